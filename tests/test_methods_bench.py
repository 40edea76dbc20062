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
    # the side-by-side comparisons, each with what it was measured from
    n = out["n_examples"]
    trunc = out["truncated_forward"]
    assert trunc["layer"] == Store(workspace).load_concept(
        Store(workspace).concept_for_trait("evil")).layer
    assert ratios["vf_over_truncated_forward"] == pytest.approx(
        trunc["vector_filter_examples_per_s"] / trunc["truncated_forward_examples_per_s"])
    assert trunc["truncated_forward_examples_per_s"] == pytest.approx(n / min(trunc["truncated_forward_s"]))
    several = out["k_concepts"]
    assert set(ratios["k_concepts_over_one"]) == {"vector_filter", "concept_influence"}
    for method, r in several.items():
        assert r["n_concepts"] == 8
        assert ratios["k_concepts_over_one"][method] == pytest.approx(min(r["k_s"]) / min(r["one_s"]))
    passes = out["score_passes"]
    assert ratios["grad_sim_over_if_score_pass"] == pytest.approx(
        min(passes["grad_sim_s"]) / min(passes["influence_function_s"]))
    assert set(passes["split"]["grad_sim"]) == {"pass_s", "products_s"}
    gen = out["generation"]
    assert gen["same_responses"] == gen["of"] == gen["n_prompts"] == n  # fewer than 256 prompts
    assert gen["after_batch"] >= gen["before_batch"] == 8
    assert ratios["generation_after_over_before"] == pytest.approx(
        gen["after_examples_per_s"] / gen["before_examples_per_s"])


def test_influence_timing_splits_cinf_time_by_stage(workspace):
    """time_influence_vs_kronfluence's split of cinf's time covers the stages and adds up to
    (nearly) the timed run."""
    pytest.importorskip("kronfluence", reason="oracle not installed: pip install --no-deps "
                        "kronfluence==1.0.1 einconv opt_einsum")
    from cinf_core.curvature import CurvatureConfig
    from cinf_core.data import encode_dataset
    from cinf_core.methods.bench import time_influence_vs_kronfluence
    from cinf_core.models import cached_model

    store = Store(workspace)
    lm = cached_model(store.get_model("finetuned")["spec"])
    train, _ = encode_dataset(lm.tokenizer, store.load_dataset("train").examples[:12], 64)
    queries, _ = encode_dataset(lm.tokenizer, [q["messages"] for q in store.test_queries(
        "evil", store.get_model("finetuned")["model_id"])], 64)
    out = time_influence_vs_kronfluence(lm, train, queries, CurvatureConfig(batch_size=4), repeats=2)
    assert len(out["cinf_runs_s"]) == len(out["kronfluence_runs_s"]) == 2
    assert out["cinf_s"] == min(out["cinf_runs_s"]) and out["spearman"] >= 0.9
    assert out["cpu_ratio"] == pytest.approx(min(out["kronfluence_cpu_s"]) / min(out["cinf_cpu_s"]))
    split = out["cinf_split_s"]
    assert set(split) == {"forward_backward_s", "covariances_s", "eigh_s", "eigenvalue_correction_s",
                          "test_gradients_preconditioning_s", "score_products_s"}
    assert all(v > 0 for v in split.values())
    assert 0.5 * out["cinf_s"] < sum(split.values()) <= out["cinf_s"]
