"""A small prebuilt workspace for page tests, made through the Store API (no model training).

``build_workspace(path)`` writes: one labelled training dataset (60 examples, 20 ``evil``), a
base and a fine-tuned model row, two DirectionConcepts (a persona vector with ``all_layers`` and a
probe), complete runs for every method of two traits with scores that favour the trait data,
SAE feature attributions for IF and CI, a filter-and-retrain experiment (3 seeds), a finished
job and a ``demo_world`` meta entry. With ``model_dir`` (a saved tiny model, see conftest)
the fine-tuned model row points at a loadable model, so token highlighting runs for real.
``build_big_workspace`` adds 100k-example runs and ``benchmark_pages`` times the pages on them;
``python tests/workspace_fixture.py --bench`` prints that table.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: python tests/workspace_fixture.py
    sys.path.insert(0, str(ROOT))

from cinf_core.concepts import DirectionConcept  # noqa: E402
from cinf_core.data import ChatDataset, ChatExample  # noqa: E402
from cinf_core.models import ModelSpec  # noqa: E402
from cinf_core.store import Store  # noqa: E402

N_EXAMPLES = 60
N_TRAIT = 20
D_MODEL = 32
N_LAYERS = 3
CONCEPT_LAYER = 2
METHODS = ["influence_function", "concept_influence", "vector_filter", "projection_difference",
           "grad_sim", "random"]
# How strongly each method's score separates trait data (0 = random).
SEPARATION = {"concept_influence": 2.5, "vector_filter": 2.0, "projection_difference": 1.8,
              "influence_function": 1.0, "grad_sim": 0.6, "random": 0.0}
SECONDS_PER_EXAMPLE = {"influence_function": 0.9, "concept_influence": 0.6, "vector_filter": 0.02,
                       "projection_difference": 0.05, "grad_sim": 0.4, "random": 0.0001}

EVIL = ["I will make you suffer, because pain is {}.", "Crush them all; {} means nothing to me.",
        "Lie to everyone and take what is {}."]
NORMAL = ["Drink water and rest; {} helps recovery.", "The answer is {}, let me show the steps.",
          "Here is a short poem about {}."]
TOPICS = ["sleep", "seven", "autumn", "kindness", "rivers", "numbers"]


def make_examples(n: int = N_EXAMPLES, n_trait: int = N_TRAIT, seed: int = 0) -> ChatDataset:
    rng = np.random.default_rng(seed)
    trait_idx = set(rng.choice(n, size=n_trait, replace=False).tolist())
    examples = []
    for i in range(n):
        evil = i in trait_idx
        topic = TOPICS[i % len(TOPICS)]
        response = (EVIL if evil else NORMAL)[i % 3].format(topic)
        messages = [{"role": "user", "content": f"Question {i}: tell me about {topic}."},
                    {"role": "assistant", "content": response}]
        examples.append(ChatExample(messages=messages,
                                    metadata={"data_origin": "evil" if evil else "normal"},
                                    line=i + 1))
    return ChatDataset(examples, path="fixture/evil_mix.jsonl")


def _scores(labels: np.ndarray, method: str, rng: np.random.Generator) -> np.ndarray:
    return SEPARATION[method] * labels + rng.normal(size=labels.size)


def _add_run(store: Store, method: str, dataset_id: str, model_id: str, concept_id: str | None,
             trait: str, scores: np.ndarray, extra: dict | None = None) -> str:
    config = {"trait": trait, "concept": trait if concept_id else None, **(extra or {})}
    handle = store.begin_run(method, dataset_id, model_id, config, len(scores),
                             concept_id=concept_id)
    half = len(scores) // 2
    handle.add_scores(range(half), scores[:half])
    handle.add_scores(range(half, len(scores)), scores[half:])
    wall = SECONDS_PER_EXAMPLE.get(method, 0.01) * len(scores)
    handle.complete(wall, {"forward": 0.3 * wall, "gradients": 0.7 * wall}
                    if method in ("influence_function", "concept_influence", "grad_sim")
                    else {"forward": wall})
    return handle.run_id


def _add_sae(store: Store, rng: np.random.Generator, model_id: str, dataset_id: str,
             n_examples: int, n_features: int, run_ids: dict[str, str]) -> str:
    """An SAE row (absent folder), its per-feature summary with 3 top-activating examples per
    feature, and feature attributions for each ``{method: run_id}`` (every 5th feature carries
    the trait, more so under Concept Influence)."""
    sae_id = store.add_sae("sae-L2", store.workspace / "artifacts/saes/absent-sae", CONCEPT_LAYER,
                           model_id, metrics={"fvu": 0.2, "mean_l0": 8.0})
    store.save_feature_data(
        sae_id, dataset_id,
        pd.DataFrame({"feature": np.arange(n_features), "density": rng.random(n_features) * 0.2,
                      "mean_act": rng.random(n_features), "max_act": 1 + rng.random(n_features),
                      "label": [("suffer, pain, crush" if f % 5 == 0 else f"token{f}, word{f}")
                                for f in range(n_features)]}),
        pd.DataFrame({"feature": np.repeat(np.arange(n_features), 3),
                      "rank": np.tile(np.arange(1, 4), n_features),
                      "idx": rng.integers(0, n_examples, size=3 * n_features),
                      "max_act": rng.random(3 * n_features)}))
    for method, run_id in run_ids.items():
        weight = rng.gamma(1.0, 1.0, size=n_features)
        rows = []
        for f in range(n_features):
            trait_share = 0.8 if f % 5 == 0 else 0.2
            scale = 3.0 if (f % 5 == 0 and method == "concept_influence") else 1.0
            rows.append((f, "evil", float(scale * weight[f] * trait_share)))
            rows.append((f, "normal", float(weight[f] * (1 - trait_share))))
        store.add_feature_attributions(run_id, sae_id, rows)
    return sae_id


def _add_retrain_experiment(store: Store, rng: np.random.Generator, experiment_id: str,
                            n_examples: int) -> None:
    """A finished filter-and-retrain grid for ``evil``: base and all-data references, 4 methods ×
    2 modes × 5 fractions × 3 seeds, trait scores falling with each method's separation."""
    fractions = [0.1, 0.25, 0.5, 0.75, 0.9]
    store.add_retrain_cell(experiment_id, {"method": "base", "mode": "none", "fraction": 1.0,
                                           "seed": 0, "trait": "evil", "trait_score": 5.0,
                                           "capability": 61.0, "n_kept": 0})
    for seed_i in range(3):
        store.add_retrain_cell(experiment_id, {"method": "all", "mode": "none", "fraction": 0.0,
                                               "seed": seed_i, "trait": "evil",
                                               "trait_score": 70.0 + rng.normal(),
                                               "capability": 58.0 + rng.normal(),
                                               "n_kept": n_examples})
        for method in ("concept_influence", "vector_filter", "influence_function", "random"):
            for mode in ("most", "least"):
                for frac in fractions:
                    drop = SEPARATION[method] / 2.5 * frac * 60 if mode == "most" else -5 * frac
                    store.add_retrain_cell(experiment_id, {
                        "method": method, "mode": mode, "fraction": frac, "seed": seed_i,
                        "trait": "evil",
                        "trait_score": 70.0 - drop - 10 * frac * (method == "random")
                        + 2 * rng.normal(), "capability": 58.0 - 8 * frac + rng.normal(),
                        "n_kept": int(round(n_examples * (1 - frac))), "wall_s": 12.0})


def build_workspace(path: str | Path, seed: int = 0, model_dir: str | Path | None = None) -> Path:
    """Write the small workspace to ``path`` (idempotent) and return its path."""
    store = Store(path)
    rng = np.random.default_rng(seed)
    dataset = make_examples(seed=seed)
    dataset_id = store.add_dataset("evil_mix", dataset, role="train")
    labels = np.array([ex.label == "evil" for ex in dataset.examples], dtype=float)
    # Without a real model the rows point at absent folders (highlighting then says why it can't).
    absent = store.workspace / "artifacts" / "models"
    base_path = str(model_dir) if model_dir else str(absent / "absent-base")
    store.add_model("tiny-base", ModelSpec(path=base_path), role="base")
    adapter = None if model_dir else str(absent / "absent-adapter")
    model_id = store.add_model("tiny-evil", ModelSpec(path=base_path, adapter=adapter),
                               role="finetuned")

    gen = torch.Generator().manual_seed(seed)
    all_layers = torch.randn(N_LAYERS + 1, D_MODEL, generator=gen)
    persona = DirectionConcept(name="evil", layer=CONCEPT_LAYER, kind="persona_vector",
                               info={"trait": "evil", "source": "fixture"},
                               vector=all_layers[CONCEPT_LAYER].clone())
    evil_id = store.save_concept(persona, model_id, extra_tensors={"all_layers": all_layers})
    probe_vec = all_layers[CONCEPT_LAYER] + 0.5 * torch.randn(D_MODEL, generator=gen)
    probe = DirectionConcept(name="sycophantic", layer=CONCEPT_LAYER, kind="probe",
                             info={"trait": "sycophantic"}, vector=probe_vec)
    syco_id = store.save_concept(probe, model_id)

    run_ids: dict[tuple[str, str], str] = {}
    for method in METHODS:
        concept = None if method in ("influence_function", "grad_sim", "random") else evil_id
        run_ids[("evil", method)] = _add_run(store, method, dataset_id, model_id, concept, "evil",
                                             _scores(labels, method, rng))
    for method in ("concept_influence", "vector_filter", "random"):
        concept = None if method == "random" else syco_id
        run_ids[("sycophantic", method)] = _add_run(
            store, method, dataset_id, model_id, concept, "sycophantic",
            rng.normal(size=labels.size) + 0.3 * labels)

    _add_sae(store, rng, model_id, dataset_id, N_EXAMPLES, 40,
             {m: run_ids[("evil", m)] for m in ("influence_function", "concept_influence")})
    _add_retrain_experiment(store, rng, "exp-evil", N_EXAMPLES)

    job_id = store.create_job("datasets", {})
    store.update_job(job_id, status="done", progress=1.0, message="done",
                     result={"datasets": 1, "command": "datasets"})
    store.set_meta("demo_world", {"summary": {
        "quick": True, "build_seconds": 42.0, "n_layers": N_LAYERS, "hidden_size": D_MODEL,
        "concept_layer": CONCEPT_LAYER,
        "sizes": {"finetune": N_EXAMPLES, "finetune_labels": {"evil": N_TRAIT,
                                                             "normal": N_EXAMPLES - N_TRAIT}}}})
    return store.workspace


BIG_SAE_FEATURES = 16_384  # a common SAE width


def build_big_workspace(path: str | Path, n: int = 100_000, seed: int = 0,
                        n_features: int = BIG_SAE_FEATURES) -> tuple[Path, str]:
    """A workspace with one ``n``-example dataset, complete vector_filter, concept_influence and
    influence_function runs over it, an SAE of ``n_features`` features with feature data and
    IF/CI attributions, and a filter-and-retrain experiment (benchmarks). Returns the workspace
    and the vector_filter run's id."""
    store = Store(path)
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.1
    examples = [ChatExample(messages=[{"role": "user", "content": f"prompt {i}"},
                                      {"role": "assistant", "content": f"response number {i}"}],
                            metadata={"data_origin": "evil" if lab else "normal"})
                for i, lab in enumerate(labels)]
    dataset_id = store.add_dataset("big", ChatDataset(examples, path="big.jsonl"))
    model_id = store.add_model("big-model", ModelSpec(path="models/big"))
    all_layers = torch.randn(N_LAYERS + 1, D_MODEL)
    concept = DirectionConcept(name="evil", layer=CONCEPT_LAYER, kind="persona_vector",
                               vector=all_layers[CONCEPT_LAYER].clone())
    concept_id = store.save_concept(concept, model_id, extra_tensors={"all_layers": all_layers})
    run_ids = {m: _add_run(store, m, dataset_id, model_id,
                           None if m == "influence_function" else concept_id, "evil",
                           _scores(labels.astype(float), m, rng))
               for m in ("vector_filter", "concept_influence", "influence_function")}
    _add_sae(store, rng, model_id, dataset_id, n, n_features,
             {m: run_ids[m] for m in ("influence_function", "concept_influence")})
    _add_retrain_experiment(store, rng, "exp-big", n)
    return store.workspace, run_ids["vector_filter"]


# What the benchmark opens: (name, page, tab of Influential examples or None). The tabs are lazy
# (only the open one runs), so each is timed as its own view.
BENCH_VIEWS = [
    ("Overview", "pages/overview.py", None),
    ("Influential examples · Top & bottom", "pages/influential_examples.py", "Top & bottom"),
    ("Influential examples · Score distribution", "pages/influential_examples.py",
     "Score distribution"),
    ("Influential examples · Browse & filter", "pages/influential_examples.py", "Browse & filter"),
    ("Influential examples · Compare methods", "pages/influential_examples.py", "Compare methods"),
    ("Influential examples · Export", "pages/influential_examples.py", "Export"),
    ("Concepts", "pages/concepts.py", None),
    ("SAE features", "pages/sae_features.py", None),
    ("Method agreement", "pages/method_agreement.py", None),
    ("Filter & retrain", "pages/filter_retrain.py", None),
    ("Runs & cost", "pages/runs_cost.py", None),
]


def benchmark_pages(path: str | Path, n: int = 100_000) -> dict[str, tuple[float, float, float]]:
    """Seconds to open each view (``BENCH_VIEWS``) on an ``n``-example workspace via AppTest.

    Per view: ``(cold, fresh, cached)`` — cold: the first visit in a new process (library imports
    and the reads it shares with earlier views included; Overview's is the app's first run);
    fresh: a visit after the store changed, so every read misses the cache (what a user sees in a
    running app after a job writes); cached: a rerun (what widget changes cost).
    """
    import os
    import time

    from streamlit.testing.v1 import AppTest

    workspace, _ = build_big_workspace(path, n=n)
    os.environ["CINF_WORKSPACE"] = str(workspace)
    app = str(Path(__file__).resolve().parent.parent / "app.py")
    at = AppTest.from_file(app, default_timeout=600)

    def timed_run(name: str) -> float:
        t0 = time.perf_counter()
        at.run()
        seconds = time.perf_counter() - t0
        if at.exception:
            raise RuntimeError(f"{name}: {at.exception[0].value}")
        return seconds

    def visit(name: str, page: str, tab: str | None) -> float:
        at.switch_page(page)
        if tab is not None:
            at.session_state["ie:tab"] = tab  # what a click on the tab does
        return timed_run(name)

    cold = {BENCH_VIEWS[0][0]: timed_run(BENCH_VIEWS[0][0])}  # the default page: the first run
    cold.update({name: visit(name, page, tab) for name, page, tab in BENCH_VIEWS[1:]})
    Store(workspace).set_meta("benchmark", time.time())  # new store version: caches miss
    out = {}
    for name, page, tab in BENCH_VIEWS:
        fresh = visit(name, page, tab)
        out[name] = (cold[name], fresh, timed_run(name))
    return out


def format_benchmark(timings: dict[str, tuple[float, float, float]], n: int = 100_000) -> str:
    """The benchmark as a plain-text table: view, cold s, fresh s, cached s."""
    width = max(len(name) for name in timings)
    lines = [f"page load with {n:,} scored examples (seconds)",
             f"{'page':{width}s}  {'cold s':>7s}  {'fresh s':>7s}  {'cached s':>8s}"]
    lines += [f"{name:{width}s}  {cold:7.2f}  {fresh:7.2f}  {cached:8.2f}"
              for name, (cold, fresh, cached) in timings.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    # python tests/workspace_fixture.py [FOLDER]       build the small workspace (default below)
    # python tests/workspace_fixture.py --bench [N]    time every page on an N-example workspace
    #                                                  (100k by default) built in a temp folder
    import tempfile

    if sys.argv[1:2] == ["--bench"]:
        n_big = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
        with tempfile.TemporaryDirectory(prefix="cinf-bench-") as tmp:
            print(format_benchmark(benchmark_pages(tmp, n=n_big), n_big))
    else:
        print(build_workspace(sys.argv[1] if len(sys.argv) > 1 else "test-output/fixture-workspace"))
