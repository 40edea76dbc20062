"""One place that names the files and folders of a workspace.

A workspace is a folder: ``cinf.duckdb`` (the store) plus ``artifacts/`` for heavy tensors and
model directories that do not belong in DuckDB rows.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WORKSPACE = Path(os.environ.get("CINF_WORKSPACE", "workspace"))
STORE_FILE = "cinf.duckdb"
ARTIFACTS_DIR = "artifacts"
MODELS_DIR = "models"
GGUF_DIR = "gguf"  # under MODELS_DIR: GGUF files converted to Hugging Face folders
GGUF_SOURCE_FILE = "gguf_source.json"  # in each converted folder: the file and its sha256
CONCEPTS_DIR = "concepts"
FACTORS_DIR = "factors"
SAES_DIR = "saes"
JOBS_DIR = "jobs"
SHARDS_DIR = "shards"
INDEX_DIR = "index"  # gradient indexes (methods/index.py), one folder per index key


def workspace_path(workspace: str | os.PathLike | None = None) -> Path:
    """The workspace folder (created if missing)."""
    path = Path(workspace) if workspace is not None else DEFAULT_WORKSPACE
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_path(workspace: str | os.PathLike | None = None) -> Path:
    return workspace_path(workspace) / STORE_FILE


def artifact_dir(workspace: str | os.PathLike | None, *parts: str) -> Path:
    """A folder under ``<workspace>/artifacts`` (created if missing)."""
    path = workspace_path(workspace).joinpath(ARTIFACTS_DIR, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def temp_for(path: str | os.PathLike) -> Path:
    """A hidden temporary file beside ``path``, this process's own (``.name.<pid>.tmp``): write
    it, then ``os.replace`` it onto ``path``. Two processes writing the same file at once (two
    ranks, a job and a page) each have their own, so neither renames the other's half-written
    one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
