"""The Method contract: what every attribution method tells the app and does for the runner.

A method is one small class (compare Kronfluence's ``Task``): presentation for the app (label,
short name, colour, formula, explanation), what it needs (a concept, test queries, a generator,
curvature), which request fields identify its run, and one ``prepare`` that returns a *scorer*,
a function from training-example indices to scores. The single-process runner, the torchrun path
and ``bench`` all score through that one function; registering an instance
(:func:`cinf_core.methods.registry.register`) makes it appear in ``score --method``, the
evaluation, the retrain grid and the app's pickers.

Sign convention: score > 0 means upweighting the example in training pushes the behaviour up;
rankings sort descending.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ..progress import ProgressFn
from ..store import config_hash, run_key

if TYPE_CHECKING:
    from ..data import ChatExample, EncodedExample
    from ..models import LoadedModel
    from ..store import Store

Scorer = Callable[[Sequence[int]], np.ndarray]
"""``indices -> scores`` (``[len(indices)]`` float64, in ``indices`` order)."""

COMMON_RUN_FIELDS = ("method", "trait", "n_queries")
"""Request fields in every run's identifying config."""


class Method(ABC):
    """One attribution method. Subclasses set the class attributes and implement ``prepare``.

    ``name`` is what the runs table stores; ``key`` names the method wherever methods are listed
    (equal to ``name`` except for variants such as Concept Influence over the answer start,
    ``concept_influence@start3``, which store their option in the run config).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    short: ClassVar[str]
    color: ClassVar[str] = "#7F7F7F"
    formula: ClassVar[str] = ""
    """LaTeX for the app's method explainer."""
    explanation: ClassVar[str] = ""

    needs_concept: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False
    needs_generator: ClassVar[bool] = False
    needs_curvature: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    """False for methods that never read the model's weights (their runs do not key on them)."""
    collective: ClassVar[bool] = False
    """Under torchrun every rank must join ``prepare`` (an EK-FAC fit, a broadcast)."""
    run_fields: ClassVar[tuple[str, ...]] = ("max_length",)
    """ScoreConfig fields, besides :data:`COMMON_RUN_FIELDS`, that identify this method's run."""
    chunk: ClassVar[int] = 128
    """Examples per scorer call (see :meth:`chunks`)."""
    sort_chunks_by_length: ClassVar[bool] = False
    """The default :meth:`chunks` groups examples of similar token length (longest first), so a
    pass over a chunk carries little padding (the gradient methods)."""
    cost: ClassVar[int] = 1
    """Cost tier (0 no model, 1 forward passes, 2 generation, 3 gradients): jobs that score every
    method score the cheap ones first."""
    in_figure4: ClassVar[bool] = False
    """Its runs are attributed to SAE features (Figure 4)."""
    signed: ClassVar[bool] = True
    """Its score follows the sign convention at both ends: a negative score means upweighting the
    example pushes the behaviour down, so the bottom of the ranking means something too (the
    evaluation's two-sidedness diagnostic reads both ends). False for a baseline whose score is a
    similarity or a draw (lexical, random)."""

    @property
    def key(self) -> str:
        return self.name

    @property
    def options(self) -> dict[str, Any]:
        """Request fields this instance fixes (a variant's option); empty for a plain method."""
        return {}

    @property
    def needs_trait(self) -> bool:
        """Needs ``--trait`` (or ``--concept``) to know what to attribute."""
        return self.needs_concept or self.needs_queries

    def variant(self, config: Mapping[str, Any]) -> "Method":
        """The instance that scored a run with this (stored or requested) ``config``."""
        return self

    def variant_for_key(self, key: str) -> "Method | None":
        """The instance a method key names (``name@...``); None when it is not one of this
        method's variants."""
        return self if key == self.key else None

    def validate(self, cfg) -> None:
        """Raise ``ValueError`` for a request this method cannot score (names the fix)."""

    def run_config(self, cfg, inputs: "RunInputs") -> dict[str, Any]:
        """The config that identifies this method's run of ``cfg`` (hashed into the run id)."""
        out = {f: getattr(cfg, f) for f in COMMON_RUN_FIELDS + self.run_fields}
        if self.loads_model:
            out["weights"] = inputs.model_row["spec"].weights_fingerprint()
        if inputs.queries:
            out["queries"] = config_hash([q["messages"] for q in inputs.queries])
        if inputs.concept is not None:
            out["layer"] = inputs.concept.layer
        return out

    def chunks(self, ctx: "ScoringContext") -> list[list[int]]:
        """How the single-process runner cuts ``ctx.todo`` into scorer calls: each call's scores
        can reach the store (a killed run resumes after the last one stored) and move the
        progress bar. Default: runs of :attr:`chunk` consecutive indices (of similar length with
        :attr:`sort_chunks_by_length`)."""
        todo = ctx.todo
        if self.sort_chunks_by_length:
            encoded = ctx.encoded()
            todo = sorted(todo, key=lambda i: -len(encoded[i].input_ids))
        return [todo[s:s + self.chunk] for s in range(0, len(todo), self.chunk)]

    @abstractmethod
    def prepare(self, ctx: "ScoringContext") -> Scorer:
        """Everything done once per run (load, fit, precondition, generate), then the scorer.

        ``ctx.todo`` are the indices this process will score; record stage times in
        ``ctx.timings`` (``*_s`` keys, summed into the run's wall time except ``load_s``).
        """

    def prepare_concepts(self, ctx: "ScoringContext", concepts: Sequence[Any]) -> "Scorer | None":
        """Several concepts in one pass: like :meth:`prepare`, for ``concepts`` instead of
        ``ctx.plan.concept``, with a scorer that returns ``[len(indices), K]`` (column k: concept
        k). None (the default) when the method scores one concept at a time; the runner then
        scores each concept's run on its own (:func:`cinf_core.methods.runner.score_concepts`)."""
        return None

    def __repr__(self) -> str:
        return f"<method {self.key}>"


@dataclass
class RunInputs:
    """A scoring request resolved against the store: what the method reads."""

    dataset: dict
    model_row: dict
    concept: Any | None = None
    queries: list[dict] = field(default_factory=list)
    generator_row: dict | None = None
    """The model generating y' (Projection Difference)."""


@dataclass
class RunPlan:
    """A resolved request: its method, inputs and the run it maps to."""

    cfg: Any
    method: Method
    inputs: RunInputs
    run_config: dict

    @property
    def dataset(self) -> dict:
        return self.inputs.dataset

    @property
    def model_row(self) -> dict:
        return self.inputs.model_row

    @property
    def concept(self):
        return self.inputs.concept

    @property
    def queries(self) -> list[dict]:
        return self.inputs.queries

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


@dataclass
class ScoringContext:
    """What ``Method.prepare`` gets: the plan, the store, and lazily loaded model and data.

    ``comm`` is the torchrun communicator (``None`` in one process): collective methods fit and
    broadcast through it. ``save_generations(model_id, gen_key, indices, responses)`` keeps
    generated responses (the store in one process, the rank's shard folder under torchrun).
    """

    store: "Store"
    plan: RunPlan
    todo: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    progress: ProgressFn = None
    comm: Any = None
    save_generations: Callable[[str, str, list[int], list[str]], None] | None = None
    device: str | None = None
    encoding: dict[str, int] = field(default_factory=dict)
    """How many training examples ``max_length`` trimmed (filled when the data is encoded)."""
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def cfg(self):
        return self.plan.cfg

    def _timed(self, stage: str, key: str, make):
        if key not in self._cache:
            t = time.perf_counter()
            self._cache[key] = make()
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t
        return self._cache[key]

    def model(self, row: dict | None = None) -> "LoadedModel":
        """The run's model (or another registered model's ``row``), loaded once per process."""
        from ..models import cached_model

        spec = (row or self.plan.model_row)["spec"]
        if self.device is not None:
            spec = replace(spec, device=self.device)
        return self._timed("load_s", f"model:{spec.path}:{spec.adapter}", lambda: cached_model(spec))

    def examples(self) -> "list[ChatExample]":
        return self._timed("encode_s", "examples", lambda: self.store.load_dataset(
            self.plan.dataset["dataset_id"]).examples)

    def encode(self, rows) -> "list[EncodedExample]":
        """``rows`` (examples or message lists) tokenised by the run's model, ``max_length``."""
        from ..data import encode_dataset

        t = time.perf_counter()
        out, _ = encode_dataset(self.model().tokenizer, rows, self.cfg.max_length)
        self.timings["encode_s"] = self.timings.get("encode_s", 0.0) + time.perf_counter() - t
        return out

    def encoded(self) -> "list[EncodedExample]":
        """The training set tokenised with response masks (once per run)."""
        from ..data import encode_dataset

        def make():
            out, report = encode_dataset(self.model().tokenizer, self.examples(), self.cfg.max_length)
            self.encoding.update(report.as_dict())
            return out

        self.model()  # loading is timed as load_s, and reading the examples once, on its own:
        self.examples()  # inside make() they would be counted in encode_s twice
        return self._timed("encode_s", "encoded", make)

    def report(self, stage: str, fraction: float) -> None:
        if self.progress:
            self.progress(stage, fraction)
