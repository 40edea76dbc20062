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

import numpy as np

from ..progress import ProgressFn
from ..store import Store
from .base import ScoringContext
from .request import ScoreConfig, plan

__all__ = ["ScoreConfig", "plan", "score"]  # the request types live in .request

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
    ctx = ScoringContext(
        store, p, todo=sorted(set(range(p.n_total)) - handle.done_indices()), progress=progress,
        save_generations=lambda model_id, key, idx, outs: store.add_generations(
            p.dataset["dataset_id"], model_id, key, idx, outs))
    try:
        _stream_scores(ctx, handle)
    except BaseException as err:
        handle.fail(f"{type(err).__name__}: {err}")
        raise
    timings = ctx.timings
    wall = sum(v for k, v in timings.items() if k != "load_s")
    handle.complete(wall, timings)
    info = store.run(handle.run_id)
    if ctx.encoding:
        summary["truncation"] = ctx.encoding
    return {**summary, "cached": False, "wall_s": wall, "examples_per_s": info["examples_per_s"],
            "timings": timings}


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


def _stream_scores(ctx: ScoringContext, handle) -> None:
    """Prepare the method's scorer and score what the run still misses, chunk by chunk.

    Scores reach the store in transactions of at most ``FLUSH_S`` seconds of work (a killed run
    loses no more than that); one transaction per small chunk would cost more than the chunk.
    """
    n, todo, method = ctx.plan.n_total, ctx.todo, ctx.plan.method
    done = n - len(todo)
    pending_idx: list[int] = []
    pending_val: list[float] = []
    last_flush = time.perf_counter()

    def flush():
        nonlocal last_flush
        if pending_idx:
            handle.add_scores(pending_idx, pending_val)
            pending_idx.clear()
            pending_val.clear()
        last_flush = time.perf_counter()

    if not todo:
        return
    scorer = method.prepare(ctx)
    t = time.perf_counter()
    try:
        for chunk in method.chunks(ctx):
            pending_idx.extend(chunk)
            pending_val.extend(np.asarray(scorer(chunk), dtype=np.float64).tolist())
            done += len(chunk)
            if time.perf_counter() - last_flush > FLUSH_S:
                flush()
            ctx.report(f"score {method.key}", done / n)
    except BaseException:
        flush()  # keep what was scored before the failure; the rerun resumes after it
        raise
    flush()
    ctx.timings["score_s"] = time.perf_counter() - t
