"""Run any method on a workspace and stream its scores into the store.

One entry point, :func:`score`, for every method. A run is keyed by everything that determines its
scores (method, dataset, model, concept, test queries, settings); asking again returns the cached
run, and a run that was killed resumes with only its missing examples.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..data import encode_dataset
from ..method_keys import split_method
from ..models import LoadedModel, ModelSpec, cached_model, generate
from ..store import Store, config_hash
from . import forward

FORWARD_METHODS = ("vector_filter", "projection_difference", "random")
GRADIENT_METHODS = ("influence_function", "concept_influence", "grad_sim")
METHODS = ("influence_function", "concept_influence", "vector_filter", "projection_difference",
           "grad_sim", "lexical", "random")
NEEDS_CONCEPT = ("concept_influence", "vector_filter", "projection_difference")
NEEDS_QUERIES = ("influence_function", "concept_influence", "grad_sim", "lexical")

Progress = Callable[[str, float], None] | None
FLUSH_S = 5.0


@dataclass
class ScoreConfig:
    """What to score and how. Names resolve through the store (name, id or role)."""

    method: str
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
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.concept_window is not None:
            if self.method != "concept_influence":
                raise ValueError(f"concept_window applies to concept_influence only, not {self.method}; "
                                 "leave it unset")
            if isinstance(self.concept_window, bool) or not isinstance(self.concept_window, int) \
                    or self.concept_window < 1:
                raise ValueError(f"concept_window must be a whole number of tokens >= 1 (or unset for "
                                 f"all response tokens), got {self.concept_window!r}")
        if self.method in NEEDS_QUERIES + NEEDS_CONCEPT and not (self.trait or self.concept):
            raise ValueError(f"{self.method} needs --trait (or --concept)")


    @classmethod
    def for_method_key(cls, key: str, trait: str | None, **kwargs) -> "ScoreConfig":
        """The request behind a method key (``concept_influence@start3``: Concept Influence with
        ``concept_window=3``; see :mod:`cinf_core.method_keys`), validated like any request."""
        method, window = split_method(key)
        return cls(method=method, trait=trait, concept_window=window, **kwargs)


def generation_key(cfg: ScoreConfig, generator: ModelSpec) -> str:
    """Key of the cached generations y' a Projection Difference run uses (greedy decoding), with
    the generator's weights fingerprint: a generator rewritten in place generates again."""
    key = {"max_new_tokens": cfg.max_new_tokens, "temperature": 0.0}
    weights = generator.weights_fingerprint()
    if weights is not None:
        key["weights"] = weights
    return config_hash(key)


def _generations(store: Store, lm_gen: LoadedModel, gen_model_id: str, dataset_id: str,
                 examples, cfg: ScoreConfig, progress: Progress) -> list[str]:
    """The generator's own responses to every training prompt, cached in the store per batch."""
    gen_key = generation_key(cfg, lm_gen.spec)
    have = store.generations(dataset_id, gen_model_id, gen_key)
    missing = [i for i in range(len(examples)) if i not in have]
    step = max(cfg.batch_size, 1)
    for s in range(0, len(missing), step):
        chunk = missing[s:s + step]
        outs = generate(lm_gen, [examples[i].prompt_messages for i in chunk],
                        max_new_tokens=cfg.max_new_tokens, batch_size=step)
        store.add_generations(dataset_id, gen_model_id, gen_key, chunk, outs)
        have.update(zip(chunk, outs))
        if progress:
            progress("generate y'", (s + len(chunk)) / max(len(missing), 1))
    return [have[i] for i in range(len(examples))]


@dataclass
class RunPlan:
    """A resolved scoring request: its inputs from the store and the run it maps to."""

    cfg: ScoreConfig
    dataset: dict
    model_row: dict
    concept: object | None
    queries: list[dict]
    run_config: dict

    @property
    def n_total(self) -> int:
        return int(self.dataset["n_examples"])

    @property
    def concept_id(self) -> str | None:
        return self.concept.concept_id if self.concept is not None else None

    @property
    def run_id(self) -> str:
        return run_key(self.cfg.method, self.dataset["dataset_id"], self.model_row["model_id"],
                       self.run_config, self.concept_id)


def run_key(method: str, dataset_id: str, model_id: str | None, config: dict,
            concept_id: str | None) -> str:
    """The run id ``Store.begin_run`` gives the same request."""
    return config_hash({"method": method, "dataset_id": dataset_id, "model_id": model_id,
                        "concept_id": concept_id, "config": config})


def plan(store: Store, cfg: ScoreConfig) -> RunPlan:
    """Resolve dataset, model, concept and test queries; build the run's identifying config."""
    dataset = store.dataset(cfg.dataset)
    model_row = store.get_model(cfg.model)
    concept = None
    if cfg.method in NEEDS_CONCEPT:
        concept_id = store._resolve("concepts", "concept_id", cfg.concept) if cfg.concept \
            else store.concept_for_trait(cfg.trait)
        concept = store.load_concept(concept_id)
    queries = []
    if cfg.method in NEEDS_QUERIES:
        queries = store.test_queries(cfg.trait, model_row["model_id"])
        if cfg.n_queries:
            queries = queries[:cfg.n_queries]
        if not queries:
            raise ValueError(f"no test queries for trait {cfg.trait!r} and model {model_row['name']!r}; "
                             "build the demo world or register test queries first")
    run_config = {k: v for k, v in asdict(cfg).items()
                  if k not in ("dataset", "model", "concept", "batch_size")}
    if cfg.method != "random":
        run_config.pop("seed")
    if cfg.method != "projection_difference":
        for k in ("generator", "max_new_tokens"):
            run_config.pop(k)
    else:
        run_config["generator_id"] = store.get_model(cfg.generator)["model_id"]
    if cfg.method not in GRADIENT_METHODS:
        run_config.pop("curvature")
    if cfg.concept_window is None:  # runs stored before the option existed keep their keys
        run_config.pop("concept_window")
    if cfg.method == "lexical":
        run_config.pop("max_length")  # words, not tokens
    if cfg.method not in ("random", "lexical"):  # the two that never load the model
        run_config["weights"] = model_row["spec"].weights_fingerprint()
        if cfg.method == "projection_difference":
            run_config["generator_weights"] = store.get_model(cfg.generator)["spec"].weights_fingerprint()
    if queries:
        run_config["queries"] = config_hash([q["messages"] for q in queries])
    if concept is not None:
        run_config["layer"] = concept.layer
    return RunPlan(cfg, dataset, model_row, concept, queries, run_config)


def score(workspace, cfg: ScoreConfig, progress: Progress = None) -> dict:
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
    summary = {"run_id": handle.run_id, "method": cfg.method, "trait": cfg.trait,
               "n_examples": p.n_total}
    if handle.cached:
        info = store.run(handle.run_id)
        return {**summary, "cached": True, "wall_s": info["wall_s"],
                "examples_per_s": info["examples_per_s"], "timings": info["timings"]}
    encoding: dict[str, int] = {}
    try:
        timings = _compute(store, handle, p, progress, encoding)
    except BaseException as err:
        handle.fail(f"{type(err).__name__}: {err}")
        raise
    wall = sum(v for k, v in timings.items() if k != "load_s")
    handle.complete(wall, timings)
    info = store.run(handle.run_id)
    if encoding:
        summary["truncation"] = encoding
    return {**summary, "cached": False, "wall_s": wall, "examples_per_s": info["examples_per_s"],
            "timings": timings}


def _compute(store: Store, handle, p: RunPlan, progress: Progress, encoding: dict) -> dict:
    """Score what the run still misses; ``encoding`` receives the truncation counts."""
    cfg, n = p.cfg, p.n_total
    timings: dict[str, float] = {}
    todo = sorted(set(range(n)) - handle.done_indices())
    done = n - len(todo)

    # Scores reach the store in transactions of at most FLUSH_S seconds of work (a killed run
    # loses no more than that); one transaction per small batch would cost more than the batch.
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

    def stream(indices, values):
        nonlocal done
        pending_idx.extend(int(i) for i in indices)
        pending_val.extend(np.asarray(values, dtype=np.float64).tolist())
        done += len(indices)
        if time.perf_counter() - last_flush > FLUSH_S:
            flush()
        if progress:
            progress(f"score {cfg.method}", done / n)

    try:
        _dispatch(store, p, timings, todo, stream, progress, encoding)
    except BaseException:
        flush()  # keep what was scored before the failure; the rerun resumes after it
        raise
    t = time.perf_counter()
    flush()
    timings["score_s"] += time.perf_counter() - t
    return timings


def lexical_run_scores(store: Store, p: RunPlan) -> np.ndarray:
    """The lexical baseline over the run's whole training set (it is cheap; no model)."""
    from . import lexical  # scipy.sparse: imported only when used (pages import this module)

    examples = store.load_dataset(p.dataset["dataset_id"]).examples
    return lexical.lexical_scores([ex.response for ex in examples],
                                  [q["messages"][-1]["content"] for q in p.queries])


def _dispatch(store: Store, p: RunPlan, timings: dict, todo: list[int], stream, progress,
              encoding: dict) -> None:
    """Compute the scores of ``todo`` with the run's method, handing them to ``stream``;
    ``encoding`` receives how many training examples ``max_length`` trimmed."""
    cfg, dataset, model_row, concept, queries = p.cfg, p.dataset, p.model_row, p.concept, p.queries
    n = p.n_total
    if cfg.method == "random":
        t = time.perf_counter()
        for s in range(0, len(todo), 4096):
            chunk = todo[s:s + 4096]
            stream(chunk, forward.random_scores(n, cfg.seed, chunk))
        timings["score_s"] = time.perf_counter() - t
        return
    if cfg.method == "lexical":
        t = time.perf_counter()
        values = lexical_run_scores(store, p)
        for s in range(0, len(todo), 4096):
            chunk = todo[s:s + 4096]
            stream(chunk, values[chunk])
        timings["score_s"] = time.perf_counter() - t
        return

    t = time.perf_counter()
    lm = cached_model(model_row["spec"])
    timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    examples = store.load_dataset(dataset["dataset_id"]).examples
    encoded, report = encode_dataset(lm.tokenizer, examples, cfg.max_length)
    encoding.update(report.as_dict())
    timings["encode_s"] = time.perf_counter() - t

    if cfg.method == "vector_filter":
        t = time.perf_counter()
        forward.vector_filter(lm, encoded, concept, todo, cfg.batch_size, on_batch=stream)
        timings["score_s"] = time.perf_counter() - t
    elif cfg.method == "projection_difference":
        gen_row = store.get_model(cfg.generator)
        lm_gen = cached_model(gen_row["spec"])
        t = time.perf_counter()
        own = _generations(store, lm_gen, gen_row["model_id"], dataset["dataset_id"], examples, cfg,
                           progress)
        timings["generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        own_msgs = [ex.prompt_messages + [{"role": "assistant", "content": y}]
                    for ex, y in zip(examples, own)]
        encoded_own, _ = encode_dataset(lm.tokenizer, own_msgs, cfg.max_length)
        timings["encode_s"] += time.perf_counter() - t
        t = time.perf_counter()
        forward.projection_difference(lm, encoded, encoded_own, concept, todo, cfg.batch_size,
                                      on_batch=stream)
        timings["score_s"] = time.perf_counter() - t
    else:
        from .gradient_runner import run_gradient_method

        timings.update(run_gradient_method(store, cfg, lm, encoded, dataset, model_row, concept,
                                           queries, todo, stream, progress))
