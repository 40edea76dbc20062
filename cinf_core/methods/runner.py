"""Run any method on a workspace and stream its scores into the store.

One entry point, :func:`score`, for every registered method (:mod:`.registry`). A run is keyed
by everything that determines its scores (method, dataset, model, concept, test queries,
settings); asking again returns the cached run, and a run that was killed resumes with only its
missing examples.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..progress import ProgressFn
from ..store import Store
from .base import RunInputs, RunPlan, ScoringContext
from .registry import get_method

FLUSH_S = 5.0


@dataclass
class ScoreConfig:
    """What to score and how. Names resolve through the store (name, id or role).

    ``method`` is any registered method key; a variant's key (``concept_influence@start3``) is
    stored as its method plus the option it fixes (``concept_window=3``).
    """

    method: str = field(metadata={"help": "method key (see the registry)"})
    trait: str | None = field(default=None, metadata={"help": "trait whose concept/test queries to use"})
    concept: str | None = field(default=None, metadata={"help": "concept name or id (default: the trait's)"})
    dataset: str = field(default="train", metadata={"help": "training set: name, id or role"})
    model: str = field(default="finetuned", metadata={"help": "model: name, id or role"})
    batch_size: int = 16
    max_length: int | None = 256
    seed: int = field(default=0, metadata={"help": "seed of the random baseline"})
    generator: str = field(default="finetuned",
                           metadata={"help": "Projection Difference: model generating y' (name/role)"})
    max_new_tokens: int = 64
    n_queries: int | None = field(default=None, metadata={"help": "use only the top-n test queries"})
    curvature: dict = field(default_factory=dict, metadata={"help": "CurvatureConfig fields"})
    concept_window: int | None = field(
        default=None, metadata={"help": "Concept Influence: measure the concept over the K positions "
                                        "where each test answer starts (None: all response tokens)"})

    def __post_init__(self):
        requested = get_method(self.method)
        for option, value in requested.options.items():
            if getattr(self, option) not in (None, value):
                raise ValueError(f"method {self.method} fixes {option}={value}, but the request "
                                 f"sets {option}={getattr(self, option)}; leave {option} unset")
            setattr(self, option, value)
        self.method = requested.name
        if self.concept_window is not None and "concept_window" not in requested.run_fields:
            raise ValueError(f"concept_window applies to concept_influence only, not "
                             f"{self.method}; leave it unset")
        method = self.resolved_method()
        method.validate(self)
        if method.needs_trait and not (self.trait or self.concept):
            raise ValueError(f"{self.method} needs --trait (or --concept)")

    def resolved_method(self):
        """The registered method (or variant) this request scores with."""
        return get_method(self.method).variant({"concept_window": self.concept_window})


def plan(store: Store, cfg: ScoreConfig) -> RunPlan:
    """Resolve dataset, model, concept and test queries; build the run's identifying config."""
    method = cfg.resolved_method()
    inputs = RunInputs(dataset=store.dataset(cfg.dataset), model_row=store.get_model(cfg.model))
    if method.needs_concept:
        inputs.concept = store.load_concept(cfg.concept or store.concept_for_trait(cfg.trait))
    if method.needs_queries:
        queries = store.test_queries(cfg.trait, inputs.model_row["model_id"])
        if cfg.n_queries:
            queries = queries[:cfg.n_queries]
        if not queries:
            raise ValueError(f"no test queries for trait {cfg.trait!r} and model "
                             f"{inputs.model_row['name']!r}; build the demo world or register "
                             "test queries first")
        inputs.queries = queries
    if method.needs_generator:
        inputs.generator_row = store.get_model(cfg.generator)
    return RunPlan(cfg, method, inputs, method.run_config(cfg, inputs))


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
    handle = store.begin_run(cfg.method, p.dataset["dataset_id"], p.model_row["model_id"],
                             p.run_config, n_total=p.n_total, concept_id=p.concept_id)
    summary = {"run_id": handle.run_id, "method": p.method.key, "trait": cfg.trait,
               "n_examples": p.n_total}
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
