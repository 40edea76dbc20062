"""Test queries: the answers Influence Function and Concept Influence attribute to.

IF measures the loss on them and CI the concept on them (the behaviour B of the methods table), so
a trait's scores say which training examples push the model towards answers like these. Queries
are stored per (trait, model); registering a set again replaces it. Two ways in, behind
``python -m cinf_core add-queries`` and the Concepts page alike:

* :func:`add_queries_from_file`: chat rows the user wrote (JSONL ``{"messages": [...]}``, the last
  message the assistant response), validated like a dataset;
* :func:`generate_test_queries`: the paper's on-policy recipe. The model answers each question
  (sampled, seeded), the workspace judge scores the answers for the trait, and the ``n`` most
  trait-expressing become the queries.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from .progress import ProgressFn, count_examples


def check_trait(trait: str | None) -> str:
    """The trait name, stripped; refuses an empty one (a trait is free text, e.g. ``evil``)."""
    if not isinstance(trait, str) or not trait.strip():
        raise ValueError(f"--trait {trait!r} is empty; name the trait the queries express, "
                         "e.g. --trait evil")
    return trait.strip()


def query_row(question: str, answer: str, judge_score: float | None = None) -> dict[str, Any]:
    """A test query: a one-turn chat whose last message is the answer, and its judge score."""
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}],
            "judge_score": math.nan if judge_score is None else float(judge_score)}


def most_trait_expressing(questions: Sequence[str], answers: Sequence[str],
                          scores: Sequence[float], n: int) -> list[dict[str, Any]]:
    """The ``n`` highest-scored answers as test-query rows, best first, at most one per question
    so the queries cover different prompts; empty answers and answers the judge refused (NaN)
    are left out."""
    rows, seen = [], set()
    for i in sorted(range(len(questions)), key=lambda i: -scores[i]):
        if questions[i] in seen or not answers[i].strip() or math.isnan(scores[i]):
            continue
        seen.add(questions[i])
        rows.append(query_row(questions[i], answers[i], scores[i]))
        if len(rows) == n:
            break
    return rows


def add_queries_from_file(workspace: str | os.PathLike, trait: str, model: str,
                          path: str | os.PathLike, skip_invalid: bool = False) -> dict[str, Any]:
    """Register the chats of a file as ``trait``'s test queries for ``model``, in file order.

    The file is read by :func:`cinf_core.data.load_dataset` (JSONL chat rows, or Parquet/CSV with
    prompt/response columns), so a bad row is reported with its line and the fix and nothing is
    stored; a numeric ``judge_score`` field is kept. Returns a JSON-ready summary.
    """
    from .data import load_dataset
    from .store import Store

    trait = check_trait(trait)
    dataset = load_dataset(path, skip_invalid=skip_invalid)
    store = Store(workspace)
    row = store.get_model(model)
    rows = []
    for ex in dataset:
        score = ex.metadata.get("judge_score")
        numeric = isinstance(score, (int, float)) and not isinstance(score, bool)
        rows.append({"messages": ex.messages, "judge_score": score if numeric else math.nan})
    replaced = len(store.test_queries(trait, row["model_id"]))
    store.add_test_queries(trait, row["model_id"], rows)
    return {"trait": trait, "model": row["name"], "model_id": row["model_id"],
            "n_queries": len(rows), "n_skipped": dataset.n_skipped, "replaced": replaced,
            "source": str(path)}


def generate_test_queries(
    workspace: str | os.PathLike,
    trait: str,
    model: str,
    questions: Sequence[str],
    n: int = 20,
    samples: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    progress: ProgressFn = None,
) -> dict[str, Any]:
    """On-policy test queries: ``model`` answers each question ``samples`` times (sampled at
    ``temperature``, seeded), the workspace judge scores every answer for ``trait`` (0-100), and
    the ``n`` most trait-expressing answers (one per question at most) become the queries.
    Refuses a workspace without a judge before loading the model. Returns a JSON-ready summary
    with the judge's mean score over all answers and over the kept ones.
    """
    from .experiments.judges import make_judge
    from .models import generate, load_model
    from .store import Store

    trait = check_trait(trait)
    questions = [q for q in questions if q.strip()]
    if not questions:
        raise ValueError("no questions to answer; give a --questions file with one per line")
    if n < 1 or samples < 1:
        raise ValueError(f"--n and --samples must be >= 1, got --n {n} --samples {samples}")
    store = Store(workspace)
    spec = store.get_meta("judge")
    if spec is None:
        raise ValueError("this workspace has no judge to score the answers; set one with "
                         "`python -m cinf_core set-judge --base-url URL --model NAME` (or "
                         "--classifier DIR), or give your own queries with --file QUERIES.jsonl")
    judge = make_judge(spec)
    judge.score(trait, [], [])  # an empty batch: refuses a trait the judge cannot score, for free
    row = store.get_model(model)
    if progress is not None:
        progress("test queries: load model", 0.0)
    lm = load_model(row["spec"])
    asked = [q for q in questions for _ in range(samples)]
    answers = generate(lm, [[{"role": "user", "content": q}] for q in asked],
                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       progress=count_examples(progress, "test queries: generate", len(asked)))
    scores = judge.score(trait, asked, answers)
    rows = most_trait_expressing(asked, answers, scores, n)
    if not rows:
        raise ValueError(f"none of the {len(asked)} answers could serve as a query (all empty or "
                         "refused by the judge); raise --max-new-tokens or check the judge")
    replaced = len(store.test_queries(trait, row["model_id"]))
    store.add_test_queries(trait, row["model_id"], rows)
    valid = [s for s in scores if not math.isnan(s)]
    return {"trait": trait, "model": row["name"], "model_id": row["model_id"],
            "n_queries": len(rows), "n_answers": len(asked), "replaced": replaced,
            "mean_judge_score": sum(valid) / len(valid) if valid else None,
            "mean_judge_score_kept": sum(r["judge_score"] for r in rows) / len(rows),
            "judge": judge.config(), "seed": seed, "temperature": temperature}
