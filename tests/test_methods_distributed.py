"""torchrun with 2 CPU processes (gloo) gives the single-process scores, merges one complete run,
and a rerun after a killed rank scores only the missing shard."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cinf_core.methods.runner import ScoreConfig, plan, score
from cinf_core.store import Store
from conftest import copy_workspace

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).resolve().parent / "distributed_driver.py"
METHODS = ["vector_filter", "projection_difference", "random", "lexical", "grad_sim",
           "influence_function", "concept_influence"]


def _torchrun(args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # --standalone: torchrun picks a free port itself (a fixed one can be taken on a shared host)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _failure(proc) -> str:
    """Every rank's traceback (torchrun prefixes them ``[rankN]:``) and the launcher's tail: the
    tail alone shows only the survivor's broken connection, not the rank that failed first."""
    ranks = [line for line in proc.stderr.splitlines() if line.startswith("[rank")]
    return "\n".join(ranks[-80:]) + "\n...\n" + proc.stderr[-1500:]


def _small_workspace(quick_world, path, n=48):
    """The quick world with a 48-example training set (keeps the EK-FAC fits short)."""
    ws = copy_workspace(quick_world, path)
    store = Store(ws)
    store.add_dataset("train-small", store.load_dataset("train").subset(range(n)), role="small")
    return ws


def test_two_ranks_equal_one_process(quick_world, tmp_path):
    single = _small_workspace(quick_world, tmp_path / "single")
    expected = {m: score(single, ScoreConfig(method=m, trait="evil", batch_size=8,
                                             dataset="train-small"))["run_id"]
                for m in METHODS}
    dist_ws = copy_workspace(single, tmp_path / "dist")
    store = Store(dist_ws)
    for run_id in store.runs()["run_id"]:
        store._drop_run(run_id)  # keeps the cached generations, so PD compares like with like
    proc = _torchrun([str(DRIVER), str(dist_ws), "--dataset", "train-small", "--methods", *METHODS])
    assert proc.returncode == 0, _failure(proc)
    ref = Store(single)
    for method, run_id in expected.items():
        info = store.run(run_id)  # same run id: the same request
        assert info["status"] == "complete" and info["n_done"] == info["n_total"]
        assert info["timings"]["world_size"] == 2
        a = ref.scores(run_id)["score"].to_numpy()
        b = store.scores(run_id)["score"].to_numpy()
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale, err_msg=method)
    shards = sorted((dist_ws / "artifacts" / "shards").iterdir())
    assert len(shards) == len(METHODS)


def test_a_late_rank_still_scores_its_shard(quick_world, tmp_path):
    """Rank 1 opens the plan after rank 0 has finished shard 0 (random scores in no time): it
    must still score shard 1, from the list rank 0 made before anyone started."""
    ws = _small_workspace(quick_world, tmp_path / "ws", n=16)
    proc = _torchrun([str(DRIVER), str(ws), "--dataset", "train-small", "--methods", "random",
                      "--late-rank", "1"])
    assert proc.returncode == 0, _failure(proc)
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {s["rank"]: s["shards_scored_here"] for s in summaries} == {0: [0], 1: [1]}
    info = Store(ws).run(summaries[0]["run_id"])
    assert info["status"] == "complete" and info["n_done"] == info["n_total"] == 16


def test_killed_rank_rerun_scores_only_missing_shard(quick_world, tmp_path):
    ws = copy_workspace(quick_world, tmp_path / "ws")
    proc = _torchrun([str(DRIVER), str(ws), "--methods", "vector_filter", "--die-rank", "1"])
    assert proc.returncode != 0
    store = Store(ws)
    p = plan(store, ScoreConfig(method="vector_filter", trait="evil", batch_size=8))
    shard_dir = ws / "artifacts" / "shards" / p.run_id
    assert (shard_dir / "shard-0.parquet").exists()
    assert not (shard_dir / "shard-1.parquet").exists()
    marker = json.loads((shard_dir / "shard-1.partial.json").read_text())
    assert marker["status"] == "running" and marker["rank"] == 1  # incomplete, and says so
    assert store.run_status(p.run_id) is None  # nothing half-done in the store
    before = (shard_dir / "shard-0.parquet").stat().st_mtime_ns
    proc = _torchrun(["-m", "cinf_core", "score", "--method", "vector_filter", "--trait", "evil",
                      "--batch-size", "8", "--workspace", str(ws), "--no-progress"])
    assert proc.returncode == 0, _failure(proc)
    assert (shard_dir / "shard-0.parquet").stat().st_mtime_ns == before  # not recomputed
    assert (shard_dir / "shard-1.parquet").exists()
    assert not (shard_dir / "shard-1.partial.json").exists()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0's, the only one
    assert summary["shards_by_rank"] == [[1], []]
    info = store.run(p.run_id)
    assert info["status"] == "complete" and info["n_done"] == info["n_total"]
    single = copy_workspace(quick_world, tmp_path / "single")
    ref = score(single, ScoreConfig(method="vector_filter", trait="evil", batch_size=8))
    np.testing.assert_allclose(store.scores(p.run_id)["score"], Store(single).scores(ref["run_id"])["score"],
                               atol=1e-5)


def test_bench_distributed_reports_speedup_and_scaling_model(quick_world, tmp_path):
    from cinf_core.methods.bench import bench_distributed

    ws = _small_workspace(quick_world, tmp_path / "ws", n=64)
    out = bench_distributed(ws, "evil", methods=("influence_function",), world_sizes=(1, 2),
                            batch_size=8, predict_for=(1, 2, 8), dataset="train-small")
    runs = out["runs"]["influence_function"]
    assert set(runs) == {"ranks_1", "ranks_2", "threads_2"}
    assert runs["ranks_2"]["timings"]["world_size"] == 2 and runs["ranks_2"]["threads_per_rank"] == 1
    assert all(r["wall_s"] > 0 for r in runs.values())
    up = out["speedup"]["influence_function"]
    assert up["ranks_2_over_1_rank"] == pytest.approx(runs["ranks_1"]["wall_s"] / runs["ranks_2"]["wall_s"])
    model = out["scaling_model"]["influence_function"]
    parts = model["parts"]
    assert parts["per_example_work_s"] > 0 and parts["n_eigh_matrices"] > 0 and parts["allreduce_bytes"] > 0
    pred = model["prediction"]
    assert pred["1"]["predicted_speedup"] == 1.0
    assert 1.0 < pred["2"]["predicted_speedup"] < pred["8"]["predicted_speedup"] < 8.0
