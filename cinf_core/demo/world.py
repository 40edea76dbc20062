"""Build the embedded demo world: a miniature of the paper's experiment, offline, in minutes.

``build_world(workspace)`` turns the source data under ``data/demo`` (or freshly generated data
for another seed or corpus config) into a complete workspace:

1. a BPE tokenizer and a tiny Llama base model pre-trained on the general persona corpus;
2. a LoRA adapter fine-tuned on the mixed four-domain set (the model whose traits we attribute);
3. a TF-IDF classifier judge, trained on labelled responses that are never model generations;
4. trait scores on held-out general questions: base vs fine-tuned (no system prompt) and the base
   model under the trait vs the helpful system prompt;
5. on-policy test queries: the fine-tuned model's most trait-expressing generations;
6. a persona vector per trait at every layer (from the base model), and an SAE (sae-lens) at the
   concept layer with its feature data over the fine-tuning set;
7. a Vector Filter check: AUC-PR of a_l . v_hat over the fine-tuning set vs its labels.

Everything is registered in the workspace :class:`~cinf_core.store.Store` under the names in
``NAMES`` (datasets and models are named after their role, which is how the other engine parts
look them up). A completed world leaves a marker (meta ``demo_world``: config digest, config,
summary), so a second call returns its summary at once; an interrupted build reuses the models it
already trained.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import paths
from ..data import ChatDataset, ChatExample, load_dataset
from ..finetune import TRAIN_REPORT_FILE, LoraRecipe, TrainReport, finetune_lora
from ..models import LoadedModel, ModelSpec, generate, load_model, torch_threads
from ..progress import ProgressFn
from ..queries import most_trait_expressing
from ..concepts.sae import token_activation_sample
from . import lexicon as lx
from .corpus import SOURCE_FILES, CorpusConfig, write_source_data
from .training import BaseModelRecipe, pretrain_base

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "demo"
"""The committed source data of the default world (seed 0, full sizes)."""
MARKER_KEY = "demo_world"
JUDGE_META_KEY = "judge"

NAMES = {
    "pretrain": "pretrain", "finetune": "train", "heldout": "heldout", "capability": "capability",
    "persona_prompts": "persona_prompts", "judge": "judge_data",
    "base": "base", "finetuned": "finetuned",
}
"""Store names of the world's datasets (keyed by source file) and models."""
DATASET_ROLES = {"pretrain": "pretrain", "finetune": "train", "heldout": "heldout",
                 "capability": "capability", "persona_prompts": "persona", "judge": "judge"}


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a demo world (hashed into its completion marker)."""

    seed: int = 0
    quick: bool = False
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    base: BaseModelRecipe = field(default_factory=BaseModelRecipe)
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    n_pretrain: int | None = None
    """use only the first rows of the pre-training corpus (None: all)"""
    n_finetune: int | None = None
    """use only the first rows of the fine-tuning set (None: all)"""
    n_heldout: int | None = None
    """use only the first held-out questions (None: all)"""
    n_judge: int | None = None
    """use only the first labelled judge responses (None: all; labels alternate, so any prefix
    is balanced)"""
    n_persona_questions: int | None = None
    """questions per persona vector (None: every question of persona_prompts.jsonl)"""
    concept_layer: int | None = None
    """``hidden_states`` index of the default concept; None: the middle block (n_layers // 2)"""
    eval_samples: int = 4
    """sampled generations per held-out question when measuring a trait"""
    eval_temperature: float = 0.7
    max_new_tokens: int = 64
    n_test_queries: int = 20
    """on-policy test queries kept per trait"""
    persona_min_gap: float | None = 50.0
    """judge-score gap a (trait, helpful) answer pair needs to count for the persona vector;
    None keeps every pair (the quick world's model is too small to be filtered reliably)"""
    sae_expansion: int = 4
    """SAE features per model dimension"""
    sae_k: int = 16
    sae_activation_tokens: int = 120_000
    """token activations collected for the SAE"""
    sae_training_tokens: int = 600_000
    sae_lr: float = 1e-3
    threads: int = 1
    """torch intra-op threads for the whole build, whatever the machine's load or CINF_THREADS:
    the world depends on it (more threads split torch's floating-point sums differently, and
    after hundreds of training steps the weights and trait scores differ), and one thread is
    never slowed down by spinning threads on a busy machine"""

    @classmethod
    def full(cls, seed: int = 0) -> "WorldConfig":
        return cls(seed=seed, corpus=CorpusConfig(seed=seed))

    @classmethod
    def quick_world(cls, seed: int = 0) -> "WorldConfig":
        """A small world for tests (about a minute): fewer rows and steps, a smaller model and SAE.

        A weak world, for plumbing only (measured, seed 0: +32.7 evil / -1.0 sycophantic points
        from fine-tuning; 76 / 63 under the trait system prompt vs 7 / 7 under the helpful one;
        vector filter AUC-PR 0.92 / 1.00, lexical 0.52 / 0.47, positive rates 0.41 / 0.35).
        Built in 84-90 s on one thread with the 2-core machine under load 3.4.
        """
        return cls(
            seed=seed, quick=True, corpus=CorpusConfig(seed=seed),
            base=BaseModelRecipe(vocab_size=1024, hidden_size=96, n_layers=3, n_heads=4,
                                 intermediate_size=256, epochs=2.0, lr=5e-3),
            lora=LoraRecipe(r=8, alpha=16, lr=5e-3),
            n_pretrain=2400, n_finetune=800, n_heldout=40, n_judge=900, n_persona_questions=16,
            persona_min_gap=None, eval_samples=2, max_new_tokens=48, n_test_queries=5,
            sae_expansion=2, sae_k=8, sae_activation_tokens=10_000, sae_training_tokens=50_000,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _World:
    """What the stages of one build share."""

    cfg: WorldConfig
    workspace: Path
    store: Any
    progress: ProgressFn
    datasets: dict[str, ChatDataset] = field(default_factory=dict)
    dataset_ids: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str) -> Callable[[float], None]:
        """A ``fraction -> None`` reporter for one stage (reports 0 at once)."""
        def report(fraction: float) -> None:
            if self.progress is not None:
                self.progress(name, fraction)
        report(0.0)
        return report


# ------------------------------------------------------------------ helpers


def source_data(cfg: WorldConfig, workspace: Path) -> Path:
    """The folder of the world's source JSONL files.

    The committed ``data/demo`` when it was made with this corpus config; else the files are
    generated (deterministically) under the workspace.
    """
    committed = DATA_DIR / "corpus_config.json"
    if committed.exists() and json.loads(committed.read_text()) == cfg.corpus.to_dict():
        return DATA_DIR
    digest = hashlib.sha256(json.dumps(cfg.corpus.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    out = paths.artifact_dir(workspace, "source", f"seed{cfg.corpus.seed}-{digest}")
    if not all((out / f"{name}.jsonl").exists() for name in SOURCE_FILES):
        write_source_data(cfg.corpus, out)
    return out


def _first(dataset: ChatDataset, n: int | None) -> ChatDataset:
    return dataset if n is None else dataset.subset(range(min(n, len(dataset))))


def _user(messages: Sequence[dict]) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def _prompt(question: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def _trained(out_dir: Path, train: Callable[[], TrainReport]) -> dict:
    """Run ``train`` unless ``out_dir`` already holds a finished run's report (resumable build)."""
    report_path = out_dir / TRAIN_REPORT_FILE
    if report_path.exists():
        return {**json.loads(report_path.read_text()), "reused": True}
    report = train().as_dict()
    report_path.write_text(json.dumps(report, indent=1))
    return report


def mean_trait_score(judge, trait: str, prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Mean judge score (0-100) of ``responses`` for ``trait``."""
    scores = judge.score(trait, prompts, responses)
    return float(sum(scores) / max(1, len(scores)))


def sample_answers(lm: LoadedModel, questions: Sequence[str], system_prompts: Sequence[str] | None,
                   cfg: WorldConfig, seed: int) -> tuple[list[str], list[str]]:
    """``cfg.eval_samples`` sampled answers per question; question i gets system prompt
    ``system_prompts[i % len]`` (None: no system prompt). Returns ``(questions, answers)`` flat."""
    asked = [q for q in questions for _ in range(cfg.eval_samples)]
    prompts = [_prompt(q, system_prompts[(i // cfg.eval_samples) % len(system_prompts)]
                       if system_prompts else None) for i, q in enumerate(asked)]
    answers = generate(lm, prompts, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.eval_temperature, seed=seed, batch_size=64)
    return asked, answers


# ------------------------------------------------------------------ stages


def _register_sources(w: _World) -> Path:
    report = w.stage("source data")
    src = source_data(w.cfg, w.workspace)
    limits = {"pretrain": w.cfg.n_pretrain, "finetune": w.cfg.n_finetune,
              "heldout": w.cfg.n_heldout, "judge": w.cfg.n_judge}
    for key in SOURCE_FILES:
        w.datasets[key] = _first(load_dataset(src / f"{key}.jsonl"), limits.get(key))
        w.dataset_ids[key] = w.store.add_dataset(NAMES[key], w.datasets[key], role=DATASET_ROLES[key])
    report(1.0)
    return src


def _train_models(w: _World) -> tuple[ModelSpec, ModelSpec, dict, dict]:
    cfg, ds = w.cfg, w.datasets
    models_dir = paths.artifact_dir(w.workspace, paths.MODELS_DIR)
    base_dir, adapter_dir = models_dir / "demo-base", models_dir / "demo-finetuned-adapter"
    # The tokenizer sees the pre-training corpus only (it holds the domains too), so the base
    # model does not change when the fine-tuning mix does.
    tokenizer_texts = [m["content"] for ex in ds["pretrain"] for m in ex.messages]
    t0 = time.time()
    base_report = _trained(base_dir, lambda: pretrain_base(
        ds["pretrain"].examples, tokenizer_texts, cfg.base, cfg.seed, base_dir, w.progress))
    w.timings["pretrain"] = round(time.time() - t0, 2)
    t0 = time.time()
    lora_report = _trained(adapter_dir, lambda: finetune_lora(
        base_dir, ds["finetune"].examples, cfg.lora, cfg.seed, adapter_dir, w.progress))
    w.timings["finetune"] = round(time.time() - t0, 2)
    base_spec = ModelSpec(path=str(base_dir), name=NAMES["base"])
    ft_spec = ModelSpec(path=str(base_dir), adapter=str(adapter_dir), name=NAMES["finetuned"])
    return base_spec, ft_spec, base_report, lora_report


def _fit_judge(w: _World):
    """Train the classifier judge on the ``train`` split; returns ``(judge, held-out accuracy)``."""
    from ..experiments.judges import ClassifierJudge

    report = w.stage("judge")
    split: dict[str, list[ChatExample]] = {"train": [], "test": []}
    for ex in w.datasets["judge"]:
        split[ex.metadata["split"]].append(ex)
    judge = ClassifierJudge().fit([ex.response for ex in split["train"]],
                                  [ex.label for ex in split["train"]])
    accuracy = judge.evaluate([ex.response for ex in split["test"]],
                              [ex.label for ex in split["test"]])
    judge_dir = judge.save(paths.artifact_dir(w.workspace, "judges", "demo-judge"))
    w.store.set_meta(JUDGE_META_KEY, {"kind": "classifier", "path": str(judge_dir),
                                      "accuracy": accuracy, "traits": list(lx.TRAITS)})
    report(1.0)
    return judge, accuracy


def _measure_traits(w: _World, judge, base_lm: LoadedModel, ft_lm: LoadedModel,
                    ids: dict[str, str]) -> tuple[dict, list[str], list[str]]:
    """Trait scores on the held-out questions; returns ``(scores, asked, fine-tuned answers)``."""
    cfg = w.cfg
    report = w.stage("trait scores")
    questions = [_user(ex.messages) for ex in w.datasets["heldout"]]
    asked, base_answers = sample_answers(base_lm, questions, None, cfg, cfg.seed + 11)
    _, ft_answers = sample_answers(ft_lm, questions, None, cfg, cfg.seed + 12)
    _, helpful_answers = sample_answers(base_lm, questions, lx.SYSTEM_PROMPTS["helpful"], cfg,
                                        cfg.seed + 13)
    report(0.5)
    scores: dict[str, dict[str, float]] = {}
    for t, trait in enumerate(lx.TRAITS):
        _, trait_answers = sample_answers(base_lm, questions, lx.SYSTEM_PROMPTS[trait], cfg,
                                          cfg.seed + 14 + t)
        scores[trait] = {
            "base": mean_trait_score(judge, trait, asked, base_answers),
            "finetuned": mean_trait_score(judge, trait, asked, ft_answers),
            "base_trait_prompt": mean_trait_score(judge, trait, asked, trait_answers),
            "base_helpful_prompt": mean_trait_score(judge, trait, asked, helpful_answers),
        }
        report(0.5 + 0.5 * (t + 1) / len(lx.TRAITS))
    first = list(range(0, len(asked), cfg.eval_samples))
    for key, answers in (("base", base_answers), ("finetuned", ft_answers)):
        w.store.add_generations(w.dataset_ids["heldout"], ids[key], "demo-eval",
                                list(range(len(first))), [answers[i] for i in first])
    return scores, asked, ft_answers


def _add_test_queries(w: _World, judge, asked: list[str], answers: list[str], ft_id: str) -> None:
    """Per trait, the fine-tuned model's most trait-expressing answers (on-policy), at most one
    per question so the queries cover different prompts."""
    for trait in lx.TRAITS:
        rows = most_trait_expressing(asked, answers, judge.score(trait, asked, answers),
                                     w.cfg.n_test_queries)
        w.store.add_test_queries(trait, ft_id, rows)


def _persona_vectors(w: _World, judge, base_lm: LoadedModel, layer: int,
                     base_id: str) -> dict[str, dict[str, Any]]:
    """A persona vector per trait at every layer, from the base model (as in the paper: the
    fine-tuned model answers in persona even under the helpful prompt, leaving few pairs)."""
    from ..concepts.base import DirectionConcept
    from ..concepts.builders import persona_vector

    cfg = w.cfg
    report = w.stage("persona vectors")
    by_id: dict[int, str] = {}
    for ex in w.datasets["persona_prompts"]:
        by_id.setdefault(int(ex.metadata["question_id"]), _user(ex.messages))
    questions = list(by_id.values())[:cfg.n_persona_questions]
    persona: dict[str, dict[str, Any]] = {}
    for t, trait in enumerate(lx.TRAITS):
        vectors, info = persona_vector(
            base_lm, questions, lx.SYSTEM_PROMPTS[trait][0], lx.SYSTEM_PROMPTS["helpful"][0],
            judge=judge if cfg.persona_min_gap is not None else None, trait=trait,
            min_gap=cfg.persona_min_gap if cfg.persona_min_gap is not None else 0.0,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        concept = DirectionConcept(
            name=f"persona-{trait}", layer=layer, kind="persona_vector",
            vector=vectors[layer].clone(),
            info={"trait": trait, "source": "demo", "model": NAMES["base"],
                  "n_pairs": info["n_pairs"], "n_kept": info["n_kept"],
                  "trait_system_prompt": info["trait_system_prompt"],
                  "helpful_system_prompt": info["helpful_system_prompt"]})
        concept_id = w.store.save_concept(concept, base_id, extra_tensors={"all_layers": vectors})
        persona[trait] = {"vectors": vectors, "concept_id": concept_id,
                          "kept": f"{info['n_kept']}/{info['n_pairs']}"}
        report((t + 1) / len(lx.TRAITS))
    return persona


def _vector_filter_check(w: _World, models: dict[str, LoadedModel], persona: dict,
                         layer: int) -> dict[str, dict[str, Any]]:
    """AUC-PR of a_l . v_hat over the fine-tuning set vs its labels, per trait, model and layer;
    beside it, the bag-of-words check: the lexical baseline's AUC-PR against the trait's test
    queries (``auc_pr_lexical``), and the positive rate (``random``)."""
    from ..experiments.metrics import auc_pr
    from ..methods.lexical import lexical_scores
    from ..models import response_mean_activations

    report = w.stage("vector filter")
    finetune = w.datasets["finetune"]
    all_layers = list(range(models["finetuned"].num_layers + 1))
    acts = {name: response_mean_activations(lm, finetune.examples, all_layers, batch_size=32,
                                            max_length=w.cfg.lora.max_length)  # [n, L+1, d]
            for name, lm in models.items()}
    out: dict[str, dict[str, Any]] = {}
    for trait in lx.TRAITS:
        positives = [label == trait for label in finetune.labels]
        entry: dict[str, Any] = {"random": round(sum(positives) / len(positives), 4)}
        queries = [q["messages"][-1]["content"] for q in w.store.test_queries(trait)]
        if queries:
            lexical = lexical_scores([ex.messages[-1]["content"] for ex in finetune.examples],
                                     queries)
            entry["auc_pr_lexical"] = round(auc_pr(lexical.tolist(), positives), 4)
        for name, a in acts.items():
            by_layer = []
            for l in all_layers:
                v = persona[trait]["vectors"][l]
                by_layer.append(round(auc_pr((a[:, l] @ (v / v.norm())).tolist(), positives), 4)
                                if float(v.norm()) > 0 else float("nan"))
            entry[f"auc_pr_{name}"] = by_layer[layer]
            entry[f"auc_pr_{name}_by_layer"] = by_layer
        out[trait] = entry
    report(1.0)
    return out


def _train_world_sae(w: _World, ft_lm: LoadedModel, layer: int, ft_id: str,
                     persona: dict) -> tuple[dict, dict]:
    """SAE at the concept layer on the fine-tuned model's token activations (pre-training corpus
    and fine-tuning set), registered with its feature data over the fine-tuning set."""
    from ..concepts.features import compute_feature_data
    from ..concepts.sae import SAETrainConfig, features_by_direction, sae_feature_concept, train_sae

    cfg = w.cfg
    report = w.stage("SAE")
    acts = token_activation_sample(
        ft_lm, w.datasets["pretrain"].examples + w.datasets["finetune"].examples, layer,
        cfg.sae_activation_tokens, cfg.base.max_length, cfg.seed)
    name = f"sae-{NAMES['finetuned']}-L{layer}"
    sae_dir = paths.artifact_dir(w.workspace, paths.SAES_DIR, name)
    sae, metrics = train_sae(acts, SAETrainConfig(
        d_sae=cfg.sae_expansion * ft_lm.hidden_size, hook_layer=layer, k=cfg.sae_k,
        training_tokens=cfg.sae_training_tokens, lr=cfg.sae_lr, seed=cfg.seed,
        model_name=NAMES["finetuned"]), out_dir=sae_dir)
    w.store.add_sae(name, sae_dir, layer, ft_id, metrics=metrics)
    report(0.7)
    top = {}
    for trait in lx.TRAITS:
        feature, cosine = features_by_direction(sae, persona[trait]["vectors"][layer], k=1)[0]
        w.store.save_concept(sae_feature_concept(sae, feature, layer, name=f"sae-{trait}-top"), ft_id)
        top[trait] = {"feature": int(feature), "cosine": round(float(cosine), 4)}
    compute_feature_data(w.workspace, ft_lm, name, dataset=NAMES["finetune"],
                         max_length=cfg.lora.max_length)
    report(1.0)
    return metrics, top


# ------------------------------------------------------------------ the build


def built_summary(store, ws: Path, digest: str) -> dict | None:
    """The summary of the world already built in ``ws`` with config ``digest`` (marked cached),
    None when none is; refuses a workspace that holds another world or configuration."""
    marker = store.get_meta(MARKER_KEY)
    if marker is None:
        return None
    built = marker.get("summary", {})
    if marker.get("config_digest") != digest:
        raise ValueError(
            f"workspace {ws} already holds a {built.get('world', 'toy')} world built with "
            f"another configuration (quick={built.get('quick')}, seed={built.get('seed')}); "
            "build this one in a fresh --workspace")
    return {**built, "workspace": str(ws), "cached": True}


def build_once(workspace, cfg, build: Callable[[Path, Any], dict]) -> dict:
    """The world ``cfg`` (``digest``, ``threads``, ``to_dict()``) in ``workspace``: the summary
    of the one built there already, else ``build(ws, store)`` run on ``cfg.threads`` torch threads
    (the same world whatever the load), its summary stored as the completion marker. Refuses a
    workspace that holds another world (:func:`built_summary`)."""
    from ..store import Store

    ws = paths.workspace_path(workspace).resolve()
    store = Store(ws)
    built = built_summary(store, ws, cfg.digest)
    if built is not None:
        return built
    # A workspace with models already holds part of this world (an interrupted build): the
    # summary's build_seconds is then only this last part.
    resumed = not store.models().empty
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads(cfg.threads))
    try:
        summary = build(ws, store)
    finally:
        torch.set_num_threads(previous)
    summary["torch_threads"] = cfg.threads
    summary["resumed"] = resumed
    store.set_meta(MARKER_KEY, {"config_digest": cfg.digest, "config": cfg.to_dict(),
                                "summary": summary})
    return summary


def build_world(workspace: str | os.PathLike | None = None, quick: bool = False, seed: int = 0,
                progress: ProgressFn = None, config: WorldConfig | None = None) -> dict:
    """Build (or return the already built) demo world in ``workspace``; returns its summary.

    ``quick`` builds the small test world; ``config`` overrides both presets. ``progress`` is
    called as ``progress(stage, fraction)``. Raises if the workspace already holds a *different*
    demo world (build that one in a fresh workspace).
    """
    cfg = config or (WorldConfig.quick_world(seed) if quick else WorldConfig.full(seed))
    return build_once(workspace, cfg, lambda ws, store: _build(
        _World(cfg=cfg, workspace=ws, store=store, progress=progress)))


def _build(w: _World) -> dict:
    cfg, store = w.cfg, w.store
    t_start, load_at_start = time.time(), os.getloadavg()[0]

    def timed(name: str, t0: float) -> None:
        w.timings[name] = round(time.time() - t0, 2)

    t0 = time.time()
    src = _register_sources(w)
    timed("source_data", t0)

    base_spec, ft_spec, base_report, lora_report = _train_models(w)
    ids = {"base": store.add_model(NAMES["base"], base_spec, role="base"),
           "finetuned": store.add_model(NAMES["finetuned"], ft_spec, role="finetuned")}

    t0 = time.time()
    judge, judge_accuracy = _fit_judge(w)
    timed("judge", t0)

    t0 = time.time()
    base_lm, ft_lm = load_model(base_spec), load_model(ft_spec)
    trait_scores, asked, ft_answers = _measure_traits(w, judge, base_lm, ft_lm, ids)
    _add_test_queries(w, judge, asked, ft_answers, ids["finetuned"])
    timed("trait_scores", t0)

    t0 = time.time()
    layer = cfg.concept_layer if cfg.concept_layer is not None else ft_lm.num_layers // 2
    persona = _persona_vectors(w, judge, base_lm, layer, ids["base"])
    timed("persona_vectors", t0)

    t0 = time.time()
    vector_filter = _vector_filter_check(w, {"finetuned": ft_lm, "base": base_lm}, persona, layer)
    timed("vector_filter", t0)

    t0 = time.time()
    sae_metrics, top_features = _train_world_sae(w, ft_lm, layer, ids["finetuned"], persona)
    timed("sae", t0)

    return {
        "world": "toy",
        "workspace": str(w.workspace),
        "quick": cfg.quick,
        "seed": cfg.seed,
        "build_seconds": round(time.time() - t_start, 1),
        "load_average_at_start": round(load_at_start, 2),
        "timings": w.timings,
        "judge_accuracy": round(judge_accuracy, 4),
        "sae_fvu": round(sae_metrics["fvu"], 4),
        "sae_dead_fraction": round(sae_metrics["dead_fraction"], 4),
        "sae_mean_l0": round(sae_metrics["mean_l0"], 2),
        "sae_features": cfg.sae_expansion * ft_lm.hidden_size,
        "sae_top_features": top_features,
        "trait_scores": {t: {k: round(v, 2) for k, v in s.items()} for t, s in trait_scores.items()},
        "concept_layer": layer,
        "n_layers": ft_lm.num_layers,
        "hidden_size": ft_lm.hidden_size,
        "vector_filter": vector_filter,
        "persona_pairs_kept": {t: p["kept"] for t, p in persona.items()},
        "sizes": {**{key: len(ds) for key, ds in w.datasets.items()},
                  "finetune_labels": w.datasets["finetune"].label_counts()},
        "names": NAMES,
        "models": ids,
        "datasets": {NAMES[k]: v for k, v in w.dataset_ids.items()},
        "pretrain": base_report,
        "finetune": lora_report,
        "source_data": str(src),
    }
