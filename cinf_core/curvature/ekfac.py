"""EK-FAC curvature for causal LMs: fit, cache, precondition.

Curvature: the Fisher of the training objective ``(1/N) sum_n L(z_n)``, ``L`` the cross-entropy
summed over the response tokens of ``z_n``, restricted to the tracked Linear modules and
block-diagonal over them: ``H_m = (1/N) sum_n vec(G_n) vec(G_n)^T`` with ``G_n = sum_t g_t a_t^T``
the per-example gradient of module m (``[out, in(+1)]``; inputs get a trailing 1 when the Linear
has a bias). ``CurvatureConfig.fisher`` picks the labels behind ``g_t``: sampled from the model
(true Fisher, an unbiased estimate of the Gauss-Newton matrix) or the dataset's (empirical Fisher).

EK-FAC (George et al. 2018; Grosse et al. 2023):

1. Kronecker factors ``A = sum_t a_t a_t^T`` and ``S = sum_t g_t g_t^T`` over every non-padding
   position (the loss covers response tokens only, but its gradient reaches prompt positions
   through attention, and ``G_n`` sums over all of them), accumulated in float32;
2. eigendecompositions ``A = U_A diag U_A^T``, ``S = U_S diag U_S^T`` in float64;
3. eigenvalue correction: ``Lambda = (1/N) sum_n (U_S^T G_n U_A)^2`` (elementwise), a second pass,
   so ``H_m ~= (U_S x U_A) diag(Lambda) (U_S x U_A)^T`` has the exact diagonal in that basis.

``(H_m + lambda I)^{-1} G = U_S [(U_S^T G U_A) / (Lambda + lambda)] U_A^T``.

Work shared between modules, none of it an approximation: modules that read the same input
tensor (q/k/v of an attention block; a LoRA ``lora_A`` and its base layer) have one A, one
eigendecomposition and one set of rotated input tokens; a LoRA ``lora_B``'s output gradient is
its base layer's times the adapter's scaling, so its S is the base layer's up to a factor (checked
on the first batch) and the two share eigenvectors and rotated output-gradient tokens. Each
covariance accumulates its upper triangle only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import batches, collate
from ..progress import ExamplesDoneFn
from .config import CurvatureConfig
from .lm import as_encoded, check_examples, check_response_head, response_losses
from .modules import select_modules
from .tape import LinearTape, eval_mode, grad_shape

FACTORS_FILE = "factors.safetensors"
FACTORS_META_FILE = "factors.json"
LAMBDA_CHUNK_BYTES = 512 * 2**20
SAMPLE_CACHE_TOKENS = 2**26
"""Sampled labels kept between the two passes of a fit (int32 each: 256 MiB at most)."""

LossFn = Callable[[nn.Module, dict, list[int]], torch.Tensor]


@dataclass
class ModuleFactors:
    """EK-FAC of one Linear: ``eigvecs_a`` [in(+1), in(+1)], ``eigvecs_s`` [out, out],
    ``eigvals`` [out, in(+1)] (the corrected eigenvalues Lambda). All float32."""

    eigvecs_a: torch.Tensor
    eigvecs_s: torch.Tensor
    eigvals: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.eigvals.shape)


@dataclass
class EKFACFactors:
    """Fitted factors of every tracked module plus what they were fitted on."""

    config: CurvatureConfig
    modules: dict[str, ModuleFactors]
    model_id: str = ""
    dataset_id: str = ""
    n_examples: int = 0
    n_tokens: int = 0
    below_layer: int | None = None

    def damping_for(self, name: str, damping: float | None = None, mode: str | None = None) -> float:
        """lambda of module ``name``: ``damping`` x mean eigenvalue (relative) or ``damping``."""
        damping = self.config.damping if damping is None else damping
        mode = self.config.damping_mode if mode is None else mode
        if mode == "relative":
            return float(damping * self.modules[name].eigvals.double().mean())
        if mode == "absolute":
            return float(damping)
        raise ValueError(f"damping mode {mode!r} is not valid; use 'relative' or 'absolute'")

    def meta(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "modules": {name: list(f.shape) for name, f in self.modules.items()},
            "model_id": self.model_id,
            "dataset_id": self.dataset_id,
            "n_examples": self.n_examples,
            "n_tokens": self.n_tokens,
            "below_layer": self.below_layer,
        }

    def save(self, directory: str | os.PathLike, keep_existing: bool = False) -> Path:
        """Write ``factors.safetensors`` + ``factors.json`` into ``directory`` (atomically).

        ``keep_existing``: if ``directory`` holds factors by the time these are written (another
        process fitted the same cache key meanwhile), keep those and discard these, instead of
        deleting the folder under a process that may be loading it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
        tensors, seen = {}, set()

        def own(t: torch.Tensor) -> torch.Tensor:  # safetensors refuses tensors sharing memory
            t = t.contiguous()
            if t.data_ptr() in seen:
                return t.clone()
            seen.add(t.data_ptr())
            return t

        for name, f in self.modules.items():
            tensors[f"{name}::eigvecs_a"] = own(f.eigvecs_a)
            tensors[f"{name}::eigvecs_s"] = own(f.eigvecs_s)
            tensors[f"{name}::eigvals"] = own(f.eigvals)
        save_file(tensors, str(tmp / FACTORS_FILE))
        (tmp / FACTORS_META_FILE).write_text(json.dumps(self.meta(), indent=2))
        if keep_existing and (directory / FACTORS_META_FILE).exists():
            shutil.rmtree(tmp)
            return directory
        if directory.exists():
            shutil.rmtree(directory)
        try:
            os.replace(tmp, directory)
        except OSError:  # another writer's folder arrived between the rmtree and the rename
            shutil.rmtree(tmp, ignore_errors=True)
            if not (keep_existing and (directory / FACTORS_META_FILE).exists()):
                raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "EKFACFactors":
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, tensor_path = directory / FACTORS_META_FILE, directory / FACTORS_FILE
        if not meta_path.exists() or not tensor_path.exists():
            raise FileNotFoundError(
                f"no EK-FAC factors in {directory} (expected {FACTORS_FILE} and {FACTORS_META_FILE}); "
                "fit them with load_or_fit_factors"
            )
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
        modules = {
            name: ModuleFactors(
                eigvecs_a=tensors[f"{name}::eigvecs_a"],
                eigvecs_s=tensors[f"{name}::eigvecs_s"],
                eigvals=tensors[f"{name}::eigvals"],
            )
            for name in meta["modules"]
        }
        return cls(
            config=CurvatureConfig.from_dict(meta["config"]),
            modules=modules,
            model_id=meta["model_id"],
            dataset_id=meta["dataset_id"],
            n_examples=meta["n_examples"],
            n_tokens=meta["n_tokens"],
            below_layer=meta["below_layer"],
        )

    def tracked_modules(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The model's Linear modules these factors were fitted for (clear error if one is missing)."""
        named = dict(model.named_modules())
        out = {}
        for name, f in self.modules.items():
            module = named.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"the factors track module {name!r}, which this model does not have as a Linear; "
                    "fit factors for this model (a peft-wrapped and a merged model name modules differently)"
                )
            expected = grad_shape(module)
            if tuple(f.shape) != expected:
                raise ValueError(
                    f"factors for {name!r} have shape {tuple(f.shape)} but the module's gradient is "
                    f"{expected}; the factors belong to another model, refit them"
                )
            out[name] = module
        return out


def fit_ekfac(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    make_batches: Callable[[], Iterable[tuple[list[int], dict]]],
    loss_fn: LossFn,
    progress: ExamplesDoneFn = None,
    comm=None,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, ModuleFactors], int, int]:
    """Fit EK-FAC for ``modules`` with two passes over ``make_batches()``.

    ``make_batches()`` yields ``(indices, batch)``; ``batch["attention_mask"]`` ([batch, seq], if
    present) marks the positions that count. ``loss_fn(model, batch, indices)`` returns the
    per-example losses ``[batch]`` whose Fisher is fitted. Returns ``(factors, n_examples,
    n_tokens)``. ``progress(k)`` is called after each batch of each pass (2N in total).

    ``comm`` (a :class:`cinf_core.methods.distributed.Communicator`) fits across processes: each
    rank passes its own batches; covariances, counts and the eigenvalue correction are summed
    over ranks and the eigendecompositions are spread over them by module.

    ``timings`` (a dict) receives where the time went, in seconds: ``covariance_pass_s`` and
    ``lambda_pass_s`` (each pass in all), of which ``covariances_s`` and ``lambda_updates_s`` were
    spent on the gradients (masking, covariance products; rotated per-example gradients), and
    ``eigh_s`` (the eigendecompositions).
    """
    clock = {} if timings is None else timings
    cov_a: dict[str, torch.Tensor] = {}
    cov_s: dict[str, torch.Tensor] = {}
    if comm is not None:  # every rank needs every accumulator, even one that saw no data
        for name, module in modules.items():
            out_dim, in_dim = grad_shape(module)
            cov_a[name] = torch.zeros(in_dim, in_dim, dtype=torch.float32)
            cov_s[name] = torch.zeros(out_dim, out_dim, dtype=torch.float32)

    # Modules that read the same input (q/k/v; a LoRA A and its base layer) have the same A:
    # it is accumulated once per batch for the group of modules sharing the input in that batch.
    group_a: dict[tuple, torch.Tensor] = {}
    groups_of: dict[str, set[tuple]] = {}
    done: set[tuple] = set()

    # A LoRA B's output gradient is its base layer's times the adapter's scaling s, so its S is
    # s^2 times the base layer's: checked on the first batch, then taken from the base layer.
    candidates = {} if comm is not None else _scaled_outputs(model, modules)
    follows: dict[str, tuple[str, float]] = {}

    def accumulate_covariances(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        g2 = g.reshape(-1, g.shape[-1])
        key = (tape.sharing(name), a.shape[-1])
        groups_of.setdefault(name, set()).add(key)
        if key not in done:
            done.add(key)
            a2 = a.reshape(-1, a.shape[-1])
            if key not in group_a:
                group_a[key] = torch.zeros(a2.shape[1], a2.shape[1], dtype=torch.float32, device=a.device)
            _add_gram_upper(group_a[key], a2)
        if name in follows:
            return
        if name not in cov_s:
            cov_s[name] = torch.zeros(g2.shape[1], g2.shape[1], dtype=torch.float32, device=g.device)
        _add_gram_upper(cov_s[name], g2)

    n_examples = n_tokens = 0
    with eval_mode(model):
        start = time.perf_counter()
        with LinearTape(modules, accumulate_covariances, model=model) as tape:
            for indices, batch in make_batches():
                mask = batch.get("attention_mask")
                tape.start(mask)
                done.clear()
                tape.backward(loss_fn(model, batch, indices).sum())
                if candidates:
                    follows.update(_proportional(cov_s, candidates))
                    candidates = {}
                n_tokens += int(mask.sum()) if mask is not None else 0
                n_examples += len(indices)
                if progress is not None:
                    progress(len(indices))
        clock["covariances_s"] = tape.seconds
        for m in list(group_a.values()) + list(cov_s.values()):
            _symmetrise_(m)
        for name, (base, _) in follows.items():
            cov_s[name] = cov_s[base]  # the same eigenvectors (one decomposition, one object)
        combined: dict[frozenset, torch.Tensor] = {}
        for name, keys in groups_of.items():
            keys = frozenset(keys)
            if keys not in combined:  # one group in every batch (the usual case): no copy
                parts = [group_a[k] for k in sorted(keys, key=repr)]
                combined[keys] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            if comm is not None:
                cov_a[name] += combined[keys].to(cov_a[name])  # one tensor each: summed in place
            else:
                cov_a[name] = combined[keys]  # shared by the modules of one group
        group_a.clear()
        if comm is not None:
            comm.sum_tensors(cov_a)
            comm.sum_tensors(cov_s)
            n_examples, n_tokens = comm.sum_int(n_examples), comm.sum_int(n_tokens)
        missing = sorted(name for name in modules
                         if name not in cov_s or not bool(cov_s[name].abs().sum() > 0))
        if missing:
            raise ValueError(
                f"no gradient reached module(s) {missing[:5]}; they do not influence the training loss, "
                "exclude them from the selection"
            )
        clock["covariance_pass_s"] = time.perf_counter() - start
        # Only the eigenvectors are used (the eigenvalues come from the correction pass), so the
        # sums need no normalisation.
        start = time.perf_counter()
        if comm is not None:
            vecs_a, vecs_s = comm.eigh(cov_a), comm.eigh(cov_s)
        else:
            vecs_a, vecs_s = _eigenvectors(cov_a, modules), _eigenvectors(cov_s, modules)
        bases = {name: (vecs_a[name], vecs_s[name]) for name in modules}
        clock["eigh_s"] = time.perf_counter() - start
        cov_a.clear()
        cov_s.clear()
        lambdas: dict[str, torch.Tensor] = {}
        if comm is not None:
            for name, module in modules.items():
                lambdas[name] = torch.zeros(grad_shape(module), dtype=torch.float32)

        # Per batch: rotated input tokens by shared input (and eigenbasis), dropped once the
        # input's last reader is done; rotated output-gradient tokens of a LoRA pair, in the base
        # layer's scale, with how many of the pair still need them.
        rotated_inputs: dict[tuple, dict[int, torch.Tensor]] = {}
        rotated_grads: dict[str, list] = {}
        # module -> (the base layer whose output gradient it scales, the scale)
        grad_source = {m: pair for m, pair in follows.items()}
        grad_source.update({base: (base, 1.0) for base, _ in follows.values()})
        pair_of: dict[str, list[str]] = {}
        for m, (base, _) in grad_source.items():
            pair_of.setdefault(base, []).append(m)

        def rotates_alone(name: str, seq: int) -> bool:
            """Whether rotating tokens is cheaper for ``name`` on its own (nothing shared)."""
            out, inp = grad_shape(modules[name])
            return seq * (out * out + inp * inp) <= out * inp * (out + inp)

        def tokens_first(name: str, seq: int) -> bool:
            """Rotate ``name``'s tokens first (seq (out^2 + in^2) + seq out in multiply-adds per
            example) or form G_n first and rotate it (seq out in + out in (out + in)), whichever
            costs less (a low-rank LoRA matrix: the latter), not counting a side whose token
            rotation a module sharing it (input or output gradient) makes anyway."""
            out, inp = grad_shape(modules[name])
            a_free = any(rotates_alone(m, seq) for m in tape.sharing(name)
                         if m != name and bases[m][0] is bases[name][0])
            source = grad_source.get(name)
            g_free = source is not None and any(rotates_alone(m, seq) for m in pair_of[source[0]]
                                                if m != name)
            tokens = (0 if a_free else seq * inp * inp) + (0 if g_free else seq * out * out)
            return tokens + seq * out * inp <= seq * out * inp + out * inp * (out + inp)

        def accumulate_lambda(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
            u_a, u_s = bases[name][0].to(a), bases[name][1].to(g)
            seq, out, inp = g.shape[1], g.shape[-1], a.shape[-1]
            # Rotated per-example gradients U_S^T G_n U_A [chunk, out, in], a few examples at a
            # time (see tokens_first).
            rotate_tokens = tokens_first(name, seq)
            if rotate_tokens:
                shared = rotated_inputs.setdefault(tape.input_key(name), {})
                if id(bases[name][0]) not in shared:
                    shared[id(bases[name][0])] = a @ u_a
                a = shared[id(bases[name][0])]
                source = grad_source.get(name)
                if source is None:
                    g = g @ u_s
                else:
                    base, scale = source
                    if base not in rotated_grads:  # in the base layer's scale
                        users = sum(tokens_first(m, seq) for m in pair_of[base])
                        rotated_grads[base] = [g @ u_s if scale == 1.0 else (g @ u_s) / scale, users]
                    entry = rotated_grads[base]
                    g = entry[0] if scale == 1.0 else entry[0] * scale
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del rotated_grads[base]
            if tape.last_reader():
                rotated_inputs.pop(tape.input_key(name), None)
            chunk = max(1, LAMBDA_CHUNK_BYTES // (out * inp * a.element_size()))
            for s in range(0, g.shape[0], chunk):
                rotated = torch.bmm(g[s: s + chunk].transpose(1, 2), a[s: s + chunk])
                if not rotate_tokens:
                    rotated = u_s.T @ rotated @ u_a
                sq = rotated.square_().sum(0)
                if name in lambdas:
                    lambdas[name].add_(sq)
                else:
                    lambdas[name] = sq

        start = time.perf_counter()
        with LinearTape(modules, accumulate_lambda, mask_inputs=False, model=model) as tape:
            for indices, batch in make_batches():
                tape.start(batch.get("attention_mask"))
                rotated_inputs.clear()
                rotated_grads.clear()
                tape.backward(loss_fn(model, batch, indices).sum())
                if progress is not None:
                    progress(len(indices))
        clock["lambda_updates_s"] = tape.seconds
        if comm is not None:
            comm.sum_tensors(lambdas)
        clock["lambda_pass_s"] = time.perf_counter() - start
    factors = {
        name: ModuleFactors(
            eigvecs_a=bases[name][0].cpu(),
            eigvecs_s=bases[name][1].cpu(),
            eigvals=(lambdas[name].double() / n_examples).float().cpu(),
        )
        for name in modules
    }
    return factors, n_examples, n_tokens


GRAM_STRIP = 64


def _add_gram_upper(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += x^T x`` on and above the diagonal only (``x``: [rows, d]), in strips of
    :data:`GRAM_STRIP` rows: about half the multiply-adds of the full product for a wide ``d``.
    :func:`_symmetrise_` fills the rest once all rows are in."""
    x = x.to(acc)
    d = x.shape[1]
    if d <= GRAM_STRIP:
        acc.addmm_(x.T, x)
        return
    for i in range(0, d, GRAM_STRIP):
        acc[i:i + GRAM_STRIP, i:].addmm_(x[:, i:i + GRAM_STRIP].T, x[:, i:])


def _symmetrise_(acc: torch.Tensor) -> None:
    """Mirror the upper triangle below the diagonal, in place."""
    d = acc.shape[0]
    if d > GRAM_STRIP:
        lower = torch.tril_indices(d, d, -1, device=acc.device)
        acc[lower[0], lower[1]] = acc[lower[1], lower[0]]


def _scaled_outputs(model: nn.Module, modules: dict[str, nn.Linear]) -> dict[str, tuple[str, float]]:
    """``{lora_B name: (its base layer's name, scaling)}`` for the peft LoRA layers among
    ``modules`` (both tracked; DoRA excluded): ``result = base(x) + lora_B(lora_A(x)) * s``, so
    the gradient reaching ``lora_B``'s output is ``s`` times the base layer's."""
    named = dict(model.named_modules())
    out = {}
    for name in modules:
        head, sep, adapter = name.rpartition(".lora_B.")
        base = head + ".base_layer"
        parent = named.get(head)
        scaling = getattr(parent, "scaling", None)
        if not sep or base not in modules or not isinstance(scaling, dict) or adapter not in scaling:
            continue
        if getattr(parent, "use_dora", {}).get(adapter, False):
            continue
        out[name] = (base, float(scaling[adapter]))
    return out


def _proportional(cov_s: dict[str, torch.Tensor], candidates: dict[str, tuple[str, float]]
                  ) -> dict[str, tuple[str, float]]:
    """The candidates whose gradient covariance so far is ``scale^2`` times their base layer's."""
    out = {}
    for name, (base, scale) in candidates.items():
        if name in cov_s and base in cov_s:
            mine, expected = cov_s[name], cov_s[base] * (scale * scale)
            tol = 1e-5 * float(expected.abs().max())
            if tol > 0 and torch.allclose(mine, expected, rtol=1e-4, atol=tol):
                out[name] = (base, scale)
    return out


def _eigenvectors(matrices: dict[str, torch.Tensor], modules) -> dict[str, torch.Tensor]:
    """Eigenvectors (float64 decomposition, float32 result) of each module's matrix; modules
    holding the same matrix object share one decomposition (and one eigenvector object)."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for name in modules:
        m = matrices[name]
        if id(m) not in done:
            done[id(m)] = torch.linalg.eigh(m.double())[1].float()
        out[name] = done[id(m)]
    return out


class _DrawCache(dict):
    """Sampled labels by seed, up to :data:`SAMPLE_CACHE_TOKENS` labels in all (int32)."""

    def __init__(self):
        super().__init__()
        self.tokens = 0

    def __setitem__(self, seed, drawn: torch.Tensor) -> None:
        if self.tokens + drawn.numel() <= SAMPLE_CACHE_TOKENS:
            self.tokens += drawn.numel()
            super().__setitem__(seed, drawn.to(torch.int32))


def lm_loss_fn(cfg: CurvatureConfig) -> LossFn:
    """The per-example LM loss of ``cfg.fisher``: sampled labels (seeded per example) or true ones.

    Sampled labels are drawn once per example and kept for the fit's second pass (the same
    seed and the same logits would draw them again)."""
    if cfg.fisher == "empirical":
        return lambda model, batch, indices: response_losses(model, batch)
    cache = _DrawCache()

    def sampled(model: nn.Module, batch: dict, indices: list[int]) -> torch.Tensor:
        seeds = [cfg.seed * 2**32 + i for i in indices]
        return response_losses(model, batch, sample_seeds=seeds, sample_cache=cache)

    return sampled


def fit_factors(
    lm,
    examples: Sequence,
    cfg: CurvatureConfig,
    below_layer: int | None = None,
    progress: ExamplesDoneFn = None,
    comm=None,
    timings: dict[str, float] | None = None,
) -> EKFACFactors:
    """Fit EK-FAC over ``select_modules(lm.model, cfg, below_layer)`` on ``examples``.

    ``lm``: a :class:`~cinf_core.models.LoadedModel` (uses ``model``, ``tokenizer``,
    ``pad_token_id``). ``examples``: ChatExamples / message lists (encoded with
    ``cfg.max_length``) or :class:`~cinf_core.data.EncodedExample`. With ``comm`` (see
    :func:`fit_ekfac`) each rank passes its contiguous share of ``examples`` and every rank
    returns the factors of all of them. Batches are formed from examples of similar length
    (longest first), so they carry little padding; the sums do not depend on the grouping.
    ``timings``: see :func:`fit_ekfac`.
    """
    encoded = as_encoded(lm.tokenizer, examples, cfg.max_length)
    check_examples(encoded, "training")
    modules = select_modules(lm.model, cfg, below_layer=below_layer)
    mine = (range(len(encoded)) if comm is None
            else np.array_split(np.arange(len(encoded)), comm.world)[comm.rank].tolist())
    order = sorted(mine, key=lambda i: -len(encoded[i].input_ids))
    if order:
        check_response_head(lm.model, collate([encoded[i] for i in order[:cfg.batch_size]], lm.pad_token_id))
    factors, n_examples, n_tokens = fit_ekfac(
        lm.model, modules, lambda: batches(encoded, cfg.batch_size, lm.pad_token_id, order), lm_loss_fn(cfg),
        progress, comm=comm, timings=timings)
    return EKFACFactors(config=cfg, modules=factors, n_examples=n_examples, n_tokens=n_tokens,
                        below_layer=below_layer)


def factors_key(model_id: str, dataset_id: str, cfg: CurvatureConfig, module_names: Sequence[str]) -> str:
    """Cache key of a fit: model, dataset, factor-relevant config fields and module names."""
    key = json.dumps(
        {"model": model_id, "dataset": dataset_id, "config": cfg.digest(), "modules": sorted(module_names)},
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_or_fit_factors(
    lm,
    examples: Sequence,
    cfg: CurvatureConfig,
    cache_dir: str | os.PathLike,
    dataset_id: str,
    below_layer: int | None = None,
    model_id: str | None = None,
    progress: ExamplesDoneFn = None,
    comm=None,
) -> EKFACFactors:
    """Factors from ``cache_dir/<key>`` if fitted before, else fit and save them there.

    The key covers ``model_id`` (default ``lm.spec.model_id``), ``dataset_id``, the factor fields
    of ``cfg`` and the selected module names, so one fit serves every concept and query set.
    Damping and batch size are not in the key: a cached fit is reused with ``cfg``'s damping.
    With ``comm`` the ranks fit together (:func:`fit_factors`) and rank 0 writes the cache.
    """
    if model_id is None:
        model_id = lm.spec.model_id
    modules = select_modules(lm.model, cfg, below_layer=below_layer)
    directory = Path(cache_dir) / factors_key(model_id, dataset_id, cfg, list(modules))
    cached = (directory / FACTORS_META_FILE).exists()
    if comm is not None:  # every rank takes rank 0's answer: a cache another process writes
        cached = comm.broadcast_object(cached)  # meanwhile must not split the ranks' paths
    if cached:
        factors = EKFACFactors.load(directory)
        factors.config = cfg
        return factors
    factors = fit_factors(lm, examples, cfg, below_layer=below_layer, progress=progress, comm=comm)
    factors.model_id, factors.dataset_id = model_id, dataset_id
    if comm is None or comm.rank == 0:
        factors.save(directory, keep_existing=True)  # the key fixes the fit: the first one stays
    if comm is not None:
        comm.barrier()
    return factors


def precondition(
    factors: EKFACFactors,
    grads: dict[str, torch.Tensor],
    damping: float | None = None,
    damping_mode: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """``(H_m + lambda_m I)^{-1} G`` per module, in the Kronecker eigenbasis.

    ``grads[name]``: ``[..., out, in(+1)]`` (any leading dims, e.g. one row per query or concept).
    Computed in ``dtype`` (float64 by default; float32 for a float32 model's behaviour gradients:
    the factors are stored in float32, and on SmolLM2's 420 modules float32 is 2.2x faster and
    within 2e-6 relative of float64); returns that dtype for float64 input, else float32.
    Damping defaults to ``factors.config``.
    """
    out = {}
    for name, grad in grads.items():
        if name not in factors.modules:
            raise ValueError(f"no factors for module {name!r}; fit factors that track it")
        f = factors.modules[name]
        if tuple(grad.shape[-2:]) != f.shape:
            raise ValueError(f"gradient of {name!r} has shape {tuple(grad.shape)}, factors expect [..., {f.shape}]")
        lam = factors.damping_for(name, damping, damping_mode)
        u_a = f.eigvecs_a.to(grad.device, dtype)
        u_s = f.eigvecs_s.to(grad.device, dtype)
        rotated = u_s.T @ grad.to(dtype) @ u_a
        rotated = rotated / (f.eigvals.to(grad.device, dtype) + lam)
        result = u_s @ rotated @ u_a.T
        out[name] = result if grad.dtype == torch.float64 else result.float()
    return out
