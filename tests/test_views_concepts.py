"""Concept geometry and token highlighting."""
import numpy as np
import pytest

from cinf_core.views.concepts import cosine_matrix, layer_norms, token_highlight_html


def test_concept_geometry():
    norms = layer_norms(np.array([[3.0, 4.0], [0.0, 1.0]]))
    assert norms["norm"].tolist() == pytest.approx([5.0, 1.0])
    cos = cosine_matrix({"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0]),
                         "c": np.array([1.0, 0.0, 0.0])})
    assert list(cos.index) == ["a", "b"] and cos.loc["a", "b"] == pytest.approx(2 ** -0.5)


def test_token_highlight_html_escapes_and_colours():
    out = token_highlight_html(["<b>", " evil", " ok"], [0.5, 1.0, -1.0])
    assert "&lt;b&gt;" in out and "<b>" not in out
    assert "rgba(213,94,0,0.85)" in out and "rgba(0,114,178,0.85)" in out
    assert 'title="+0.500"' in out
