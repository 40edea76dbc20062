"""The gradient index: Concept Influence for any new concept in seconds, after one pass.

One pass over the training set stores, for every example ``z_i`` and every tracked Linear ``m``,
its gradient compressed by a Kronecker-factored random projection; a concept query is then one
backward pass of ``f_c`` on the test queries and a matrix-vector product with the stored matrix.

Sign (DESIGN.md §1): ``score(z_i) > 0`` means upweighting ``z_i`` pushes the behaviour up;
Concept Influence is ``score_i = -grad f_c^T (H + lambda I)^{-1} grad L(z_i)``
(:mod:`cinf_core.methods.gradient`), ``H`` the block-diagonal EK-FAC over the tracked modules.

The math, per module (``a_t`` its inputs, with a trailing 1 when it has a bias; ``g_t`` its
output gradients; ``G_i = sum_t g_t a_t^T``, ``[out, in]``). EK-FAC gives eigenbases ``Q_A``,
``Q_S`` and corrected eigenvalues ``Lambda`` (``[out, in]``), ``D = Lambda + lambda``, and

    (H + lambda)^{-1} G = Q_S [(Q_S^T G Q_A) / D] Q_A^T,

so with ``Pre = -(H + lambda)^{-1} grad f_c`` (exact, computed at query time) the score is
``<Pre, G_i> = <Q_S^T Pre Q_A, Q_S^T G_i Q_A>`` (Frobenius; the rotation is orthogonal).

1. **Half-whitening in the eigenbasis.** Any positive ``s_out [out]``, ``s_in [in]`` keep it exact:
   ``<W, G~> = <W / (s_out s_in^T), G~ * (s_out s_in^T)>``. We take ``s_out s_in^T ~ D^{-1/2}``
   (the least-squares fit of ``log D`` by ``alpha_o + beta_i``), so both sides are about
   equally well conditioned; the stored side ``diag(s_out) Q_S^T G_i Q_A diag(s_in)`` stays
   Kronecker-factored (``sum_t (s_out * Q_S^T g_t)(s_in * Q_A^T a_t)^T``).
2. **Projection.** Fixed random ``P_out [k_out, out]``, ``P_in [k_in, in]`` with i.i.d.
   ``N(0, 1/k)`` entries (seeded by the index seed and the module's name), or the identity when
   ``k`` reaches the full size. The sizes come from one budget, ``dim^2`` stored values per module
   on average, shared in proportion to each module's whitened energy ``sum(Lambda s_out^2
   s_in^2)`` (:func:`allocate`): the projection error of a module has variance about
   ``|X_m|^2 |Y_m|^2 / (k_out k_in)``, and on the demo world that energy predicts ``|X_m||Y_m|``
   (correlation 0.97 in log space), so this split minimises the total error of the budget (2.9x
   lower variance than equal sizes, measured). Folding rotation, whitening and projection into
   one matrix per side, ``T_out = c P_out diag(s_out) Q_S^T`` and
   ``T_in = P_in diag(s_in) Q_A^T``, the index stores per example and module

       Z_i = T_out G_i T_in^T = sum_t (T_out g_t)(T_in a_t)^T        ([k_out, k_in])

   from the captured ``a_t``, ``g_t`` (the full ``G_i`` is never formed). ``c`` scales the
   module's entries to about unit variance (``c^2 = k_out k_in / sum(Lambda s_out^2 s_in^2)``),
   so float16 storage keeps its precision.
3. **Query.** ``U_out = P_out diag(1/s_out) Q_S^T / c``, ``U_in = P_in diag(1/s_in) Q_A^T`` and
   ``w = U_out Pre U_in^T``; ``score_i ~= sum_m <w_m, Z_im>``, one matrix product ``[N, D] @
   [D, K]`` for K concepts. Since ``E[P^T P] = I`` and ``P_out``, ``P_in`` are independent this
   is an unbiased (Johnson-Lindenstrauss) estimate of the exact score, and with ``P = I`` (``k``
   at full size) it *is* the exact score. Its error shrinks like one over the square root of the
   stored width, so how much an index can be compressed depends on how many eigen-directions
   of each module carry energy above the damping: on the demo world's tiny model most do, and
   Spearman >= 0.9 against the exact scores needs about 60% of the full gradient's size (the
   README's table); random projections of larger models are expected to compress more.

On disk (``<workspace>/artifacts/index/<key>/``): ``index.json`` (what it was built from, the
column layout, progress, timings), ``matrix.npy`` (``[N, D]`` float16 or float32, memory-mapped),
``done.npy`` (one byte per chunk of :data:`CHUNK` examples: a killed build resumes after the last
finished chunk) and ``projections.safetensors`` (``T`` and ``U`` of every module). Under
``torchrun`` every rank joins the EK-FAC fit and writes its own chunks' rows into the one matrix
(the ranks must share the folder's file system).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import paths
from ..concepts.base import Concept
from ..curvature.config import CurvatureConfig
from ..curvature.ekfac import FACTORS_META_FILE, EKFACFactors, factors_key, load_or_fit_factors
from ..curvature.lm import check_examples, response_losses
from ..curvature.tape import LinearTape, eval_mode
from ..data import EncodedExample, collate
from ..progress import ProgressFn
from ..store import config_hash

DEFAULT_DIM = 96
"""Average projection dimension per side: a budget of ``dim**2`` stored values per tracked module,
shared across modules by their whitened energy (:func:`allocate`). 96 keeps Spearman >= 0.9
against the exact scores on the demo world (README); smaller is a smaller, noisier index."""
DTYPES = ("float16", "float32")
CHUNK = 64
"""Examples per resumable unit of the build."""
META_FILE = "index.json"
MATRIX_FILE = "matrix.npy"
DONE_FILE = "done.npy"
PROJECTIONS_FILE = "projections.safetensors"
FLOAT16_LIMIT = 6.0e4
QUERY_BLOCK_BYTES = 128 * 2**20
OPTION_FIELDS = ("dim", "seed", "dtype", "whiten")


@dataclass
class IndexSpec:
    """Everything that determines an index's content (its key hashes all of it)."""

    model_id: str
    weights: str | None
    dataset_id: str
    max_length: int | None
    curvature: dict
    """CurvatureConfig fields (batch size left out: it does not change the result)."""
    below_layer: int | None
    """Blocks tracked: those below this ``hidden_states`` index (None: every selected block)."""
    dim: int = DEFAULT_DIM
    seed: int = 0
    dtype: str = "float16"
    whiten: bool = True

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"index dimension must be a whole number >= 1, got {self.dim!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"index dtype {self.dtype!r} is not valid; use one of "
                             f"{', '.join(DTYPES)}")
        self.curvature = {k: v for k, v in self.curvature.items() if k != "batch_size"}

    @property
    def key(self) -> str:
        return config_hash(asdict(self))

    def curvature_config(self, batch_size: int = 16) -> CurvatureConfig:
        return CurvatureConfig.from_dict({**self.curvature, "batch_size": batch_size})


@dataclass
class Slot:
    """Where one module's projected gradient sits in a row of the index."""

    name: str
    out: int
    inp: int
    k_out: int
    k_in: int
    offset: int
    scale: float

    @property
    def size(self) -> int:
        return self.k_out * self.k_in

    @property
    def exact(self) -> bool:
        """Both sides at full size: the module's whole (rotated, scaled) gradient is stored."""
        return (self.k_out, self.k_in) == (self.out, self.inp)

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)


@dataclass
class GradientIndex:
    """An index folder, opened: its spec, layout and (lazily) its matrix and projections."""

    directory: Path
    meta: dict
    spec: IndexSpec = field(init=False)
    slots: dict[str, Slot] = field(init=False)

    def __post_init__(self):
        self.spec = IndexSpec(**self.meta["spec"])
        self.slots = {s["name"]: Slot(**s) for s in self.meta["slots"]}

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def n_examples(self) -> int:
        return int(self.meta["n_examples"])

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"

    @property
    def bytes_per_example(self) -> int:
        return self.width * np.dtype(self.spec.dtype).itemsize

    def n_done(self) -> int:
        done = np.load(self.directory / DONE_FILE, mmap_mode="r")
        return int(sum(min(CHUNK, self.n_examples - c * CHUNK) for c in np.flatnonzero(done)))

    def matrix(self, writable: bool = False) -> np.ndarray:
        """The ``[N, D]`` matrix, memory-mapped (read-only unless ``writable``)."""
        return np.load(self.directory / MATRIX_FILE, mmap_mode="r+" if writable else "r")

    def projections(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.directory / PROJECTIONS_FILE))

    def summary(self) -> dict:
        """What the CLI and the pages say about the index."""
        m = self.meta
        return {"index_id": self.key, "path": str(self.directory), "status": m.get("status"),
                "dim": self.spec.dim, "dtype": self.spec.dtype,
                "below_layer": self.spec.below_layer,
                "n_examples": self.n_examples, "n_done": self.n_done(), "width": self.width,
                "n_modules": len(self.slots), "bytes_per_example": self.bytes_per_example,
                "matrix_bytes": self.bytes_per_example * self.n_examples,
                "model_id": self.spec.model_id, "dataset_id": self.spec.dataset_id,
                "max_length": self.spec.max_length, "build_s": m.get("build_s"),
                "fit_s": m.get("fit_s"), "pass_s": m.get("pass_s"),
                "completed_at": m.get("completed_at")}


# ---------------------------------------------------------------- locating indexes


def index_root(workspace) -> Path:
    return paths.workspace_path(workspace) / paths.ARTIFACTS_DIR / paths.INDEX_DIR


def open_index(directory: str | os.PathLike) -> GradientIndex:
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"no gradient index in {directory} (no {META_FILE}); build one "
                                "with `python -m cinf_core index`")
    return GradientIndex(directory, json.loads(meta_path.read_text()))


def list_indexes(workspace) -> list[GradientIndex]:
    """Every index folder of the workspace (complete or not), newest first."""
    root = index_root(workspace)
    found = []
    if root.exists():
        for meta in root.glob(f"*/{META_FILE}"):
            try:
                found.append(open_index(meta.parent))
            except (ValueError, TypeError, KeyError, json.JSONDecodeError):
                continue  # a folder from another version of cinf: not usable here
    return sorted(found, key=lambda ix: ix.meta.get("created_at", 0), reverse=True)


def run_option(dim: int, spec: IndexSpec | None = None) -> dict:
    """What a run over the index records in its config (``index``): the options that, besides
    the run's model, data, token budget and curvature, determine the index's content (the
    defaults, or those of ``spec``)."""
    if spec is not None:
        return {k: getattr(spec, k) for k in OPTION_FIELDS}
    return {"dim": int(dim), **{k: f.default for k, f in IndexSpec.__dataclass_fields__.items()
                                if k in OPTION_FIELDS and k != "dim"}}


def find_index(workspace, *, model_id: str, weights: str | None, dataset_id: str,
               max_length: int | None, curvature: dict, options: dict, layer: int | None = None,
               model_name: str | None = None) -> GradientIndex:
    """The newest complete index of this model, dataset, token budget, curvature and options
    (:func:`run_option`) that tracks every block below ``layer``; a clear error saying what to
    build otherwise."""
    curvature = {k: v for k, v in curvature.items() if k != "batch_size"}
    dim = int(options["dim"])
    name = model_name or model_id
    all_ix = list_indexes(workspace)
    build = f"`python -m cinf_core index --model {name} --dim {dim}`"
    same_model = [ix for ix in all_ix if ix.spec.model_id == model_id]
    if not same_model:
        others = sorted({ix.spec.model_id for ix in all_ix})
        if others:
            raise ValueError(f"the gradient index(es) in this workspace were built for model(s) "
                             f"{', '.join(others)}, not for {name!r} ({model_id}); an index "
                             f"answers queries about its own model only. Build one for this model "
                             f"with {build}")
        raise ValueError(f"no gradient index in this workspace; build one with {build} (one pass "
                         "over the training data, about the cost of one Concept Influence run)")
    same = [ix for ix in same_model if ix.spec.weights == weights]
    if not same:
        raise ValueError(f"model {name!r} changed since its gradient index was built (its files "
                         f"differ); rebuild the index with {build}")
    same = [ix for ix in same if ix.spec.dataset_id == dataset_id]
    if not same:
        raise ValueError(f"no gradient index of model {name!r} covers dataset {dataset_id}; build "
                         f"one with {build} --dataset {dataset_id}")
    same = [ix for ix in same if ix.spec.max_length == max_length and ix.spec.curvature == curvature
            and run_option(0, ix.spec) == {k: options.get(k) for k in OPTION_FIELDS}]
    if not same:
        have = sorted({(ix.spec.dim, ix.spec.max_length) for ix in same_model})
        raise ValueError(f"no gradient index of model {name!r} with dimension {dim}, max_length "
                         f"{max_length} and these curvature settings (built: (dim, max_length) = "
                         f"{have}); build one with {build} --max-length {max_length}")
    if layer is not None:
        covering = [ix for ix in same
                    if ix.spec.below_layer is None or layer <= ix.spec.below_layer]
        if not covering:
            tracked = max(ix.spec.below_layer for ix in same)
            raise ValueError(f"the concept is at layer {layer}, above the modules the gradient "
                             f"index tracks (blocks below layer {tracked}); Concept Influence "
                             f"needs every block below the concept's layer. Build an index with "
                             f"{build} --below-layer {layer}")
        same = covering
    complete = [ix for ix in same if ix.complete]
    if not complete:
        ix = same[0]
        raise ValueError(f"the gradient index in {ix.directory} is not complete ({ix.n_done()} of "
                         f"{ix.n_examples} examples); finish it with {build} (it resumes)")
    return complete[0]


# ---------------------------------------------------------------- projections


def _module_seed(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def _projection(k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[min(k, n), n]``: the identity when ``k >= n``, else i.i.d. N(0, 1/k)."""
    if k >= n:
        return torch.eye(n, dtype=torch.float64)
    return torch.randn(k, n, generator=gen, dtype=torch.float64) / k ** 0.5


def _whitening(factors: EKFACFactors, name: str, whiten: bool
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``s_out [out]``, ``s_in [in]`` with ``s_out s_in^T ~ (Lambda + lambda)^{-1/2}`` (ones without
    whitening) and the module's expected squared norm ``sum(Lambda s_out^2 s_in^2)`` of a training
    example's rotated, scaled gradient (its effective dimension, about the number of eigen-
    directions above the damping, when whitened)."""
    f = factors.modules[name]
    out, inp = f.shape
    eig = f.eigvals.double().clamp_min(0.0)
    if whiten:
        logd = (eig + factors.damping_for(name)).log()
        s_out = torch.exp(-logd.mean(1) / 2)
        s_in = torch.exp(-(logd.mean(0) - logd.mean()) / 2)
    else:
        s_out, s_in = torch.ones(out, dtype=torch.float64), torch.ones(inp, dtype=torch.float64)
    return s_out, s_in, float((eig * s_out[:, None] ** 2 * s_in[None] ** 2).sum())


def allocate(shapes: Sequence[tuple[int, int]], energies: Sequence[float], dim: int
             ) -> list[tuple[int, int]]:
    """``(k_out, k_in)`` per module: a budget of ``len(shapes) * dim**2`` stored values shared in
    proportion to each module's energy (capped at its full size, the rest shared again).

    The projection error of module m has variance about ``|X_m|^2 |Y_m|^2 / w_m`` (``w_m`` its
    stored values); with ``|X_m|^2 ~ |Y_m|^2 ~`` its whitened energy ``e_m``, ``w_m ~ e_m``
    minimises the total for a fixed budget. Each side gets about ``sqrt(w_m)``, at most its size.
    A ``dim`` at least every module's largest side keeps every module whole (exact).
    """
    full = np.array([o * i for o, i in shapes], dtype=np.float64)
    weight = np.maximum(np.asarray(energies, dtype=np.float64), 1e-12 * max(max(energies), 1e-300))
    budget = float(len(shapes)) * dim * dim
    width = full.copy()
    if full.sum() > budget:
        capped = np.zeros(len(shapes), dtype=bool)
        while True:  # water-filling: modules that would exceed their size get it, the rest share
            left = budget - full[capped].sum()
            share = left * weight / weight[~capped].sum()
            over = ~capped & (share >= full)
            if not over.any():
                width = np.where(capped, full, share)
                break
            capped |= over
    out = []
    for (o, i), w in zip(shapes, width):
        if w >= o * i:
            out.append((o, i))
            continue
        k_in = int(min(i, max(1, round(w ** 0.5))))
        k_out = int(min(o, max(1, round(w / k_in))))
        k_in = int(min(i, max(1, round(w / k_out))))  # the other side, when one side hit its size
        out.append((k_out, k_in))
    return out


def make_projections(factors: EKFACFactors, spec: IndexSpec
                     ) -> tuple[list[Slot], dict[str, torch.Tensor]]:
    """The column layout and ``{name::t_out, ::t_in, ::u_out, ::u_in}`` (float32) of every module
    of ``factors`` (see the module docstring)."""
    names = sorted(factors.modules)
    whitened = {n: _whitening(factors, n, spec.whiten) for n in names}
    sizes = allocate([factors.modules[n].shape for n in names], [whitened[n][2] for n in names],
                     spec.dim)
    slots, tensors, offset = [], {}, 0
    for name, (k_out, k_in) in zip(names, sizes):
        f = factors.modules[name]
        out, inp = f.shape
        s_out, s_in, energy = whitened[name]
        gen = torch.Generator().manual_seed(_module_seed(spec.seed, name))
        p_out, p_in = _projection(k_out, out, gen), _projection(k_in, inp, gen)
        scale = (k_out * k_in / energy) ** 0.5 if energy > 0 else 1.0
        q_s, q_a = f.eigvecs_s.double(), f.eigvecs_a.double()
        tensors[f"{name}::t_out"] = (scale * (p_out * s_out) @ q_s.T).float()
        tensors[f"{name}::t_in"] = ((p_in * s_in) @ q_a.T).float()
        tensors[f"{name}::u_out"] = ((p_out / s_out) @ q_s.T / scale).float()
        tensors[f"{name}::u_in"] = ((p_in / s_in) @ q_a.T).float()
        slots.append(Slot(name, out, inp, k_out, k_in, offset, scale))
        offset += k_out * k_in
    return slots, tensors


# ---------------------------------------------------------------- build


def build_index(lm, encoded: Sequence[EncodedExample], factors: EKFACFactors, spec: IndexSpec,
                directory: str | os.PathLike, *, batch_size: int = 16, progress: ProgressFn = None,
                comm=None, stop_after_chunks: int | None = None, fit_s: float = 0.0
                ) -> GradientIndex:
    """Build (or resume) the index of ``encoded`` in ``directory``.

    ``factors`` must track the modules ``spec`` names (fitted on the same data). A folder left by
    a killed build with the same key resumes after its last finished chunk; one with another key
    is replaced. ``stop_after_chunks`` ends the pass early (as a kill would; for tests).
    ``comm``: torchrun communicator; every rank passes the same arguments and writes its share.
    """
    directory = Path(directory)
    check_examples(encoded, "training")
    n = len(encoded)
    n_chunks = (n + CHUNK - 1) // CHUNK
    rank0 = comm is None or comm.rank == 0
    todo = None
    if rank0:
        _prepare_folder(directory, factors, spec, n, n_chunks)
        todo = [c for c in range(n_chunks) if not np.load(directory / DONE_FILE)[c]]
    if comm is not None:
        # One list of the chunks left, made before any rank starts: a rank reading DONE_FILE
        # itself after a faster rank finished a chunk would get a shifted share and skip one.
        todo = comm.broadcast_object(todo)
    index = open_index(directory)
    proj = {k: v.to(_device(lm.model)) for k, v in index.projections().items()}
    modules = factors.tracked_modules(lm.model)
    if sorted(modules) != sorted(index.slots):
        raise ValueError(f"the index in {directory} tracks {len(index.slots)} modules but the "
                         f"factors {len(modules)}; delete the folder and build again")
    matrix = index.matrix(writable=True)
    done = np.load(directory / DONE_FILE, mmap_mode="r+")
    order = length_order(encoded)
    mine = todo if comm is None else todo[comm.rank::comm.world]
    total_todo = sum(min(CHUNK, n - c * CHUNK) for c in todo)
    width = index.width
    buf = np.zeros((0, width), dtype=np.float32)
    rows = slice(0, 0)

    def capture(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        slot = index.slots[name]
        pa = a @ proj[f"{name}::t_in"].to(a.dtype).T          # [b, t, k_in]
        pg = g @ proj[f"{name}::t_out"].to(g.dtype).T         # [b, t, k_out]
        z = torch.bmm(pg.transpose(1, 2), pa)                 # [b, k_out, k_in]
        buf[rows, slot.columns] = z.reshape(z.shape[0], -1).float().cpu().numpy()

    t0 = time.perf_counter()
    seen = 0
    with eval_mode(lm.model), LinearTape(modules, capture, model=lm.model) as tape:
        for k, c in enumerate(mine):
            if stop_after_chunks is not None and k >= stop_after_chunks:
                break
            members = order[c * CHUNK:(c + 1) * CHUNK]
            buf = np.zeros((len(members), width), dtype=np.float32)
            for start in range(0, len(members), batch_size):
                part = members[start:start + batch_size]
                batch = collate([encoded[i] for i in part], lm.pad_token_id)
                rows = slice(start, start + len(part))
                tape.start(batch["attention_mask"])
                tape.backward(response_losses(lm.model, batch).sum())
            _check_values(buf, spec.dtype, members)
            matrix[members] = buf.astype(spec.dtype)
            matrix.flush()
            done[c] = 1
            done.flush()
            seen += len(members)
            if progress is not None:
                progress("gradient index", seen / max(total_todo, 1) if comm is None else
                         (k + 1) / max(len(mine), 1))
    pass_s = time.perf_counter() - t0
    del matrix
    if comm is not None:
        pass_s = max(comm.gather_objects(pass_s))
        comm.barrier()
    if rank0:
        meta = json.loads((directory / META_FILE).read_text())
        meta["pass_s"] = float(meta.get("pass_s") or 0.0) + pass_s
        meta["fit_s"] = float(meta.get("fit_s") or 0.0) + fit_s
        meta["build_s"] = meta["pass_s"] + meta["fit_s"]
        if bool(np.load(directory / DONE_FILE, mmap_mode="r").all()):
            meta["status"] = "complete"
            meta["completed_at"] = time.time()
        _write_meta(directory, meta)
    if comm is not None:
        comm.barrier()
    return open_index(directory)


def length_order(encoded: Sequence[EncodedExample]) -> list[int]:
    """Training examples longest first (ties by index): chunk ``c`` of a build is
    ``order[c * CHUNK:(c + 1) * CHUNK]``, so its batches carry little padding."""
    return sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))


def _check_values(buf: np.ndarray, dtype: str, members: Sequence[int]) -> None:
    bad = ~np.isfinite(buf).all(axis=1)
    if bad.any():
        raise ValueError(f"training example {members[int(np.flatnonzero(bad)[0])]} has a "
                         "non-finite gradient; check the model and the example")
    if dtype == "float16" and np.abs(buf).max(initial=0.0) > FLOAT16_LIMIT:
        row = members[int(np.abs(buf).max(axis=1).argmax())]
        raise ValueError(f"training example {row}'s projected gradient exceeds the float16 range; "
                         "build the index with --dtype float32")


def _write_meta(directory: Path, meta: dict) -> None:
    tmp = paths.temp_for(directory / META_FILE)
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, directory / META_FILE)


def _prepare_folder(directory: Path, factors: EKFACFactors, spec: IndexSpec, n: int,
                    n_chunks: int) -> None:
    """Create the folder's files, unless a build with the same key left them (then resume)."""
    from safetensors.torch import save_file

    meta_path = directory / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if (meta.get("key") == spec.key and meta.get("n_examples") == n
                    and (directory / MATRIX_FILE).exists() and (directory / DONE_FILE).exists()):
                return
        except json.JSONDecodeError:
            pass
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    slots, tensors = make_projections(factors, spec)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / PROJECTIONS_FILE))
    width = sum(s.size for s in slots)
    np.lib.format.open_memmap(directory / MATRIX_FILE, mode="w+", dtype=spec.dtype,
                              shape=(n, width)).flush()
    np.lib.format.open_memmap(directory / DONE_FILE, mode="w+", dtype=np.uint8,
                              shape=(n_chunks,)).flush()
    _write_meta(directory, {"key": spec.key, "spec": asdict(spec), "n_examples": n, "width": width,
                            "chunk": CHUNK, "slots": [asdict(s) for s in slots],
                            "status": "building", "created_at": time.time(), "pass_s": 0.0,
                            "fit_s": 0.0, "build_s": 0.0})


# ---------------------------------------------------------------- query


def query_index(index: GradientIndex, lm, factors: EKFACFactors, concepts: Sequence[Concept],
                queries: Sequence[EncodedExample], *, batch_size: int = 8,
                window: int | None = None,
                model_id: str | None = None, rows: Sequence[int] | None = None,
                timings: dict | None = None) -> np.ndarray:
    """Concept Influence of each concept over the index: ``[len(rows), K]`` float64.

    ``-(H + lambda)^{-1} grad f_c`` is exact (:func:`gradient.prepare_concept_influence`, one
    backward per concept on ``queries``); the training side is the index. ``model_id``, when
    given, must be the index's model. ``rows``: only these training examples (default all).
    ``timings`` (a dict) receives ``queries_s`` and ``score_s``.
    """
    from .gradient import prepare_concept_influence

    concepts = list(concepts)
    check_query(index, concepts, model_id)
    if not index.complete:
        raise ValueError(f"the gradient index in {index.directory} is not complete "
                         f"({index.n_done()} of {index.n_examples} examples); finish building it")
    t0 = time.perf_counter()
    prepared = prepare_concept_influence(lm, queries, factors, concepts, batch_size=batch_size,
                                         window=window)
    proj = index.projections()
    w = np.zeros((index.width, len(concepts)), dtype=np.float64)
    for name, pre in prepared.queries.items():
        slot = index.slots.get(name)
        if slot is None:
            raise ValueError(f"the gradient index does not track module {name!r}; build it with "
                             "the same curvature settings as the factors")
        u_out = proj[f"{name}::u_out"].double()
        u_in = proj[f"{name}::u_in"].double()
        wp = u_out @ pre.double().cpu() @ u_in.T                  # [K, k_out, k_in]
        w[slot.columns] = wp.reshape(len(concepts), -1).T.numpy()
    t1 = time.perf_counter()
    scores = matrix_product(index, w, rows)
    if timings is not None:
        timings["queries_s"] = timings.get("queries_s", 0.0) + t1 - t0
        timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t1
    return scores


def matrix_product(index: GradientIndex, w: np.ndarray, rows: Sequence[int] | None = None
                   ) -> np.ndarray:
    """``index[rows] @ w`` (float64 result), reading the memory-mapped matrix in blocks.

    A float16 index is multiplied in float16 (``w`` scaled to unit maximum per column first; the
    products accumulate in float32 inside torch's kernel): several times faster than converting
    the matrix, at a relative error near 1e-4 of the largest score, far below the projection's.
    A float32 index is multiplied in float32.
    """
    matrix = index.matrix()
    half = index.spec.dtype == "float16"
    scale = np.abs(w).max(axis=0)
    scale[scale == 0] = 1.0
    wt = torch.from_numpy(np.ascontiguousarray(w / scale))
    wt = wt.to(torch.float16 if half else torch.float32)
    order = np.arange(index.n_examples) if rows is None else np.asarray(rows, dtype=np.int64)
    step = max(1, QUERY_BLOCK_BYTES // (matrix.dtype.itemsize * max(index.width, 1)))
    out = np.empty((len(order), w.shape[1]), dtype=np.float64)
    for s in range(0, len(order), step):
        part = order[s:s + step]
        block = matrix[part[0]:part[-1] + 1] if _contiguous(part) else matrix[part]
        product = torch.from_numpy(np.array(block)) @ wt
        out[s:s + step] = product.double().numpy() * scale
    return out


def _contiguous(idx: np.ndarray) -> bool:
    return (len(idx) > 0 and int(idx[-1]) - int(idx[0]) == len(idx) - 1
            and bool((np.diff(idx) == 1).all()))


def check_query(index: GradientIndex, concepts: Sequence[Concept],
                model_id: str | None = None) -> None:
    """Refuse a query the index cannot answer: another model's, or a concept above the tracked
    blocks."""
    if model_id is not None and model_id != index.spec.model_id:
        raise ValueError(f"this gradient index was built for model {index.spec.model_id}, not "
                         f"{model_id}; an index answers queries about its own model only (build "
                         "one for this model with `python -m cinf_core index --model ...`)")
    top = index.spec.below_layer
    for c in concepts:
        if top is not None and c.layer > top:
            raise ValueError(f"concept {c.name!r} is at layer {c.layer}, above the modules the "
                             f"gradient index tracks (blocks below layer {top}); Concept Influence "
                             f"needs every block below the concept's layer. Build an index with "
                             f"`python -m cinf_core index --below-layer {c.layer}`")


# ---------------------------------------------------------------- the workspace


def curvature_of(cfg_curvature: dict, max_length: int | None, batch_size: int) -> CurvatureConfig:
    """The EK-FAC settings of a request (as the gradient methods build them)."""
    return CurvatureConfig.from_dict({"max_length": max_length, "batch_size": batch_size,
                                      **(cfg_curvature or {})})


def default_below_layer(store) -> int | None:
    """The highest layer of the workspace's concepts (the index then tracks exactly the blocks
    Concept Influence needs for each of them), None when there is none (every block)."""
    concepts = store.concepts()
    if concepts.empty:
        return None
    return int(concepts["layer"].max())


def workspace_spec(store, *, model: str = "finetuned", dataset: str = "train",
                   dim: int = DEFAULT_DIM, max_length: int | None = 256,
                   curvature: dict | None = None, below_layer: int | None | str = "auto",
                   seed: int = 0, dtype: str = "float16", whiten: bool = True) -> IndexSpec:
    row = store.get_model(model)
    ds = store.dataset(dataset)
    if below_layer == "auto":
        below_layer = default_below_layer(store)
    cfg = curvature_of(curvature or {}, max_length, 16)
    return IndexSpec(model_id=row["model_id"], weights=row["spec"].weights_fingerprint(),
                     dataset_id=ds["dataset_id"], max_length=max_length, curvature=cfg.to_dict(),
                     below_layer=below_layer, dim=dim, seed=seed, dtype=dtype, whiten=whiten)


def load_factors(workspace, lm, encoded, spec: IndexSpec, *, batch_size: int = 16,
                 progress=None, comm=None, cache_dir: str | os.PathLike | None = None
                 ) -> EKFACFactors:
    """The EK-FAC factors an index of ``spec`` uses (the factor cache shared with Concept
    Influence runs: a concept layer's run and the index below that layer fit them once)."""
    cache = cache_dir or paths.artifact_dir(workspace, paths.FACTORS_DIR)
    return load_or_fit_factors(lm, encoded, spec.curvature_config(batch_size), cache_dir=cache,
                               dataset_id=spec.dataset_id, below_layer=spec.below_layer,
                               model_id=spec.model_id, progress=progress, comm=comm)


def build_workspace_index(workspace, *, model: str = "finetuned", dataset: str = "train",
                          dim: int = DEFAULT_DIM, max_length: int | None = 256,
                          curvature: dict | None = None, below_layer: int | None | str = "auto",
                          seed: int = 0, dtype: str = "float16", whiten: bool = True,
                          batch_size: int = 16, progress: ProgressFn = None, comm=None,
                          factors_dir: str | os.PathLike | None = None,
                          stop_after_chunks: int | None = None) -> dict:
    """``python -m cinf_core index``: build, resume or find the index of a registered model over
    a registered dataset; returns its summary (size, build time, ``cached`` when it was complete).
    """
    from ..data import encode_dataset
    from ..models import cached_model
    from ..store import Store

    store = Store(workspace, read_only=comm is not None and comm.rank != 0)
    spec = workspace_spec(store, model=model, dataset=dataset, dim=dim, max_length=max_length,
                          curvature=curvature, below_layer=below_layer, seed=seed, dtype=dtype,
                          whiten=whiten)
    directory = index_root(workspace) / spec.key
    built = None
    if (comm is None or comm.rank == 0) and (directory / META_FILE).exists():
        existing = open_index(directory)
        if existing.complete and existing.key == spec.key:
            built = existing.summary()
    if comm is not None:  # rank 0's answer for every rank (the ranks must take the same path)
        built = comm.broadcast_object(built)
    if built is not None:
        return {**built, "cached": True}
    t0 = time.perf_counter()
    lm = cached_model(store.get_model(model)["spec"])
    if spec.below_layer is not None:
        from ..models import check_layer

        check_layer(lm.model, spec.below_layer)
    examples = store.load_dataset(spec.dataset_id).examples
    encoded, _ = encode_dataset(lm.tokenizer, examples, max_length)
    load_s = time.perf_counter() - t0

    def fit_progress(k: int, seen=[0]) -> None:  # noqa: B006 — a counter across calls
        seen[0] += k
        if progress is not None:
            progress("fit EK-FAC", seen[0] / (2 * max(len(encoded), 1)))

    t1 = time.perf_counter()
    factors = load_factors(workspace, lm, encoded, spec, batch_size=batch_size,
                           progress=fit_progress, comm=comm, cache_dir=factors_dir)
    fit_s = time.perf_counter() - t1
    index = build_index(lm, encoded, factors, spec, directory, batch_size=batch_size,
                        progress=progress, comm=comm, stop_after_chunks=stop_after_chunks,
                        fit_s=fit_s)
    return {**index.summary(), "cached": False, "load_s": load_s, "this_fit_s": fit_s}


def index_for_plan(store, plan) -> GradientIndex:
    """The index a planned ``concept_influence --index K`` run reads; refuses (ValueError) a
    request no index of the workspace can answer: none built, another model's, a concept above
    the tracked blocks, an unfinished build."""
    cfg = plan.cfg
    curvature = curvature_of(cfg.curvature, cfg.max_length, cfg.batch_size).to_dict()
    return find_index(store.workspace, model_id=plan.model_row["model_id"],
                      weights=plan.model_row["spec"].weights_fingerprint(),
                      dataset_id=plan.dataset["dataset_id"], max_length=cfg.max_length,
                      curvature=curvature, options=plan.run_config["index"],
                      layer=plan.concept.layer if plan.concept is not None else None,
                      model_name=plan.model_row.get("name"))


def query_factors(workspace, index: GradientIndex, lm, encoded=None, batch_size: int = 16
                  ) -> EKFACFactors:
    """The EK-FAC factors behind ``index`` (from the factor cache; refitted when the cache was
    cleared, from ``encoded()``, the training set)."""

    spec = index.spec
    cfg = spec.curvature_config(batch_size)
    cache = paths.artifact_dir(workspace, paths.FACTORS_DIR)
    directory = cache / factors_key(spec.model_id, spec.dataset_id, cfg, list(index.slots))
    if (directory / FACTORS_META_FILE).exists():
        factors = EKFACFactors.load(directory)
        factors.config = cfg
        return factors
    if encoded is None:
        raise FileNotFoundError(f"the EK-FAC factors of the gradient index in {index.directory} "
                                f"are not in {cache}; score once or rebuild the index")
    return load_factors(workspace, lm, encoded(), spec, batch_size=batch_size)


def index_scorer(ctx):
    """The scorer of a ``concept_influence --index K`` run (:class:`~.builtin.ConceptInfluence`
    with ``index``): the concept's query against the index, every example at once."""
    p, cfg = ctx.plan, ctx.cfg
    index = index_for_plan(ctx.store, p)
    lm = ctx.model()
    t = time.perf_counter()
    factors = query_factors(ctx.store.workspace, index, lm, ctx.encoded, cfg.batch_size)
    ctx.timings["fit_s"] = time.perf_counter() - t
    query_enc = ctx.encode([q["messages"] for q in p.queries])
    scores = query_index(index, lm, factors, [p.concept], query_enc, batch_size=cfg.batch_size,
                         window=cfg.concept_window, model_id=p.model_row["model_id"],
                         timings=ctx.timings)[:, 0]
    return lambda idx: scores[np.asarray(list(idx), dtype=np.int64)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


__all__ = ["DEFAULT_DIM", "GradientIndex", "IndexSpec", "Slot", "build_index",
           "build_workspace_index", "check_query", "find_index", "list_indexes", "make_projections",
           "matrix_product", "open_index", "query_index", "workspace_spec"]
