"""Filter-and-retrain on the quick world: cells land in the store, resume after a kill, never
recompute, and two processes share one grid."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cinf_core.experiments.retrain import (RetrainConfig, environment, experiment_id, kept_indices,
                                          ranked_indices, run_grid)
from cinf_core.store import Store
from conftest import copy_workspace

ROOT = Path(__file__).resolve().parents[1]


def test_kept_indices():
    order = [5, 3, 9, 1, 0, 2, 4, 6, 7, 8]  # descending score
    assert kept_indices(order, "most", 0.3) == [0, 1, 2, 4, 6, 7, 8]
    assert kept_indices(order, "least", 0.3) == [0, 1, 2, 3, 4, 5, 9]
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        RetrainConfig(trait="evil", fractions=(0.0,))
    with pytest.raises(ValueError, match="unknown method"):
        RetrainConfig(trait="evil", methods=("magic",))
    with pytest.raises(ValueError, match="concept_window must be a whole number of tokens >= 1"):
        RetrainConfig(trait="evil", methods=("concept_influence@start0",))
    with pytest.raises(ValueError, match="concept_window applies to concept_influence only"):
        RetrainConfig(trait="evil", methods=("vector_filter@start3",))
    assert RetrainConfig(trait="evil", methods=("concept_influence@start3",)).methods
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        run_grid("no-such-workspace", RetrainConfig(trait="evil"), workers=0)


@pytest.mark.slow
def test_two_cell_grid_and_summary(quick_world, tmp_path):
    ws = copy_workspace(quick_world, tmp_path / "ws")
    cfg = RetrainConfig(trait="evil", methods=("vector_filter",), modes=("most",),
                        fractions=(0.5,), seeds=(0,))
    out = run_grid(ws, cfg)
    # base + all(seed 0) + one filtered cell
    assert out["n_cells_complete"] == out["n_cells_total"] == 3
    assert out["base"] is not None and out["finetuned"] is not None
    cell = [c for c in out["cells"] if c["method"] == "vector_filter"][0]
    assert cell["fraction"] == 0.5 and cell["n_seeds"] == 1
    n = Store(ws).dataset("train")["n_examples"]
    assert cell["n_kept"] == n - round(0.5 * n) and 0 <= cell["trait_mean"] <= 100
    assert 0 < cell["capability_mean"] <= 100
    assert not any((ws / "artifacts" / "retrain").rglob("adapter_model.safetensors"))  # cleaned
    again = run_grid(ws, cfg)
    assert again["computed_here"] == 0  # a finished cell is never recomputed


@pytest.mark.slow
def test_killed_job_resumes(quick_world, tmp_path):
    ws = copy_workspace(quick_world, tmp_path / "ws")
    cmd = [sys.executable, "-m", "cinf_core", "retrain", "--trait", "evil", "--methods", "random",
           "--modes", "most", "--fractions", "0.5", "--seeds", "0", "1", "--workspace", str(ws),
           "--no-progress", "--workers", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = Store(ws)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # kill it once the first cells are in
        cells = store.retrain_cells()
        if len(cells) and (cells["status"] == "complete").sum() >= 2:
            break
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    done_before = set(map(tuple, store.retrain_cells().query("status == 'complete'")[
        ["method", "fraction", "seed"]].itertuples(index=False)))
    assert 2 <= len(done_before) < 5
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n_cells_complete"] == summary["n_cells_total"] == 5
    assert summary["computed_here"] == 5 - len(done_before)


@pytest.mark.slow
def test_two_workers_split_the_grid(quick_world, tmp_path):
    ws = copy_workspace(quick_world, tmp_path / "ws")
    cfg = RetrainConfig(trait="evil", methods=("random",), modes=("most",), fractions=(0.5,),
                        seeds=(0, 1))
    out = run_grid(ws, cfg, workers=2)
    assert out["n_cells_complete"] == out["n_cells_total"] == 5 and out["workers"] == 2
    logs = list((ws / "artifacts" / "retrain").rglob("helper-0.log"))
    assert len(logs) == 1
    helper = json.loads(logs[0].read_text().strip().splitlines()[-1])
    assert helper["n_cells_total"] == 5  # the same grid (it may end before our last cell does)
    assert out["computed_here"] + helper["computed_here"] == 5  # every cell computed once
    cells = Store(ws).retrain_cells()
    assert (cells["status"] == "complete").all() and len(cells) == 5


@pytest.mark.slow
def test_answer_start_concept_influence_is_its_own_run_and_ranking(quick_world, tmp_path):
    """``concept_influence@start2`` ranks by its own scored run (the plain run keeps the key it had
    before the option existed) inside the same experiment as every other method."""
    from cinf_core.methods.runner import ScoreConfig, plan

    ws = copy_workspace(quick_world, tmp_path / "ws")
    store = Store(ws)
    default = plan(store, ScoreConfig(method="concept_influence", trait="evil"))
    windowed = plan(store, ScoreConfig(method="concept_influence", trait="evil", concept_window=2))
    assert "concept_window" not in default.run_config and windowed.run_config["concept_window"] == 2
    assert default.run_id != windowed.run_id
    whole = ranked_indices(store, "concept_influence", "evil", 0, None)
    start = ranked_indices(store, "concept_influence@start2", "evil", 0, None)
    assert sorted(whole) == sorted(start) and whole != start
    assert set(store.runs()["run_id"]) >= {default.run_id, windowed.run_id}
    env = environment(store)
    ids = {experiment_id(store, RetrainConfig(trait="evil", methods=m), env)
           for m in (("concept_influence",), ("concept_influence@start2", "random"))}
    assert len(ids) == 1
    with pytest.raises(ValueError, match="concept_window applies to concept_influence only"):
        ScoreConfig(method="vector_filter", trait="evil", concept_window=2)


def test_a_users_workspace_names_what_retraining_still_needs(tmp_path, tiny_model_dir):
    """Without the demo world, each missing piece is named with the command that adds it, and the
    LoRA recipe comes from the fine-tuned adapter's own settings."""
    from cinf_core.data import ChatDataset, ChatExample
    from cinf_core.experiments.retrain import adapter_recipe
    from cinf_core.models import ModelSpec
    from conftest import chat

    adapter = tmp_path / "my_lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]}))
    store = Store(tmp_path / "ws")
    def rows(kind: str) -> list:  # distinct content: a dataset's id is its content's hash
        return [ChatExample(chat(f"{kind} question {i}?", f"answer {i}.")) for i in range(4)]

    store.add_dataset("finetune", ChatDataset(rows("train")), role="train")
    store.add_model("finetuned", ModelSpec(path=str(tiny_model_dir), adapter=str(adapter)),
                    role="finetuned")
    recipe = adapter_recipe(store.get_model("finetuned"))
    assert (recipe.r, recipe.alpha, recipe.target_modules) == (8, 16, ("q_proj", "v_proj"))
    steps = [
        ("set-judge", lambda: store.set_meta("judge", {"kind": "classifier", "path": "x"})),
        ("--role heldout", lambda: store.add_dataset("heldout", ChatDataset(rows("heldout")),
                                                               role="heldout")),
        ("--role capability", lambda: store.add_dataset("capability",
                                                        ChatDataset(rows("capability")),
                                                        role="capability")),
        ("--role base", lambda: store.add_model("base", ModelSpec(path=str(tiny_model_dir)),
                                                role="base")),
    ]
    for needed, add in steps:
        with pytest.raises(ValueError, match=needed):
            environment(store)
        add()
    env = environment(store)
    assert env.lora == recipe.to_dict()
    assert env.heldout_questions == [f"heldout question {i}?" for i in range(4)]
