import json
import subprocess
import sys


from cinf_core.cli import main
from conftest import chat


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
