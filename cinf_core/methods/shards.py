"""Score shards: how ranks of a distributed run write results without touching the store.

A run's training set is cut into ``n_shards`` contiguous shards, fixed by the first attempt
(``plan.json``). A rank scoring shard k writes ``shard-k.partial.json`` (status ``running``) when it
starts; when the shard is done it writes ``shard-k.parquet`` (idx, score) atomically and removes the
marker. A rank that dies leaves its marker behind: the shard is incomplete and says so. A rerun
scores only the shards without a parquet file, and the merge loads them all into the store in one
transaction once every shard is complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths

PLAN_FILE = "plan.json"


@dataclass
class ShardPlan:
    directory: Path
    n_total: int
    n_shards: int

    @classmethod
    def open(cls, directory: str | os.PathLike, n_total: int, n_shards: int) -> "ShardPlan":
        """Load the plan of ``directory``, or create it with ``n_shards`` shards."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        plan_path = directory / PLAN_FILE
        if plan_path.exists():
            plan = json.loads(plan_path.read_text())
            if plan["n_total"] != n_total:
                raise ValueError(f"shard plan in {directory} covers {plan['n_total']} examples, the "
                                 f"run has {n_total}; delete the folder to start over")
            return cls(directory, n_total, int(plan["n_shards"]))
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        tmp = paths.temp_for(plan_path)
        tmp.write_text(json.dumps({"n_total": n_total, "n_shards": n_shards}))
        os.replace(tmp, plan_path)
        return cls(directory, n_total, n_shards)

    def indices(self, shard: int) -> list[int]:
        """The example indices of ``shard`` (contiguous, deterministic)."""
        return np.array_split(np.arange(self.n_total), self.n_shards)[shard].tolist()

    def _parquet(self, shard: int) -> Path:
        return self.directory / f"shard-{shard}.parquet"

    def _marker(self, shard: int) -> Path:
        return self.directory / f"shard-{shard}.partial.json"

    def complete(self) -> list[int]:
        return [k for k in range(self.n_shards) if self._parquet(k).exists()]

    def missing(self) -> list[int]:
        return [k for k in range(self.n_shards) if not self._parquet(k).exists()]

    def incomplete(self) -> list[int]:
        """Shards a rank started and never finished (it died)."""
        return [k for k in self.missing() if self._marker(k).exists()]

    @staticmethod
    def assigned(missing: list[int], rank: int, world: int) -> list[int]:
        """The shards of ``missing`` rank ``rank`` of ``world`` should score (round-robin).

        ``missing`` must be one snapshot shared by every rank: a rank that lists the missing
        shards itself, after a faster rank has already finished one, gets a shifted list and
        leaves a shard unscored."""
        return list(missing)[rank::world]

    def start(self, shard: int, rank: int) -> None:
        self._marker(shard).write_text(json.dumps({"status": "running", "rank": rank,
                                                   "pid": os.getpid()}))

    def finish(self, shard: int, indices: list[int], scores: np.ndarray, timings: dict) -> None:
        expected = self.indices(shard)
        if sorted(indices) != expected:
            raise ValueError(f"shard {shard} got scores for {len(indices)} examples, expected "
                             f"{len(expected)}")
        frame = pd.DataFrame({"idx": np.asarray(indices, dtype=np.int64),
                              "score": np.asarray(scores, dtype=np.float64)})
        tmp = paths.temp_for(self._parquet(shard))
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self._parquet(shard))
        timings_path = self.directory / f"shard-{shard}.timings.json"
        tmp = paths.temp_for(timings_path)  # whole or absent: `merge` parses every one
        tmp.write_text(json.dumps(timings))
        os.replace(tmp, timings_path)
        self._marker(shard).unlink(missing_ok=True)

    def read(self) -> pd.DataFrame:
        """All scores, once every shard is complete."""
        missing = self.missing()
        if missing:
            raise ValueError(f"shards {missing} of {self.directory} are not complete; rerun the "
                             "scoring command to finish them")
        frame = pd.concat([pd.read_parquet(self._parquet(k)) for k in range(self.n_shards)])
        return frame.sort_values("idx").reset_index(drop=True)

    def timings(self) -> list[dict]:
        out = []
        for k in range(self.n_shards):
            path = self.directory / f"shard-{k}.timings.json"
            if path.exists():
                out.append(json.loads(path.read_text()))
        return out

    def save_generations(self, model_id: str, gen_key: str, indices: list[int],
                         responses: list[str]) -> None:
        """Keep responses ``model_id`` generated (cache key ``gen_key``) beside the shards, for
        the merge to store."""
        if not indices:
            return
        frame = pd.DataFrame({"model_id": model_id, "gen_key": gen_key,
                              "idx": np.asarray(indices, dtype=np.int64), "response": responses})
        name = f"gen-{os.getpid()}-{min(indices)}.parquet"
        tmp = paths.temp_for(self.directory / name)
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self.directory / name)

    def read_generations(self) -> pd.DataFrame | None:
        files = sorted(self.directory.glob("gen-*.parquet"))
        if not files:
            return None
        return pd.concat([pd.read_parquet(f) for f in files]).drop_duplicates(
            ["model_id", "gen_key", "idx"])

