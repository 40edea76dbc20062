"""Token-level inspection for the app: what one example or one phrase looks like inside the model.

Each function takes plain arguments (the workspace, names or ids from the store, chats as message
lists, a phrase) and returns plain data (lists, frames), so a page draws the result without
loading anything itself. Models load through :func:`cinf_core.models.cached_model` (one copy per
process, shared with scoring); a registered SAE loads once per process too. Nothing here writes
to the store.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from .concepts.features import features_by_concept, load_registered_sae, sae_model_spec
from .concepts.sae import feature_token_activations, features_for_phrase
from .models import cached_model, token_activations
from .store import Store

Chat = Sequence[Mapping[str, str]]
"""A chat as the store keeps it: ``[{"role": ..., "content": ...}, ...]``."""


def highlight_concept(workspace, concept: str | None, trait: str) -> str | None:
    """The concept to highlight a run's examples with: the run's own ``concept``, else the newest
    concept built for its ``trait`` (influence function, gradient similarity and random runs have
    none); None when the trait has no concept either."""
    if isinstance(concept, str) and concept:
        return concept
    try:
        return Store(workspace, read_only=True).concept_for_trait(trait)
    except KeyError:
        return None


def concept_token_projection(workspace, model: str, concept: str,
                             messages: Chat) -> tuple[list[str], list[float]]:
    """One chat's response tokens and each token's projection ``h_l · v̂`` on a stored concept's
    direction at the concept's layer ``l`` (one forward pass of the registered ``model``).

    Returns ``(tokens, values)``: decoded token strings and one float per token.
    """
    store = Store(workspace, read_only=True)
    lm = cached_model(store.get_model(model)["spec"])
    loaded = store.load_concept(concept)
    tokens, acts = token_activations(lm, messages, loaded.layer)
    return tokens, (acts @ loaded.direction().to(acts.dtype)).tolist()


@functools.lru_cache(maxsize=2)
def _registered_sae(workspace: Path, sae: str):
    """``(sae, layer)`` of a registered SAE, loaded once per process (a real SAE is big)."""
    return load_registered_sae(workspace, sae)


def _sae_and_model(workspace, sae: str):
    """A registered SAE, the layer it reads and the model it was trained on (both cached)."""
    sae_obj, layer = _registered_sae(Path(workspace).resolve(), sae)
    return sae_obj, layer, cached_model(sae_model_spec(workspace, sae))


def phrase_features(workspace, sae: str, text: str,
                    k: int = 10) -> tuple[list[str], list[tuple[int, float]], list[list[float]]]:
    """Which features of a registered SAE fire on ``text`` read as an assistant response: the model
    the SAE was trained on runs up to the SAE's layer, then the SAE encodes every token.

    Returns ``(tokens, features, token_acts)``: the phrase's tokens, the top ``k`` features as
    ``(feature, max activation)`` strongest first (features that never fire left out), and each
    listed feature's activation on each token ``[n_tokens][len(features)]``.
    """
    sae_obj, layer, lm = _sae_and_model(workspace, sae)
    found = features_for_phrase(lm, sae_obj, text, k=k, layer=layer)
    return found.tokens, found.features, found.token_acts.tolist()


def sae_features_near_concept(workspace, sae: str, concept: str, k: int = 10) -> pd.DataFrame:
    """The ``k`` features of a registered SAE whose decoder rows point most along a stored
    direction concept at the SAE's layer: ``feature, cosine`` (see ``features_by_concept``)."""
    sae_obj, layer = _registered_sae(Path(workspace).resolve(), sae)
    return features_by_concept(workspace, sae_obj, concept, k=k, layer=layer)


def feature_tokens(workspace, sae: str, feature: int,
                   chats: Sequence[Chat]) -> list[tuple[list[str], list[float]]]:
    """One SAE feature's activation on every response token of each chat (a top-activating
    example's highlighting; its max is the example's max activation).

    Returns one ``(tokens, activations)`` per chat.
    """
    sae_obj, layer, lm = _sae_and_model(workspace, sae)
    return feature_token_activations(lm, sae_obj, chats, int(feature), layer=layer)
