"""``python -m cinf_core bench``: every method end to end on one workspace, side by side.

Runs in a scratch copy of the workspace (fresh factor cache, no cached runs), so every method
pays its full cost in the same process on the same machine state: curvature fit included for
IF and CI (and shown separately), generation included for Projection Difference. Ratios are
measured in this one run; absolute times drift on a shared machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import paths
from ..curvature.ekfac import FACTORS_META_FILE, EKFACFactors
from ..data import encode_dataset
from ..models import cached_model
from ..store import Store
from .forward import forward_throughput_batches
from .registry import get_method, method_keys
from .runner import ScoreConfig, score

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
        for method in method_keys():
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
            if "skipped" not in kron:
                ratios["if_over_kronfluence"] = kron["cinf_s"] / kron["kronfluence_s"]
        return {"trait": trait, "n_examples": len(encoded), "methods": results,
                "forward_limit": {"wall_s": forward_s, "examples_per_s": forward_eps},
                "kronfluence": kron, "ratios": ratios}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kronfluence_ratio(store, lm, encoded, trait, batch_size, max_length) -> dict:
    """Our IF vs Kronfluence's on the same job (same modules, Fisher, damping, data), or
    ``{"skipped": why}`` when Kronfluence is not installed."""
    from ..curvature import CurvatureConfig
    from ..curvature.oracle import import_kronfluence

    try:
        import_kronfluence()
    except ImportError as err:
        return {"skipped": str(err)}
    queries = store.test_queries(trait, store.get_model("finetuned")["model_id"])
    q_enc, _ = encode_dataset(lm.tokenizer, [q["messages"] for q in queries], max_length)
    cfg = CurvatureConfig(batch_size=batch_size, max_length=max_length)
    return time_influence_vs_kronfluence(lm, list(encoded), q_enc, cfg)


def time_influence_vs_kronfluence(lm, train, queries, cfg) -> dict[str, float]:
    """Wall time of the same per-query IF job (fit EK-FAC + score) in cinf and in Kronfluence.

    Returns ``{"cinf_s", "kronfluence_s", "ratio"}`` (ratio = kronfluence_s / cinf_s, > 1 means
    cinf is faster) and ``"spearman"``: the mean per-query rank agreement of the two score sets.
    """
    from scipy.stats import spearmanr

    from ..curvature.ekfac import fit_factors
    from ..curvature.oracle import import_kronfluence, kronfluence_influence
    from .gradient import influence_function

    import_kronfluence()
    start = time.perf_counter()
    factors = fit_factors(lm, train, cfg)
    ours = influence_function(lm, train, queries, factors, batch_size=cfg.batch_size, per_query=True)
    cinf_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = kronfluence_influence(lm, train, queries, cfg)
    kronfluence_s = time.perf_counter() - start
    rho = float(np.mean([spearmanr(ours[:, q], theirs[q]).statistic for q in range(len(queries))]))
    return {"cinf_s": cinf_s, "kronfluence_s": kronfluence_s, "ratio": kronfluence_s / cinf_s,
            "spearman": rho}


# ---------------------------------------------------------------- scale-out (torchrun)

def bench_distributed(workspace, trait: str | None = None,
                      methods: tuple[str, ...] = ("vector_filter", "influence_function"),
                      world_sizes: tuple[int, ...] = (1, 2), batch_size: int = 16, max_length: int = 256,
                      bandwidth_gb_s: float = 100.0, predict_for: tuple[int, ...] = (1, 2, 4, 8, 16, 64),
                      dataset: str = "train", progress=None) -> dict:
    """Score each method with ``torchrun --nproc_per_node W`` for every W (one thread per rank),
    and once in one process with W_max threads; report speed-ups and a scaling model.

    Every launch runs in a fresh scratch copy (no cached runs, factors or generations), so each
    pays the whole job. The scaling model takes the one-rank run's measured parts: fixed per-job
    costs (load, encode, test-query preconditioning on rank 0), the eigendecompositions (timed
    here on the fitted factors' shapes; spread over ranks by module), and the per-example work
    (both EK-FAC passes and the scoring pass, divided over ranks), plus an all-reduce of the
    factors (ring: 2(N-1)/N x bytes / ``bandwidth_gb_s``, an assumption, stated in the output).
    """
    store = Store(workspace)
    trait = trait or (store.traits() or [None])[0]
    if trait is None:
        raise ValueError("no traits in this workspace; build the demo world first")
    methods = tuple(get_method(m).key for m in methods)  # a clear error for an unknown key
    launches = [(m, w, "ranks") for m in methods for w in world_sizes]
    launches += [(m, max(world_sizes), "threads") for m in methods if max(world_sizes) > 1]
    results: dict[str, dict] = {m: {} for m in methods}
    model_parts: dict[str, dict] = {}
    for k, (method, world, how) in enumerate(launches):
        if progress:
            progress(f"bench {method} x{world} {how}", k / len(launches))
        scratch = scratch_copy(workspace)
        try:
            run = _launch(scratch, method, trait, world, how, batch_size, max_length, dataset)
            results[method][f"{how}_{world}"] = run
            if how == "ranks" and world == 1:
                model_parts[method] = _scaling_parts(scratch, run)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    speedups = {}
    for method in methods:
        r = results[method]
        one = r["ranks_1"]["wall_s"] if "ranks_1" in r else None
        for key, run in r.items():
            if one and key != "ranks_1":
                speedups.setdefault(method, {})[f"{key}_over_1_rank"] = one / run["wall_s"]
    models = {m: _predict(parts, predict_for, bandwidth_gb_s) for m, parts in model_parts.items()}
    return {"trait": trait, "dataset": dataset, "n_examples": store.dataset(dataset)["n_examples"],
            "runs": results, "speedup": speedups, "scaling_model": models,
            "assumed_allreduce_gb_s": bandwidth_gb_s}


def _launch(scratch: Path, method: str, trait: str, world: int, how: str, batch_size: int,
            max_length: int, dataset: str) -> dict:
    """One scoring job as a user runs it; wall time of the whole command and the run's timings."""
    args = ["-m", "cinf_core", "score", "--method", method, "--trait", trait, "--workspace", str(scratch),
            "--batch-size", str(batch_size), "--max-length", str(max_length), "--dataset", dataset,
            "--no-progress"]
    threads = 1 if how == "ranks" else world
    env = dict(os.environ, CINF_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if how == "ranks":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(world), *args]
    else:
        cmd = [sys.executable, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    info = Store(scratch).run(summary["run_id"])
    return {"wall_s": wall, "run_wall_s": info["wall_s"], "world_size": world, "threads_per_rank": threads,
            "timings": info["timings"]}


def _scaling_parts(scratch: Path, run: dict) -> dict:
    """The one-rank run split into fixed, eigendecomposition, per-example and all-reduce parts."""
    timings = run["timings"]
    ranks = timings.get("ranks") or [timings]
    t = ranks[0]
    eigh_s, allreduce_bytes, n_matrices = 0.0, 0, 0
    factors_dir = scratch / paths.ARTIFACTS_DIR / paths.FACTORS_DIR
    if factors_dir.exists():
        for meta in factors_dir.rglob(FACTORS_META_FILE):
            for f in EKFACFactors.load(meta.parent).modules.values():
                for dim in (f.eigvecs_a.shape[0], f.eigvecs_s.shape[0]):
                    m = torch.randn(dim, dim, dtype=torch.float64)
                    t0 = time.perf_counter()
                    torch.linalg.eigh(m @ m.T)
                    eigh_s += time.perf_counter() - t0
                    allreduce_bytes += 4 * dim * dim
                    n_matrices += 1
                allreduce_bytes += 4 * f.eigvals.numel()
    fit_s, score_s = float(t.get("fit_s", 0.0)), float(t.get("score_s", 0.0))
    fixed = float(t.get("load_s", 0.0) + t.get("encode_s", 0.0) + t.get("queries_s", 0.0))
    return {
        "fixed_s": fixed, "eigh_s": eigh_s, "n_eigh_matrices": n_matrices,
        "per_example_work_s": max(fit_s - eigh_s, 0.0) + score_s,
        "allreduce_bytes": allreduce_bytes,
        # Interpreter start, imports, torchrun, store reads and the merge: the command's wall
        # time minus the parts the run measured.
        "launch_overhead_s": max(run["wall_s"] - fixed - fit_s - score_s, 0.0),
    }


def _predict(parts: dict, ranks: tuple[int, ...], bandwidth_gb_s: float) -> dict:
    """T(N) = launch + fixed + eigh / min(N, matrices) + work / N + ring all-reduce(N)."""
    out = {}
    base = None
    for n in ranks:
        comm = 0.0 if n == 1 else 2 * (n - 1) / n * parts["allreduce_bytes"] / (bandwidth_gb_s * 1e9)
        eigh = parts["eigh_s"] / max(1, min(n, parts["n_eigh_matrices"] or 1))
        total = (parts["launch_overhead_s"] + parts["fixed_s"] + eigh + parts["per_example_work_s"] / n
                 + comm)
        base = total if base is None else base
        out[str(n)] = {"predicted_s": total, "predicted_speedup": base / total}
    return {"parts": parts, "prediction": out}
