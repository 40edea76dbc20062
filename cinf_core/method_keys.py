"""Method keys: a method name, or a method with the variant it was scored with.

Concept Influence measured over an answer-start window (``ScoreConfig.concept_window = K``) is its
own method wherever methods are listed, compared or filtered by: ``concept_influence@start<K>``.
This module is import-light (no torch): pages, the evaluation and the retrain grid all use it.
"""
from __future__ import annotations

from typing import Mapping

VARIANT_SEP = "@start"
ANSWER_START_WINDOW = 3
"""The answer-start window of the Concept Influence variant the app offers by default. Chosen on
an earlier demo world, where K = 1, 3, 6 gave AUC-PR 0.897 / 0.912 / 0.891 (evil) and
0.671 / 0.729 / 0.657 (sycophantic), against 0.731 / 0.556 over all response tokens; on the
current demo world K = 3 gives 0.745 / 0.595 against 0.644 / 0.633 (not re-tuned)."""
ANSWER_START_CI = f"concept_influence{VARIANT_SEP}{ANSWER_START_WINDOW}"
FIGURE4_METHODS = ("influence_function", "concept_influence", ANSWER_START_CI)
"""Method keys whose runs are attributed to SAE features (Figure 4)."""


def method_key(method: str, config: Mapping | None = None) -> str:
    """The key of a run scored by ``method`` with ``config`` (its stored or requested settings)."""
    window = (config or {}).get("concept_window")
    if method == "concept_influence" and window:
        return f"{method}{VARIANT_SEP}{int(window)}"
    return method


def split_method(key: str) -> tuple[str, int | None]:
    """``(method, answer-start window or None)`` of a method key."""
    base, sep, window = key.partition(VARIANT_SEP)
    return (base, int(window)) if sep and window.isdigit() else (key, None)
