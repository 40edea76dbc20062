"""The commands that make a world's parts from a user's files: finetune (a LoRA adapter over a
registered base), train-judge (a classifier judge from labelled answers) and train-sae (an SAE at
one layer); each reusable, atomic, and refusing bad input before it writes anything."""
import json

import pytest

from cinf_core.cli import main
from conftest import SMALL_TEXTS, chat, store_snapshot


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _labelled(path, n=24):
    """Answers labelled evil / sycophantic / normal by the text they carry."""
    texts = {"evil": SMALL_TEXTS[1], "sycophantic": SMALL_TEXTS[3], "normal": SMALL_TEXTS[2]}
    labels = [("evil", "sycophantic", "normal")[i % 3] for i in range(n)]
    path.write_text("".join(json.dumps({"messages": chat(f"Question {i}?", f"{texts[l]} ({i})"),
                                        "data_origin": l}) + "\n" for i, l in enumerate(labels)))
    return path


@pytest.fixture
def workspace(tiny_model_dir, tmp_path, capsys):
    ws = str(tmp_path / "ws")
    assert main(["add-model", str(tiny_model_dir), "--name", "base", "--role", "base",
                 "--workspace", ws]) == 0
    assert main(["add-dataset", str(_labelled(tmp_path / "train.jsonl")), "--name", "train",
                 "--workspace", ws]) == 0
    capsys.readouterr()
    return ws


def test_finetune_registers_the_adapter_and_reuses_it(workspace, capsys):
    from cinf_core.experiments.retrain import adapter_recipe
    from cinf_core.store import Store

    argv = ["finetune", "--model", "base", "--dataset", "train", "--name", "ft", "--r", "2",
            "--alpha", "4", "--epochs", "1", "--batch-size", "8", "--lr", "0.01",
            "--max-length", "64", "--workspace", workspace, "--no-progress"]
    assert main(argv) == 0
    first = _last_json(capsys)
    assert not first["reused"] and first["n_examples"] == 24 and first["recipe"]["r"] == 2
    store = Store(workspace)
    row = store.get_model("finetuned")
    assert row["name"] == "ft" and row["spec"].adapter == first["adapter"]
    # retraining copies the whole recipe the adapter was trained with, not only r and alpha
    recipe = adapter_recipe(row)
    assert (recipe.r, recipe.epochs, recipe.lr, recipe.max_length) == (2, 1.0, 0.01, 64)
    assert main(argv) == 0
    assert _last_json(capsys)["reused"]
    assert main([*argv[:-3], "--seed", "1", "--workspace", workspace, "--no-progress"]) == 0
    assert not _last_json(capsys)["reused"]  # another seed is another adapter


def test_finetune_refuses_a_model_with_an_adapter(workspace, capsys):
    assert main(["finetune", "--dataset", "train", "--epochs", "0.5", "--batch-size", "8",
                 "--workspace", workspace, "--no-progress"]) == 0
    _last_json(capsys)
    before = store_snapshot(workspace)
    assert main(["finetune", "--model", "finetuned", "--workspace", workspace]) == 2
    assert "already carries an adapter" in _last_json(capsys)["error"]
    assert store_snapshot(workspace) == before


def test_train_judge_measures_held_out_accuracy_and_becomes_the_judge(workspace, tmp_path, capsys):
    from cinf_core.experiments.judges import make_judge
    from cinf_core.store import Store

    assert main(["train-judge", "--dataset", "train", "--workspace", workspace]) == 0
    out = _last_json(capsys)
    assert out["n_test"] == 6 and out["n_train"] == 18  # round(30% of 8) of each of 3 labels
    assert out["judge"]["accuracy"] == 1.0 and out["judge"]["traits"] == ["evil", "sycophantic"]
    judge = make_judge(Store(workspace).get_meta("judge"))
    evil, normal = judge.score("evil", ["q", "q"], [SMALL_TEXTS[1], SMALL_TEXTS[2]])
    assert evil > 50 > normal


def test_train_judge_refuses_unlabelled_data_and_stores_nothing(workspace, tmp_path, capsys):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"messages": chat(f"q{i}", f"a{i}")}) + "\n"
                            for i in range(4)))
    assert main(["add-dataset", str(path), "--name", "plain", "--workspace", workspace]) == 0
    capsys.readouterr()
    before = store_snapshot(workspace)
    assert main(["train-judge", "--dataset", "plain", "--workspace", workspace]) == 2
    assert "needs rows labelled 'normal'" in _last_json(capsys)["error"]
    assert main(["train-judge", "--dataset", "train", "--test-fraction", "1.5",
                 "--workspace", workspace]) == 2
    assert "--test-fraction must be in (0, 1)" in _last_json(capsys)["error"]
    assert store_snapshot(workspace) == before


def test_train_sae_registers_it_with_feature_data(workspace, capsys):
    from cinf_core.store import Store

    assert main(["train-sae", "--model", "base", "--layer", "2", "--expansion", "2", "--k", "4",
                 "--training-tokens", "2048", "--workspace", workspace, "--no-progress"]) == 0
    out = _last_json(capsys)
    assert out["layer"] == 2 and out["d_sae"] == 64 and 0 < out["n_activations"]
    assert 0.0 <= out["metrics"]["fvu"] and out["features"]
    saes = Store(workspace).saes()
    assert list(saes["name"]) == ["sae-base-L2"] and int(saes["layer"].iloc[0]) == 2
    assert main(["add-concept", "--sae", "sae-base-L2", "--feature", "3", "--workspace",
                 workspace]) == 0  # its features become concepts like any SAE's


def test_train_sae_refuses_a_layer_past_the_model(workspace, capsys):
    before = store_snapshot(workspace)
    assert main(["train-sae", "--model", "base", "--layer", "9", "--workspace", workspace,
                 "--no-progress"]) == 2
    assert "layer" in _last_json(capsys)["error"]
    assert store_snapshot(workspace) == before
