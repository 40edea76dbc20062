"""The method contract: a new method is one class, and then it exists everywhere.

A toy method that scores each training example by the length of its response is written to a
module of its own and registered through ``CINF_METHODS``; the test then finds it in
``score --method`` (a subprocess), the evaluation, the torchrun path (2 gloo ranks) and the
app's method pickers (AppTest).
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cinf_core.methods import registry
from cinf_core.methods.runner import ScoreConfig, plan
from cinf_core.store import Store
from workspace_fixture import build_workspace

ROOT = Path(__file__).resolve().parent.parent
TOY_MODULE = "cinf_toy_method"
TOY = '''
import numpy as np

from cinf_core.methods.base import Method
from cinf_core.methods.registry import register


@register
class ResponseLength(Method):
    """Scores each training example by its response's length in characters."""

    name = "response_length"
    label = "Response length"
    short = "Len"
    loads_model = False
    run_fields = ()

    def prepare(self, ctx):
        examples = ctx.examples()
        return lambda idx: np.array([len(examples[i].response) for i in idx], dtype=float)
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    where = tmp_path_factory.mktemp("plugin")
    (where / f"{TOY_MODULE}.py").write_text(TOY)
    return where


@pytest.fixture()
def toy_registered(plugin_dir, monkeypatch):
    """The toy method registered in this process (as ``CINF_METHODS`` would), removed after."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    importlib.import_module(TOY_MODULE)
    yield registry.get_method("response_length")
    registry.unregister("response_length")
    sys.modules.pop(TOY_MODULE, None)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    return build_workspace(tmp_path_factory.mktemp("toy_ws"), model_dir=tiny_model_dir)


def _env(plugin_dir) -> dict:
    return dict(os.environ, CINF_METHODS=TOY_MODULE, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(plugin_dir), str(ROOT)]))


def _lengths(workspace) -> np.ndarray:
    return np.array([len(ex.response) for ex in Store(workspace).load_dataset("train").examples],
                    dtype=float)


def test_builtin_registry_lists_every_method_once_with_what_the_app_needs():
    keys = registry.method_keys()
    assert keys[:3] == ["concept_influence", "concept_influence@start3", "influence_function"]
    assert len(keys) == len(set(keys)) == 8
    assert registry.method_keys(results_order=True)[:2] == ["lexical", "random"]  # cheap first
    for method in registry.registered():
        assert method.label and method.short and method.color.startswith("#")
        assert registry.get_method(method.key) is method
    assert registry.figure4_keys() == ["concept_influence", "concept_influence@start3",
                                       "influence_function"]
    assert registry.get_method("concept_influence@start5").options == {"concept_window": 5}
    with pytest.raises(ValueError, match="unknown method 'magic'; use one of concept_influence"):
        registry.get_method("magic")


def test_registering_a_taken_name_is_refused():
    from cinf_core.methods.base import Method

    class Impostor(Method):
        name, label, short = "vector_filter", "Impostor", "X"

        def prepare(self, ctx):
            raise AssertionError

    with pytest.raises(ValueError, match="'vector_filter' is already registered by VectorFilter"):
        registry.register(Impostor)
    assert type(registry.get_method("vector_filter")).__name__ == "VectorFilter"


def test_a_plugin_that_cannot_be_imported_is_named(monkeypatch):
    code = "from cinf_core.methods.registry import method_keys; method_keys()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, CINF_METHODS="no_such_module_here"), cwd=ROOT)
    assert proc.returncode != 0
    assert "CINF_METHODS names module 'no_such_module_here'" in proc.stderr


def test_toy_method_is_scored_by_the_cli(workspace, plugin_dir, tmp_path):
    """``score --method response_length`` in a fresh process: the run is stored and complete."""
    import shutil

    ws = shutil.copytree(workspace, tmp_path / "ws")
    env = _env(plugin_dir)
    helped = subprocess.run([sys.executable, "-m", "cinf_core", "score", "--help"], env=env,
                            capture_output=True, text=True, cwd=ROOT)
    assert "response_length" in helped.stdout
    proc = subprocess.run([sys.executable, "-m", "cinf_core", "score", "--method", "response_length",
                           "--trait", "evil", "--workspace", str(ws), "--no-progress"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "response_length" and not summary["cached"]
    run = Store(ws).run(summary["run_id"])
    assert run["status"] == "complete" and run["n_done"] == run["n_total"] == 60
    assert "weights" not in run["config"]  # it never reads the model
    np.testing.assert_array_equal(Store(ws).scores(summary["run_id"])["score"], _lengths(ws))
    plain = subprocess.run([sys.executable, "-m", "cinf_core", "score", "--method",
                            "response_length", "--trait", "evil", "--workspace", str(ws)],
                           capture_output=True, text=True, cwd=ROOT,
                           env={k: v for k, v in env.items() if k != "CINF_METHODS"})
    assert plain.returncode != 0 and "unknown method 'response_length'" in plain.stderr


def test_toy_method_joins_the_evaluation(workspace, toy_registered, tmp_path):
    import shutil

    from cinf_core.experiments.evaluate import ensure_runs, evaluate, result_methods

    ws = shutil.copytree(workspace, tmp_path / "ws")
    assert "response_length" in result_methods()
    runs = ensure_runs(ws, traits=["evil"], methods=("response_length",))
    result = evaluate(ws, traits=["evil"])
    assert result["runs"]["evil"]["response_length"] == runs["evil"]["response_length"]
    lengths = _lengths(ws)
    labels = np.array([ex.label == "evil" for ex in Store(ws).load_dataset("train").examples])
    from cinf_core.experiments.metrics import auc_pr

    assert result["auc_pr"]["evil"]["response_length"] == pytest.approx(auc_pr(lengths, labels))
    assert "response_length" in result["spearman"]["evil"]


@pytest.mark.slow
def test_toy_method_runs_under_torchrun(workspace, plugin_dir, toy_registered, tmp_path):
    """Two gloo ranks score the toy method through the same scorer: one merged run, the
    single-process scores."""
    import shutil

    ws = shutil.copytree(workspace, tmp_path / "ws")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cinf_core", "score",
           "--method", "response_length", "--trait", "evil", "--workspace", str(ws), "--no-progress"]
    proc = subprocess.run(cmd, env=_env(plugin_dir), capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = Store(ws)
    run_id = plan(store, ScoreConfig(method="response_length", trait="evil")).run_id
    run = store.run(run_id)  # the same request in one process names the same run
    assert run["status"] == "complete" and run["timings"]["world_size"] == 2
    np.testing.assert_array_equal(store.scores(run_id)["score"], _lengths(ws))


def test_toy_method_appears_in_the_app_pickers(workspace, toy_registered, monkeypatch, tmp_path):
    import shutil

    from cinf_core.experiments.evaluate import ensure_runs

    ws = shutil.copytree(workspace, tmp_path / "ws")
    ensure_runs(ws, traits=["evil"], methods=("response_length",))
    monkeypatch.setenv("CINF_WORKSPACE", str(ws))
    app = str(ROOT / "app.py")

    at = AppTest.from_file(app, default_timeout=120).run()
    at.switch_page("pages/runs_cost.py").run()
    assert not at.exception, [e.value for e in at.exception]
    method = [sb for sb in at.selectbox if sb.label == "Method"][0]
    assert "Response length" in method.options

    at.switch_page("pages/filter_retrain.py").run()
    assert not at.exception, [e.value for e in at.exception]
    pickers = [ms for ms in at.multiselect if ms.label == "Methods"]
    assert pickers and "Response length" in pickers[0].options

    at.switch_page("pages/influential_examples.py").run()
    assert not at.exception, [e.value for e in at.exception]
    options = [o for sb in at.selectbox for o in sb.options]
    assert "Response length" in options
