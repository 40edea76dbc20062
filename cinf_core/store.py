"""The workspace store: one DuckDB file per workspace. The only module that writes SQL.

Concurrency: DuckDB allows one read-write process per file, and a reader in another process
conflicts with it. So no connection is held open: every call opens a short connection, does its
work in one transaction, and closes it; a call that finds the file locked by another process
retries with backoff (up to ``LOCK_TIMEOUT_S``). A long job therefore writes its scores in batches,
each its own short transaction, and the app reads between them.

Runs are keyed by the hash of everything that determines their result. ``begin_run`` returns the
cached run when it is complete and resumes a run that was interrupted: its scores so far are kept
and only missing examples are computed. A run is marked ``complete`` only when every example has a
score. Heavy tensors (concept vectors, SAE matrices) live in safetensors files under
``<workspace>/artifacts``; their rows here point at them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pandas as pd
import torch

from . import paths
from .concepts.base import Concept
from .data import ChatDataset, ChatExample, write_jsonl
from .models import ModelSpec

LOCK_TIMEOUT_S = 60.0
SCHEMA_VERSION = 1

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)""",
    """CREATE TABLE IF NOT EXISTS datasets (
        dataset_id TEXT PRIMARY KEY, name TEXT, role TEXT, path TEXT, n_examples INTEGER,
        label_counts TEXT, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS examples (
        dataset_id TEXT, idx INTEGER, prompt TEXT, response TEXT, data_origin TEXT,
        messages TEXT, metadata TEXT, PRIMARY KEY (dataset_id, idx))""",
    """CREATE TABLE IF NOT EXISTS models (
        model_id TEXT PRIMARY KEY, name TEXT, role TEXT, spec TEXT, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS concepts (
        concept_id TEXT PRIMARY KEY, name TEXT, kind TEXT, layer INTEGER, model_id TEXT,
        config TEXT, tensor_path TEXT, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, method TEXT, dataset_id TEXT, model_id TEXT, concept_id TEXT,
        config TEXT, status TEXT, n_total INTEGER, n_done INTEGER, started_at TIMESTAMP,
        finished_at TIMESTAMP, wall_s DOUBLE, examples_per_s DOUBLE, host TEXT, timings TEXT,
        error TEXT, owner TEXT)""",
    # A store made before runs had an owner (the process scoring it) gets the column.
    """ALTER TABLE runs ADD COLUMN IF NOT EXISTS owner TEXT""",
    """CREATE TABLE IF NOT EXISTS scores (
        run_id TEXT, idx INTEGER, score DOUBLE, PRIMARY KEY (run_id, idx))""",
    """CREATE TABLE IF NOT EXISTS test_queries (
        trait TEXT, model_id TEXT, rank INTEGER, prompt TEXT, response TEXT, messages TEXT,
        judge_score DOUBLE, PRIMARY KEY (trait, model_id, rank))""",
    """CREATE TABLE IF NOT EXISTS generations (
        dataset_id TEXT, model_id TEXT, gen_key TEXT, idx INTEGER, response TEXT,
        PRIMARY KEY (dataset_id, model_id, gen_key, idx))""",
    """CREATE TABLE IF NOT EXISTS feature_attributions (
        run_id TEXT, sae_id TEXT, feature INTEGER, grp TEXT, influence DOUBLE,
        PRIMARY KEY (run_id, sae_id, feature, grp))""",
    """CREATE TABLE IF NOT EXISTS saes (
        sae_id TEXT PRIMARY KEY, name TEXT, layer INTEGER, model_id TEXT, path TEXT,
        metrics TEXT, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS sae_features (
        sae_id TEXT, dataset_id TEXT, feature INTEGER, density DOUBLE, mean_act DOUBLE,
        max_act DOUBLE, label TEXT, PRIMARY KEY (sae_id, dataset_id, feature))""",
    """CREATE TABLE IF NOT EXISTS feature_examples (
        sae_id TEXT, dataset_id TEXT, feature INTEGER, rank INTEGER, idx INTEGER, max_act DOUBLE,
        PRIMARY KEY (sae_id, dataset_id, feature, rank))""",
    """CREATE TABLE IF NOT EXISTS retrain_cells (
        experiment_id TEXT, method TEXT, mode TEXT, fraction DOUBLE, seed INTEGER,
        trait TEXT, trait_score DOUBLE, capability DOUBLE, n_kept INTEGER, wall_s DOUBLE,
        status TEXT, finished_at TIMESTAMP, owner TEXT, claimed_at TIMESTAMP,
        PRIMARY KEY (experiment_id, method, mode, fraction, seed))""",
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY, kind TEXT, args TEXT, status TEXT, progress DOUBLE,
        message TEXT, pid INTEGER, created_at TIMESTAMP, updated_at TIMESTAMP, result TEXT,
        error TEXT)""",
]


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def config_hash(obj: Any) -> str:
    """Stable 16-hex hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(method: str, dataset_id: str, model_id: str | None, config: dict,
            concept_id: str | None) -> str:
    """The id of a scoring run: the hash of everything that determines its scores (the one place
    a run id is computed; the runner, the torchrun merge and the store all ask here)."""
    return config_hash({"method": method, "dataset_id": dataset_id, "model_id": model_id,
                        "concept_id": concept_id, "config": config})


def process_owner() -> str:
    """This process as an owner tag ``host:pid`` (of a scoring run or a retrain cell)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None) -> bool:
    """Whether an owner tag ``host:pid`` names a live process (other hosts count as alive)."""
    if not owner or ":" not in owner:
        return False
    host, pid = owner.rsplit(":", 1)
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _is_lock_error(err: Exception) -> bool:
    text = str(err).lower()
    return "lock" in text or "conflicting" in text or "different configuration" in text


# What the operating system says when a workspace cannot be written, as DuckDB and Python quote it.
_DISK_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}


class WorkspaceWriteError(OSError):
    """The workspace's disk refused a write (full, over quota, read-only or not writable); the
    message says which, that nothing of the step was half-stored, and what to do."""

    def __str__(self) -> str:
        return self.strerror


def disk_error(err: BaseException, where: str | os.PathLike) -> WorkspaceWriteError | None:
    """``err`` as a :class:`WorkspaceWriteError` about writing ``where`` when the disk refused
    a write: an ``OSError`` of a full or read-only disk, or a DuckDB error quoting one of
    :data:`_DISK_ERRNOS` (DuckDB raises its own classes); else None. (A plain ``OSError`` with
    EACCES is left alone: reading a user's file can raise it too.)"""
    if isinstance(err, WorkspaceWriteError):
        return err
    if isinstance(err, OSError):
        code = err.errno if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
    else:
        code = next((c for c, text in _DISK_ERRNOS.items() if text in str(err)), None)
    if code is None:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = ("the disk is full. Nothing of this step was half-stored: the store keeps "
                  "everything finished before it (a scoring run resumes from its last stored "
                  "scores). Free space on that disk, or pass another --workspace, and run the "
                  "command again")
    else:
        advice = ("the workspace is read-only here. Nothing was changed. Copy the workspace to a "
                  "writable folder (or make it writable) and run the command there; to show its "
                  "results, serve it with `python -m cinf_core app --read-only --workspace DIR`")
    return WorkspaceWriteError(code, f"cannot write {where} ({_DISK_ERRNOS[code]}): {advice}")


@dataclass
class RunHandle:
    """A scoring run in the store. ``cached`` is True when it was already complete; ``held_by``
    names the live process (``host:pid``) scoring it when this process could not claim it."""

    store: "Store"
    run_id: str
    n_total: int
    cached: bool = False
    held_by: str | None = None

    def done_indices(self) -> set[int]:
        return self.store._done_indices(self.run_id)

    def add_scores(self, indices: Sequence[int], scores: Sequence[float]) -> None:
        self.store._add_scores(self.run_id, indices, scores)

    def complete(self, wall_s: float, timings: dict | None = None) -> None:
        self.store._complete_run(self.run_id, wall_s, timings or {})

    def fail(self, error: str) -> None:
        self.store._fail_run(self.run_id, error, process_owner())


class Store:
    """The DuckDB store of one workspace (``<workspace>/cinf.duckdb``)."""

    def __init__(self, workspace: str | os.PathLike | None = None, read_only: bool = False):
        """``read_only``: never write (ranks of a distributed run, a read-only app: every write
        is refused); the store must exist. A store on a disk that refuses writes (read-only)
        opens for reading; its first write then fails with a :class:`WorkspaceWriteError` that
        says so."""
        self.workspace = paths.workspace_path(workspace)
        self.path = self.workspace / paths.STORE_FILE
        self.read_only = read_only
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"no store at {self.path}; create the workspace first")
            return
        try:
            with self._connect() as con:
                for stmt in SCHEMA:
                    con.execute(stmt)
                con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                            [json.dumps(SCHEMA_VERSION)])
        except WorkspaceWriteError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT) or not self.path.exists():
                raise

    # ------------------------------------------------------------ connections

    @contextmanager
    def _connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; retries while another process holds the file. A write the
        disk refuses (full, read-only) raises :class:`WorkspaceWriteError`; DuckDB has then
        rolled the transaction back, so the store keeps its state from before it. A store opened
        ``read_only`` refuses every write here."""
        if self.read_only and not read_only:
            raise WorkspaceWriteError(errno.EROFS, f"cannot write {self.path}: it was opened "
                                                   "read-only (a read-only app, a torchrun rank)")
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        delay = 0.01
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except (duckdb.IOException, duckdb.ConnectionException) as err:
                refused = None if read_only else disk_error(err, self.path)
                if refused is not None:
                    raise refused from err
                if not _is_lock_error(err) or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"could not open the store {self.path}: {err}. Another process may hold "
                        "it for writing; wait for it to finish or use another --workspace."
                    ) from err
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)
        try:
            yield con
        except duckdb.Error as err:
            refused = disk_error(err, self.path)
            if refused is None:
                raise
            raise refused from err
        finally:
            try:
                con.close()
            except duckdb.Error:
                # A checkpoint on close that the disk refused: what was committed stays in the
                # write-ahead log, which the next connection replays.
                pass

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _query_df(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._connect(read_only=True) as con:
            return con.execute(sql, list(params)).df()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._connect(read_only=True) as con:
            return con.execute(sql, list(params)).fetchall()

    # ------------------------------------------------------------ meta

    def set_meta(self, key: str, value: Any) -> None:
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", [key])
        return json.loads(rows[0][0]) if rows else default

    # ------------------------------------------------------------ datasets

    def add_dataset(self, name: str, dataset: ChatDataset, role: str = "train") -> str:
        """Register a dataset and its examples (idempotent: same content, same id)."""
        rows = [ex.to_row() for ex in dataset.examples]
        dataset_id = config_hash({"rows": rows})
        frame = pd.DataFrame({
            "dataset_id": dataset_id,
            "idx": np.arange(len(rows), dtype=np.int32),
            "prompt": [ex.prompt_text for ex in dataset.examples],
            "response": [ex.response for ex in dataset.examples],
            "data_origin": [ex.label for ex in dataset.examples],
            "messages": [json.dumps(ex.messages, ensure_ascii=False) for ex in dataset.examples],
            "metadata": [json.dumps(ex.metadata, ensure_ascii=False, default=str)
                         for ex in dataset.examples],
        })
        with self._transaction() as con:
            exists = con.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", [dataset_id]).fetchall()
            if exists:
                con.execute("UPDATE datasets SET name = ?, role = ? WHERE dataset_id = ?",
                            [name, role, dataset_id])
                return dataset_id
            con.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
                [dataset_id, name, role, dataset.path, len(rows),
                 json.dumps(dataset.label_counts()), _now()],
            )
            con.register("new_examples", frame)
            con.execute("INSERT INTO examples SELECT dataset_id, idx, prompt, response, data_origin,"
                        " messages, metadata FROM new_examples")
            con.unregister("new_examples")
        return dataset_id

    def datasets(self) -> pd.DataFrame:
        return self._query_df("SELECT * FROM datasets ORDER BY created_at")

    def _resolve(self, table: str, id_col: str, key: str) -> str:
        if table not in {"datasets", "models", "concepts"}:
            raise ValueError(f"unknown table {table}")
        # An id or a name wins; datasets and models can also be found by role ("train",
        # "finetuned", "base"), newest first.
        role = "role = ?" if table != "concepts" else "kind = ?"
        rows = self._query(
            f"SELECT {id_col} FROM {table} WHERE {id_col} = ? OR name = ? OR {role} "
            f"ORDER BY ({id_col} = ?) DESC, (name = ?) DESC, created_at DESC LIMIT 1",
            [key, key, key, key, key])
        if not rows:
            raise KeyError(f"no {table[:-1]} named or with id {key!r} in {self.path}; "
                           f"list them with `python -m cinf_core {table}`")
        return rows[0][0]

    def dataset(self, name_or_id: str) -> dict:
        dataset_id = self._resolve("datasets", "dataset_id", name_or_id)
        frame = self._query_df("SELECT * FROM datasets WHERE dataset_id = ?", [dataset_id])
        row = frame.iloc[0].to_dict()
        row["label_counts"] = json.loads(row["label_counts"])
        return row

    def examples(self, name_or_id: str) -> pd.DataFrame:
        """Examples as a frame: idx, prompt, response, data_origin (messages/metadata as JSON)."""
        dataset_id = self._resolve("datasets", "dataset_id", name_or_id)
        return self._query_df(
            "SELECT idx, prompt, response, data_origin, messages, metadata FROM examples "
            "WHERE dataset_id = ? ORDER BY idx", [dataset_id])

    def labels(self, name_or_id: str) -> pd.DataFrame:
        """``idx, data_origin`` of a dataset (no text: cheap for 100k rows)."""
        dataset_id = self._resolve("datasets", "dataset_id", name_or_id)
        return self._query_df("SELECT idx, data_origin FROM examples WHERE dataset_id = ? "
                              "ORDER BY idx", [dataset_id])

    def load_dataset(self, name_or_id: str) -> ChatDataset:
        frame = self.examples(name_or_id)
        info = self.dataset(name_or_id)
        examples = [
            ChatExample(messages=json.loads(m), metadata=json.loads(md), line=int(i) + 1)
            for i, m, md in zip(frame["idx"], frame["messages"], frame["metadata"])
        ]
        return ChatDataset(examples, path=info["path"] or "")

    # ------------------------------------------------------------ models

    def add_model(self, name: str, spec: ModelSpec, role: str = "finetuned") -> str:
        model_id = spec.model_id
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                        [model_id, name, role, json.dumps(spec.to_dict()), _now()])
        return model_id

    def get_model(self, name_or_id: str) -> dict:
        model_id = self._resolve("models", "model_id", name_or_id)
        row = self._query_df("SELECT * FROM models WHERE model_id = ?", [model_id]).iloc[0].to_dict()
        row["spec"] = ModelSpec.from_dict(json.loads(row["spec"]))
        return row

    def models(self) -> pd.DataFrame:
        return self._query_df("SELECT * FROM models ORDER BY created_at")

    # ------------------------------------------------------------ concepts

    def save_concept(self, concept: Concept, model_id: str | None,
                     extra_tensors: dict[str, torch.Tensor] | None = None) -> str:
        """Save a concept's tensors beside the store and register it; returns its id."""
        from safetensors.torch import save_file

        concept_id = concept.concept_id
        config, tensors = concept.to_record()
        tensors = dict(tensors)
        for key, value in (extra_tensors or {}).items():
            tensors[key] = value.detach().to(torch.float32).cpu()
        out = paths.artifact_dir(self.workspace, paths.CONCEPTS_DIR) / f"{concept_id}.safetensors"
        tmp = paths.temp_for(out)
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, out)
        rel = str(out.relative_to(self.workspace))
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO concepts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [concept_id, concept.name, concept.kind, concept.layer, model_id,
                         json.dumps(config, default=str), rel, _now()])
        return concept_id

    def concepts(self) -> pd.DataFrame:
        return self._query_df("SELECT * FROM concepts ORDER BY created_at")

    def concept_for_trait(self, trait: str) -> str:
        """The id of the newest concept whose info names ``trait`` (persona vectors first)."""
        frame = self.concepts()
        matches = [(r["kind"] != "persona_vector", -i, r["concept_id"])
                   for i, r in enumerate(frame.to_dict(orient="records"))
                   if json.loads(r["config"]).get("info", {}).get("trait") == trait]
        if not matches:
            raise KeyError(f"no concept for trait {trait!r} in {self.path}; add one with "
                           f"`python -m cinf_core add-concept --trait {trait} ...` (--vector FILE, "
                           "--persona, --probe or --sae) or pass --concept NAME")
        return min(matches)[2]

    def concept_tensors(self, name_or_id: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        concept_id = self._resolve("concepts", "concept_id", name_or_id)
        (rel,) = self._query("SELECT tensor_path FROM concepts WHERE concept_id = ?", [concept_id])[0]
        return load_file(str(self.workspace / rel))

    def load_concept(self, name_or_id: str) -> Concept:
        concept_id = self._resolve("concepts", "concept_id", name_or_id)
        name, kind, layer, config = self._query(
            "SELECT name, kind, layer, config FROM concepts WHERE concept_id = ?", [concept_id])[0]
        return Concept.from_record(name, kind, layer, json.loads(config),
                                   self.concept_tensors(concept_id))

    # ------------------------------------------------------------ test queries and generations

    def add_test_queries(self, trait: str, model_id: str, rows: Sequence[dict]) -> None:
        with self._transaction() as con:
            con.execute("DELETE FROM test_queries WHERE trait = ? AND model_id = ?", [trait, model_id])
            for rank, row in enumerate(rows):
                msgs = row["messages"]
                user = [m["content"] for m in msgs[:-1] if m["role"] == "user"]
                con.execute("INSERT INTO test_queries VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [trait, model_id, rank, user[-1] if user else "", msgs[-1]["content"],
                             json.dumps(msgs), float(row.get("judge_score", float("nan")))])

    def test_queries(self, trait: str, model_id: str | None = None) -> list[dict]:
        sql = "SELECT * FROM test_queries WHERE trait = ?"
        params: list[Any] = [trait]
        if model_id is not None:
            sql += " AND model_id = ?"
            params.append(model_id)
        frame = self._query_df(sql + " ORDER BY rank", params)
        return [{**r, "messages": json.loads(r["messages"])} for r in frame.to_dict(orient="records")]

    def test_query_sets(self) -> pd.DataFrame:
        """One row per registered set of test queries: ``trait, model_id, n_queries,
        mean_judge_score`` (NaN where the queries came without judge scores)."""
        return self._query_df(
            "SELECT trait, model_id, count(*) AS n_queries, avg(judge_score) AS mean_judge_score "
            "FROM test_queries GROUP BY trait, model_id ORDER BY trait, model_id")

    def traits(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT trait FROM test_queries ORDER BY trait")]

    def add_generations(self, dataset_id: str, model_id: str, gen_key: str,
                        indices: Sequence[int], responses: Sequence[str]) -> None:
        with self._transaction() as con:
            con.executemany("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?)",
                            [[dataset_id, model_id, gen_key, int(i), r]
                             for i, r in zip(indices, responses)])

    def generations(self, dataset_id: str, model_id: str, gen_key: str) -> dict[int, str]:
        rows = self._query("SELECT idx, response FROM generations WHERE dataset_id = ? AND "
                           "model_id = ? AND gen_key = ?", [dataset_id, model_id, gen_key])
        return {int(i): r for i, r in rows}

    # ------------------------------------------------------------ runs and scores

    def begin_run(self, method: str, dataset_id: str, model_id: str | None, config: dict,
                  n_total: int, concept_id: str | None = None,
                  stale_after_s: float = 3600.0) -> RunHandle:
        """Start, resume or return the cached run keyed by its full configuration.

        Starting or resuming claims the run for this process (``owner``), so one process writes a
        run at a time. While another live process holds it nothing changes and the handle's
        ``held_by`` names that process: ask again later (the run is then complete, or its owner
        died and this process resumes it). A claim by a process on another host, whose liveness
        cannot be checked here, is taken over once it is ``stale_after_s`` old.
        """
        run_id = run_key(method, dataset_id, model_id, config, concept_id)
        owner = process_owner()
        with self._transaction() as con:
            row = con.execute("SELECT status, owner, started_at FROM runs WHERE run_id = ?",
                              [run_id]).fetchone()
            if row is not None:
                status, holder, started_at = row
                if status == "complete":
                    return RunHandle(self, run_id, n_total, cached=True)
                if status == "running" and holder not in (None, owner) and \
                        _owner_alive(holder) and \
                        (_now() - started_at).total_seconds() < stale_after_s:
                    return RunHandle(self, run_id, n_total, held_by=holder)
                con.execute("UPDATE runs SET status = 'running', error = NULL, host = ?, "
                            "started_at = ?, owner = ? WHERE run_id = ?",
                            [socket.gethostname(), _now(), owner, run_id])
            else:
                con.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, 'running', ?, 0, ?, NULL, NULL,"
                    " NULL, ?, NULL, NULL, ?)",
                    [run_id, method, dataset_id, model_id, concept_id,
                     json.dumps(config, sort_keys=True, default=str), n_total, _now(),
                     socket.gethostname(), owner])
        return RunHandle(self, run_id, n_total)

    def run_status(self, run_id: str) -> str | None:
        rows = self._query("SELECT status FROM runs WHERE run_id = ?", [run_id])
        return rows[0][0] if rows else None

    def import_run(self, method: str, dataset_id: str, model_id: str | None, config: dict,
                   concept_id: str | None, indices: Sequence[int], scores: Sequence[float],
                   wall_s: float, timings: dict) -> str:
        """Store a run computed elsewhere (merged shards) as complete, in one transaction."""
        run_id = run_key(method, dataset_id, model_id, config, concept_id)
        values = np.asarray(scores, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"run {run_id}: scores contain NaN/inf; refusing to store them")
        n_total = int(self.dataset(dataset_id)["n_examples"])
        if sorted(int(i) for i in indices) != list(range(n_total)):
            raise ValueError(f"run {run_id}: {len(indices)} scores do not cover its "
                             f"{n_total} examples exactly once")
        frame = pd.DataFrame({"run_id": run_id, "idx": np.asarray(indices, dtype=np.int32),
                              "score": values})
        with self._transaction() as con:
            row = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if row and row[0] == "complete":
                return run_id
            con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?, ?, ?, ?, ?, NULL,"
                " NULL)",
                [run_id, method, dataset_id, model_id, concept_id,
                 json.dumps(config, sort_keys=True, default=str), n_total, n_total, _now(), _now(),
                 wall_s, n_total / wall_s if wall_s > 0 else None, socket.gethostname(),
                 json.dumps(timings, default=str)])
            con.register("new_scores", frame)
            con.execute("INSERT OR REPLACE INTO scores SELECT run_id, idx, score FROM new_scores")
            con.unregister("new_scores")
        return run_id

    def _done_indices(self, run_id: str) -> set[int]:
        return {int(r[0]) for r in self._query("SELECT idx FROM scores WHERE run_id = ?", [run_id])}

    def _add_scores(self, run_id: str, indices: Sequence[int], scores: Sequence[float]) -> None:
        self._add_scores_many([(run_id, indices, scores)])

    def _add_scores_many(self, batches: Sequence[tuple[str, Sequence[int], Sequence[float]]]) -> None:
        """Scores of several runs ``(run_id, indices, scores)`` in one transaction (the runs of
        one multi-concept pass)."""
        frames = []
        for run_id, indices, scores in batches:
            if len(indices) != len(scores):
                raise ValueError(f"{len(indices)} indices but {len(scores)} scores")
            values = np.asarray(scores, dtype=np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"run {run_id}: scores contain NaN/inf; refusing to store them")
            frames.append(pd.DataFrame({"run_id": run_id, "idx": np.asarray(indices, dtype=np.int32),
                                        "score": values}))
        if not frames:
            return
        frame = pd.concat(frames, ignore_index=True)
        with self._transaction() as con:
            con.register("new_scores", frame)
            con.execute("INSERT OR REPLACE INTO scores SELECT run_id, idx, score FROM new_scores")
            con.unregister("new_scores")
            for run_id in dict.fromkeys(b[0] for b in batches):
                con.execute("UPDATE runs SET n_done = (SELECT count(*) FROM scores WHERE run_id = ?) "
                            "WHERE run_id = ?", [run_id, run_id])

    def _complete_run(self, run_id: str, wall_s: float, timings: dict) -> None:
        """Mark a run complete once every example has a score (a run already complete is left
        as it was marked)."""
        with self._transaction() as con:
            status, n_total, n_done = con.execute(
                "SELECT status, n_total, (SELECT count(*) FROM scores WHERE run_id = ?) FROM runs "
                "WHERE run_id = ?", [run_id, run_id]).fetchone()
            if status == "complete":
                return
            if n_done != n_total:
                raise RuntimeError(f"run {run_id} has {n_done} of {n_total} scores; "
                                   "it cannot be marked complete")
            con.execute(
                "UPDATE runs SET status = 'complete', n_done = ?, finished_at = ?, wall_s = ?, "
                "examples_per_s = ?, timings = ?, error = NULL WHERE run_id = ?",
                [n_done, _now(), wall_s, n_total / wall_s if wall_s > 0 else None,
                 json.dumps(timings), run_id])

    def _fail_run(self, run_id: str, error: str, owner: str) -> None:
        """Mark the run failed, unless another process has taken it over or finished it."""
        with self._connect() as con:
            con.execute("UPDATE runs SET status = 'failed', error = ? WHERE run_id = ? AND "
                        "status = 'running' AND owner = ?", [error, run_id, owner])

    def _drop_run(self, run_id: str) -> None:
        """Delete a run and its scores (used on scratch copies)."""
        with self._transaction() as con:
            con.execute("DELETE FROM scores WHERE run_id = ?", [run_id])
            con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])

    def _drop_generations(self) -> None:
        """Delete every cached generation (used on scratch copies, so benchmarks pay for them)."""
        with self._connect() as con:
            con.execute("DELETE FROM generations")

    def runs(self, method: str | None = None, status: str | None = None) -> pd.DataFrame:
        sql, params = "SELECT * FROM runs WHERE 1=1", []
        if method:
            sql += " AND method = ?"
            params.append(method)
        if status:
            sql += " AND status = ?"
            params.append(status)
        return self._query_df(sql + " ORDER BY started_at", params)

    def run(self, run_id: str) -> dict:
        frame = self._query_df("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if frame.empty:
            raise KeyError(f"no run {run_id!r} in {self.path}; list runs with `python -m cinf_core runs`")
        row = frame.iloc[0].to_dict()
        row["config"] = json.loads(row["config"])
        row["timings"] = json.loads(row["timings"]) if row["timings"] else {}
        return row

    def scores(self, run_id: str) -> pd.DataFrame:
        """``idx, score`` of a run, in example order."""
        return self._query_df("SELECT idx, score FROM scores WHERE run_id = ? ORDER BY idx", [run_id])

    def scored_examples(self, run_id: str) -> pd.DataFrame:
        """Scores joined with their examples, ranked (rank 1 = highest score)."""
        return self._query_df(
            "SELECT s.idx, s.score, rank() OVER (ORDER BY s.score DESC) AS rank, e.data_origin, "
            "e.prompt, e.response FROM scores s JOIN runs r ON r.run_id = s.run_id "
            "JOIN examples e ON e.dataset_id = r.dataset_id AND e.idx = s.idx "
            "WHERE s.run_id = ? ORDER BY rank", [run_id])

    # ------------------------------------------------------------ exports

    def export_scores(self, run_id: str, path: str | os.PathLike) -> Path:
        """Write a run's scored examples to ``.parquet`` or ``.csv``."""
        path = Path(path)
        self.run(run_id)  # a clear error for an unknown run
        frame = self.scored_examples(run_id)
        if frame.empty:
            raise ValueError(f"run {run_id} has no scores to export")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            frame.to_parquet(path, index=False)
        elif path.suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            raise ValueError(f"export path {path} must end in .parquet or .csv")
        return path

    def export_filtered_dataset(self, run_id: str, path: str | os.PathLike,
                                remove_fraction: float, mode: str = "most") -> dict:
        """Write the run's dataset minus its top (``most``) or bottom (``least``) fraction as JSONL."""
        if not 0.0 <= remove_fraction < 1.0:
            raise ValueError(f"remove_fraction must be in [0, 1), got {remove_fraction}")
        if mode not in ("most", "least"):
            raise ValueError(f"mode must be 'most' or 'least', got {mode!r}")
        run = self.run(run_id)
        if run["status"] != "complete":
            raise ValueError(f"run {run_id} is {run['status']}; finish it before exporting")
        scores = self.scores(run_id)
        order = scores.sort_values("score", ascending=(mode == "least"), kind="stable")["idx"].tolist()
        n_remove = int(round(remove_fraction * len(order)))
        removed = set(order[:n_remove])
        dataset = self.load_dataset(run["dataset_id"])
        kept = [ex for i, ex in enumerate(dataset.examples) if i not in removed]
        n = write_jsonl(kept, path)
        return {"path": str(path), "n_kept": n, "n_removed": len(removed)}

    # ------------------------------------------------------------ SAEs and their features

    def add_sae(self, name: str, path: str | os.PathLike, layer: int, model_id: str | None,
                metrics: dict | None = None) -> str:
        """Register an SAE folder (sae-lens ``save_model`` layout); relative to the workspace
        when it lives inside it."""
        path = Path(path).resolve()
        try:
            stored = str(path.relative_to(self.workspace.resolve()))
        except ValueError:
            stored = str(path)
        sae_id = config_hash({"path": str(path), "layer": layer, "model_id": model_id})
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO saes VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [sae_id, name, layer, model_id, stored, json.dumps(metrics or {}), _now()])
        return sae_id

    def saes(self) -> pd.DataFrame:
        return self._query_df("SELECT * FROM saes ORDER BY created_at")

    def get_sae(self, name_or_id: str) -> dict:
        rows = self._query_df("SELECT * FROM saes WHERE sae_id = ? OR name = ? "
                              "ORDER BY (sae_id = ?) DESC, created_at DESC LIMIT 1",
                              [name_or_id, name_or_id, name_or_id])
        if rows.empty:
            raise KeyError(f"no SAE named or with id {name_or_id!r} in {self.path}; register "
                           "one with `python -m cinf_core add-sae PATH --model M --layer L` "
                           "(the demo world has one)")
        row = rows.iloc[0].to_dict()
        row["metrics"] = json.loads(row["metrics"])
        path = Path(row["path"])
        row["path"] = str(path if path.is_absolute() else self.workspace / path)
        return row

    def save_feature_data(self, sae_id: str, dataset_id: str, features: pd.DataFrame,
                          examples: pd.DataFrame) -> None:
        """Replace the per-feature summary (feature, density, mean_act, max_act, label) and the
        top-activating examples (feature, rank, idx, max_act) of an SAE over a dataset."""
        feats = features.assign(sae_id=sae_id, dataset_id=dataset_id)
        exs = examples.assign(sae_id=sae_id, dataset_id=dataset_id)
        with self._transaction() as con:
            con.execute("DELETE FROM sae_features WHERE sae_id = ? AND dataset_id = ?", [sae_id, dataset_id])
            con.execute("DELETE FROM feature_examples WHERE sae_id = ? AND dataset_id = ?", [sae_id, dataset_id])
            con.register("new_feats", feats)
            con.execute("INSERT INTO sae_features SELECT sae_id, dataset_id, feature, density, "
                        "mean_act, max_act, label FROM new_feats")
            con.register("new_exs", exs)
            con.execute("INSERT INTO feature_examples SELECT sae_id, dataset_id, feature, rank, idx, "
                        "max_act FROM new_exs")

    def sae_features(self, sae_id: str, dataset_id: str) -> pd.DataFrame:
        return self._query_df("SELECT feature, density, mean_act, max_act, label FROM sae_features "
                              "WHERE sae_id = ? AND dataset_id = ? ORDER BY feature", [sae_id, dataset_id])

    def feature_examples(self, sae_id: str, dataset_id: str, feature: int) -> pd.DataFrame:
        """Top-activating examples of one feature, joined with their text."""
        return self._query_df(
            "SELECT f.rank, f.idx, f.max_act, e.data_origin, e.prompt, e.response, e.messages "
            "FROM feature_examples f JOIN examples e ON e.dataset_id = f.dataset_id AND e.idx = f.idx "
            "WHERE f.sae_id = ? AND f.dataset_id = ? AND f.feature = ? ORDER BY f.rank",
            [sae_id, dataset_id, int(feature)])

    # ------------------------------------------------------------ feature attributions, retrain cells

    def add_feature_attributions(self, run_id: str, sae_id: str,
                                 rows: Iterable[tuple[int, str, float]]) -> None:
        with self._transaction() as con:
            con.execute("DELETE FROM feature_attributions WHERE run_id = ? AND sae_id = ?",
                        [run_id, sae_id])
            con.executemany("INSERT INTO feature_attributions VALUES (?, ?, ?, ?, ?)",
                            [[run_id, sae_id, int(f), g, float(v)] for f, g, v in rows])

    def feature_attributions(self, run_id: str, sae_id: str) -> pd.DataFrame:
        return self._query_df("SELECT feature, grp, influence FROM feature_attributions "
                              "WHERE run_id = ? AND sae_id = ?", [run_id, sae_id])

    def claim_retrain_cell(self, experiment_id: str, cell: dict, owner: str,
                           stale_after_s: float = 3600.0) -> bool:
        """Claim a cell for ``owner``; False when it is complete or another live job holds it.

        A claim older than ``stale_after_s`` or held by a process that no longer exists on this
        host is taken over (its job died).
        """
        key = [experiment_id, cell["method"], cell["mode"], float(cell["fraction"]), int(cell["seed"])]
        with self._transaction() as con:
            row = con.execute(
                "SELECT status, owner, claimed_at FROM retrain_cells WHERE experiment_id = ? AND "
                "method = ? AND mode = ? AND fraction = ? AND seed = ?", key).fetchone()
            if row is not None:
                status, holder, claimed_at = row
                if status == "complete":
                    return False
                if status == "running" and holder != owner and _owner_alive(holder) and \
                        (_now() - claimed_at).total_seconds() < stale_after_s:
                    return False
            con.execute(
                "INSERT OR REPLACE INTO retrain_cells VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL, "
                "NULL, 'running', NULL, ?, ?)", key + [cell["trait"], owner, _now()])
        return True

    def add_retrain_cell(self, experiment_id: str, cell: dict) -> None:
        """Record a finished cell (method, mode, fraction, seed, trait, trait_score, capability,
        n_kept, wall_s)."""
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO retrain_cells VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [experiment_id, cell["method"], cell["mode"], float(cell["fraction"]),
                 int(cell["seed"]), cell["trait"], cell.get("trait_score"), cell.get("capability"),
                 cell.get("n_kept"), cell.get("wall_s"), cell.get("status", "complete"), _now(),
                 cell.get("owner"), None])

    def retrain_cells(self, experiment_id: str | None = None) -> pd.DataFrame:
        if experiment_id is None:
            return self._query_df("SELECT * FROM retrain_cells ORDER BY finished_at")
        return self._query_df("SELECT * FROM retrain_cells WHERE experiment_id = ? "
                              "ORDER BY finished_at", [experiment_id])

    # ------------------------------------------------------------ background jobs

    def create_job(self, kind: str, args: dict) -> str:
        job_id = config_hash({"kind": kind, "args": args, "t": time.time_ns()})
        with self._connect() as con:
            con.execute("INSERT INTO jobs VALUES (?, ?, ?, 'queued', 0.0, '', NULL, ?, ?, NULL, NULL)",
                        [job_id, kind, json.dumps(args), _now(), _now()])
        return job_id

    def update_job(self, job_id: str, *, if_status: Sequence[str] | None = None,
                   **fields: Any) -> bool:
        """Set ``fields`` of the job; with ``if_status``, only while its status is one of those
        (checked in the same statement: a job that ended meanwhile keeps its ending). Returns
        whether the row was changed."""
        allowed = {"status", "progress", "message", "pid", "result", "error"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v) if k == "result" else v for k, v in fields.items()]
        where, params = "job_id = ?", [job_id]
        if if_status is not None:
            where += f" AND status IN ({', '.join('?' for _ in if_status)})"
            params += list(if_status)
        with self._connect() as con:
            changed = con.execute(f"UPDATE jobs SET {sets}, updated_at = ? WHERE {where}",
                                  [*values, _now(), *params]).fetchone()
        return bool(changed and changed[0])

    def job(self, job_id: str) -> dict:
        frame = self._query_df("SELECT * FROM jobs WHERE job_id = ?", [job_id])
        if frame.empty:
            raise KeyError(f"no job {job_id!r}")
        row = frame.iloc[0].to_dict()
        row["args"] = json.loads(row["args"])
        row["result"] = json.loads(row["result"]) if row["result"] else None
        return row

    def jobs(self) -> pd.DataFrame:
        return self._query_df("SELECT * FROM jobs ORDER BY created_at DESC")
