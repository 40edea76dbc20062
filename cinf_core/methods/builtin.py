"""The methods cinf ships: Concept Influence (and its answer-start variant), Influence Function,
Vector Filter, Projection Difference, gradient similarity, and the lexical and random baselines.

Each is a :class:`~cinf_core.methods.base.Method`; :mod:`cinf_core.methods.registry` registers
them in this order, which is the order the app lists them in.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from .. import paths
from ..store import config_hash
from .base import Method, RunInputs, Scorer, ScoringContext

# Colours: the colour-blind-safe Okabe-Ito palette, one per method in every chart of the app.


class ConceptInfluence(Method):
    """CI: ``-grad f_c^T (H + lambda I)^-1 grad L(z_i)``, EK-FAC over blocks below the concept.

    ``window = K`` measures ``f_c`` only where each test answer starts: the last prompt token and
    the first K-1 answer tokens (its own method key, ``concept_influence@start<K>``).
    ``index = k`` answers over the gradient index of projection dimension k
    (:mod:`cinf_core.methods.index`: one backward on the test queries and a matrix product
    instead of a pass over the training data; key ``concept_influence@index<k>``).
    """

    name = "concept_influence"
    label = "Concept Influence"
    short = "CI"
    color = "#D55E00"
    formula = (r"\mathrm{CI}(z_i) = -\nabla_\theta f_c^\top\,(H+\lambda I)^{-1}\,"
               r"\nabla_\theta L(z_i),\quad f_c = \bar a_l\cdot\hat v")
    explanation = ("How much upweighting the example pushes the concept measurement f_c "
                   "(projection on the concept direction, or an SAE feature's pre-activation) up "
                   "on the test queries. EK-FAC only over blocks below the concept layer l.")
    needs_concept = needs_queries = needs_curvature = True
    collective = True
    run_fields = ("max_length", "curvature", "concept_window", "index")
    cost = 3
    sort_chunks_by_length = True
    in_figure4 = True
    VARIANT_SEP = "@start"
    INDEX_SEP = "@index"
    WINDOW_COLOR = "#8C510A"
    INDEX_COLOR = "#E69F00"
    WINDOW_FORMULA = (r"\mathrm{CI}_K(z_i) = -\nabla_\theta f_c^\top\,(H+\lambda I)^{-1}\,"
                      r"\nabla_\theta L(z_i),\quad f_c = \tfrac{1}{|W|}\textstyle\sum_{t \in W} "
                      r"h_{l,t}\cdot\hat v,\ W = \{r_0-1, \dots, r_0+K-2\}")
    INDEX_FORMULA = (r"\widetilde{\mathrm{CI}}(z_i) = \textstyle\sum_m \big\langle U_m\,"
                     r"\big[-(H+\lambda I)^{-1}\nabla_{\theta_m} f_c\big]\,V_m^\top,\ "
                     r"T_m\,\nabla_{\theta_m} L(z_i)\,R_m^\top \big\rangle")

    def __init__(self, window: int | None = None, index: int | None = None):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"concept_window must be a whole number of tokens >= 1 (or unset for "
                             f"all response tokens), got {window!r}")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                                  or index < 1):
            raise ValueError(f"index must be the gradient index's projection dimension, a whole "
                             f"number >= 1 (or unset for the exact pass), got {index!r}")
        self.window = window
        self.index = index
        if window is not None:  # the variant's own presentation (instance attributes)
            self.label = f"{type(self).label} (answer start, {window} tok)"
            self.short = f"{type(self).short}@{window}"
            self.color = self.WINDOW_COLOR
            self.formula = self.WINDOW_FORMULA
            self.explanation = (
                f"Concept Influence with f_c measured only where each test answer starts: the last "
                f"prompt token (r_0 is the first answer token) and the first {window - 1} answer "
                f"token(s), where the model commits to how it answers, instead of over the whole "
                f"teacher-forced answer.")
        if index is not None:
            base = self.label
            self.label = (f"{base[:-1]}, gradient index k={index})" if window is not None
                          else f"{base} (gradient index, k={index})")
            self.short = f"{self.short}~{index}"
            self.color = self.INDEX_COLOR
            self.formula = self.INDEX_FORMULA
            self.explanation = (
                "Concept Influence answered from the gradient index: every training gradient was "
                "stored once, rotated into the EK-FAC eigenbasis, half-whitened and compressed by "
                f"a fixed random projection (dimension {index}); a concept costs one backward pass "
                "on the test queries and one matrix product. An unbiased estimate of the exact "
                "score (exact when the dimension reaches the modules' full size).")

    @property
    def key(self) -> str:
        key = self.name if self.window is None else f"{self.name}{self.VARIANT_SEP}{self.window}"
        return key if self.index is None else f"{key}{self.INDEX_SEP}{self.index}"

    @property
    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.window is None else {"concept_window": self.window}
        if self.index is not None:
            out["index"] = self.index
        return out

    def variant(self, config: Mapping[str, Any]) -> Method:
        window = (config or {}).get("concept_window")
        index = (config or {}).get("index")
        if isinstance(index, Mapping):  # a stored run's config records the index's options
            index = index.get("dim")
        window, index = (int(window) if window else None), (int(index) if index else None)
        if window == self.window and index == self.index:
            return self
        return ConceptInfluence(window, index)

    def variant_for_key(self, key: str) -> Method | None:
        base, *parts = key.split("@")
        if base != self.name:
            if parts:
                option = "index" if parts[0].startswith("index") else "concept_window"
                raise ValueError(f"{option} applies to concept_influence only, not {base}; "
                                 "leave it unset")
            return None
        window = index = None
        for part in parts:
            tag = "@" + part
            if tag.startswith(self.VARIANT_SEP) and window is None:
                window = tag[len(self.VARIANT_SEP):]
                if not window.isdigit():
                    raise ValueError(f"method {key!r}: the answer-start window must be a whole "
                                     f"number of tokens, as in {self.name}{self.VARIANT_SEP}3")
            elif tag.startswith(self.INDEX_SEP) and index is None:
                index = tag[len(self.INDEX_SEP):]
                if not index.isdigit():
                    raise ValueError(f"method {key!r}: the gradient index's dimension must be a "
                                     f"whole number, as in {self.name}{self.INDEX_SEP}32")
            else:
                raise ValueError(f"method {key!r}: unknown variant @{part}; use "
                                 f"{self.name}{self.VARIANT_SEP}K and/or {self.name}"
                                 f"{self.INDEX_SEP}K")
        return self.variant({"concept_window": window, "index": index})

    def run_config(self, cfg, inputs: RunInputs) -> dict[str, Any]:
        out = super().run_config(cfg, inputs)
        if out["concept_window"] is None:  # runs scored before the option existed keep their ids
            del out["concept_window"]
        if out["index"] is None:
            del out["index"]
        else:
            from .index import run_option

            out["index"] = run_option(out["index"])
        return out

    def chunks(self, ctx: ScoringContext) -> list[list[int]]:
        if self.index is not None:  # one matrix product answers every example at once
            return [ctx.todo] if ctx.todo else []
        return super().chunks(ctx)

    def prepare(self, ctx: ScoringContext) -> Scorer:
        if self.index is not None:
            from .index import index_scorer

            return index_scorer(ctx)
        from . import gradient

        def precondition(lm, query_enc, factors):
            return gradient.prepare_concept_influence(lm, query_enc, factors, ctx.plan.concept,
                                                      batch_size=ctx.cfg.batch_size,
                                                      window=ctx.cfg.concept_window)

        return _gradient_scorer(ctx, precondition, below_layer=ctx.plan.concept.layer)

    def prepare_concepts(self, ctx: ScoringContext, concepts) -> Scorer | None:
        """One training pass for several concepts: EK-FAC over the blocks below the highest
        concept layer (a concept's gradient is zero in the blocks at or above its own layer),
        one preconditioned row per concept; the scorer returns ``[n, K]``."""
        if getattr(self, "index", None) is not None:
            return None  # the gradient index answers each concept on its own
        from . import gradient

        def precondition(lm, query_enc, factors):
            return gradient.prepare_concept_influence(lm, query_enc, factors, list(concepts),
                                                      batch_size=ctx.cfg.batch_size,
                                                      window=ctx.cfg.concept_window)

        return _gradient_scorer(ctx, precondition, below_layer=max(c.layer for c in concepts),
                                all_columns=True)


class InfluenceFunction(Method):
    name = "influence_function"
    label = "Influence Function"
    short = "IF"
    color = "#0072B2"
    formula = (r"\mathrm{IF}(z_i) = \nabla_\theta L_{\text{test}}^\top\,"
               r"(H+\lambda I)^{-1}\,\nabla_\theta L(z_i)")
    explanation = ("How much upweighting the example lowers the loss on the test queries (the "
                   "trait-expressing generations). Needs one gradient per example and EK-FAC "
                   "curvature H.")
    needs_queries = needs_curvature = True
    collective = True
    run_fields = ("max_length", "curvature")
    cost = 3
    sort_chunks_by_length = True
    in_figure4 = True

    def prepare(self, ctx: ScoringContext) -> Scorer:
        from . import gradient

        return _gradient_scorer(ctx, lambda lm, query_enc, factors: (
            gradient.prepare_influence_function(lm, query_enc, factors,
                                                batch_size=ctx.cfg.batch_size)))


class VectorFilter(Method):
    name = "vector_filter"
    label = "Vector Filter"
    short = "VF"
    color = "#009E73"
    formula = r"\mathrm{VF}(z_i) = \bar a_l(x_i, y_i)\cdot \hat v"
    explanation = ("Projection of the example's response-mean activation on the concept "
                   "direction. One forward pass per example; no gradients, no Hessian.")
    needs_concept = True

    def chunks(self, ctx: ScoringContext) -> list[list[int]]:
        return _length_batches(ctx)

    def prepare(self, ctx: ScoringContext) -> Scorer:
        score = self.prepare_concepts(ctx, [ctx.plan.concept])
        return lambda idx: score(idx)[:, 0]

    def prepare_concepts(self, ctx: ScoringContext, concepts) -> Scorer:
        """Several concepts from the same forward passes (stopped at the highest concept layer):
        the scorer returns ``[n, K]``."""
        from . import forward

        lm, encoded, concepts = ctx.model(), ctx.encoded(), list(concepts)
        directions = forward._directions(lm, concepts)  # a bad concept is refused here, once
        return lambda idx: forward.project(lm, encoded, idx, concepts, ctx.cfg.batch_size,
                                           directions=directions)


class ProjectionDifference(Method):
    name = "projection_difference"
    label = "Projection Difference"
    short = "PD"
    color = "#CC79A7"
    formula = (r"\mathrm{PD}(z_i) = \big[\bar a_l(x_i, y_i) - "
               r"\bar a_l(x_i, y'_i)\big]\cdot\hat v")
    explanation = ("How much more the training response expresses the concept than the model's "
                   "own response y' to the same prompt. Forward passes only.")
    needs_concept = needs_generator = True
    run_fields = ("max_length", "generator", "max_new_tokens")
    cost = 2

    def chunks(self, ctx: ScoringContext) -> list[list[int]]:
        return _length_batches(ctx)

    def run_config(self, cfg, inputs: RunInputs) -> dict[str, Any]:
        out = super().run_config(cfg, inputs)
        generator = inputs.generator_row
        out["generator_id"] = generator["model_id"]
        out["generator_weights"] = generator["spec"].weights_fingerprint()
        return out

    def prepare(self, ctx: ScoringContext) -> Scorer:
        from . import forward

        cfg, store = ctx.cfg, ctx.store
        lm, encoded, examples = ctx.model(), ctx.encoded(), ctx.examples()
        gen_row = ctx.plan.inputs.generator_row
        lm_gen = ctx.model(gen_row)
        gen_key = generation_key(cfg.max_new_tokens, gen_row["spec"])
        have = store.generations(ctx.plan.dataset["dataset_id"], gen_row["model_id"], gen_key)
        missing = [i for i in ctx.todo if i not in have]
        t = time.perf_counter()

        def save(chunk: list[int], outs: list[str], done: int) -> None:
            ctx.save_generations(gen_row["model_id"], gen_key, chunk, outs)
            have.update(zip(chunk, outs))
            ctx.report("generate y'", done / len(missing))

        generate_responses(lm_gen, [examples[i].prompt_messages for i in missing],
                           cfg.max_new_tokens, generation_batch(cfg.batch_size),
                           on_batch=lambda rows, outs, done: save([missing[r] for r in rows], outs, done))
        ctx.timings["generate_s"] = time.perf_counter() - t
        own = ctx.encode([examples[i].prompt_messages + [{"role": "assistant", "content": have[i]}]
                          for i in ctx.todo])
        by_index = dict(zip(ctx.todo, own))
        # Examples this process does not score keep their own encoding (never read).
        encoded_own = [by_index.get(i, e) for i, e in enumerate(encoded)]
        return lambda idx: forward.projection_difference(lm, encoded, encoded_own,
                                                         ctx.plan.concept, idx, cfg.batch_size)


class GradientSimilarity(Method):
    name = "grad_sim"
    label = "Gradient similarity"
    short = "GS"
    color = "#E69F00"
    formula = r"\mathrm{GS}(z_i) = \nabla_\theta L_{\text{test}}^\top\,\nabla_\theta L(z_i)"
    explanation = "Influence function with H = I: the dot product of test and training gradients."
    needs_queries = True
    collective = True
    run_fields = ("max_length", "curvature")
    cost = 3
    sort_chunks_by_length = True

    def prepare(self, ctx: ScoringContext) -> Scorer:
        from . import gradient

        return _gradient_scorer(ctx, lambda lm, query_enc, factors: gradient.prepare_grad_sim(
            lm, query_enc, curvature_config(ctx.cfg), batch_size=ctx.cfg.batch_size))


class Lexical(Method):
    name = "lexical"
    label = "Lexical (TF-IDF)"
    short = "Lex"
    color = "#56B4E9"
    formula = (r"\mathrm{Lex}(z_i) = \cos\big(\mathrm{tfidf}(y_i),\ "
               r"\tfrac{1}{Q}\textstyle\sum_q \mathrm{tfidf}(y_q)\big)")
    explanation = ("Bag-of-words baseline: TF-IDF similarity of the training response to the "
                   "test queries' responses. No model. If it retrieves the trait data as well as "
                   "a method, the trait is in the words themselves.")
    needs_queries = True
    loads_model = False
    signed = False  # a cosine similarity of word counts: no "pushes it down" end
    run_fields = ()  # words, not tokens: max_length does not apply
    chunk = 4096
    cost = 0

    def prepare(self, ctx: ScoringContext) -> Scorer:
        from . import lexical

        values = lexical.lexical_scores([ex.response for ex in ctx.examples()],
                                        [q["messages"][-1]["content"] for q in ctx.plan.queries])
        return lambda idx: values[list(idx)]


class Random(Method):
    name = "random"
    label = "Random"
    short = "Random"
    color = "#7F7F7F"
    formula = r"s_i \sim \mathcal{N}(0, 1)"
    explanation = "A seeded random score per example: the baseline every method must beat."
    loads_model = False
    signed = False
    run_fields = ("max_length", "seed")
    chunk = 4096
    cost = 0

    def prepare(self, ctx: ScoringContext) -> Scorer:
        from . import forward

        n, seed = ctx.plan.n_total, ctx.cfg.seed
        return lambda idx: forward.random_scores(n, seed, idx)


ANSWER_START_WINDOW = 3
"""The answer-start window of the registered Concept Influence variant: K = 3 ranked the demo
world's trait data best of K = 1, 3, 6 (picked against its labels; see the README)."""
BUILTIN_METHODS: tuple[Method, ...] = (
    ConceptInfluence(), ConceptInfluence(window=ANSWER_START_WINDOW), InfluenceFunction(),
    VectorFilter(), ProjectionDifference(), GradientSimilarity(), Lexical(), Random())
"""Registered by :mod:`cinf_core.methods.registry`, in the app's display order."""


# ---------------------------------------------------------------- shared by the gradient methods

def curvature_config(cfg):
    """The run's EK-FAC settings: ``cfg.curvature`` over the run's batch size and token budget."""
    from ..curvature import CurvatureConfig

    return CurvatureConfig.from_dict({"max_length": cfg.max_length, "batch_size": cfg.batch_size,
                                      **cfg.curvature})


def generation_key(max_new_tokens: int, generator) -> str:
    """Key of the cached greedy generations y' made by ``generator`` (a ModelSpec), with its
    weights fingerprint: a generator rewritten in place generates again."""
    key = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    weights = generator.weights_fingerprint()
    if weights is not None:
        key["weights"] = weights
    return config_hash(key)


GENERATION_BATCH = 64
"""Prompts per generation batch (at least the run's batch size): a greedy decoding step costs
about the same for 16 rows as for 64 on a small model, so wide batches generate faster."""


def generation_batch(batch_size: int) -> int:
    return max(int(batch_size), GENERATION_BATCH)


def generate_responses(lm, prompts, max_new_tokens: int, batch_size: int, on_batch=None) -> list[str]:
    """Greedy responses to ``prompts`` (message lists), in their order, generated in batches of
    prompts of similar token length (longest first), left-padded with an attention mask
    (:func:`cinf_core.models.generate`), so little padding rides along.

    ``on_batch(rows, responses, n_done)``: after each batch, ``rows`` its positions in
    ``prompts``. Greedy decoding of a prompt does not depend on its batch: padded positions are
    masked out of attention and positions count from each prompt's first token (tested equal
    to one prompt at a time).
    """
    from ..models import generate

    tok = lm.tokenizer
    texts = [tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out: list[str | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        responses = generate(lm, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                             batch_size=len(rows))
        for i, r in zip(rows, responses):
            out[i] = r
        if on_batch is not None:
            on_batch(rows, responses, s + len(rows))
    return out


def _length_batches(ctx: ScoringContext) -> list[list[int]]:
    """Forward methods score batches of similar length (little padding), longest first."""
    from .forward import length_batches

    return length_batches(ctx.encoded(), ctx.todo, ctx.cfg.batch_size)


def _gradient_scorer(ctx: ScoringContext, precondition, below_layer: int | None = None,
                     all_columns: bool = False) -> Scorer:
    """Fit (or load) the EK-FAC factors, precondition the behaviour gradient once, and return
    the scorer of training gradients against it.

    ``precondition(lm, query_encodings, factors)`` returns a :class:`gradient.Prepared`. Under
    torchrun every rank joins the fit (``ctx.comm`` sums the covariances); rank 0 alone
    preconditions and broadcasts the result (module names and tensors only). The scorer returns
    ``[n]`` (the first behaviour row), or ``[n, K]`` with ``all_columns``.
    """
    from ..curvature import load_or_fit_factors
    from . import gradient

    cfg, method = ctx.cfg, ctx.plan.method
    lm, encoded = ctx.model(), ctx.encoded()
    factors = None
    if method.needs_curvature:
        seen = 0

        def fit_progress(k: int) -> None:  # the fit makes two passes over the data
            nonlocal seen
            seen += k
            ctx.report("fit EK-FAC", seen / (2 * max(len(encoded), 1)))

        t = time.perf_counter()
        factors = load_or_fit_factors(
            lm, encoded, curvature_config(cfg),
            cache_dir=paths.artifact_dir(ctx.store.workspace, paths.FACTORS_DIR),
            dataset_id=ctx.plan.dataset["dataset_id"], below_layer=below_layer,
            model_id=ctx.plan.model_row["model_id"], progress=fit_progress, comm=ctx.comm)
        ctx.timings["fit_s"] = time.perf_counter() - t
    prepared = None
    if ctx.comm is None or ctx.comm.rank == 0:
        query_enc = ctx.encode([q["messages"] for q in ctx.plan.queries])
        t = time.perf_counter()
        prepared = precondition(lm, query_enc, factors)
        ctx.timings["queries_s"] = time.perf_counter() - t
    if ctx.comm is not None:
        payload = None if prepared is None else (
            prepared.method, list(prepared.modules), prepared.queries, prepared.columns)
        kind, names, queries, columns = ctx.comm.broadcast_object(payload)
        named = dict(lm.model.named_modules())
        prepared = gradient.Prepared(kind, {n: named[n] for n in names}, queries, columns)
    def scorer(idx):
        scores = gradient.train_scores(lm, prepared, encoded, batch_size=cfg.batch_size, indices=idx)
        return scores if all_columns else scores[:, 0]

    return scorer
