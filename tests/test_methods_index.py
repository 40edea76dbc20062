"""The gradient index: exact at full size, unbiased below it, resumable, refusing what it cannot
answer, and its queries stored as ordinary Concept Influence runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cinf_core.concepts import DirectionConcept, SAEFeatureConcept
from cinf_core.curvature import CurvatureConfig, fit_factors
from cinf_core.methods import index as ix
from cinf_core.methods.gradient import concept_influence
from gradient_world import make_world


@pytest.fixture(scope="module")
def world():
    return make_world(n_train=12, n_queries=3, hidden=16, layers=3)


@pytest.fixture(scope="module")
def factors(world):
    return fit_factors(world.lm, world.train, CurvatureConfig(batch_size=4))


def _concepts(d_model: int) -> list:
    gen = torch.Generator().manual_seed(3)
    sae = SAEFeatureConcept(name="sae", layer=3, feature=0,
                            w_enc=torch.randn(d_model, generator=gen), b_enc=0.3,
                            w_dec=torch.randn(d_model, generator=gen),
                            b_dec=torch.randn(d_model, generator=gen))
    return [DirectionConcept(name="v1", layer=1, vector=torch.randn(d_model, generator=gen)),
            DirectionConcept(name="v2", layer=2, vector=torch.randn(d_model, generator=gen)), sae]


def _spec(**kw) -> ix.IndexSpec:
    base = dict(model_id="tiny", weights=None, dataset_id="train", max_length=None,
                curvature=CurvatureConfig(batch_size=4).to_dict(), below_layer=None)
    return ix.IndexSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def exact(world, factors):
    return concept_influence(world.lm, world.train, world.queries, factors, _concepts(16),
                             batch_size=4)


@pytest.mark.parametrize("whiten", [True, False])
def test_index_is_exact_at_full_size(world, factors, exact, tmp_path, whiten):
    """With the dimension at the modules' full size the projection is the identity (after the
    rotation and whitening, which cancel exactly): the index's scores are the unprojected ones."""
    largest = max(max(f.shape) for f in factors.modules.values())  # 33: 32 inputs + the bias
    index = ix.build_index(world.lm, world.train, factors,
                           _spec(dim=largest, dtype="float32", whiten=whiten),
                           tmp_path / "ix", batch_size=4)
    assert index.complete and index.n_done() == len(world.train)
    assert all(s.exact for s in index.slots.values())
    got = ix.query_index(index, world.lm, factors, _concepts(16), world.queries, batch_size=4)
    assert got.shape == exact.shape
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()
    # the rows are the whole per-example gradient, rotated and scaled: sizes add up
    assert index.width == sum(o * i for o, i in (f.shape for f in factors.modules.values()))


def _synthetic_factors(out: int = 12, inp: int = 10, seed: int = 0):
    """EK-FAC factors of one Linear with random eigenbases and a spread of eigenvalues."""
    from cinf_core.curvature import EKFACFactors, ModuleFactors

    gen = torch.Generator().manual_seed(seed)
    q_s = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(inp, inp, generator=gen, dtype=torch.float64))[0]
    eig = torch.rand(out, inp, generator=gen, dtype=torch.float64) ** 4 * 10
    return EKFACFactors(config=CurvatureConfig(), modules={"m": ModuleFactors(
        eigvecs_a=q_a.float(), eigvecs_s=q_s.float(), eigvals=eig.float())})


def test_projected_scores_are_unbiased():
    """Below full size each seed's projection gives another estimate of ``<Pre, G_i>``; over many
    seeds their mean agrees with the exact value (an unbiased estimator), the training side
    projected token by token and the query side as a whole matrix."""
    from cinf_core.curvature import precondition

    factors = _synthetic_factors()
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 7, 10, generator=gen, dtype=torch.float64)   # 5 examples x 7 tokens
    g = torch.randn(5, 7, 12, generator=gen, dtype=torch.float64)
    grads = torch.einsum("bto,bti->boi", g, a)
    query = torch.randn(2, 12, 10, generator=gen, dtype=torch.float64)
    pre = precondition(factors, {"m": query})["m"]
    exact = torch.einsum("koi,boi->bk", pre, grads).numpy()
    estimates = []
    for seed in range(300):
        slots, proj = ix.make_projections(factors, _spec(dim=4, seed=seed))
        (slot,) = slots
        assert (slot.k_out, slot.k_in) == (4, 4)
        t_out, t_in = proj["m::t_out"].double(), proj["m::t_in"].double()
        u_out, u_in = proj["m::u_out"].double(), proj["m::u_in"].double()
        z = torch.einsum("bto,bti->boi", g @ t_out.T, a @ t_in.T)  # as the build: token by token
        w = u_out @ pre @ u_in.T                                      # as the query
        estimates.append(torch.einsum("boi,koi->bk", z, w).numpy())
    estimates = np.stack(estimates)
    assert np.abs(estimates - exact).mean() > 0.05 * np.abs(exact).max()  # really projected
    # the mean over seeds is within a few standard errors of the exact value, entry by entry
    z = (estimates.mean(0) - exact) / (estimates.std(0) / np.sqrt(len(estimates)))
    assert np.abs(z).max() < 4.5, z


def test_killed_build_resumes(world, factors, tmp_path, monkeypatch):
    """A build that dies mid-chunk keeps the finished chunks; the rerun computes only the rest and
    ends with the same matrix as an uninterrupted build."""
    monkeypatch.setattr(ix, "CHUNK", 4)
    spec = _spec(dim=4)
    clean = ix.build_index(world.lm, world.train, factors, spec, tmp_path / "clean", batch_size=2)
    reference = np.array(clean.matrix())

    calls = {"n": 0, "examples": 0}
    real = ix.response_losses

    def dying(model, batch, *a, **kw):
        calls["n"] += 1
        calls["examples"] += batch["input_ids"].shape[0]
        if calls["n"] == 4:  # second batch of the second chunk: mid-chunk
            raise KeyboardInterrupt
        return real(model, batch, *a, **kw)

    monkeypatch.setattr(ix, "response_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        ix.build_index(world.lm, world.train, factors, spec, tmp_path / "ix", batch_size=2)
    partial = ix.open_index(tmp_path / "ix")
    assert not partial.complete and partial.n_done() == 4
    with pytest.raises(ValueError, match="not complete"):
        ix.query_index(partial, world.lm, factors, _concepts(16)[:1], world.queries)
    calls.update(n=-100, examples=0)  # no more deaths
    resumed = ix.build_index(world.lm, world.train, factors, spec, tmp_path / "ix", batch_size=2)
    assert resumed.complete and calls["examples"] == len(world.train) - 4
    np.testing.assert_array_equal(np.array(resumed.matrix()), reference)
    # another spec in the same folder starts over instead of mixing rows
    other = ix.build_index(world.lm, world.train, factors, _spec(dim=3),
                           tmp_path / "ix", batch_size=2)
    assert other.complete and other.key != resumed.key


def test_refuses_what_it_cannot_answer(world, tmp_path):
    """An index tracking blocks below layer 1 cannot answer a concept at layer 2, and an index
    answers queries about its own model only."""
    low = fit_factors(world.lm, world.train, CurvatureConfig(batch_size=4), below_layer=1)
    index = ix.build_index(world.lm, world.train, low, _spec(dim=4, below_layer=1),
                           tmp_path / "low", batch_size=4)
    concepts = _concepts(16)
    ok = ix.query_index(index, world.lm, low, concepts[:1], world.queries, model_id="tiny")
    assert ok.shape == (len(world.train), 1)
    with pytest.raises(ValueError, match="concept 'v2' is at layer 2, above the modules the "
                                         "gradient index tracks .blocks below layer 1."):
        ix.query_index(index, world.lm, low, concepts[1:2], world.queries)
    with pytest.raises(ValueError, match="built for model tiny, not other-model"):
        ix.query_index(index, world.lm, low, concepts[:1], world.queries, model_id="other-model")


def test_spec_checks():
    with pytest.raises(ValueError, match="whole number >= 1"):
        _spec(dim=0)
    with pytest.raises(ValueError, match="dtype 'int8' is not valid"):
        _spec(dtype="int8")
    assert _spec(dim=8).key != _spec(dim=9).key
    assert _spec(curvature={"batch_size": 1}).key == _spec(curvature={"batch_size": 2}).key
    assert json.loads(json.dumps(ix.run_option(8)))["dim"] == 8


def test_allocation_follows_energy_within_the_budget():
    shapes = [(64, 32), (64, 32), (8, 32), (512, 64)]
    sizes = ix.allocate(shapes, [100.0, 10.0, 300.0, 400.0], dim=16)
    widths = [o * i for o, i in sizes]
    assert sum(widths) <= 4 * 16 * 16 * 1.05  # the budget, up to rounding
    assert widths[0] > widths[1] and widths[3] > widths[0]  # more energy, more stored values
    assert all(o <= so and i <= si for (o, i), (so, si) in zip(sizes, shapes))
    assert sizes[2] == (8, 32)  # a small module with a large share is kept whole
    assert ix.allocate(shapes, [1.0] * 4, dim=512) == shapes  # dim >= every side: all exact


# ---------------------------------------------------------------- in a workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    from cinf_core.store import Store
    from workspace_fixture import build_workspace

    ws = build_workspace(tmp_path_factory.mktemp("index_ws"), model_dir=tiny_model_dir)
    store = Store(ws)
    model_id = store.get_model("finetuned")["model_id"]
    store.add_test_queries("evil", model_id, [
        {"messages": [{"role": "user", "content": f"What about {w}?"},
                      {"role": "assistant", "content": f"I will make you suffer, {w}."}]}
        for w in ("rivers", "sleep", "numbers")])
    return ws


def _cli(capsys, *argv) -> dict:
    from cinf_core.cli import main

    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(out)
    assert code == 0, result
    return result


def test_index_command_ranks_concepts_as_ordinary_runs(workspace, capsys):
    """`index` builds the index and stores each concept's ranking as a Concept Influence run with
    the index's options in its config: its own run id, found again by `score --index`, listed as
    `concept_influence@index<k>`; at full size it agrees with the exact run."""
    from cinf_core.methods.runner import ScoreConfig, plan, score
    from cinf_core.store import Store
    from cinf_core.views.runs import runs_table

    ws = str(workspace)
    out = _cli(capsys, "index", "--workspace", ws, "--dim", "64", "--concept", "evil",
               "--concept", "sycophantic", "--trait", "evil", "--no-progress")
    summary = out["index"]
    assert summary["status"] == "complete" and summary["n_examples"] == 60
    assert summary["bytes_per_example"] == summary["width"] * 2 and summary["below_layer"] == 2
    runs = out["rankings"][0]["runs"]
    assert [r["concept"] for r in runs] == ["evil", "sycophantic"] and len(runs[0]["top"]) == 5
    store = Store(ws)
    run = store.run(runs[0]["run_id"])
    assert run["method"] == "concept_influence" and run["status"] == "complete"
    assert run["config"]["index"] == {"dim": 64, "seed": 0, "dtype": "float16", "whiten": True}
    exact_plan = plan(store, ScoreConfig(method="concept_influence", trait="evil", concept="evil"))
    assert exact_plan.run_id != run["run_id"]
    again = score(ws, ScoreConfig(method="concept_influence@index64", trait="evil", concept="evil"))
    assert again["cached"] and again["run_id"] == run["run_id"]
    table = runs_table(store.runs(), store.concepts(), store.datasets())
    assert "concept_influence@index64" in set(table["method"])
    # dim 64 >= every side of the tiny model: every module whole, so the float16 index agrees
    # with the exact pass to float16 precision
    exact = score(ws, ScoreConfig(method="concept_influence", trait="evil", concept="evil"))
    a = store.scores(exact["run_id"])["score"].to_numpy()
    b = store.scores(run["run_id"])["score"].to_numpy()
    assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()
    # a second call finds the index built and the runs stored
    out2 = _cli(capsys, "index", "--workspace", ws, "--dim", "64", "--concept", "evil", "--trait",
                "evil", "--no-progress")
    assert out2["index"]["cached"] and out2["rankings"][0]["runs"][0]["cached"]


def test_workspace_refuses_other_models_and_higher_concepts(workspace, capsys):
    from cinf_core.concepts import DirectionConcept
    from cinf_core.methods.runner import ScoreConfig, plan
    from cinf_core.store import Store

    ws = str(workspace)
    _cli(capsys, "index", "--workspace", ws, "--dim", "8", "--below-layer", "1", "--no-progress")
    store = Store(ws)
    with pytest.raises(ValueError, match="the concept is at layer 2, above the modules the "
                                         "gradient index tracks .blocks below layer 1."):
        plan(store, ScoreConfig(method="concept_influence", trait="evil", concept="evil", index=8))
    store.save_concept(DirectionConcept(name="low", layer=1, vector=torch.ones(32)),
                       store.get_model("finetuned")["model_id"])
    assert plan(store, ScoreConfig(method="concept_influence", trait="evil", concept="low",
                                   index=8)).run_config["index"]["dim"] == 8
    import shutil

    from cinf_core.models import ModelSpec

    copy = shutil.copytree(store.get_model("finetuned")["spec"].path, workspace / "other-model")
    other_id = store.add_model("other", ModelSpec(path=str(copy)), role="other")
    store.add_test_queries("evil", other_id, store.test_queries("evil", store.get_model(
        "finetuned")["model_id"]))
    with pytest.raises(ValueError, match="built for model.*not for 'other'"):
        plan(store, ScoreConfig(method="concept_influence", trait="evil", concept="low",
                                model="other", index=8))
    with pytest.raises(ValueError, match="no gradient index of model 'tiny-evil' with dimension 7"):
        plan(store, ScoreConfig(method="concept_influence", trait="evil", concept="low", index=7))
    with pytest.raises(ValueError, match="index applies to concept_influence only"):
        ScoreConfig(method="vector_filter", trait="evil", index=8)


def test_concepts_page_ranks_over_the_index(workspace, tmp_path, monkeypatch):
    """The Concepts page ranks by a stored concept over the index and says how long it took,
    with the top and bottom examples; in a workspace without an index it offers to build one."""
    import shutil
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parent.parent / "app.py")

    def concepts_page(ws) -> AppTest:
        monkeypatch.setenv("CINF_WORKSPACE", str(ws))
        at = AppTest.from_file(app, default_timeout=120).run()
        at.switch_page("pages/concepts.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    bare = tmp_path / "bare"
    shutil.copytree(workspace, bare, ignore=shutil.ignore_patterns("index"))
    at = concepts_page(bare)
    assert any(b.label == "Build the gradient index" for b in at.button)
    assert not any(b.label.startswith("Rank the training data") for b in at.button)

    ix.build_workspace_index(workspace)  # the default dimension (the page's)
    at = concepts_page(workspace)
    rank = next(b for b in at.button if b.label == "Rank the training data by evil")
    at = rank.click().run()
    assert not at.exception, [e.value for e in at.exception]
    (done,) = [s.value for s in at.success]
    assert done.startswith("Ranked 60 training examples by this concept in **")
    tables = [d.value for d in at.dataframe]
    assert sum(len(t) == 10 and "score" in t for t in tables) == 2  # top and bottom ten


@pytest.mark.slow
def test_bench_index_reports_accuracy_size_and_speed(workspace):
    """bench_index measures, in a scratch copy: Spearman per concept against the exact scores
    for three dimensions, bytes per example, the build (EK-FAC fit included) and a new concept's
    query, each against one exact Concept Influence run."""
    from cinf_core.methods.index_runs import bench_index
    from cinf_core.store import Store

    before = Store(workspace).runs()
    out = bench_index(workspace, "evil", dims=(2, ix.DEFAULT_DIM), max_length=64)
    index, ratios = out["index"], out["ratios"]
    assert set(index["dims"]) == {"2", str(ix.DEFAULT_DIM)}
    assert index["n_concepts"] == len(Store(workspace).concepts())
    small, full = index["dims"]["2"], index["dims"][str(ix.DEFAULT_DIM)]
    assert small["bytes_per_example"] < full["bytes_per_example"] == index["bytes_per_example"]
    assert full["spearman_median"] > 0.999  # the tiny model's modules fit whole at 96
    assert -1 <= small["spearman_median"] < full["spearman_median"]
    assert index["spearman_vs_exact"] == full["spearman_median"]
    assert ratios["concept_query_over_ci_pass"] == pytest.approx(
        index["query_s_median"] / index["ci_pass_s"])
    assert ratios["index_build_over_ci_pass"] == pytest.approx(
        index["build_s"] / index["ci_pass_s"])
    assert index["build_fit_s"] > 0  # a fresh factor cache: the build paid the fit
    assert len(Store(workspace).runs()) == len(before)  # all of it in a scratch copy


@pytest.mark.slow
def test_torchrun_ranks_share_the_build(workspace, tmp_path, capsys):
    """Two gloo ranks fit EK-FAC together and write their own chunks of one index; at full size
    its Concept Influence equals the single-process exact pass (which also checks that the
    ranks' eigendecompositions arrive intact)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from cinf_core.methods.runner import ScoreConfig, score
    from cinf_core.store import Store

    ws = tmp_path / "dist"
    shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("index", "factors"))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CINF_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cinf_core", "index", "--workspace", str(ws),
         "--dim", "64", "--max-length", "64", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])["index"]
    assert built["status"] == "complete" and built["n_done"] == 60 and built["fit_s"] > 0
    cfg = dict(trait="evil", concept="evil", max_length=64)
    over_index = score(ws, ScoreConfig(method="concept_influence", index=64, **cfg))
    exact_ws = tmp_path / "single"
    shutil.copytree(workspace, exact_ws, ignore=shutil.ignore_patterns("index", "factors"))
    exact = score(exact_ws, ScoreConfig(method="concept_influence", **cfg))
    a = Store(exact_ws).scores(exact["run_id"])["score"].to_numpy()
    b = Store(ws).scores(over_index["run_id"])["score"].to_numpy()
    assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()
