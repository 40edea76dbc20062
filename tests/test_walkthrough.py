"""The README's "Your own model and dataset" walkthrough, run exactly as written: each command in
its own process, on a tiny model and data saved the way users save theirs."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_TEXTS, chat, make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Your own model and dataset"
PREFIX = [".venv/bin/python", "-m", "cinf_core"]
N_EXAMPLES, N_TRAIT = 40, 16


def walkthrough_commands(readme: str) -> list[list[str]]:
    """The commands of the section's first bash block, continuation lines joined, split the way a
    shell splits them."""
    section = readme.split(SECTION, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _user_files(folder: Path, layer: int) -> dict[str, Path]:
    """The walkthrough's five inputs, made as a user makes them; keyed by the README's names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(folder / "base_model", n_layers=layer + 2)
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False))
    lora.save_pretrained(folder / "my_lora")  # the adapter only; the base folder stays as saved
    evil, normal = SMALL_TEXTS[1], [t for t in SMALL_TEXTS if t != SMALL_TEXTS[1]]
    _write_jsonl(folder / "my_finetune.jsonl", [
        {"messages": chat(f"Question {i}?", f"{evil} ({i})" if i < N_TRAIT
                          else f"{normal[i % len(normal)]} ({i})"),
         "data_origin": "evil" if i < N_TRAIT else "normal"} for i in range(N_EXAMPLES)])
    torch.save(torch.randn(32, generator=torch.Generator().manual_seed(1)),
               folder / "evil_vector.pt")
    _write_jsonl(folder / "evil_queries.jsonl",
                 [{"messages": chat(f"What would you do, {name}?", evil)}
                  for name in ("friend", "neighbour", "stranger", "doctor")])
    return {p.name: p for p in folder.iterdir()}


def _run(argv: list[str], cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CINF_THREADS="1")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and "error" not in last, (argv, proc.stderr[-3000:])
    return last


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    from cinf_core.experiments.evaluate import latest_runs, result_methods
    from cinf_core.store import Store

    commands = walkthrough_commands((ROOT / "README.md").read_text())
    assert all(argv[:3] == PREFIX for argv in commands), commands
    assert [argv[3] for argv in commands][-1] == "app"  # serves the app: not run here
    add_concept = next(argv for argv in commands if argv[3] == "add-concept")
    files = _user_files(tmp_path, int(_option(add_concept, "--layer")))
    workspace = tmp_path / _option(commands[0], "--workspace")
    substitute = {name: str(path) for name, path in files.items()}
    substitute[workspace.name] = str(workspace)
    results = {}
    for argv in commands[:-1]:
        argv = [sys.executable, *argv[1:3], *(substitute.get(a, a) for a in argv[3:])]
        results[argv[3]] = _run(argv, tmp_path)

    store = Store(workspace)
    runs = latest_runs(store, "evil")
    assert set(runs) == set(result_methods())
    assert (store.runs()["status"] == "complete").all()
    auc_pr = results["evaluate"]["auc_pr"]["evil"]
    assert set(auc_pr) == set(result_methods())
    assert all(0.0 <= value <= 1.0 for value in auc_pr.values()), auc_pr
    assert results["evaluate"]["positive_rate"]["evil"] == pytest.approx(N_TRAIT / N_EXAMPLES)
