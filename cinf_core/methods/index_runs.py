"""The gradient index in use: ``python -m cinf_core index``, concept queries stored as ordinary
runs, what the pages show about the index, and its benchmark.

A query over the index (:mod:`cinf_core.methods.index`) is stored as a Concept Influence run
whose config records the index's options (``index``), so its run id differs from the exact
pass's and every page (influential examples, method agreement, Figure 4) reads it like any
other run. Several concepts share one query: one backward pass each on the test queries, then
one matrix product for all of them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import paths
from ..progress import ProgressFn
from ..store import Store
from .index import (DEFAULT_DIM, DTYPES, GradientIndex, build_workspace_index,
                    index_for_plan, list_indexes, query_factors, query_index, run_option)
from .request import ScoreConfig, plan
from .scratch import scratch_copy


def rank_concepts(workspace, concepts: Sequence[str], trait: str, *, model: str = "finetuned",
                  dataset: str = "train", dim: int = DEFAULT_DIM, batch_size: int = 16,
                  max_length: int | None = 256, n_queries: int | None = None,
                  curvature: dict | None = None, window: int | None = None) -> dict:
    """Concept Influence of stored ``concepts`` (names or ids) over the gradient index, measured
    on ``trait``'s test queries; one run per concept (a run already complete is reused).

    Returns ``{"index": ..., "runs": [{"run_id", "concept", "concept_id", "cached"}, ...],
    "seconds": ..., "timings": ...}``; ``seconds`` is the whole call (store reads, model load on
    the first call in a process, the query, storing the runs).
    """
    from ..models import cached_model

    if not concepts:
        raise ValueError("no concept to rank by; name one or more stored concepts")
    t0 = time.perf_counter()
    store = Store(workspace)
    plans = [plan(store, ScoreConfig(method="concept_influence", trait=trait, concept=c,
                                     dataset=dataset, model=model, batch_size=batch_size,
                                     max_length=max_length, n_queries=n_queries,
                                     curvature=dict(curvature or {}), concept_window=window,
                                     index=dim))
             for c in concepts]
    index = index_for_plan(store, max(plans, key=lambda p: p.concept.layer))
    todo = [p for p in plans if store.run_status(p.run_id) != "complete"]
    timings: dict[str, float] = {}
    if todo:
        first = todo[0]
        t = time.perf_counter()
        lm = cached_model(first.model_row["spec"])
        timings["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        factors = query_factors(workspace, index, lm, batch_size=batch_size)
        timings["fit_s"] = time.perf_counter() - t
        from ..data import encode_dataset

        query_enc, _ = encode_dataset(lm.tokenizer, [q["messages"] for q in first.queries],
                                      max_length)
        scores = query_index(index, lm, factors, [p.concept for p in todo], query_enc,
                             batch_size=batch_size, window=window,
                             model_id=first.model_row["model_id"], timings=timings)
        wall = sum(v for k, v in timings.items() if k != "load_s")
        run_timings = {**timings, "concepts_in_query": len(todo)}
        n = index.n_examples
        for k, p in enumerate(todo):
            store.import_run(p.cfg.method, p.dataset["dataset_id"], p.model_row["model_id"],
                             p.run_config, p.concept_id, list(range(n)), scores[:, k], wall,
                             run_timings)
    runs = [{"run_id": p.run_id, "concept": p.concept.name, "concept_id": p.concept_id,
             "layer": p.concept.layer, "cached": p not in todo} for p in plans]
    return {"index": index.summary(), "trait": trait, "runs": runs, "timings": timings,
            "seconds": time.perf_counter() - t0}


def sae_feature_concepts(workspace, sae: str, features: Sequence[int]) -> list[str]:
    """Each feature of a registered SAE saved as a concept (the same feature gives the same
    concept id every time); returns the concept ids."""
    from ..concepts.sae import make_sae_feature_concept

    return [make_sae_feature_concept(workspace, sae, int(j))["concept_id"] for j in features]


def index_status(workspace, model: str = "finetuned", dataset: str | None = None,
                 dim: int = DEFAULT_DIM, max_length: int | None = 256) -> dict | None:
    """The newest index of ``model`` (over ``dataset`` when given) with the default options of
    ``dim`` as :meth:`GradientIndex.summary` says it (``status`` ``complete`` or ``building``),
    or None when there is none. Reads the store and the index folders only (no model)."""
    store = Store(workspace, read_only=True)
    try:
        row = store.get_model(model)
        dataset_id = store.dataset(dataset)["dataset_id"] if dataset else None
    except (KeyError, ValueError):
        return None
    want = run_option(dim)
    for ix in list_indexes(workspace):
        if (ix.spec.model_id == row["model_id"] and ix.spec.max_length == max_length
                and (dataset_id is None or ix.spec.dataset_id == dataset_id)
                and run_option(0, ix.spec) == want):
            out = ix.summary()
            out["stale"] = ix.spec.weights != row["spec"].weights_fingerprint()
            return out
    return None


def top_and_bottom(store: Store, run_id: str, k: int = 10):
    """The ``k`` highest and lowest scored examples of a run (``rank, idx, score, data_origin,
    prompt, response``)."""
    ranked = store.scored_examples(run_id)
    return ranked.head(k).reset_index(drop=True), ranked.tail(k).iloc[::-1].reset_index(drop=True)


# ---------------------------------------------------------------- the CLI


def index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="finetuned", help="model name, id or role")
    p.add_argument("--dataset", default="train", help="training set name, id or role")
    p.add_argument("--dim", type=int, default=DEFAULT_DIM,
                   help=f"projection dimension (default {DEFAULT_DIM}; larger: closer to the exact "
                        "scores, a bigger index)")
    p.add_argument("--below-layer", type=int,
                   help="track the blocks below this layer (default: the highest layer of the "
                        "workspace's concepts; concepts above it are refused)")
    p.add_argument("--all-blocks", action="store_true", help="track every block (any layer)")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projections")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--damping", type=float, help="EK-FAC damping")
    p.add_argument("--concept", action="append", default=[],
                   help="after building: rank the training data by this stored concept (repeat "
                        "for several: one matrix product for all)")
    p.add_argument("--sae", help="with --feature: the registered SAE whose features to rank by")
    p.add_argument("--feature", type=int, action="append", default=[],
                   help="an SAE feature to rank by (saved as a concept; repeatable)")
    p.add_argument("--trait", help="whose test queries measure the concepts (default: each "
                                   "concept's own trait)")
    p.add_argument("--n-queries", type=int, help="use only the top-n test queries")
    p.add_argument("--top", type=int, default=5, help="examples listed per end of each ranking")


def index_command(args: argparse.Namespace, progress: ProgressFn = None) -> dict:
    """``python -m cinf_core index``: build (or resume, or find) the index, then rank the given
    concepts over it. Under ``torchrun`` the ranks share the build."""
    import os
    import sys

    comm = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import init_process_group

        comm = init_process_group()
    if args.feature and not args.sae:
        raise ValueError("--feature needs --sae (the SAE the features belong to)")
    curvature = {} if args.damping is None else {"damping": args.damping}
    below = None if args.all_blocks else (args.below_layer if args.below_layer is not None
                                          else "auto")
    summary = build_workspace_index(
        args.workspace, model=args.model, dataset=args.dataset, dim=args.dim,
        max_length=args.max_length, curvature=curvature, below_layer=below, seed=args.seed,
        dtype=args.dtype, batch_size=args.batch_size, progress=progress, comm=comm)
    if comm is not None and comm.rank != 0:
        return summary
    mib = summary["matrix_bytes"] / 2**20
    print(f"gradient index {summary['index_id']}: {summary['n_examples']} examples x "
          f"{summary['width']} values ({summary['dtype']}, {summary['bytes_per_example']} bytes "
          f"per example, {mib:.1f} MiB) in {summary['path']}; built in "
          f"{summary['build_s']:.1f} s (EK-FAC {summary['fit_s']:.1f} s, pass "
          f"{summary['pass_s']:.1f} s){' (already built)' if summary['cached'] else ''}",
          file=sys.stderr)
    out = {"index": summary}
    concepts = list(args.concept)
    if args.feature:
        concepts += sae_feature_concepts(args.workspace, args.sae, args.feature)
    if not concepts:
        return out
    store = Store(args.workspace)
    by_trait: dict[str, list[str]] = {}
    for c in concepts:
        trait = args.trait or _concept_trait(store, c)
        by_trait.setdefault(trait, []).append(c)
    out["rankings"] = []
    for trait, names in by_trait.items():
        ranked = rank_concepts(args.workspace, names, trait, model=args.model,
                               dataset=args.dataset, dim=args.dim, batch_size=args.batch_size,
                               max_length=args.max_length, n_queries=args.n_queries,
                               curvature=curvature)
        for run in ranked["runs"]:
            top, bottom = top_and_bottom(store, run["run_id"], args.top)
            run["top"] = top["idx"].astype(int).tolist()
            run["bottom"] = bottom["idx"].astype(int).tolist()
            print(f"{run['concept']} (trait {trait}): run {run['run_id']}, top examples "
                  f"{run['top']}, bottom {run['bottom']}", file=sys.stderr)
        print(f"ranked {len(names)} concept(s) for '{trait}' in {ranked['seconds']:.2f} s",
              file=sys.stderr)
        out["rankings"].append(ranked)
    return out


def _concept_trait(store: Store, concept: str) -> str:
    """The trait a stored concept records; a clear error when it has none."""
    row = store.concepts()
    row = row[(row["concept_id"] == concept) | (row["name"] == concept)]
    if row.empty:
        raise KeyError(f"no concept {concept!r}; list them with `python -m cinf_core concepts`")
    trait = json.loads(row.iloc[-1]["config"]).get("info", {}).get("trait")
    if not trait:
        raise ValueError(f"concept {concept!r} records no trait; pass --trait to say whose test "
                         "queries measure it")
    return trait


# ---------------------------------------------------------------- benchmark


def _scratch(workspace) -> Path:
    """A throwaway copy of the store and the artifacts the index needs (no factor cache, no
    index, no runs), so every part pays its full cost."""
    return scratch_copy(workspace, skip={paths.FACTORS_DIR, paths.INDEX_DIR, "retrain",
                                         paths.JOBS_DIR, paths.SHARDS_DIR},
                        drop_generations=False, prefix="cinf-index-bench-")


def _concepts_and_traits(store: Store, trait: str, concepts: Sequence[str] | None = None
                         ) -> list[tuple[str, str]]:
    """Each stored concept (``concepts``' ids, default all) with the trait whose test queries
    measure it: its own, else ``trait``."""
    traits = set(store.traits())
    out = []
    for r in store.concepts().to_dict(orient="records"):
        if concepts is not None and r["concept_id"] not in concepts:
            continue
        own = json.loads(r["config"]).get("info", {}).get("trait")
        out.append((r["concept_id"], own if own in traits else trait))
    return out


def bench_index(workspace, trait: str | None = None, dims: Sequence[int] | None = None,
                batch_size: int = 16, max_length: int = 256, ci_pass_s: float | None = None,
                scratch: str | Path | None = None, concepts: Sequence[str] | None = None,
                progress: ProgressFn = None) -> dict:
    """The index's accuracy, size and speed on a workspace, measured side by side.

    For each dimension of ``dims`` (default: a half, two thirds and all of :data:`DEFAULT_DIM`):
    Spearman per concept of the index's Concept Influence against the exact (unprojected)
    EK-FAC scores (:func:`gradient.concept_influence`, every stored concept on its trait's test
    queries), bytes per example and the pass time. At the default dimension: the index build
    with a fresh factor cache (EK-FAC fit included, as a first Concept Influence run pays it),
    and a new concept's query as ``score --method concept_influence --index K`` runs it (the
    median over the concepts; model load excluded as in every run's wall time). ``ci_pass_s``:
    the wall time of one exact Concept Influence run measured by the caller (``bench``); else it
    is measured here, in the same scratch copy, with a fresh factor cache. ``scratch``: a
    throwaway copy to work in (``bench``'s; default: one made here). ``concepts``: the concept
    ids to measure (default: every stored concept).
    Returns ``{"index": {...}, "ratios": {...}}`` for ``bench``'s JSON.
    """
    from scipy.stats import spearmanr

    from ..data import encode_dataset
    from ..models import cached_model
    from .gradient import concept_influence
    from .runner import score

    dims = list(dims or (DEFAULT_DIM // 2, 2 * DEFAULT_DIM // 3, DEFAULT_DIM))
    if DEFAULT_DIM not in dims:
        dims.append(DEFAULT_DIM)
    own_scratch = scratch is None
    ws = _scratch(workspace) if own_scratch else Path(scratch)
    for folder in (paths.INDEX_DIR,):
        shutil.rmtree(ws / paths.ARTIFACTS_DIR / folder, ignore_errors=True)
    try:
        store = Store(ws)
        traits = store.traits()
        if not traits:
            raise ValueError("no traits in this workspace; build the demo world first")
        trait = trait or traits[0]
        report = (lambda stage, f: progress(stage, f)) if progress else (lambda *_: None)
        if ci_pass_s is None:
            report("bench: exact CI pass", 0.0)
            summary = score(ws, ScoreConfig(method="concept_influence", trait=trait,
                                            batch_size=batch_size, max_length=max_length))
            ci_pass_s = summary["wall_s"]
        pairs = _concepts_and_traits(store, trait, concepts)
        row = store.get_model("finetuned")
        lm = cached_model(row["spec"])
        encoded, _ = encode_dataset(lm.tokenizer, store.load_dataset("train").examples, max_length)
        # The default dimension first, with a fresh factor cache: the build pays the EK-FAC fit.
        fresh = Path(tempfile.mkdtemp(prefix="cinf-index-factors-"))
        builds = {}
        try:
            for k, dim in enumerate([DEFAULT_DIM] + [d for d in dims if d != DEFAULT_DIM]):
                report(f"bench: index k={dim}", k / (len(dims) + 2))
                builds[dim] = build_workspace_index(
                    ws, dim=dim, max_length=max_length, batch_size=batch_size,
                    factors_dir=fresh if dim == DEFAULT_DIM else None)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
        # Exact scores: every concept of a trait in one pass over the data.
        report("bench: exact scores", (len(dims)) / (len(dims) + 2))
        by_trait: dict[str, list[str]] = {}
        for concept_id, t in pairs:
            by_trait.setdefault(t, []).append(concept_id)
        any_index = _open(builds[DEFAULT_DIM])
        factors = query_factors(ws, any_index, lm, lambda: encoded, batch_size)
        exact, names = {}, {}
        for t, ids in by_trait.items():
            concepts = [store.load_concept(c) for c in ids]
            q_enc, _ = encode_dataset(lm.tokenizer, [q["messages"] for q in
                                                     store.test_queries(t, row["model_id"])],
                                      max_length)
            s = concept_influence(lm, encoded, q_enc, factors, concepts, batch_size=batch_size)
            for j, c in enumerate(ids):
                exact[c] = s[:, j]
                names[c] = concepts[j].name
        table = {}
        for dim in dims:
            rhos = {}
            for t, ids in by_trait.items():
                ranked = rank_concepts(ws, ids, t, dim=dim, batch_size=batch_size,
                                       max_length=max_length)
                for r in ranked["runs"]:
                    got = store.scores(r["run_id"])["score"].to_numpy()
                    rho = spearmanr(got, exact[r["concept_id"]]).statistic
                    rhos[names[r["concept_id"]]] = float(rho)
            b = builds[dim]
            table[str(dim)] = {"spearman_median": float(np.median(list(rhos.values()))),
                               "spearman": rhos, "bytes_per_example": b["bytes_per_example"],
                               "width": b["width"], "pass_s": b["pass_s"]}
        # A new concept's query as a user runs it: one `score --index` run per concept.
        report("bench: concept queries", (len(dims) + 1) / (len(dims) + 2))
        for run in store.runs(method="concept_influence").to_dict(orient="records"):
            if "index" in json.loads(run["config"]):  # the rankings above: ask again, afresh
                store._drop_run(run["run_id"])
        query_s = []
        for concept_id, t in pairs:
            summary = score(ws, ScoreConfig(method="concept_influence", trait=t, concept=concept_id,
                                            batch_size=batch_size, max_length=max_length,
                                            index=DEFAULT_DIM))
            query_s.append(summary["wall_s"])
        default = builds[DEFAULT_DIM]
        index = {
            "default_dim": DEFAULT_DIM, "dims": table,
            "spearman_vs_exact": table[str(DEFAULT_DIM)]["spearman_median"],
            "bytes_per_example": default["bytes_per_example"], "width": default["width"],
            "n_examples": default["n_examples"], "n_concepts": len(pairs),
            "build_s": default["build_s"], "build_fit_s": default["fit_s"],
            "build_pass_s": default["pass_s"], "query_s_median": float(np.median(query_s)),
            "query_s": query_s, "ci_pass_s": ci_pass_s, "trait": trait,
        }
        ratios = {"concept_query_over_ci_pass": index["query_s_median"] / ci_pass_s,
                  "index_build_over_ci_pass": default["build_s"] / ci_pass_s}
        return {"index": index, "ratios": ratios}
    finally:
        if own_scratch:
            shutil.rmtree(ws, ignore_errors=True)


def _open(summary: dict) -> GradientIndex:
    from .index import open_index

    return open_index(summary["path"])


__all__ = ["bench_index", "index_arguments", "index_command", "index_status", "rank_concepts",
           "sae_feature_concepts", "top_and_bottom"]
