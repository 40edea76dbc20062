"""EK-FAC curvature for causal LMs: select modules, fit factors once, cache, precondition."""
from .config import CurvatureConfig
from .ekfac import (
    EKFACFactors,
    ModuleFactors,
    fit_ekfac,
    fit_factors,
    load_or_fit_factors,
    precondition,
)
from .modules import select_modules
from .oracle import kronfluence_influence

__all__ = [
    "CurvatureConfig",
    "EKFACFactors",
    "ModuleFactors",
    "fit_ekfac",
    "fit_factors",
    "kronfluence_influence",
    "load_or_fit_factors",
    "precondition",
    "select_modules",
]
