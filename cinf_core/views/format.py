"""The workspace and numbers as text: the store's version (the app's cache key), where the
workspace is, the demo world's one-line summary, durations, and a form picker's default row."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

from .. import paths


def store_version(workspace: str | Path) -> str:
    """A key that changes whenever the store file changes (cache key for the app's reads)."""
    base = Path(workspace) / paths.STORE_FILE
    parts = []
    for p in (base, base.with_name(base.name + ".wal")):
        try:
            st = p.stat()
        except OSError:
            continue
        parts.append(f"{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


@dataclass(frozen=True)
class WorkspaceInfo:
    """A workspace folder (absolute) and whether it holds a store yet."""

    path: str
    exists: bool


def workspace_info(workspace: str | Path) -> WorkspaceInfo:
    path = Path(workspace).expanduser()
    return WorkspaceInfo(str(path.resolve()), (path / paths.STORE_FILE).exists())


def built_worlds(default_workspace: str | Path) -> dict[str, Path]:
    """``{button label: folder}`` of the demo worlds built in their default folders (the toy one
    in the default workspace, the SmolLM2 one beside it)."""
    from ..demo import world_workspace

    labels = {"toy": "Toy world", "smollm2": "SmolLM2-135M world"}
    out = {}
    for world, label in labels.items():
        folder = world_workspace(world, default_workspace).expanduser().resolve()
        if (folder / paths.STORE_FILE).exists():
            out[label] = folder
    return out


def demo_summary_text(meta_value: Mapping | None) -> str:
    """One line about the demo world from its meta entry (``{"summary": {...}}`` or the summary)."""
    if not meta_value:
        return ""
    from ..demo import WORLDS

    summary = meta_value.get("summary", meta_value)
    parts = [WORLDS.get(summary.get("world", "toy"), str(summary.get("world")))]
    if "quick" in summary:
        parts.append("quick version" if summary["quick"] else "full version")
    sizes = summary.get("sizes") or {}
    if "finetune" in sizes:
        parts.append(f"{sizes['finetune']} fine-tuning examples")
    labels = sizes.get("finetune_labels") or {}
    if labels:
        parts.append("labels " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    if "n_layers" in summary and "hidden_size" in summary:
        parts.append(f"model {summary['n_layers']} layers × {summary['hidden_size']} d")
    if "concept_layer" in summary:
        parts.append(f"concept layer {summary['concept_layer']}")
    if "build_seconds" in summary:
        parts.append(f"build resumed, its last part took {fmt_seconds(summary['build_seconds'])}"
                     if summary.get("resumed") else
                     f"built in {fmt_seconds(summary['build_seconds'])}")
    return " · ".join(parts)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def newest_with_role(table: pd.DataFrame, role: str) -> int:
    """Row position of the newest row of ``table`` (oldest first, with a ``role`` column) whose role
    is ``role``; the last row when none has it. The default choice of a form's picker."""
    if table.empty:
        return 0
    hits = [i for i, r in enumerate(table["role"]) if r == role] if "role" in table else []
    return hits[-1] if hits else len(table) - 1
