"""Methods as the app shows them: labels, short names, colours and formulas per method key."""
from cinf_core import ui_data
from cinf_core.views.labels import LABEL_COLORS


def test_every_method_has_colour_label_formula():
    for m in ui_data.METHOD_ORDER:
        assert ui_data.method_color(m).startswith("#")
        assert ui_data.method_label(m) != m
        assert m in ui_data.METHOD_FORMULAS and m in ui_data.METHOD_EXPLANATIONS
    assert len(set(ui_data.METHOD_COLORS.values())) == len(ui_data.METHOD_COLORS)
    assert ui_data.method_color("new_method") == ui_data.method_color("new_method")
    assert ui_data.color_map(["vector_filter"], by_label=True) == {"Vector Filter": "#009E73"}


def test_answer_start_concept_influence_has_its_own_name_colour_and_formula():
    key = "concept_influence@start3"
    assert ui_data.split_method(key) == ("concept_influence", 3)
    assert ui_data.split_method("concept_influence") == ("concept_influence", None)
    colours = {ui_data.method_color(m) for m in ui_data.METHOD_ORDER}
    assert ui_data.method_color(key) not in colours | set(LABEL_COLORS.values())
    assert ui_data.method_short(key) == "CI@3"
    text, formula = ui_data.method_explanation(key)
    assert "first 2 answer token(s)" in text and "r_0" in formula
    assert ui_data.method_explanation("concept_influence")[1] == ui_data.METHOD_FORMULAS["concept_influence"]
    assert ui_data.method_explanation("unknown") is None
