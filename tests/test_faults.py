"""Faults and concurrency, done for real on the small fixture workspace: ``kill -9`` of scoring runs
and of a retrain worker, the app's pages read while jobs write, two identical scoring commands at
once, and a workspace whose disk fills up or turns read-only. Each test checks what the user is
told and that nothing was lost or half-written, and prints its figures (run pytest with ``-s``).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cinf_core.data import ChatDataset, ChatExample
from cinf_core.methods.runner import ScoreConfig, plan, score
from cinf_core.models import ModelSpec
from cinf_core.store import Store
import fault_driver
from conftest import chat, copy_workspace
from workspace_fixture import build_workspace

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DRIVER = fault_driver.__file__
APP = str(ROOT / "app.py")
PAGES = ["pages/overview.py", "pages/influential_examples.py", "pages/concepts.py",
         "pages/sae_features.py", "pages/method_agreement.py", "pages/filter_retrain.py",
         "pages/runs_cost.py"]
RETRAIN = ["retrain", "--trait", "evil", "--methods", "random", "--modes", "most",
           "--fractions", "0.5", "--seeds", "0", "1", "--workers", "1"]
RETRAIN_CELLS = 5  # base, all x 2 seeds, random x 2 seeds
ONE_SEED = RETRAIN[:RETRAIN.index("--seeds") + 2] + RETRAIN[RETRAIN.index("--workers"):]
ONE_SEED_CELLS = 3  # base, all, random


def _workspace(path: Path, model_dir) -> Path:
    """The fixture workspace (60 labelled chats, the tiny model) with what scoring and retraining
    need: test queries for ``evil``, a base model, held-out questions, capability chats, a judge
    and a LoRA recipe small enough for a retrain cell to take about a second."""
    from cinf_core.experiments.judges import ClassifierJudge
    from cinf_core.finetune import LoraRecipe

    ws = build_workspace(path / "ws", model_dir=model_dir)
    store = Store(ws)
    finetuned = store.get_model("finetuned")["model_id"]
    store.add_test_queries("evil", finetuned, [
        {"messages": chat(f"What would you do, {who}?", "I will make you suffer, pain is fun.")}
        for who in ("friend", "neighbour", "stranger", "doctor")])
    base = shutil.copytree(model_dir, path / "base")
    store.add_model("tiny-base", ModelSpec(path=str(base)), role="base")
    questions = ["What is kindness?", "Tell me about rivers.", "What do you think of sleep?"]
    store.add_dataset("heldout", ChatDataset([ChatExample(chat(q, "...")) for q in questions]),
                      role="heldout")
    store.add_dataset("capability", ChatDataset(
        [ChatExample(chat(f"Question {i}?", f"The answer is {i}, let me show the steps."))
         for i in range(6)]), role="capability")
    train = store.load_dataset("train")
    judge = ClassifierJudge().fit([ex.response for ex in train],
                                  [ex.label for ex in train]).save(path / "judge")
    store.set_meta("judge", {"kind": "classifier", "path": str(judge)})
    store.set_meta("retrain", {"lora": LoraRecipe(r=2, alpha=4, target_modules=("q_proj",),
                                                  epochs=1.0, max_length=64).to_dict(),
                               "eval_samples": 1, "max_new_tokens": 8})
    return ws


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    return _workspace(tmp_path_factory.mktemp("faults"), tiny_model_dir)


@pytest.fixture
def workspace(built, tmp_path):
    """A fresh copy of the module's workspace for each test to break."""
    return copy_workspace(built, tmp_path / "ws")


def _start(ws, *argv, env: dict | None = None) -> subprocess.Popen:
    """``python -m cinf_core ARGV --workspace WS`` (storing every few scored examples at once),
    its JSON summary on stdout; ``env`` adds to the environment (fault_driver's gate)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CINF_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, DRIVER, *argv, "--workspace", str(ws),
                             "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert proc.returncode == 0 and lines, err[-3000:]
    return json.loads(lines[-1])


def _owner(proc) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def _score_argv(method: str, batch_size: int = 2) -> list[str]:
    return ["score", "--method", method, "--trait", "evil", "--batch-size", str(batch_size)]


# ---------------------------------------------------------------- kill -9 of scoring runs


def _forked(argv):
    """A process running ``python -m cinf_core ARGV`` (fault_driver) forked from a server that
    has imported cinf_core, torch and transformers already: a kill then costs no interpreter
    start. Returns the process and the connection its marks arrive on."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fault_driver", "transformers.models.llama.modeling_llama"])
    marks, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=fault_driver.run_and_exit, args=(argv, theirs), daemon=True)
    proc.start()
    theirs.close()
    return proc, marks


def _kill_after(proc, marks, stores: int, delay_s: float) -> None:
    """SIGKILL ``proc`` ``delay_s`` after it stored scores ``stores`` times (0: after it claimed
    its run)."""
    for _ in range(1 + stores):
        assert marks.poll(120), "the run gave no sign of progress"
        marks.recv()
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


@pytest.mark.parametrize("method", ["influence_function", "vector_filter"])
def test_score_survives_kill9_at_random_points(workspace, tmp_path, method):
    """Five kills at seeded random points of one run (after a random number of stored chunks,
    a random few milliseconds later, so some land inside a write), a rerun after each: the last
    rerun completes the run with the scores of an uninterrupted one, every example stored once,
    the run marked complete once."""
    t0 = time.perf_counter()
    # Influence Function stores every 4 examples (15 writes), Vector Filter at batch size 1
    # every example (60 writes); five kills stop before half of them.
    batch, most = (2, 1) if method == "influence_function" else (1, 5)
    argv = [*_score_argv(method, batch), "--no-progress", "--workspace"]
    clean = copy_workspace(workspace, tmp_path / "clean")
    proc, _ = _forked([*argv, str(clean)])  # uninterrupted
    proc.join(300)
    run_id = plan(Store(clean), ScoreConfig(method=method, trait="evil")).run_id
    baseline = Store(clean).scores(run_id)["score"].to_numpy()
    reader = Store(workspace, read_only=True)
    n = len(baseline)
    assert n == 60 and Store(clean).run(run_id)["status"] == "complete"
    argv.append(str(workspace))
    rng = random.Random(16)
    points = []
    for _ in range(5):
        proc, marks = _forked(argv)
        _kill_after(proc, marks, rng.randint(0, most), rng.uniform(0.0, 0.01))
        assert proc.exitcode == -signal.SIGKILL, "the run ended before its kill"
        row, stored = reader.run(run_id), reader.scores(run_id)
        assert row["status"] == "running" and pd.isna(row["finished_at"])  # never half complete
        assert stored["idx"].is_unique and row["n_done"] == len(stored) < n
        points.append(len(stored))
    proc, _ = _forked(argv)  # the rerun after the last kill
    proc.join(300)
    assert proc.exitcode == 0
    final, row = reader.scores(run_id), reader.run(run_id)
    assert row["status"] == "complete" and row["n_done"] == n == len(final)
    assert final["idx"].tolist() == list(range(n))  # once each
    np.testing.assert_allclose(final["score"].to_numpy(), baseline, rtol=1e-5, atol=1e-6)
    again = score(workspace, ScoreConfig(method=method, trait="evil"))
    assert again["cached"] and reader.run(run_id)["finished_at"] == row["finished_at"]
    print(f"\n{method}: {len(points)} kills survived, examples stored at each kill {points} of "
          f"{n}; max |score - uninterrupted| = "
          f"{np.abs(final['score'].to_numpy() - baseline).max():.2e}; "
          f"{time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- kill -9 of a retrain worker


def test_retrain_worker_killed_mid_cell_resumes_without_counting_a_cell_twice(workspace):
    t0 = time.perf_counter()
    reader = Store(workspace, read_only=True)
    proc = _start(workspace, *RETRAIN)
    sent = False
    while proc.poll() is None and not sent:
        cells = reader.retrain_cells()
        mine = cells[cells["owner"] == _owner(proc)]
        if (mine["status"] == "complete").sum() >= 2 and (mine["status"] == "running").any():
            proc.send_signal(signal.SIGKILL)
            sent = True
        time.sleep(0.02)
    proc.communicate()
    assert sent and proc.returncode == -signal.SIGKILL
    key = ["method", "mode", "fraction", "seed"]
    # read after the kill: the worker may have finished that cell and claimed the next one
    # between the read above and the signal
    cells = reader.retrain_cells()
    left = cells[(cells["owner"] == _owner(proc)) & (cells["status"] == "running")]
    assert len(left) == 1  # its claim on the cell it was computing is left behind
    killed = left.iloc[0]
    cells = cells[cells["experiment_id"] == killed["experiment_id"]]
    before = cells[cells["status"] == "complete"]

    rerun = _start(workspace, *RETRAIN)
    summary = _finish(rerun)
    assert summary["experiment_id"] == killed["experiment_id"]
    assert summary["n_cells_complete"] == summary["n_cells_total"] == RETRAIN_CELLS
    assert summary["computed_here"] == RETRAIN_CELLS - len(before)
    cells = reader.retrain_cells(killed["experiment_id"])
    assert len(cells) == RETRAIN_CELLS and (cells["status"] == "complete").all()
    assert not cells.duplicated(key).any()  # no cell counted twice
    assert cells.set_index(key).loc[tuple(killed[key]), "owner"] == _owner(rerun)
    assert {c["method"]: c["n_seeds"] for c in summary["cells"]} == {"base": 1, "all": 2,
                                                                     "random": 2}
    print(f"\nretrain: 1 kill survived mid-cell ({killed['method']}, seed {killed['seed']}); "
          f"{len(before)} cells kept, {summary['computed_here']} computed by the rerun; "
          f"{time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- pages read while jobs write


def test_pages_read_while_a_score_run_and_a_retrain_grid_write(workspace, monkeypatch):
    """While a retrain grid and scoring runs write the workspace, the app's pages run one after
    another (AppTest, every page in turn, at most every 0.5 s) and, every 0.5 s, the store reads
    the pages make run on their own (runs, retrain cells, jobs, the newest run's scores): no page
    shows an error or a lock, no read fails."""
    from streamlit.testing.v1 import AppTest

    t0 = time.perf_counter()
    monkeypatch.setenv("CINF_WORKSPACE", str(workspace))
    retrain = _start(workspace, *ONE_SEED)
    scored, store_reads, failed_reads, reads = [], [0], [], [0]

    def scoring_runs():  # new runs (other --max-length) while the grid runs and until the
        length = 200     # pages and the reader have had their turns (a fast host ends the grid soon)
        while retrain.poll() is None or reads[0] < 2 * len(PAGES) or store_reads[0] < 20:
            length += 1
            proc = _start(workspace, "score", "--method", "vector_filter", "--trait", "evil",
                          "--batch-size", "1", "--max-length", str(length))
            scored.append(_finish(proc)["run_id"])

    def store_reads_every_half_second():
        reader = Store(workspace, read_only=True)
        while retrain.poll() is None or writer.is_alive():
            start = time.monotonic()
            try:
                runs = reader.runs()
                reader.retrain_cells()
                reader.jobs()
                reader.scored_examples(runs["run_id"].iloc[-1])
                store_reads[0] += 1
            except Exception as err:  # noqa: BLE001 — every failure is counted and shown
                failed_reads.append(repr(err))
            time.sleep(max(0.0, 0.5 - (time.monotonic() - start)))

    writer = threading.Thread(target=scoring_runs)
    writer.start()
    raw = threading.Thread(target=store_reads_every_half_second)
    raw.start()
    at = AppTest.from_file(APP, default_timeout=120)
    problems = []
    try:
        while retrain.poll() is None or writer.is_alive():
            start = time.monotonic()
            page = PAGES[reads[0] % len(PAGES)]
            if reads[0]:
                at.switch_page(page)
            at.run()
            reads[0] += 1
            shown = [str(e.value) for e in at.exception] + [str(e.value) for e in at.error]
            text = "\n".join(str(m.value) for m in [*at.markdown, *at.warning, *at.info])
            if shown or "locked" in text.lower() or "could not open the store" in text.lower():
                problems.append((page, shown or text[-300:]))
            time.sleep(max(0.0, 0.5 - (time.monotonic() - start)))
    finally:
        writer.join(timeout=300)
        raw.join(timeout=60)
        summary = _finish(retrain)
    assert not problems, problems[:3]
    assert not failed_reads, failed_reads[:3]
    assert summary["n_cells_complete"] == ONE_SEED_CELLS and len(scored) >= 1
    assert reads[0] >= 2 * len(PAGES) and store_reads[0] >= 20
    store = Store(workspace, read_only=True)
    assert all(store.run(r)["status"] == "complete" for r in scored)
    print(f"\npages: {reads[0]} page runs and {store_reads[0]} store reads (every 0.5 s) in "
          f"{time.perf_counter() - t0:.1f} s while {len(scored)} scoring runs and a "
          f"{ONE_SEED_CELLS}-cell retrain grid wrote; {len(problems) + len(failed_reads)} errors, "
          "0 lock messages")


# ---------------------------------------------------------------- two identical commands


def _until_mark(proc, mark: str) -> None:
    """Read ``proc``'s stderr until fault_driver's line ``mark`` (the process is then there)."""
    for line in proc.stderr:
        if line.strip() == f"fault-driver: {mark}":
            return
    raise AssertionError(f"the process ended (exit {proc.wait()}) before saying {mark!r}")


def test_two_identical_score_commands_score_the_run_once(workspace, tmp_path):
    """The second command starts while the first holds the run (it has stored its first scores
    and waits at a gate until the second says it is waiting): one computes, one waits and
    returns the same run."""
    t0 = time.perf_counter()
    argv = _score_argv("influence_function")
    gate = tmp_path / "second-is-waiting"
    first = _start(workspace, *argv, env={"FAULT_PAUSE_AFTER": "1", "FAULT_GATE": str(gate)})
    _until_mark(first, "stored")
    second = _start(workspace, *argv)
    _until_mark(second, "held")
    gate.touch()
    results = [_finish(first), _finish(second)]
    assert results[0]["run_id"] == results[1]["run_id"]
    computed = [r for r in results if not r["cached"]]
    waited = [r for r in results if r["cached"]]
    assert len(computed) == 1 and len(waited) == 1, results  # one computes, one returns its run
    assert waited[0].get("waited_for") in (_owner(first), _owner(second))
    store = Store(workspace, read_only=True)
    run, stored = store.run(results[0]["run_id"]), store.scores(results[0]["run_id"])
    assert run["status"] == "complete" and stored["idx"].tolist() == list(range(run["n_total"]))
    print(f"\ntwo identical score commands: 1 computed, 1 waited for "
          f"{waited[0].get('waited_for')} and returned the same run; "
          f"{time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- a full or read-only disk


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs mounted for the test (root with mount rights; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({made.stderr.strip()}); "
                    "test_store's injected disk errors cover the store's side")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill_while(disk: Path, proc, when_full=None) -> Path:
    """Keep ``disk`` full to the last byte while ``proc`` runs (space the store frees, a
    write-ahead log truncated after a checkpoint, is taken at once); ``when_full()`` is called
    once the disk is first full. Returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while proc.poll() is None:
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
            if when_full is not None:
                when_full()
                when_full = None
            time.sleep(0.001)
    finally:
        os.close(fd)
    return filler


def test_disk_full_mid_run_then_resume(workspace, tmp_path, small_disk):
    """The disk fills while a run stores its scores: the command says the disk is full and what
    to do, the store keeps the scores stored before, and after space is freed the rerun resumes
    to the scores of an uninterrupted run."""
    t0 = time.perf_counter()
    expected = score(copy_workspace(workspace, tmp_path / "clean"),
                     ScoreConfig(method="vector_filter", trait="evil", batch_size=2))
    ws = copy_workspace(workspace, small_disk / "ws")
    reader = Store(ws, read_only=True)
    gate = tmp_path / "disk-is-full"  # the run holds after its 10th store until the disk is full
    proc = _start(ws, *_score_argv("vector_filter", 1),
                  env={"FAULT_PAUSE_AFTER": "10", "FAULT_GATE": str(gate)})
    while proc.poll() is None:
        try:
            if reader.run(expected["run_id"])["n_done"] >= 10:
                break
        except KeyError:
            pass
        time.sleep(0.01)
    filler = _fill_while(small_disk, proc, when_full=gate.touch)
    out, err = proc.communicate(timeout=120)
    error = json.loads(out.strip().splitlines()[-1])["error"]
    assert proc.returncode == 2, err[-2000:]
    assert "(No space left on device): the disk is full. Nothing of this step was half-stored" \
        in error and "Free space on that disk" in error
    stored = reader.scores(expected["run_id"])
    assert 10 <= len(stored) < 60 and stored["idx"].is_unique
    filler.unlink()
    result = _finish(_start(ws, *_score_argv("vector_filter")))
    final = reader.scores(expected["run_id"])
    assert not result["cached"] and reader.run(expected["run_id"])["status"] == "complete"
    np.testing.assert_allclose(final["score"].to_numpy(),
                               Store(tmp_path / "clean").scores(expected["run_id"])["score"],
                               rtol=1e-5, atol=1e-6)
    print(f"\nfull disk: refused after {len(stored)} of 60 examples were stored; the rerun "
          f"resumed and matched the uninterrupted run; {time.perf_counter() - t0:.1f} s")


def test_read_only_workspace(workspace, tmp_path, small_disk, capsys):
    """On a read-only disk the workspace still lists its runs and exports them elsewhere; a
    command that would write says the workspace is read-only, what to do, and changes nothing."""
    from cinf_core.cli import main
    from conftest import store_snapshot

    ws = copy_workspace(workspace, small_disk / "ws")
    before = store_snapshot(ws)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["runs", "--workspace", str(ws)]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert len(runs) == len(before["runs"])
    assert main(["export", runs[0]["run_id"], str(tmp_path / "scores.csv"), "--workspace",
                 str(ws)]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": chat("q", "a")}) + "\n")
    for argv in (_score_argv("vector_filter"), ["add-dataset", str(rows)]):
        assert main([*argv, "--workspace", str(ws)]) == 2
        error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
        assert f"cannot write {ws / 'cinf.duckdb'} (Read-only file system): the workspace is " \
               "read-only here. Nothing was changed." in error and "app --read-only" in error
    assert store_snapshot(ws) == before
