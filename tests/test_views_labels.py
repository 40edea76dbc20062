"""Data labels: the trait label, label colours, the label mix per dataset."""
import json

import pandas as pd

from cinf_core.methods import registry
from cinf_core.views.labels import LABEL_COLORS, guess_trait_label, label_colors, label_mix


def test_guess_trait_label_skips_normal_and_prefers_minority():
    assert guess_trait_label(["normal"] * 5 + ["evil"] * 2) == "evil"
    assert guess_trait_label(["normal", None]) is None
    assert guess_trait_label(["a"] * 3 + ["b"]) == "b"
    colors = label_colors(["normal", "evil"], "evil")
    assert colors["evil"] == LABEL_COLORS["trait"] and colors["normal"] != colors["evil"]


def test_label_colours_share_no_colour_with_methods_or_theme():
    import tomllib
    from pathlib import Path

    labels = ["evil", "normal", "unlabelled", "sycophantic", "a", "b", "c", "d", "e", "f", "g"]
    label_hex = set(label_colors(labels, "evil").values())
    label_hex |= set(label_colors(labels).values()) | set(LABEL_COLORS.values())
    method_hex = {registry.method_color(k) for k in registry.method_keys()}
    method_hex |= set(registry._EXTRA_COLORS)
    theme = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit/config.toml")
                          .read_text())["theme"]
    method_hex.add(theme["primaryColor"])
    assert not {c.upper() for c in label_hex} & {c.upper() for c in method_hex}
    colors = label_colors(["normal", "evil", "sycophantic"], "evil")
    assert colors["normal"] == LABEL_COLORS["other"]  # normal data: neutral grey-blue
    assert len(set(colors.values())) == 3


def test_label_mix_reads_json_counts():
    ds = pd.DataFrame({"name": ["a"], "label_counts": [json.dumps({"evil": 2, "normal": 3})]})
    mix = label_mix(ds)
    assert mix.set_index("label")["count"].to_dict() == {"evil": 2, "normal": 3}
