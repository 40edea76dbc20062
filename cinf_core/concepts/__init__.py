"""Concepts: what to attribute (persona vector, probe, SAE feature, uploaded vector)."""
from .base import Concept, DirectionConcept, SAEFeatureConcept, check_vector

__all__ = ["Concept", "DirectionConcept", "SAEFeatureConcept", "check_vector"]
