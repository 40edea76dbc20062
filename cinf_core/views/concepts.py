"""Concepts as the app shows them: per-layer norms, cosines between directions, and a response's
tokens coloured by a per-token value (projection on a concept, an SAE feature's activation)."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import pandas as pd


def layer_norms(all_layers) -> pd.DataFrame:
    """``layer, norm`` of a concept's per-layer tensor ``[n_layers(+1), d_model]``."""
    arr = np.asarray(all_layers, dtype=float)
    if arr.ndim != 2:
        return pd.DataFrame(columns=["layer", "norm"])
    return pd.DataFrame({"layer": np.arange(arr.shape[0]), "norm": np.linalg.norm(arr, axis=1)})


def cosine_matrix(vectors: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Cosine similarity between concept directions of the same size (others are dropped)."""
    items = [(k, np.asarray(v, dtype=float).ravel()) for k, v in vectors.items()]
    if not items:
        return pd.DataFrame()
    size = pd.Series([v.size for _, v in items]).mode()[0]
    items = [(k, v) for k, v in items if v.size == size and np.linalg.norm(v) > 0]
    names = [k for k, _ in items]
    mat = np.stack([v / np.linalg.norm(v) for _, v in items]) if items else np.zeros((0, size))
    return pd.DataFrame(mat @ mat.T, index=names, columns=names)


def token_highlight_html(tokens: Sequence[str], values: Sequence[float],
                         scale: float | None = None) -> str:
    """HTML for a response with each token's background coloured by its value (its projection on
    a concept, or an SAE feature's activation): red for positive (towards the concept), blue for
    negative, opacity ∝ |value|/scale. Token text is escaped; the value shows as a tooltip."""
    vals = np.asarray(values, dtype=float)
    if scale is None:
        scale = float(np.abs(vals).max()) if vals.size else 1.0
    scale = scale if scale > 0 else 1.0
    spans = []
    for tok, v in zip(tokens, vals):
        alpha = min(abs(v) / scale, 1.0) * 0.85
        rgb = "213,94,0" if v >= 0 else "0,114,178"
        text = html.escape(tok).replace("\n", "<br>")
        spans.append(f'<span title="{v:+.3f}" style="background: rgba({rgb},{alpha:.2f}); '
                     f'border-radius: 3px; padding: 0 1px">{text}</span>')
    return ('<div style="line-height: 1.9; font-family: ui-monospace, monospace; '
            'white-space: pre-wrap">' + "".join(spans) + "</div>")
