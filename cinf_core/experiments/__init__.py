"""Experiments: trait judges, filter-and-retrain, agreement and retrieval metrics."""
from .judges import (
    ClassifierJudge,
    ClassifierJudgeConfig,
    Judge,
    OpenAIJudge,
    OpenAIJudgeConfig,
    make_judge,
)

__all__ = [
    "ClassifierJudge",
    "ClassifierJudgeConfig",
    "Judge",
    "OpenAIJudge",
    "OpenAIJudgeConfig",
    "make_judge",
]
