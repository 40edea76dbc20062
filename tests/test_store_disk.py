"""A disk that refuses the store's writes, injected where DuckDB reports it (the real thing, a full
and a read-only filesystem, is in test_faults.py where this machine lets a test mount one): the
error says what happened and what to do, and the store keeps its state from before."""
import duckdb
import pytest

from cinf_core.store import Store, WorkspaceWriteError
from workspace_fixture import make_examples


class _RefusingConnection:
    """A DuckDB connection whose COMMIT fails the way DuckDB reports a full disk."""

    def __init__(self, con):
        self._con = con

    def execute(self, sql, *args):
        if sql.strip().upper() == "COMMIT":
            raise duckdb.TransactionException(
                'TransactionContext Error: Failed to commit: Could not write file "cinf.duckdb.'
                'wal": No space left on device')
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_a_full_disk_at_commit_is_said_and_stores_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.add_dataset("kept", make_examples(6, n_trait=2))
    connect = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *a, **k: _RefusingConnection(connect(*a, **k)))
    with pytest.raises(WorkspaceWriteError) as info:
        store.add_dataset("lost", make_examples(12, n_trait=4, seed=1))
    assert str(info.value) == (
        f"cannot write {store.path} (No space left on device): the disk is full. Nothing of this "
        "step was half-stored: the store keeps everything finished before it (a scoring run "
        "resumes from its last stored scores). Free space on that disk, or pass another "
        "--workspace, and run the command again")
    monkeypatch.undo()
    assert store.datasets()["name"].tolist() == ["kept"]
    assert len(store.examples("kept")) == 6


def test_a_read_only_store_still_reads(tmp_path, monkeypatch):
    Store(tmp_path).add_dataset("kept", make_examples(6, n_trait=2))
    connect = duckdb.connect

    def read_only_disk(path, read_only=False, **kwargs):
        if not read_only:
            raise duckdb.IOException(f'IO Error: Cannot open file "{path}": Read-only file system')
        return connect(path, read_only=True, **kwargs)

    monkeypatch.setattr(duckdb, "connect", read_only_disk)
    store = Store(tmp_path)  # opens for reading
    assert store.datasets()["name"].tolist() == ["kept"]
    with pytest.raises(WorkspaceWriteError, match=r"\(Read-only file system\): the workspace is "
                                                  r"read-only here. Nothing was changed.*"
                                                  r"app --read-only"):
        store.set_meta("x", 1)
    with pytest.raises(WorkspaceWriteError, match="Read-only file system"):
        Store(tmp_path / "new")  # nothing to read yet: the refusal stands
