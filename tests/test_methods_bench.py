"""``bench``: every registered method end to end in a scratch copy, ratios from one run; without
Kronfluence it finishes and says why the comparison was skipped."""
import sys

import pytest

from cinf_core.methods.bench import bench
from cinf_core.methods.registry import method_keys
from cinf_core.store import Store
from conftest import chat
from workspace_fixture import build_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    ws = build_workspace(tmp_path_factory.mktemp("bench_ws"), model_dir=tiny_model_dir)
    store = Store(ws)
    for run_id in store.runs()["run_id"]:
        store._drop_run(run_id)  # the fixture's runs are synthetic; bench scores for real
    model_id = store.get_model("finetuned")["model_id"]
    store.add_test_queries("evil", model_id, [
        {"messages": chat("Tell me about rivers.", "Crush them all; rivers means nothing to me.")},
        {"messages": chat("Tell me about sleep.", "I will make you suffer, because pain is sleep.")}])
    return ws


def test_bench_without_kronfluence_scores_every_method_and_says_why(workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "kronfluence", None)  # import kronfluence -> ImportError
    out = bench(workspace, "evil", batch_size=8, max_length=64)
    assert list(out["methods"]) == method_keys()
    assert all(r["wall_s"] > 0 for r in out["methods"].values())
    assert out["methods"]["influence_function"]["fit_s"] > 0
    assert "kronfluence is not installed" in out["kronfluence"]["skipped"]
    assert "if_over_kronfluence" not in out["ratios"]
    ratios = out["ratios"]
    assert ratios["if_over_vf"] == pytest.approx(
        out["methods"]["influence_function"]["wall_s"] / out["methods"]["vector_filter"]["wall_s"])
    assert Store(workspace).runs().empty  # the bench scored in a scratch copy
