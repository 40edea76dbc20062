"""The workspace and numbers as text: store version, demo summary, durations, picker defaults."""
import pandas as pd

from cinf_core.views.format import (demo_summary_text, fmt_seconds, newest_with_role,
                                    store_version, workspace_info)


def test_store_version_changes_with_the_store(tmp_path):
    from cinf_core.store import Store

    assert store_version(tmp_path) == ""
    store = Store(tmp_path)
    before = store_version(tmp_path)
    store.set_meta("x", 1)
    assert store_version(tmp_path) != before
    assert workspace_info(tmp_path).exists


def test_demo_summary_text_and_seconds():
    text = demo_summary_text({"summary": {"quick": True, "build_seconds": 150,
                                          "sizes": {"finetune": 60}}})
    assert text.startswith("the toy world") and "quick version" in text
    assert "60 fine-tuning examples" in text and "2.5 min" in text
    smollm2 = demo_summary_text({"summary": {"world": "smollm2", "quick": False, "n_layers": 30,
                                             "hidden_size": 576, "concept_layer": 20}})
    assert smollm2.startswith("the SmolLM2-135M-Instruct world") and "30 layers × 576 d" in smollm2
    resumed = demo_summary_text({"summary": {"build_seconds": 248, "resumed": True}})
    assert "build resumed, its last part took 4.1 min" in resumed and "built in" not in resumed
    assert demo_summary_text(None) == ""
    assert fmt_seconds(0.5) == "500 ms" and fmt_seconds(None) == "—"


def test_newest_with_role_picks_the_form_default():
    table = pd.DataFrame({"name": ["pretrain", "train", "train-v2", "heldout"],
                          "role": ["pretrain", "train", "train", "heldout"]})
    assert newest_with_role(table, "train") == 2
    assert newest_with_role(table, "missing") == 3
    assert newest_with_role(table.iloc[:0], "train") == 0
