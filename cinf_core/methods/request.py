"""A scoring request (:class:`ScoreConfig`) and its resolution against a workspace (:func:`plan`).

Shared by the single-process runner and the torchrun path: both turn the same request into the
same run (same id, same inputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..store import Store
from .base import RunInputs, RunPlan
from .registry import get_method


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
    index: int | None = field(
        default=None, metadata={"help": "Concept Influence over the gradient index of this "
                                        "projection dimension (`python -m cinf_core index` builds "
                                        "it once; None: the exact pass over the training data)"})

    def __post_init__(self):
        requested = get_method(self.method)
        for option, value in requested.options.items():
            if getattr(self, option) not in (None, value):
                raise ValueError(f"method {self.method} fixes {option}={value}, but the request "
                                 f"sets {option}={getattr(self, option)}; leave {option} unset")
            setattr(self, option, value)
        self.method = requested.name
        for option in ("concept_window", "index"):
            if getattr(self, option) is not None and option not in requested.run_fields:
                raise ValueError(f"{option} applies to concept_influence only, not "
                                 f"{self.method}; leave it unset")
        method = self.resolved_method()
        method.validate(self)
        if method.needs_trait and not (self.trait or self.concept):
            raise ValueError(f"{self.method} needs --trait (or --concept)")

    def resolved_method(self):
        """The registered method (or variant) this request scores with."""
        return get_method(self.method).variant({"concept_window": self.concept_window,
                                                "index": self.index})


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
                             f"{inputs.model_row['name']!r}; add them with `python -m cinf_core "
                             f"add-queries --trait {cfg.trait} --model "
                             f"{inputs.model_row['name']} --file QUERIES.jsonl` (or --generate "
                             "--questions FILE)")
        inputs.queries = queries
    if method.needs_generator:
        inputs.generator_row = store.get_model(cfg.generator)
    p = RunPlan(cfg, method, inputs, method.run_config(cfg, inputs))
    if cfg.index is not None:  # refuse a query the workspace's gradient index cannot answer
        from .index import index_for_plan

        index_for_plan(store, p)
    return p
