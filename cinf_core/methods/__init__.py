"""Attribution methods behind one contract (:class:`~.base.Method`) and one entry point,
``score(workspace, ScoreConfig(...))``.

Influence Function, Concept Influence, gradient similarity (``gradient``), Vector Filter,
Projection Difference, random (``forward``), lexical (``lexical``); every caller lists them
through :mod:`.registry`. Sign convention: score > 0 means upweighting the example pushes the
behaviour up; rankings sort descending.
"""
from .base import Method, ScoringContext
from .registry import get_method, method_keys, register
from .runner import ScoreConfig, score, score_concepts

__all__ = ["Method", "ScoreConfig", "ScoringContext", "get_method", "method_keys", "register",
           "score", "score_concepts"]
