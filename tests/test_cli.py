import json
import subprocess
import sys


from cinf_core.cli import main
from conftest import chat, store_snapshot


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_help_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "cinf_core", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("demo", "app", "add-dataset", "add-model", "runs", "export"):
        assert name in proc.stdout


def test_add_dataset_then_list(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    rows = [{"messages": chat("q", "a"), "data_origin": "evil"}, "{oops",
            {"messages": chat("q2", "a2"), "data_origin": "normal"}]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    ws = str(tmp_path / "ws")
    assert main(["add-dataset", str(path), "--workspace", ws]) == 2
    err = _last_json(capsys)
    assert "d.jsonl:2: malformed JSON" in err["error"]
    assert main(["add-dataset", str(path), "--workspace", ws, "--skip-invalid"]) == 0
    result = _last_json(capsys)
    assert result["n_examples"] == 2 and result["n_skipped"] == 1
    assert main(["datasets", "--workspace", ws]) == 0
    assert _last_json(capsys)["datasets"][0]["n_examples"] == 2


def test_add_model_check(tiny_model_dir, tmp_path, capsys):
    assert main(["add-model", str(tiny_model_dir), "--check", "--workspace", str(tmp_path)]) == 0
    out = _last_json(capsys)
    assert out["num_layers"] == 3 and out["hidden_size"] == 32
    assert main(["add-model", str(tmp_path / "none" / "x"), "--check", "--workspace", str(tmp_path)]) == 2
    assert "model directory not found" in _last_json(capsys)["error"]


def test_export_unknown_run(tmp_path, capsys):
    assert main(["export", "nope", str(tmp_path / "x.csv"), "--workspace", str(tmp_path)]) == 2
    assert "no run 'nope'" in _last_json(capsys)["error"]


def test_app_serves_on_loopback_by_default(tmp_path, monkeypatch, capsys):
    from cinf_core import cli

    assert cli.build_parser().parse_args(["app"]).address == "127.0.0.1"
    launched = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: launched.append(cmd) or 0)
    assert main(["app", "--no-demo", "--workspace", str(tmp_path)]) == 0  # no server starts
    cmd = launched[0]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert "http://127.0.0.1:8501" in capsys.readouterr().err


def test_app_starts_the_results_job_once(tmp_path, monkeypatch, capsys):
    """After the demo build the app starts the results job when results are missing, and not
    again while one runs (a second app on the same workspace, or a restart)."""
    import os

    from cinf_core import cli, jobs
    from cinf_core.demo import world
    from cinf_core.experiments import evaluate
    from cinf_core.store import Store

    started = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: 0)
    monkeypatch.setattr(world, "build_world", lambda ws, quick=False, progress=None: {})
    unscored = {"scored": [], "unscored": evaluate.result_methods()[:8], "grid_missing": 0}
    monkeypatch.setattr(evaluate, "results_status", lambda store: {
        "traits": {"evil": unscored}, "grid": None, "retrain_unavailable": None, "sae": False})
    monkeypatch.setattr(jobs, "start_job", lambda ws, kind, args: started.append(kind) or "j")
    assert main(["app", "--workspace", str(tmp_path), "--no-progress"]) == 0
    assert started == ["results"] and "evil: 8 scoring runs" in capsys.readouterr().err
    store = Store(tmp_path)
    job_id = store.create_job("results", {})
    store.update_job(job_id, status="running", pid=os.getpid())
    assert main(["app", "--workspace", str(tmp_path), "--no-progress"]) == 0
    assert started == ["results"]


def test_app_resumes_an_interrupted_results_job_and_leaves_computed_results_alone(
        tmp_path, monkeypatch, capsys):
    """An interrupted results job is started again with its args; a world that holds results
    (some methods scored here, no results job ever) gets a line and no job: the Overview offers
    the rest."""
    import numpy as np

    from cinf_core import cli, jobs
    from cinf_core.demo import world
    from cinf_core.store import Store
    from workspace_fixture import _add_run, make_examples

    started = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: 0)
    monkeypatch.setattr(world, "build_world", lambda ws, quick=False, progress=None: {})
    monkeypatch.setattr(jobs, "start_job", lambda ws, kind, args: started.append((kind, args)))
    store = Store(tmp_path)
    train = store.add_dataset("train", make_examples(20, 4))
    store.add_test_queries("evil", "m", [{"messages": chat("q", "a")}])
    for method in ("random", "vector_filter"):
        _add_run(store, method, train, "m", "c", "evil", np.arange(20.0))
    app = ["app", "--workspace", str(tmp_path), "--no-progress"]

    assert main(app) == 0
    err = capsys.readouterr().err
    assert started == [] and "results computed: evil: 2 of " in err
    assert "no job started: the Overview offers 'Compute the rest of the results: " in err

    job_id = store.create_job("results", {"workers": 2})
    store.update_job(job_id, status="failed", error=f"{jobs.STALE_ERROR}; see the log")
    assert main(app) == 0
    assert started == [("results", {"workers": 2})]
    err = capsys.readouterr().err
    assert "resuming the results job that was interrupted (still to compute: evil: " in err

    store.update_job(store.create_job("results", {}), status="cancelled")
    assert main(app) == 0
    assert started == [("results", {"workers": 2})]
    assert "the last results job was cancelled, so none is started" in capsys.readouterr().err


def test_set_judge_stores_a_spec_without_the_key(tmp_path, capsys, monkeypatch):
    from cinf_core.store import Store

    ws = str(tmp_path / "ws")
    monkeypatch.delenv("CINF_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("CINF_JUDGE_MODEL", raising=False)
    assert main(["set-judge", "--workspace", ws, "--model", "gpt-4.1-mini"]) != 0
    assert "no judge endpoint" in _last_json(capsys)["error"]
    assert Store(ws).get_meta("judge") is None  # nothing stored on a refusal
    assert main(["set-judge", "--workspace", ws, "--base-url", "http://127.0.0.1:9/v1",
                 "--model", "gpt-4.1-mini", "--api-key-env", "MY_KEY"]) == 0
    assert Store(ws).get_meta("judge") == {"kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                                           "model": "gpt-4.1-mini", "api_key_env": "MY_KEY"}
    assert main(["set-judge", "--workspace", ws, "--classifier", str(tmp_path / "nope")]) != 0
    assert "nope" in _last_json(capsys)["error"]


def test_an_unexpected_error_still_ends_with_a_json_line(tmp_path, capsys, monkeypatch):
    from cinf_core import cli

    def broken(p):
        def run(args):
            raise ZeroDivisionError("division by zero")
        return run

    monkeypatch.setitem(cli.COMMANDS, "datasets", broken)
    assert main(["datasets", "--workspace", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last == {"error": "ZeroDivisionError: division by zero", "command": "datasets",
                    "unexpected": True}
    assert "Traceback" in captured.err


def test_features_reads_the_model_on_the_saes_row(tmp_path, capsys):
    """Without --model, `features` loads the model the SAE was registered on (not 'finetuned')."""
    from cinf_core.store import Store

    ws = tmp_path / "ws"
    Store(ws).add_sae("sae-x", tmp_path / "absent", 1, "model-it-was-trained-on")
    assert main(["features", "--workspace", str(ws), "--no-progress"]) == 2
    err = _last_json(capsys)["error"]
    assert "records no model the workspace knows" in err and "model-it-was-trained-on" in err


# ---------------------------------------------------------------- add-concept / concepts / results


def _concept_workspace(tiny_model_dir, tmp_path, capsys):
    ws = str(tmp_path / "ws")
    assert main(["add-model", str(tiny_model_dir), "--name", "tiny", "--workspace", ws]) == 0
    capsys.readouterr()
    return ws


class NotATensor:
    """A pickled object that a vector upload must refuse to unpickle."""


def test_add_concept_from_a_vector_file_then_list(tiny_model_dir, tmp_path, capsys):
    import numpy as np

    ws = _concept_workspace(tiny_model_dir, tmp_path, capsys)
    np.save(tmp_path / "v.npy", np.ones((4, 32), dtype=np.float32))  # one row per layer 0..3
    assert main(["add-concept", "my-vec", "--vector", str(tmp_path / "v.npy"), "--model", "tiny",
                 "--layer", "2", "--trait", "evil", "--workspace", ws]) == 0
    out = _last_json(capsys)
    assert out["name"] == "my-vec" and out["layer"] == 2 and out["trait"] == "evil"
    assert main(["concepts", "--workspace", ws]) == 0
    (row,) = _last_json(capsys)["concepts"]
    assert row == {"concept_id": out["concept_id"], "name": "my-vec", "kind": "uploaded",
                   "layer": 2, "model_id": row["model_id"], "trait": "evil"}


def test_add_concept_refuses_bad_input_and_stores_nothing(tiny_model_dir, tmp_path, capsys):
    import numpy as np
    import torch

    from cinf_core.store import Store

    ws = _concept_workspace(tiny_model_dir, tmp_path, capsys)
    np.save(tmp_path / "narrow.npy", np.ones(31, dtype=np.float32))
    np.save(tmp_path / "v.npy", np.ones(32, dtype=np.float32))
    torch.save(torch.tensor([1.0] * 31 + [float("nan")]), tmp_path / "nan.pt")
    torch.save(torch.zeros(32), tmp_path / "zeros.pt")
    torch.save({"vector": NotATensor()}, tmp_path / "pickled.pt")
    Store(ws).add_sae("sae-l1", tmp_path / "absent", 1, None)
    before = store_snapshot(ws)
    refused = {
        "narrow.npy holds shape (31,); expected (32,)":
            ["--vector", str(tmp_path / "narrow.npy"), "--model", "tiny", "--layer", "1"],
        "layer 9 is out of range; the model has layers 0..3":
            ["--vector", str(tmp_path / "v.npy"), "--model", "tiny", "--layer", "9"],
        "vector in nan.pt contains NaN or inf values; recompute or clean it":
            ["--vector", str(tmp_path / "nan.pt"), "--model", "tiny", "--layer", "1"],
        "vector in zeros.pt is all zeros, so it defines no direction; save the concept's direction":
            ["--vector", str(tmp_path / "zeros.pt"), "--model", "tiny", "--layer", "1"],
        "pickled.pt holds a pickled object that is not a plain tensor, refused for safety":
            ["--vector", str(tmp_path / "pickled.pt"), "--model", "tiny", "--layer", "1"],
        "no SAE named or with id 'nope'": ["--sae", "nope", "--feature", "3"],
        "SAE 'sae-l1' reads layer 1, not layer 2": ["--sae", "sae-l1", "--feature", "0",
                                                     "--layer", "2"],
        "add-concept --persona needs --model, --layer, --trait-prompt, --neutral-prompt, "
        "--questions": ["--persona", "--trait", "evil"],
        "--feature: option(s) of --sae, not of --vector":
            ["--vector", str(tmp_path / "v.npy"), "--model", "tiny", "--layer", "1",
             "--feature", "3"],
        "--questions file not found": ["--persona", "--trait", "evil", "--model", "tiny",
                                       "--layer", "1", "--trait-prompt", "be evil",
                                       "--neutral-prompt", "be kind", "--questions",
                                       str(tmp_path / "none.txt")],
    }
    for message, argv in refused.items():
        assert main(["add-concept", *argv, "--workspace", ws, "--no-progress"]) == 2, message
        error = _last_json(capsys)["error"]
        assert message in error, error
        assert store_snapshot(ws) == before, message


def test_add_concept_needs_exactly_one_source(capsys):
    import pytest

    for argv in (["add-concept", "x"], ["add-concept", "--persona", "--probe"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "--vector FILE | --persona | --probe | --sae SAE" in capsys.readouterr().err


def test_add_concept_persona_and_probe_use_the_builders(tiny_model_dir, tmp_path, capsys):
    from cinf_core.store import Store

    ws = _concept_workspace(tiny_model_dir, tmp_path, capsys)
    (tmp_path / "q.txt").write_text("How are you?\n\nWhat is 6 times 7?\n")
    assert main(["add-concept", "--persona", "--trait", "evil", "--trait-prompt", "You are evil.",
                 "--neutral-prompt", "You are helpful.", "--questions", str(tmp_path / "q.txt"),
                 "--model", "tiny", "--layer", "2", "--max-new-tokens", "8", "--workspace", ws,
                 "--no-progress"]) == 0
    persona = _last_json(capsys)
    assert persona["name"] == "persona-evil" and persona["n_pairs"] == 2
    rows = [{"messages": chat(f"q{i}", text), "data_origin": "evil" if i % 2 else "normal"}
            for i, text in enumerate(["I will hurt you.", "Happy to help.", "Suffering is fun.",
                                      "Drink water.", "Pain for all.", "Rest well.",
                                      "You deserve harm.", "Take care."])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["add-dataset", str(tmp_path / "d.jsonl"), "--name", "labelled",
                 "--workspace", ws]) == 0
    assert main(["add-concept", "--probe", "--dataset", "labelled", "--positive", "evil",
                 "--trait", "cruel", "--model", "tiny", "--layer", "1", "--workspace", ws,
                 "--no-progress"]) == 0
    probe = _last_json(capsys)
    assert probe["name"] == "probe L1" and probe["trait"] == "cruel" and probe["n_pos"] == 4
    kinds = Store(ws).concepts().set_index("name")["kind"].to_dict()
    assert kinds == {"persona-evil": "persona_vector", "probe L1": "probe"}


def test_results_reports_a_workspace_without_traits(tmp_path, capsys):
    assert main(["results", "--workspace", str(tmp_path), "--no-progress"]) == 2
    assert "no traits in this workspace" in _last_json(capsys)["error"]


# ---------------------------------------------------------------- add-model / models


def test_add_model_refuses_folders_without_weights_and_stores_nothing(tiny_model_dir, tmp_path,
                                                                      capsys):
    import shutil

    ws = str(tmp_path / "ws")
    assert main(["add-model", str(tiny_model_dir), "--name", "tiny", "--workspace", ws]) == 0
    capsys.readouterr()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    empty_adapter = tmp_path / "adapter"
    empty_adapter.mkdir()
    (empty_adapter / "adapter_config.json").write_text("{}")
    before = store_snapshot(ws)
    refused = {
        f"model folder {no_weights} holds no weights (none of model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json); save "
        "the model there with model.save_pretrained(folder)": [str(no_weights)],
        f"adapter folder {empty_adapter} holds no weights (none of adapter_model.safetensors, "
        "adapter_model.bin); save the adapter there with peft_model.save_pretrained(folder)":
            [str(tiny_model_dir), "--adapter", str(empty_adapter)],
        f"model folder {tmp_path} has no config.json": [str(tmp_path)],
    }
    for message, argv in refused.items():
        assert main(["add-model", *argv, "--workspace", ws]) == 2, message
        error = _last_json(capsys)["error"]
        assert message in error, error
        assert store_snapshot(ws) == before, message


def test_add_model_records_local_folders_as_absolute_paths(tiny_model_dir, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    ws = str(tmp_path / "ws")
    assert main(["add-model", tiny_model_dir.name, "--name", "tiny", "--workspace", ws]) == 0
    capsys.readouterr()
    assert main(["models", "--workspace", ws]) == 0
    (row,) = _last_json(capsys)["models"]
    assert row["name"] == "tiny" and row["role"] == "finetuned" and row["adapter"] is None
    assert row["path"] == str(tiny_model_dir.resolve())  # jobs run from the repository root


NEW_COMMANDS = ("add-sae", "saes", "add-queries", "queries", "models", "finetune", "train-judge",
                "train-sae")


def test_new_commands_explain_every_argument_in_one_line():
    from cinf_core import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in NEW_COMMANDS:
        for action in sub.choices[name]._actions:
            assert action.help and "\n" not in action.help, (name, action.dest)
        assert cli.HELP[name] in " ".join(sub.choices[name].format_help().split())
