"""Attribution methods behind one entry point: ``score(workspace, ScoreConfig(...))``.

Influence Function, Concept Influence, gradient similarity (``gradient``), Vector Filter,
Projection Difference, random (``forward``). Sign convention: score > 0 means upweighting the
example pushes the behaviour up; rankings sort descending.
"""
from .runner import METHODS, ScoreConfig, score

__all__ = ["METHODS", "ScoreConfig", "score"]
