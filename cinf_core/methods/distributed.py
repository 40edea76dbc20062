"""Scoring across processes and machines with torch.distributed (``torchrun``).

``torchrun --nproc_per_node N -m cinf_core score ...`` runs the same command in N processes. Each
rank takes a deterministic share of the work; nothing but rank 0 writes the store:

* EK-FAC (IF, CI): every rank accumulates covariance factors over its slice of the training set;
  they are all-reduced (summed) before the eigendecompositions, which are spread over the ranks by
  module and broadcast; the eigenvalue correction is all-reduced the same way. Rank 0 saves the
  factors to the on-disk cache, so a rerun loads them.
* The preconditioned test-query gradient is computed once, on rank 0, and broadcast.
* Scores: the training set is cut into shards (one per rank on the first attempt); each rank
  writes its shards as Parquet files (:mod:`.shards`) and never opens the store for writing.
  Rank 0 then loads every shard into the store in one transaction. A rank that dies leaves its
  shard marked incomplete; rerunning the command scores only the missing shards, and
  ``python -m cinf_core merge`` loads finished shards without scoring.

Backend: ``gloo`` on CPU, ``nccl`` when CUDA is available; nothing else changes.
"""
from __future__ import annotations

import atexit
import os
import time

import torch

from .. import paths
from ..progress import ProgressFn
from ..store import Store
from .base import RunPlan, ScoringContext
from .request import ScoreConfig, plan
from .shards import ShardPlan


class Communicator:
    """The collective operations the distributed EK-FAC fit needs (no-ops for one process)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """In-place all-reduce (sum) of every tensor, in name order on every rank."""
        for name in sorted(tensors):
            t = tensors[name]
            buf = t.to(self.device)
            self.dist.all_reduce(buf)
            t.copy_(buf.to(t.device))

    def sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return int(t.item())

    def eigh(self, matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eigenvectors (fp64 decomposition, fp32 result) of each matrix, one rank per module."""
        out = {}
        for k, name in enumerate(sorted(matrices)):
            owner = k % self.world
            m = matrices[name]
            if self.rank == owner:
                # eigh returns column-major eigenvectors; a collective sends a tensor's storage
                # in memory order, so a non-contiguous one arrives transposed on the other ranks
                vecs = torch.linalg.eigh(m.double())[1].float().contiguous()
            else:
                vecs = torch.empty(m.shape, dtype=torch.float32)
            buf = vecs.to(self.device)
            self.dist.broadcast(buf, src=owner)
            out[name] = buf.cpu()
        return out

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        self.dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()


def init_process_group() -> Communicator:
    """Join the torchrun job: ``nccl`` with CUDA, else ``gloo``; pins the local GPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # A process that exits with the group alive can abort in gloo's threads (SIGABRT,
        # "terminate called without an active exception"); leave the group on exit.
        atexit.register(_leave_group)
    return Communicator()


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def score_distributed(workspace, cfg: ScoreConfig, progress: ProgressFn = None) -> dict:
    """The torchrun path of :func:`cinf_core.methods.runner.score` (see the module docstring).

    Each rank prepares the method's scorer (collective methods on every rank, so all join the
    fit and the broadcast) and scores its shards with it: the same scorer as in one process.
    """
    comm = init_process_group()
    store = Store(workspace, read_only=True)
    p = plan(store, cfg)
    summary = {"run_id": p.run_id, "method": p.method.key, "trait": cfg.trait,
               "n_examples": p.n_total, "world_size": comm.world, "rank": comm.rank}
    # rank 0's answer for every rank: another process may complete the run between the ranks'
    # reads, and a rank that returned would leave the others waiting in a collective
    existing = comm.broadcast_object(store.run_status(p.run_id) if comm.rank == 0 else None)
    if existing == "complete":
        return {**summary, "cached": True}
    shard_dir = paths.artifact_dir(workspace, paths.SHARDS_DIR, p.run_id)
    # Rank 0 creates the plan and lists the shards still to score, once, before any rank
    # starts: every rank assigns from that one list (a rank listing them itself would miss
    # the shards a faster rank had finished meanwhile, and shift the round-robin).
    todo = ShardPlan.open(shard_dir, p.n_total, comm.world).missing() if comm.rank == 0 else None
    todo = comm.broadcast_object(todo)
    shard_plan = ShardPlan.open(shard_dir, p.n_total, comm.world)
    mine = ShardPlan.assigned(todo, comm.rank, comm.world)
    ctx = ScoringContext(store, p, todo=[i for k in mine for i in shard_plan.indices(k)],
                         progress=progress, comm=comm,
                         save_generations=shard_plan.save_generations,
                         device=str(comm.device) if comm.device.type == "cuda" else None)
    needs_all = p.method.collective and bool(todo)
    scorer = p.method.prepare(ctx) if (mine or needs_all) else None
    timings = ctx.timings
    t = time.perf_counter()
    for k in mine:
        shard_plan.start(k, comm.rank)
        idx = shard_plan.indices(k)
        values = scorer(idx)
        shard_plan.finish(k, idx, values, {**timings, "rank": comm.rank})
    timings["score_s"] = time.perf_counter() - t
    if ctx.encoding:
        summary["truncation"] = ctx.encoding
    all_timings = comm.gather_objects(timings)
    summary["shards_by_rank"] = comm.gather_objects(mine)
    comm.barrier()
    if comm.rank == 0:
        merged = merge_shards(workspace, p, shard_plan, all_timings)
        summary.update(merged)
    comm.barrier()
    return {**summary, "cached": False, "shards_scored_here": mine}


def merge_shards(workspace, p: RunPlan, shard_plan: ShardPlan, rank_timings: list[dict]) -> dict:
    """Load every finished shard into the store as one complete run, in one transaction."""
    frame = shard_plan.read()
    # The run's wall time is the slowest rank's (ranks run concurrently).
    wall = max(sum(v for k, v in t.items() if k not in ("load_s", "rank")) for t in rank_timings) \
        if rank_timings else 0.0
    timings = {"ranks": rank_timings, "world_size": len(rank_timings)}
    store = Store(workspace)
    gens = shard_plan.read_generations()
    if gens is not None:
        for (model_id, gen_key), part in gens.groupby(["model_id", "gen_key"]):
            store.add_generations(p.dataset["dataset_id"], model_id, gen_key,
                                  part["idx"].tolist(), part["response"].tolist())
    store.import_run(p.cfg.method, p.dataset["dataset_id"], p.model_row["model_id"], p.run_config,
                     p.concept_id, frame["idx"].tolist(), frame["score"].tolist(), wall, timings)
    return {"merged": True, "wall_s": wall, "n_shards": shard_plan.n_shards}


def merge(workspace, cfg: ScoreConfig) -> dict:
    """``python -m cinf_core merge``: load finished shards of a run without scoring anything."""
    store = Store(workspace)
    p = plan(store, cfg)
    shard_dir = paths.workspace_path(workspace) / paths.ARTIFACTS_DIR / paths.SHARDS_DIR / p.run_id
    if not (shard_dir / "plan.json").exists():
        raise ValueError(f"no shards for run {p.run_id} in {shard_dir}; score it with torchrun first")
    shard_plan = ShardPlan.open(shard_dir, p.n_total, 1)
    return {"run_id": p.run_id, **merge_shards(workspace, p, shard_plan, shard_plan.timings())}
