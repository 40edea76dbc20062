"""Throwaway copies of a workspace to benchmark in (``bench``, the gradient index's bench)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .. import paths
from ..store import Store

SKIP_ARTIFACTS = {paths.FACTORS_DIR, "retrain", paths.JOBS_DIR, paths.SHARDS_DIR, "features"}


def scratch_copy(workspace, skip: frozenset | set = SKIP_ARTIFACTS, drop_generations: bool = True,
                 prefix: str = "cinf-bench-") -> Path:
    """A throwaway copy of the store and artifacts to benchmark in: without the artifacts named
    in ``skip`` (caches), without runs, and (``drop_generations``) without stored generations, so
    Projection Difference pays for its own."""
    src = paths.workspace_path(workspace)
    dst = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copy2(src / paths.STORE_FILE, dst / paths.STORE_FILE)
    art = src / paths.ARTIFACTS_DIR
    if art.exists():
        for child in art.iterdir():
            if child.name not in skip:
                target = dst / paths.ARTIFACTS_DIR / child.name
                (shutil.copytree if child.is_dir() else shutil.copy2)(child, target)
    store = Store(dst)
    for run_id in store.runs()["run_id"]:
        store._drop_run(run_id)
    if drop_generations:
        store._drop_generations()
    return dst
