"""``python -m cinf_core bench``: every method end to end on one workspace, side by side.

Runs in a scratch copy of the workspace (fresh factor cache, no cached runs), so every method
pays its full cost in the same process on the same machine state: curvature fit included for
IF and CI (and shown separately), generation included for Projection Difference. Ratios are
measured in this one run; absolute times drift on a shared machine.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .. import paths
from ..data import encode_dataset
from ..store import Store
from .forward import forward_throughput_batches
from .runner import METHODS, ScoreConfig, cached_model, score

SKIP_ARTIFACTS = {paths.FACTORS_DIR, "retrain", paths.JOBS_DIR, paths.SHARDS_DIR, "features"}


def scratch_copy(workspace) -> Path:
    """A throwaway copy of the store and artifacts (without caches) to benchmark in."""
    src = paths.workspace_path(workspace)
    dst = Path(tempfile.mkdtemp(prefix="cinf-bench-"))
    shutil.copy2(src / paths.STORE_FILE, dst / paths.STORE_FILE)
    art = src / paths.ARTIFACTS_DIR
    if art.exists():
        for child in art.iterdir():
            if child.name not in SKIP_ARTIFACTS:
                target = dst / paths.ARTIFACTS_DIR / child.name
                (shutil.copytree if child.is_dir() else shutil.copy2)(child, target)
    store = Store(dst)
    for run_id in store.runs()["run_id"]:
        store._drop_run(run_id)
    store._drop_generations()  # Projection Difference pays for its generations in the bench
    return dst


def bench(workspace, trait: str | None = None, batch_size: int = 16, max_length: int = 256,
          with_kronfluence: bool = True, progress=None) -> dict:
    store = Store(workspace)
    traits = store.traits()
    if not traits:
        raise ValueError("no traits in this workspace; build the demo world first")
    trait = trait or traits[0]
    scratch = scratch_copy(workspace)
    try:
        results = {}
        for method in METHODS:
            summary = score(scratch, ScoreConfig(method=method, trait=trait, batch_size=batch_size,
                                                 max_length=max_length), progress=progress)
            t = summary["timings"]
            results[method] = {"wall_s": summary["wall_s"],
                               "examples_per_s": summary["n_examples"] / summary["wall_s"],
                               "fit_s": t.get("fit_s", 0.0), "timings": t}
        sstore = Store(scratch)
        lm = cached_model(sstore.get_model("finetuned")["spec"])
        examples = sstore.load_dataset("train").examples
        encoded, _ = encode_dataset(lm.tokenizer, examples, max_length)
        t0 = time.perf_counter()
        n = forward_throughput_batches(lm, encoded, batch_size)
        forward_s = time.perf_counter() - t0
        forward_eps = n / forward_s
        vf_eps = len(encoded) / results["vector_filter"]["timings"]["score_s"]
        ratios = {
            "if_over_vf": results["influence_function"]["wall_s"] / results["vector_filter"]["wall_s"],
            "ci_over_vf": results["concept_influence"]["wall_s"] / results["vector_filter"]["wall_s"],
            "if_over_ci": results["influence_function"]["wall_s"] / results["concept_influence"]["wall_s"],
            "vf_over_forward_limit": vf_eps / forward_eps,
        }
        kron = None
        if with_kronfluence:
            kron = _kronfluence_ratio(sstore, lm, encoded, trait, batch_size, max_length)
            if kron is not None:
                ratios["if_over_kronfluence"] = kron["cinf_s"] / kron["kronfluence_s"]
        return {"trait": trait, "n_examples": len(encoded), "methods": results,
                "forward_limit": {"wall_s": forward_s, "examples_per_s": forward_eps},
                "kronfluence": kron, "ratios": ratios}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kronfluence_ratio(store, lm, encoded, trait, batch_size, max_length) -> dict | None:
    """Our IF vs Kronfluence's on the same job (same modules, Fisher, damping, data)."""
    from ..curvature import CurvatureConfig, time_influence_vs_kronfluence
    from ..curvature.oracle import import_kronfluence

    try:
        import_kronfluence()
    except ImportError as err:
        return {"skipped": str(err)}
    queries = store.test_queries(trait, store.get_model("finetuned")["model_id"])
    q_enc, _ = encode_dataset(lm.tokenizer, [q["messages"] for q in queries], max_length)
    cfg = CurvatureConfig(batch_size=batch_size, max_length=max_length)
    return time_influence_vs_kronfluence(lm, list(encoded), q_enc, cfg)
