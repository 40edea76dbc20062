"""cinf: Concept Influence explorer — which training examples made a model pick up a trait?

The public API pages and users may call. The engine never imports streamlit.
"""
from .concepts import Concept, DirectionConcept, SAEFeatureConcept
from .data import ChatDataset, ChatExample, DatasetError, load_dataset
from .models import LoadedModel, ModelSpec, load_model
from .store import Store

__all__ = [
    "ChatDataset", "ChatExample", "Concept", "DatasetError", "DirectionConcept", "LoadedModel",
    "ModelSpec", "SAEFeatureConcept", "Store", "load_dataset", "load_model",
]
