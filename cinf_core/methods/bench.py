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
import time
from pathlib import Path

import numpy as np
import torch

from .. import paths
from ..curvature.ekfac import FACTORS_META_FILE, EKFACFactors
from ..data import encode_dataset
from ..models import cached_model
from ..store import Store
from .forward import forward_throughput_batches, truncated_forward_seconds
from .registry import get_method, method_keys
from .runner import ScoreConfig, score
from .scratch import scratch_copy


def bench(workspace, trait: str | None = None, batch_size: int = 16, max_length: int = 256,
          with_kronfluence: bool = True, progress=None, repeats: int = 1,
          n_concepts: int = 8) -> dict:
    """Every method end to end in a scratch copy, then the side-by-side comparisons (each
    ``repeats`` times, alternating, best of each kept):

    * ``vf_over_truncated_forward``: Vector Filter's scoring pass (the runner's ``score_s``) over
      the bare forward of the model stopped at the concept layer, same length batches;
    * ``k_concepts_over_one``: ``n_concepts`` concepts (the trait's and random unit directions at
      its layer, registered in the scratch copy) scored in one pass vs the trait's alone, for
      Vector Filter and Concept Influence (its factors fitted already: the scoring cost);
    * ``grad_sim_over_if_score_pass``: the two scoring passes over the training set;
    * Projection Difference's generation, the earlier way (dataset order, ``batch_size``
      prompts a batch) vs now (prompts of similar length, :func:`generation_batch`);
    * Influence Function vs Kronfluence with cinf's time split by stage.
    """
    store = Store(workspace)
    traits = store.traits()
    if not traits:
        raise ValueError("no traits in this workspace; build the demo world first")
    trait = trait or traits[0]
    repeats = max(1, int(repeats))
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
        wall = {m: r["wall_s"] for m, r in results.items()}
        ratios = {
            "if_over_vf": wall["influence_function"] / wall["vector_filter"],
            "ci_over_vf": wall["concept_influence"] / wall["vector_filter"],
            "if_over_ci": wall["influence_function"] / wall["concept_influence"],
            "vf_over_forward_limit": vf_eps / forward_eps,
        }
        base = ScoreConfig(method="vector_filter", trait=trait, batch_size=batch_size,
                           max_length=max_length)
        concept = sstore.load_concept(base.concept or sstore.concept_for_trait(trait))
        truncated = _vf_vs_truncated(scratch, base, lm, encoded, concept.layer, batch_size, repeats)
        ratios["vf_over_truncated_forward"] = truncated["ratio"]
        several = _k_concepts(scratch, trait, concept, batch_size, max_length, n_concepts, repeats,
                              progress)
        ratios["k_concepts_over_one"] = {m: r["ratio"] for m, r in several.items()}
        passes = _score_passes(sstore, lm, encoded, trait, batch_size, max_length, repeats)
        ratios["grad_sim_over_if_score_pass"] = passes["ratio"]
        generation = _generation_before_after(sstore, examples, batch_size, repeats)
        ratios["generation_after_over_before"] = generation["speedup"]
        kron = None
        if with_kronfluence:
            kron = _kronfluence_ratio(sstore, lm, encoded, trait, batch_size, max_length, repeats)
            if "skipped" not in kron:
                ratios["if_over_kronfluence"] = kron["cinf_s"] / kron["kronfluence_s"]
                ratios["if_over_kronfluence_cpu"] = 1.0 / kron["cpu_ratio"]
        from .index_runs import bench_index  # the gradient index against this CI pass

        indexed = bench_index(scratch, trait, batch_size=batch_size, max_length=max_length,
                              ci_pass_s=wall["concept_influence"], scratch=scratch,
                              concepts=list(store.concepts()["concept_id"]), progress=progress)
        ratios.update(indexed["ratios"])
        return {"trait": trait, "n_examples": len(encoded), "batch_size": batch_size,
                "torch_threads": torch.get_num_threads(), "repeats": repeats, "methods": results,
                "forward_limit": {"wall_s": forward_s, "examples_per_s": forward_eps},
                "truncated_forward": truncated, "k_concepts": several, "score_passes": passes,
                "generation": generation, "kronfluence": kron, "index": indexed["index"],
                "ratios": ratios}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _best(samples: list[float]) -> float:
    return float(min(samples))


def _drop_runs(store: Store, method: str) -> None:
    for run_id in store.runs(method=method)["run_id"]:
        store._drop_run(run_id)


def _vf_vs_truncated(scratch, cfg, lm, encoded, layer, batch_size, repeats) -> dict:
    """Vector Filter through the runner (its stored ``score_s``) vs the truncated forward,
    alternating; examples/s of the best of each."""
    store = Store(scratch)
    vf_s, trunc_s = [], []
    for _ in range(repeats):
        _drop_runs(store, "vector_filter")
        vf_s.append(score(scratch, cfg)["timings"]["score_s"])
        trunc_s.append(truncated_forward_seconds(lm, encoded, layer, batch_size)[1])
    n = len(encoded)
    return {"layer": layer, "vector_filter_score_s": vf_s, "truncated_forward_s": trunc_s,
            "vector_filter_examples_per_s": n / _best(vf_s),
            "truncated_forward_examples_per_s": n / _best(trunc_s),
            "ratio": _best(trunc_s) / _best(vf_s)}


def _k_concepts(scratch, trait, concept, batch_size, max_length, k, repeats, progress) -> dict:
    """``k`` concepts in one pass vs one: the trait's concept plus ``k - 1`` random unit
    directions at its layer (seeded), registered in the scratch store. Times are the runs' walls
    without loading (CI's factors come from the cache the method loop filled)."""
    from ..concepts import DirectionConcept
    from .runner import score_concepts

    store = Store(scratch)
    model_id = store.get_model("finetuned")["model_id"]
    gen = torch.Generator().manual_seed(0)
    names = [concept.name]
    for j in range(k - 1):
        vector = torch.randn(concept.direction().shape[0], generator=gen)
        extra = DirectionConcept(name=f"bench-random-{j}", layer=concept.layer,
                                 vector=vector / vector.norm(), kind="direction")
        store.save_concept(extra, model_id)
        names.append(extra.name)
    out = {}
    for method in ("vector_filter", "concept_influence"):
        cfg = ScoreConfig(method=method, trait=trait, concept=concept.name, batch_size=batch_size,
                          max_length=max_length)
        one_s, many_s = [], []
        for _ in range(repeats):
            _drop_runs(store, method)
            one_s.append(score(scratch, cfg, progress=progress)["wall_s"])
            _drop_runs(store, method)
            runs = score_concepts(scratch, cfg, names, progress=progress)
            many_s.append(runs[0]["wall_s"])
        out[method] = {"n_concepts": k, "one_s": one_s, "k_s": many_s,
                       "ratio": _best(many_s) / _best(one_s)}
    return out


def _score_passes(store, lm, encoded, trait, batch_size, max_length, repeats) -> dict:
    """Influence Function's and gradient similarity's passes over the training set, back to back
    on the same examples and batches (the preconditioned and the raw test gradient)."""
    from ..curvature import CurvatureConfig, load_or_fit_factors
    from .gradient import prepare_grad_sim, prepare_influence_function, train_scores

    queries = store.test_queries(trait, store.get_model("finetuned")["model_id"])
    q_enc, _ = encode_dataset(lm.tokenizer, [q["messages"] for q in queries], max_length)
    cfg = CurvatureConfig(batch_size=batch_size, max_length=max_length)
    model_id = store.get_model("finetuned")["model_id"]
    factors = load_or_fit_factors(lm, encoded, cfg, paths.artifact_dir(store.workspace, paths.FACTORS_DIR),
                                  dataset_id=store.dataset("train")["dataset_id"], model_id=model_id)
    prepared = {"influence_function": prepare_influence_function(lm, q_enc, factors, batch_size=batch_size),
                "grad_sim": prepare_grad_sim(lm, q_enc, cfg, batch_size=batch_size)}
    times: dict[str, list[float]] = {m: [] for m in prepared}
    split: dict[str, dict] = {}
    for r in range(repeats):
        for method in (prepared if r % 2 == 0 else reversed(list(prepared))):
            t = {}
            train_scores(lm, prepared[method], encoded, batch_size=batch_size, timings=t)
            times[method].append(t["pass_s"])
            split[method] = t
    return {"influence_function_s": times["influence_function"], "grad_sim_s": times["grad_sim"],
            "split": split, "ratio": _best(times["grad_sim"]) / _best(times["influence_function"])}


def _generation_before_after(store, examples, batch_size, repeats, limit: int = 256) -> dict:
    """Projection Difference's generation of y' for the first ``limit`` prompts: as before
    (dataset order, ``batch_size`` prompts a batch) and as now (:func:`generate_responses`),
    alternating; examples/s of the best of each, and whether the responses are the same."""
    from ..models import generate
    from .builtin import generate_responses, generation_batch

    lm = cached_model(store.get_model("finetuned")["spec"])
    prompts = [e.prompt_messages for e in examples[:limit]]
    max_new = ScoreConfig.__dataclass_fields__["max_new_tokens"].default
    before_s, after_s = [], []
    before = after = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        before = [r for s in range(0, len(prompts), batch_size)
                  for r in generate(lm, prompts[s:s + batch_size], max_new_tokens=max_new,
                                    batch_size=batch_size)]
        before_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        after = generate_responses(lm, prompts, max_new, generation_batch(batch_size))
        after_s.append(time.perf_counter() - t0)
    n = len(prompts)
    return {"n_prompts": n, "max_new_tokens": max_new, "before_batch": batch_size,
            "after_batch": generation_batch(batch_size), "before_s": before_s, "after_s": after_s,
            "before_examples_per_s": n / _best(before_s), "after_examples_per_s": n / _best(after_s),
            "speedup": _best(before_s) / _best(after_s),
            "same_responses": sum(a == b for a, b in zip(before, after)), "of": n}


def _kronfluence_ratio(store, lm, encoded, trait, batch_size, max_length, repeats=1) -> dict:
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
    return time_influence_vs_kronfluence(lm, list(encoded), q_enc, cfg, repeats=repeats)


def time_influence_vs_kronfluence(lm, train, queries, cfg, repeats: int = 1) -> dict:
    """Wall time of the same per-query IF job (fit EK-FAC + score) in cinf and in Kronfluence.

    Returns ``{"cinf_s", "kronfluence_s", "ratio"}`` (ratio = kronfluence_s / cinf_s, > 1 means
    cinf is faster; with ``repeats`` > 1 the two alternate, ABBA, and the best of each counts),
    ``"spearman"``: the mean per-query rank agreement of the two score sets, and
    ``"cinf_split_s"``: where cinf's time went (of its best repeat): the model's forward and
    backward passes, the covariance products, the eigendecompositions, the eigenvalue
    correction's rotated per-example gradients, the test gradients with their preconditioning,
    and the scoring pass's per-example products.
    """
    from scipy.stats import spearmanr

    from ..curvature.oracle import import_kronfluence, kronfluence_influence

    import_kronfluence()
    cinf, kron, splits, cinf_cpu, kron_cpu = [], [], [], [], []
    ours = theirs = None
    for r in range(max(1, int(repeats))):
        for who in (("cinf", "kronfluence") if r % 2 == 0 else ("kronfluence", "cinf")):
            start, cpu = time.perf_counter(), time.process_time()
            if who == "cinf":
                ours, split = _cinf_influence(lm, train, queries, cfg)
                cinf.append(time.perf_counter() - start)
                cinf_cpu.append(time.process_time() - cpu)
                splits.append(split)
            else:
                theirs = kronfluence_influence(lm, train, queries, cfg)
                kron.append(time.perf_counter() - start)
                kron_cpu.append(time.process_time() - cpu)
    rho = float(np.mean([spearmanr(ours[:, q], theirs[q]).statistic for q in range(len(queries))]))
    cinf_s, kronfluence_s = _best(cinf), _best(kron)
    # CPU seconds of this process (all its threads): steadier than wall time on a busy machine.
    return {"cinf_s": cinf_s, "kronfluence_s": kronfluence_s, "ratio": kronfluence_s / cinf_s,
            "cinf_runs_s": cinf, "kronfluence_runs_s": kron,
            "cinf_cpu_s": cinf_cpu, "kronfluence_cpu_s": kron_cpu,
            "cpu_ratio": _best(kron_cpu) / _best(cinf_cpu), "spearman": rho,
            "cinf_split_s": splits[int(np.argmin(cinf))]}


def _cinf_influence(lm, train, queries, cfg) -> tuple[np.ndarray, dict]:
    """cinf's per-query IF (fit + score) and its time by stage."""
    from ..curvature.ekfac import fit_factors
    from .gradient import prepare_influence_function, train_scores

    fit: dict[str, float] = {}
    factors = fit_factors(lm, train, cfg, timings=fit)
    t0 = time.perf_counter()
    prepared = prepare_influence_function(lm, queries, factors, batch_size=cfg.batch_size,
                                          per_query=True)
    queries_s = time.perf_counter() - t0
    passes: dict[str, float] = {}
    scores = train_scores(lm, prepared, train, batch_size=cfg.batch_size, timings=passes)
    model_s = (fit["covariance_pass_s"] - fit["covariances_s"] + fit["lambda_pass_s"]
               - fit["lambda_updates_s"] + passes["pass_s"] - passes["products_s"])
    split = {"forward_backward_s": model_s, "covariances_s": fit["covariances_s"],
             "eigh_s": fit["eigh_s"], "eigenvalue_correction_s": fit["lambda_updates_s"],
             "test_gradients_preconditioning_s": queries_s,
             "score_products_s": passes["products_s"]}
    return scores, split


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
