"""Background jobs: long work runs outside the app's script runs and reports progress.

``start_job(workspace, kind, args)`` records the job in the store and spawns a detached runner,
``python -m cinf_core.jobs run JOB_ID --workspace W`` (its own session, so it outlives reruns, page
switches and the app). The runner starts the job's command as a child and is the only one that
writes the job's row: it parses the child's progress lines (``stage: 42%|...``, the format of the
CLI's progress bars) from stderr, tees stderr to ``<workspace>/artifacts/jobs/JOB_ID.log``, and at
the end stores ``result`` (the last JSON line of stdout, as every CLI command prints one) and, on
failure, ``error`` in plain words (the last message line, never a traceback).

A job kind is a CLI subcommand (``python -m cinf_core score ...``): the job's args become its
command line (:func:`command_argv`), so a page and a terminal run the same code. A kind whose
command is not in this version of cinf is refused up front with a clear message.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .commands import SUBCOMMANDS

REPO_ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")
PROGRESS_EVERY_S = 0.5
_PROGRESS_RE = re.compile(r"^(?P<stage>.*?):\s*(?P<pct>\d{1,3})%\|")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class JobUnavailable(RuntimeError):
    """The job kind's command does not exist in this version of cinf, or the app serves its
    workspace read-only."""


STALE_ERROR = "the job's process ended without reporting (killed or crashed)"
"""How :func:`job_state` words the error of a job whose runner is gone without finishing."""
KILLED_ERROR = "the job's command was killed"
"""How :func:`run_job` words the error of a job whose command a signal ended."""


def job_interrupted(job) -> bool:
    """Whether ``job`` (a row of the jobs table) ended unfinished through no choice of its own:
    its runner vanished (killed, crashed, the machine restarted: :data:`STALE_ERROR`) or a signal
    ended its command (:data:`KILLED_ERROR`). Not a job that is done, was cancelled by the user,
    or failed with an error of its own."""
    return (job.get("status") == "failed"
            and str(job.get("error") or "").startswith((STALE_ERROR, KILLED_ERROR)))


READ_ONLY_ENV = "CINF_READ_ONLY"
"""Set to ``1`` in the app's process by ``python -m cinf_core app --read-only`` (the default on
an address other than loopback): the app then starts, cancels and records no job."""
READ_ONLY_REASON = ("this app serves its workspace read-only (started with --read-only, or on an "
                    "address other than loopback without --allow-jobs), so it starts no jobs; "
                    "run the command in a terminal, or restart the app with --allow-jobs")


def serving_read_only() -> bool:
    """Whether this process is an app serving its workspace read-only (:data:`READ_ONLY_ENV`)."""
    return os.environ.get(READ_ONLY_ENV) == "1"


@dataclass(frozen=True)
class JobKind:
    """A ``python -m cinf_core`` subcommand that runs as a background job, and its title."""

    command: str
    title: str


JOB_KINDS: dict[str, JobKind] = {k.command: k for k in [
    JobKind("demo", "Build the demo world"),
    JobKind("score", "Score the training set"),
    JobKind("retrain", "Filter and retrain experiment"),
    JobKind("features", "SAE feature data and attribution"),
    JobKind("index", "Build the gradient index (and rank concepts over it)"),
    JobKind("evaluate", "Evaluate methods against labels"),
    JobKind("results", "Compute the results (every method, SAE features, filter and retrain)"),
    JobKind("add-dataset", "Register a dataset"),
    JobKind("add-model", "Register a model"),
    JobKind("add-concept", "Make a concept"),
    JobKind("add-sae", "Register an SAE"),
    JobKind("add-queries", "Register test queries"),
    JobKind("datasets", "List datasets"),
]}


# ---------------------------------------------------------------- paths and argv

def _workspace(workspace) -> Path:
    return paths.workspace_path(workspace).resolve()


def job_log_path(workspace, job_id: str) -> Path:
    return paths.artifact_dir(workspace, paths.JOBS_DIR) / f"{job_id}.log"


def job_stdout_path(workspace, job_id: str) -> Path:
    return paths.artifact_dir(workspace, paths.JOBS_DIR) / f"{job_id}.out"


def command_argv(command: str, args: dict[str, Any]) -> list[str]:
    """CLI arguments from a job's args: ``positional`` first, then ``--key value`` options
    (``True`` is a bare flag, ``False``/``None`` are left out, lists repeat the values)."""
    argv = [command, *map(str, args.get("positional", []))]
    for key, value in args.items():
        if key == "positional" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def job_argv(kind: JobKind, args: dict[str, Any], workspace) -> list[str]:
    """The child process's full command line."""
    return [sys.executable, "-m", "cinf_core", *command_argv(kind.command, args),
            "--workspace", str(_workspace(workspace))]


def job_input_file(workspace, text: str, suffix: str = ".txt") -> Path:
    """A file holding ``text`` for a job's command to read (e.g. ``add-concept --questions``);
    named by its content, so saving the same text twice gives the same file."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = paths.artifact_dir(workspace, paths.JOBS_DIR, "inputs") / f"{digest}{suffix}"
    if not path.exists():
        tmp = paths.temp_for(path)
        tmp.write_text(text)
        os.replace(tmp, path)
    return path.resolve()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------- availability

def unavailable_reason(kind: str) -> str | None:
    """None when the kind can run here, else a sentence saying what is missing."""
    if kind not in JOB_KINDS:
        return f"unknown job kind {kind!r}; known kinds: {', '.join(JOB_KINDS)}"
    command = JOB_KINDS[kind].command
    if command not in SUBCOMMANDS:
        return (f"`python -m cinf_core {command}` is not in this version of cinf yet; "
                "update cinf or run the step by hand")
    return None


# ---------------------------------------------------------------- the app side

def start_job(workspace, kind: str, args: dict[str, Any] | None = None) -> str:
    """Record a job and start it in the background; returns its id at once. A read-only app
    refuses here, whatever the request that got this far."""
    from .store import Store

    reason = READ_ONLY_REASON if serving_read_only() else unavailable_reason(kind)
    if reason is not None:
        raise JobUnavailable(reason)
    args = dict(args or {})
    ws = _workspace(workspace)
    store = Store(ws)
    job_id = store.create_job(kind, args)
    runner_log = paths.artifact_dir(ws, paths.JOBS_DIR) / f"{job_id}.runner.log"
    with open(runner_log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cinf_core.jobs", "run", job_id, "--workspace", str(ws)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
            env=_child_env(), start_new_session=True)
    # Reap the runner when it ends so it never lingers as a zombie of the app process.
    threading.Thread(target=proc.wait, daemon=True).start()
    store.update_job(job_id, pid=proc.pid)
    return job_id


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def job_state(store, job_id: str, stale_after_s: float = 10.0) -> dict:
    """The job's row from ``store``; a job whose runner is gone without finishing is marked
    failed (in the returned row only, when ``store`` is read-only)."""
    job = store.job(job_id)
    if job["status"] in ACTIVE:
        age = time.time() - _timestamp(job["updated_at"])
        if age > stale_after_s and not _alive(job["pid"]):
            error = f"{STALE_ERROR}; see {job_log_path(store.workspace, job_id)}"
            if store.read_only:
                return {**job, "status": "failed", "error": error}
            # only if it is still active: its runner may have ended it since the read above
            store.update_job(job_id, if_status=ACTIVE, status="failed", error=error)
            job = store.job(job_id)
    return job


def active_jobs(store, kinds: tuple[str, ...] | None = None,
                stale_after_s: float = 10.0) -> list[dict]:
    """The jobs still queued or running, newest first (only ``kinds`` when given), wherever
    they were started (a page, the app command, another session); a job whose runner is gone is
    marked failed on the way (see :func:`job_state`) and left out."""
    frame = store.jobs()
    if frame.empty:
        return []
    frame = frame[frame["status"].isin(ACTIVE)]
    if kinds is not None:
        frame = frame[frame["kind"].isin(kinds)]
    found = [job_state(store, job_id, stale_after_s) for job_id in frame["job_id"]]
    return [job for job in found if job["status"] in ACTIVE]


def _timestamp(value) -> float:
    """Seconds since the epoch of a naive-UTC timestamp from the store."""
    import pandas as pd

    if value is None:
        return 0.0
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.timestamp()


def cancel_job(workspace, job_id: str) -> None:
    """Stop a running job (its runner and the command, one process group) and mark it."""
    from .store import Store

    if serving_read_only():
        raise JobUnavailable(READ_ONLY_REASON)
    store = Store(workspace)
    job = store.job(job_id)
    if job["status"] not in ACTIVE:
        return
    if job["pid"] and _alive(job["pid"]):
        try:
            os.killpg(int(job["pid"]), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    # a job that finished between the read above and the signal keeps its ending
    store.update_job(job_id, if_status=ACTIVE, status="cancelled", message="cancelled by the user")


def log_tail(workspace, job_id: str, n_lines: int = 30) -> str:
    """The last lines of a job's stderr log, progress-bar redraws removed."""
    path = job_log_path(workspace, job_id)
    if not path.exists():
        return ""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n".join(lines[-n_lines:])


# ---------------------------------------------------------------- the runner side

def parse_progress(segment: str) -> tuple[str, float] | None:
    """``(stage, fraction)`` from one progress-bar redraw, else None."""
    m = _PROGRESS_RE.match(_ANSI_RE.sub("", segment).strip())
    if m is None:
        return None
    return m.group("stage").strip(), min(int(m.group("pct")), 100) / 100.0


def plain_error(stderr_lines: list[str]) -> str:
    """The last message line of stderr in plain words (exception class and traceback dropped)."""
    for line in reversed(stderr_lines):
        text = _ANSI_RE.sub("", line).strip()
        if not text or parse_progress(text) or text.startswith(("File ", "Traceback", "^", "~")):
            continue
        text = re.sub(r"^error:\s*", "", text)
        text = re.sub(r"^([A-Za-z_][\w.]*(Error|Exception|Unavailable|Interrupt)):\s*", "", text)
        return text
    return "the job failed without a message"


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_job(workspace, job_id: str) -> int:
    """Run a recorded job to the end, keeping its row up to date. Returns the exit code."""
    from .store import Store

    store = Store(workspace)
    job = store.job(job_id)
    kind = JOB_KINDS.get(job["kind"])
    if kind is None:
        store.update_job(job_id, status="failed", error=f"unknown job kind {job['kind']!r}")
        return 2
    argv = job_argv(kind, job["args"] or {}, store.workspace)
    store.update_job(job_id, status="running", progress=0.0, message="starting",
                     pid=os.getpid())
    log_path = job_log_path(store.workspace, job_id)
    out_path = job_stdout_path(store.workspace, job_id)
    lines: list[str] = []
    last_write, pending = 0.0, None
    with open(out_path, "wb") as out, open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                                cwd=str(REPO_ROOT), env=_child_env())
        buf = b""
        while True:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *segments, buf = re.split(rb"[\r\n]", buf)
            for raw in segments:
                text = raw.decode(errors="replace")
                progress = parse_progress(text)
                if progress is not None:
                    pending = progress
                elif text.strip():
                    lines.append(text)
                    log.write(raw + b"\n")
                    log.flush()
            now = time.monotonic()
            if pending is not None and now - last_write >= PROGRESS_EVERY_S:
                store.update_job(job_id, progress=pending[1], message=pending[0])
                last_write, pending = now, None
        if buf.strip():
            lines.append(buf.decode(errors="replace"))
            log.write(buf + b"\n")
        code = proc.wait()
    result = last_json_line(out_path.read_text(errors="replace"))
    if code == 0 and not (result or {}).get("error"):
        store.update_job(job_id, status="done", progress=1.0, message="done", result=result)
        return 0
    error = (result or {}).get("error")
    if not error and code < 0:  # a signal ended it: its last stderr line says nothing about why
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        error = f"{KILLED_ERROR} ({name})"
    error = error or plain_error(lines) or f"exit code {code}"
    store.update_job(job_id, status="failed", message=f"failed (exit code {code})",
                     result=result, error=str(error))
    return code or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cinf_core.jobs",
                                     description="run a background job of the cinf app")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run a job recorded in the store")
    p_run.add_argument("job_id")
    p_run.add_argument("--workspace", required=True)
    args = parser.parse_args(argv)
    try:
        return run_job(args.workspace, args.job_id)
    except Exception as err:  # noqa: BLE001 — the row must say why the runner died
        from .store import Store

        Store(args.workspace).update_job(args.job_id, status="failed",
                                         error=f"the job runner failed: {err}")
        raise


if __name__ == "__main__":
    sys.exit(main())
