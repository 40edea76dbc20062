"""Run any method on a workspace and stream its scores into the store.

One entry point, :func:`score`, for every registered method (:mod:`.registry`). A run is keyed
by everything that determines its scores (method, dataset, model, concept, test queries,
settings); asking again returns the cached run, and a run that was killed resumes with only its
missing examples. One process scores a run at a time: a second request for a run another live
process is scoring waits for it and returns its result.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from ..progress import ProgressFn
from ..store import Store
from .base import ScoringContext
from .request import ScoreConfig, plan

__all__ = ["ScoreConfig", "plan", "score", "score_concepts"]  # the request types live in .request

FLUSH_S = 5.0
WAIT_POLL_S = 1.0


def score(workspace, cfg: ScoreConfig, progress: ProgressFn = None) -> dict:
    """Score the training set with ``cfg.method``; returns the run summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the work is split across ranks (see
    :mod:`cinf_core.methods.distributed`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import score_distributed

        return score_distributed(workspace, cfg, progress)
    store = Store(workspace)
    p = plan(store, cfg)
    handle, waited_for = _claim(store, p, progress)
    summary = {"run_id": handle.run_id, "method": p.method.key, "trait": cfg.trait,
               "n_examples": p.n_total}
    if waited_for:
        summary["waited_for"] = waited_for
    if handle.cached:
        info = store.run(handle.run_id)
        return {**summary, "cached": True, "wall_s": info["wall_s"],
                "examples_per_s": info["examples_per_s"], "timings": info["timings"]}
    return {**summary, **_score_one(store, p, handle, progress)}


def _claim(store: Store, p, progress: ProgressFn):
    """``(handle, waited_for)``: the run, claimed for this process. While another live process
    scores it, wait (the run then comes back complete, or to resume when that process died);
    ``waited_for`` names the last process waited for, None when there was none."""
    waited_for = None
    while True:
        handle = store.begin_run(p.cfg.method, p.dataset["dataset_id"], p.model_row["model_id"],
                                 p.run_config, n_total=p.n_total, concept_id=p.concept_id)
        if handle.held_by is None:
            return handle, waited_for
        waited_for = handle.held_by
        if progress:
            n_done = int(store.run(handle.run_id)["n_done"] or 0)
            progress(f"waiting for {handle.held_by}, which scores this run", n_done / p.n_total)
        time.sleep(WAIT_POLL_S)


def score_concepts(workspace, cfg: ScoreConfig, concepts, progress: ProgressFn = None) -> list[dict]:
    """Score the training set for several concepts (names or ids) with one method, in one pass
    when the method can (:meth:`~cinf_core.methods.base.Method.prepare_concepts`: Vector Filter's
    forward passes, Concept Influence's training gradients are shared by every concept).

    Each concept ends up as its own ordinary run, with the id it would get scored alone
    (``cfg`` with ``concept`` set to it); runs already complete are returned as cached and runs
    left unfinished resume. Returns one run summary per distinct concept, in the given order.
    A method without a shared pass (or under torchrun) scores the concepts one after another.
    """
    concepts = list(dict.fromkeys(concepts))
    if not concepts:
        raise ValueError("no concepts given; name at least one")
    cfgs = [replace(cfg, concept=c) for c in concepts]
    method = cfg.resolved_method()
    if not method.needs_concept:
        raise ValueError(f"{method.key} does not read a concept; score it once without --concepts")
    if len(cfgs) == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return [score(workspace, c, progress) for c in cfgs]
    store = Store(workspace)
    plans = [plan(store, c) for c in cfgs]
    ids = [p.run_id for p in plans]
    if len(set(ids)) < len(ids):  # a name and an id of the same concept
        keep = {run_id: k for k, run_id in reversed(list(enumerate(ids)))}
        plans = [p for k, p in enumerate(plans) if keep[p.run_id] == k]
    summaries: dict[str, dict] = {}
    runs = []
    for p in sorted(plans, key=lambda p: p.run_id):  # one claim order: two commands never wait
        handle, waited_for = _claim(store, p, progress)  # for each other
        summary = {"run_id": handle.run_id, "method": p.method.key, "trait": cfg.trait,
                   "concept": p.concept.name, "n_examples": p.n_total}
        if waited_for:
            summary["waited_for"] = waited_for
        if handle.cached:
            info = store.run(handle.run_id)
            summaries[p.run_id] = {**summary, "cached": True, "wall_s": info["wall_s"],
                                   "examples_per_s": info["examples_per_s"],
                                   "timings": info["timings"]}
        else:
            todo = set(range(p.n_total)) - handle.done_indices()
            runs.append((p, handle, todo, summary))
    if runs:
        first = runs[0][0]
        ctx = ScoringContext(
            store, first, todo=sorted(set().union(*(r[2] for r in runs))), progress=progress,
            save_generations=lambda model_id, key, idx, outs: store.add_generations(
                first.dataset["dataset_id"], model_id, key, idx, outs))
        scorer = method.prepare_concepts(ctx, [r[0].concept for r in runs]) if ctx.todo else None
        if scorer is None and ctx.todo:  # no shared pass: one run after another
            for p, handle, _, summary in runs:
                summaries[p.run_id] = {**summary, **_score_one(store, p, handle, progress)}
        else:
            try:
                _stream_scores(ctx, [(r[1], r[2]) for r in runs], scorer)
            except BaseException as err:
                for _, handle, _, _ in runs:
                    handle.fail(f"{type(err).__name__}: {err}")
                raise
            wall = sum(v for k, v in ctx.timings.items() if k != "load_s")
            for p, handle, _, summary in runs:
                timings = dict(ctx.timings, shared_with=[r[0].run_id for r in runs
                                                         if r[0].run_id != p.run_id])
                handle.complete(wall, timings)
                info = store.run(handle.run_id)
                summaries[p.run_id] = {**summary, "cached": False, "wall_s": wall,
                                       "examples_per_s": info["examples_per_s"], "timings": timings}
                if ctx.encoding:
                    summaries[p.run_id]["truncation"] = ctx.encoding
    return [summaries[p.run_id] for p in plans]


def _score_one(store: Store, p, handle, progress: ProgressFn) -> dict:
    """Score one claimed run (what :func:`score` does after the claim)."""
    ctx = ScoringContext(
        store, p, todo=sorted(set(range(p.n_total)) - handle.done_indices()), progress=progress,
        save_generations=lambda model_id, key, idx, outs: store.add_generations(
            p.dataset["dataset_id"], model_id, key, idx, outs))
    try:
        _stream_scores(ctx, [(handle, set(ctx.todo))])
    except BaseException as err:
        handle.fail(f"{type(err).__name__}: {err}")
        raise
    timings = ctx.timings
    wall = sum(v for k, v in timings.items() if k != "load_s")
    handle.complete(wall, timings)
    info = store.run(handle.run_id)
    out = {"cached": False, "wall_s": wall, "examples_per_s": info["examples_per_s"],
           "timings": timings}
    if ctx.encoding:
        out["truncation"] = ctx.encoding
    return out


def _stream_scores(ctx: ScoringContext, runs, scorer=None) -> None:
    """Prepare the method's scorer and score what the runs still miss, chunk by chunk.

    ``runs``: ``(handle, todo)`` pairs, one per run; with one run the scorer is the method's
    (``[n]`` per chunk), with several ``scorer`` returns ``[n, len(runs)]`` (column k: run k)
    and each run stores the examples in its own ``todo``. Scores reach the store in
    transactions of at most ``FLUSH_S`` seconds of work (a killed run loses no more than that);
    one transaction per small chunk would cost more than the chunk.
    """
    n, todo, method = ctx.plan.n_total, ctx.todo, ctx.plan.method
    done = n - len(todo)
    pending: list[tuple[list[int], list[float]]] = [([], []) for _ in runs]
    last_flush = time.perf_counter()

    def flush():
        nonlocal last_flush
        ready = [(handle, idx, val) for (handle, _), (idx, val) in zip(runs, pending) if idx]
        if len(ready) == 1:
            ready[0][0].add_scores(ready[0][1], ready[0][2])
        elif ready:  # one transaction for every run of the pass
            ctx.store._add_scores_many([(h.run_id, idx, val) for h, idx, val in ready])
        for _, idx, val in ready:
            idx.clear()
            val.clear()
        last_flush = time.perf_counter()

    if not todo:
        return
    if scorer is None:
        scorer = method.prepare(ctx)
    t = time.perf_counter()
    try:
        for chunk in method.chunks(ctx):
            values = np.asarray(scorer(chunk), dtype=np.float64).reshape(len(chunk), -1)
            for k, ((_, wanted), (idx, val)) in enumerate(zip(runs, pending)):
                rows = [r for r, i in enumerate(chunk) if i in wanted]
                idx.extend(chunk[r] for r in rows)
                val.extend(values[rows, k].tolist())
            done += len(chunk)
            if time.perf_counter() - last_flush > FLUSH_S:
                flush()
            ctx.report(f"score {method.key}", done / n)
    except BaseException:
        flush()  # keep what was scored before the failure; the rerun resumes after it
        raise
    flush()
    ctx.timings["score_s"] = time.perf_counter() - t
