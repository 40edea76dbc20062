"""Methods as the app shows them: labels, short names, colours and formulas per method key."""
from cinf_core.methods import registry
from cinf_core.views.labels import LABEL_COLORS

BASE_METHODS = [m.key for m in registry.registered() if not m.options]


def test_every_method_has_colour_label_formula():
    for m in BASE_METHODS:
        assert registry.method_color(m).startswith("#")
        assert registry.method_label(m) != m
        assert registry.method_explanation(m) is not None
    colours = [registry.method_color(m) for m in BASE_METHODS]
    assert len(set(colours)) == len(colours)
    assert registry.method_color("new_method") == registry.method_color("new_method")
    assert registry.color_map(["vector_filter"], by_label=True) == {"Vector Filter": "#009E73"}


def test_answer_start_concept_influence_has_its_own_name_colour_and_formula():
    key = "concept_influence@start3"
    variant = registry.get_method(key)
    assert (variant.name, variant.window) == ("concept_influence", 3)
    plain = registry.get_method("concept_influence")
    assert (plain.name, plain.window) == ("concept_influence", None)
    colours = {registry.method_color(m) for m in BASE_METHODS}
    assert registry.method_color(key) not in colours | set(LABEL_COLORS.values())
    assert registry.method_short(key) == "CI@3"
    text, formula = registry.method_explanation(key)
    assert "first 2 answer token(s)" in text and "r_0" in formula
    assert registry.method_explanation("concept_influence")[1] == plain.formula
    assert registry.method_explanation("unknown") is None
    assert registry.score_flags(key) == "--method concept_influence --concept-window 3"
    assert registry.method_key("concept_influence", {"concept_window": 3}) == key
    assert registry.method_key("response_length_not_loaded", {}) == "response_length_not_loaded"
