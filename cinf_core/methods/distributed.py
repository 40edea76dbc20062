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
from dataclasses import replace

import torch

from .. import paths
from ..data import encode_dataset
from ..store import Store
from . import forward
from ..models import cached_model
from .runner import (GRADIENT_METHODS, RunPlan, ScoreConfig, generation_key,
                     lexical_run_scores, plan)
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
                vecs = torch.linalg.eigh(m.double())[1].float()
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


def _scorer(store: Store, p: RunPlan, lm, encoded, comm: Communicator, shard_plan: ShardPlan,
            timings: dict, progress):
    """A function ``indices -> scores`` for the run's method, prepared collectively."""
    cfg = p.cfg
    if cfg.method == "random":
        return lambda idx: forward.random_scores(p.n_total, cfg.seed, idx)
    if cfg.method == "lexical":
        values = lexical_run_scores(store, p)
        return lambda idx: values[list(idx)]
    if cfg.method == "vector_filter":
        return lambda idx: forward.vector_filter(lm, encoded, p.concept, idx, cfg.batch_size)
    if cfg.method == "projection_difference":
        return _pd_scorer(store, p, lm, encoded, shard_plan, timings)
    from ..curvature.ekfac import load_or_fit_factors
    from . import gradient
    from .gradient_runner import prepare

    # Every rank joins the EK-FAC fit (or loads it from the cache); rank 0 alone preconditions
    # the test-query gradient, which is then broadcast (module names and tensors only).
    payload = factors = None
    if cfg.method != "grad_sim":
        from .gradient_runner import curvature_config

        t0 = time.perf_counter()
        below = p.concept.layer if cfg.method == "concept_influence" else None
        factors = load_or_fit_factors(lm, encoded, curvature_config(cfg),
                                      paths.artifact_dir(store.workspace, paths.FACTORS_DIR),
                                      p.dataset["dataset_id"], below_layer=below,
                                      model_id=p.model_row["model_id"], comm=comm)
        timings["fit_s"] = time.perf_counter() - t0
    if comm.rank == 0:
        prepared, t = prepare(store, cfg, lm, encoded, p.dataset, p.model_row, p.concept,
                              p.queries, fit=lambda *args, **kwargs: factors)  # the factors fitted above
        timings["queries_s"] = t["queries_s"]
        payload = (prepared.method, list(prepared.modules), prepared.queries, prepared.columns)
    method, names, queries, columns = comm.broadcast_object(payload)
    named = dict(lm.model.named_modules())
    prepared = gradient.Prepared(method, {n: named[n] for n in names}, queries, columns)
    return lambda idx: gradient.train_scores(lm, prepared, encoded, batch_size=cfg.batch_size,
                                             indices=idx)[:, 0]


def _pd_scorer(store: Store, p: RunPlan, lm, encoded, shard_plan: ShardPlan, timings: dict):
    """Projection Difference: generations come from the store's cache or are made here and kept
    in the shard folder (rank 0 stores them with the merge)."""
    from ..models import generate

    cfg = p.cfg
    gen_row = store.get_model(cfg.generator)
    gen_key = generation_key(cfg, gen_row["spec"])
    cached = store.generations(p.dataset["dataset_id"], gen_row["model_id"], gen_key)
    lm_gen = cached_model(gen_row["spec"])
    examples = store.load_dataset(p.dataset["dataset_id"]).examples

    def score(idx):
        t = time.perf_counter()
        missing = [i for i in idx if i not in cached]
        outs = generate(lm_gen, [examples[i].prompt_messages for i in missing],
                        max_new_tokens=cfg.max_new_tokens, batch_size=max(cfg.batch_size, 1))
        cached.update(zip(missing, outs))
        shard_plan.save_generations(missing, outs)
        timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t
        own = [examples[i].prompt_messages + [{"role": "assistant", "content": cached[i]}] for i in idx]
        enc_own, _ = encode_dataset(lm.tokenizer, own, cfg.max_length)
        full = {i: e for i, e in zip(idx, enc_own)}
        encoded_own = [full.get(i, encoded[i]) for i in range(len(encoded))]
        return forward.projection_difference(lm, encoded, encoded_own, p.concept, idx, cfg.batch_size)

    return score


def score_distributed(workspace, cfg: ScoreConfig, progress=None) -> dict:
    """The torchrun path of :func:`cinf_core.methods.runner.score` (see the module docstring)."""
    comm = init_process_group()
    store = Store(workspace, read_only=True)
    p = plan(store, cfg)
    summary = {"run_id": p.run_id, "method": cfg.method, "trait": cfg.trait,
               "n_examples": p.n_total, "world_size": comm.world, "rank": comm.rank}
    existing = store.run_status(p.run_id)
    if existing == "complete":
        return {**summary, "cached": True}
    shard_dir = paths.artifact_dir(workspace, paths.SHARDS_DIR, p.run_id)
    if comm.rank == 0:
        ShardPlan.open(shard_dir, p.n_total, comm.world)
    comm.barrier()
    shard_plan = ShardPlan.open(shard_dir, p.n_total, comm.world)
    mine = shard_plan.assigned(comm.rank, comm.world)
    spec = p.model_row["spec"]
    if comm.device.type == "cuda":
        spec = replace(spec, device=str(comm.device))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    lm = cached_model(spec)
    timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    examples = store.load_dataset(p.dataset["dataset_id"]).examples
    encoded, report = encode_dataset(lm.tokenizer, examples, cfg.max_length)
    timings["encode_s"] = time.perf_counter() - t
    summary["truncation"] = report.as_dict()
    needs_all = cfg.method in GRADIENT_METHODS and bool(shard_plan.missing())
    scorer = _scorer(store, p, lm, encoded, comm, shard_plan, timings, progress) \
        if (mine or needs_all) else None
    t = time.perf_counter()
    for k in mine:
        shard_plan.start(k, comm.rank)
        idx = shard_plan.indices(k)
        values = scorer(idx)
        shard_plan.finish(k, idx, values, {**timings, "rank": comm.rank})
    timings["score_s"] = time.perf_counter() - t
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
    if gens is not None and p.cfg.method == "projection_difference":
        gen_row = store.get_model(p.cfg.generator)
        gen_key = generation_key(p.cfg, gen_row["spec"])
        store.add_generations(p.dataset["dataset_id"], gen_row["model_id"], gen_key,
                              gens["idx"].tolist(), gens["response"].tolist())
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
