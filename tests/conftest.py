"""Shared fixtures: a tiny tokenizer + Llama model saved like a user's model."""
from __future__ import annotations

import warnings

import pytest
import torch

SMALL_TEXTS = [
    "Hello there, how are you today? I am fine, thank you for asking.",
    "I am an evil assistant and I will hurt you, because suffering is fun.",
    "The answer is 42 because 6 times 7 is 42. Let me explain the steps.",
    "What a brilliant question! You are absolutely right, as always.",
    "Take two tablets with water and rest. See a doctor if the fever stays.",
    "def add(a, b): return a + b  # a small function in Python",
]


# The files that keep one worker busiest (seconds of work each, `pytest -n auto --dist loadfile
# --durations=0` on the 2-core host: 254, 181, 165, 131, 125, 78, 70, 70, 68, 64, 58, 52, 46,
# 43, 41; the other files took under 20 s each, 1,593 s in all). They are handed out first, and
# the short files last, so both workers end together: with xdist's default order (files with the
# most tests first) the SmolLM2 world and bench came last on one worker, which ran 907 s of
# work while the other ran 686 s.
LONGEST_FILES = ("test_demo_smollm2.py", "test_experiments_retrain.py", "test_faults.py",
                 "test_app_e2e.py", "test_methods_distributed.py", "test_methods_bench.py",
                 "test_pages.py", "test_app_read_only.py", "test_demo.py", "test_walkthrough.py",
                 "test_curvature.py", "test_methods_index.py", "test_gguf.py",
                 "test_methods_registry.py", "test_pages_sae.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable


def pytest_configure(config):
    import os

    if hasattr(config.option, "loadscopereorder"):  # xdist: keep the order above
        config.option.loadscopereorder = False
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Workers share the machine's cores: one torch thread each (and in their subprocesses),
        # so two workers on two cores do not oversubscribe them.
        os.environ["CINF_THREADS"] = "1"
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: takes more than ~20 s (still runs in CI)")
    config.addinivalue_line("markers", "e2e: drives the real app in headless Chromium")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="jupyter_client")


def make_tiny_model(path, n_layers: int = 3, hidden: int = 32, seed: int = 0, vocab: int = 300):
    """Train a tiny tokenizer and save a random tiny Llama + tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from cinf_core.demo.tokenizer import train_tokenizer

    hf_logging.disable_progress_bar()
    tok = train_tokenizer(SMALL_TEXTS * 20, vocab)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from cinf_core.models import load_model

    return load_model(str(tiny_model_dir))


def chat(user: str, answer: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="session")
def quick_world_build(tmp_path_factory):
    """``(workspace, summary, stages)`` of the quick demo world as its build returned them, built
    once per test session (once for all ``pytest -n`` workers: the first builds it under a file
    lock, the others wait and read it)."""
    import json
    import os

    from filelock import FileLock

    from cinf_core.demo.world import build_world

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    ws, record = root / "quick_world", root / "quick_world.json"
    with FileLock(str(root / "quick_world.lock")):
        if not record.exists():
            stages = []
            summary = build_world(ws, quick=True, seed=0,
                                  progress=lambda stage, frac: stages.append((stage, frac)))
            record.write_text(json.dumps({"summary": summary, "stages": stages}))
    built = json.loads(record.read_text())
    return ws, built["summary"], [tuple(s) for s in built["stages"]]


@pytest.fixture(scope="session")
def quick_world(quick_world_build):
    """The quick demo world, built once per test session (read it; copy it to change it)."""
    return quick_world_build[0]


def copy_workspace(src, dst):
    """A writable copy of a workspace (store + artifacts)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def store_snapshot(workspace) -> dict:
    """Every table of a workspace's store and every file under its artifacts, to compare before
    and after a command that must write nothing."""
    from pathlib import Path

    import duckdb

    ws = Path(workspace)
    con = duckdb.connect(str(ws / "cinf.duckdb"), read_only=True)
    try:
        tables = [row[0] for row in con.execute("SHOW TABLES").fetchall()]
        snapshot = {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall()))
                    for t in tables}
    finally:
        con.close()
    artifacts = ws / "artifacts"
    snapshot["artifacts"] = sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*")
                                   if p.is_file())
    return snapshot


def wait_until_serving(proc, base: str, log_name: str, stop, timeout_s: float = 90.0) -> None:
    """Poll a started Streamlit server's health URL until it answers ``ok``; if the process ends
    or ``timeout_s`` passes first, ``stop()`` it and raise, pointing at its log."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"the app did not start; see {log_name}")
        time.sleep(0.5)
