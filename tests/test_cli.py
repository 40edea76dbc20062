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
