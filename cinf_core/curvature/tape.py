"""Per-example, per-token gradients of Linear modules without materialising parameter gradients.

For a Linear ``y = W a (+ b)`` applied to the tokens of one example, the gradient of a scalar
``F`` is ``dF/dW = sum_t g_t a_t^T`` with ``g_t = dF/dy_t``. :class:`LinearTape` records the inputs
``a`` [batch, seq, in] in the forward and hands ``(a, g)`` pairs to a callback in the backward, one
module at a time, so callers can reduce them (covariances, dot products) while autograd runs.
With a bias, ``a`` gets a trailing 1: the gradient matrix is then ``[out, in + 1]`` = ``[W | b]``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

GradCallback = Callable[[str, torch.Tensor, torch.Tensor], None]


class LinearTape:
    """Context manager that taps ``modules`` and calls ``on_grad(name, a, g)`` during backward.

    ``a`` is ``[batch, seq, in(+1)]`` and ``g`` is ``[batch, seq, out]``, in float32 (float64 for a
    float64 model). Set ``token_mask`` ([batch, seq] bool, False at padding) before each forward;
    ``None`` keeps every position. Inputs at padding positions are set to zero (they are real
    activations that must not enter ``sum_t a_t a_t^T``); output gradients are handed over as
    autograd computed them: for a causal LM with right padding the gradient at a padding
    position is exactly zero (no loss reads it and attention never looks at it), so it adds
    nothing to ``sum_t g_t g_t^T`` or ``sum_t g_t a_t^T``. ``mask_inputs=False`` skips the input
    masking too, for callers that only form ``sum_t g_t a_t^T`` and its products (a masking
    pass cheaper). Call :meth:`backward` instead of ``scalar.backward()``: it only asks autograd
    for the module-output gradients, so no ``.grad`` is written into the model.

    Modules that read the same input tensor in a forward (q/k/v of an attention block, a LoRA
    ``lora_A`` and its base layer) get the same ``a`` object, prepared once; :meth:`sharing` names
    them, so a caller can reduce a shared input once.

    ``model``: the model the modules belong to. Its input embeddings' output becomes the leaf the
    backward runs to, so autograd visits every tapped output on the way. Without it (or when the
    embeddings did not run before a tapped module) each tapped output gets ``+ anchor``, an exact
    no-op whose gradient autograd is asked for instead; that costs an extra add in the forward
    and a reduction in the backward per module.

    ``seconds`` sums the time spent handing gradients over (masking plus ``on_grad``), so a pass
    can be split into the model's forward/backward and the work done on the gradients.
    """

    def __init__(self, modules: dict[str, nn.Linear], on_grad: GradCallback, mask_inputs: bool = True,
                 model: nn.Module | None = None):
        self.modules = modules
        self.on_grad = on_grad
        self.mask_inputs = mask_inputs
        self.model = model
        self.token_mask: torch.Tensor | None = None
        self._sources: dict[int, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
        self._source_of: dict[str, int] = {}
        self._prepared: dict[tuple[int, bool], torch.Tensor] = {}
        self._readers: dict[tuple[int, bool], int] = {}
        self._last = False
        self._handles: list = []
        self._anchor: torch.Tensor | None = None
        self._anchor_used = False
        self._leaves: list[torch.Tensor] = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self.seconds = 0.0

    def __enter__(self) -> "LinearTape":
        for module in self.modules.values():
            for p in module.parameters():
                self._saved_requires_grad.append((p, p.requires_grad))
                p.requires_grad_(True)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        embeddings = _input_embeddings(self.model)
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_hook(self._leaf_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad.clear()
        self._forget()
        self._anchor = None

    def start(self, token_mask: torch.Tensor | None) -> None:
        """Begin a new forward: forget the previous inputs, set the token mask [batch, seq]."""
        self._forget()
        self.token_mask = None if token_mask is None else token_mask.bool()
        if self.token_mask is not None and bool(self.token_mask.all()):
            self.token_mask = None  # no padding in this batch (length-sorted batches): no masking
        self._anchor = torch.zeros((), requires_grad=True)
        self._anchor_used = False

    def backward(self, scalar: torch.Tensor, retain_graph: bool = False) -> None:
        """Run the backward of ``scalar``; ``on_grad`` fires for every tapped module it reaches."""
        if self._anchor is None:
            raise RuntimeError("LinearTape.start(mask) must be called before the forward pass")
        if not scalar.requires_grad:
            return  # no tapped module lies upstream of it: every gradient is zero
        inputs = self._leaves + ([self._anchor] if self._anchor_used else [])
        torch.autograd.grad(scalar, inputs, retain_graph=retain_graph, allow_unused=True)

    def sharing(self, name: str) -> tuple[str, ...]:
        """The tapped modules that read the same input tensor as ``name`` in this forward (sorted;
        ``name`` included), whose ``a`` is the same object."""
        return tuple(sorted(self._sources[self._source_of[name]][2]))

    def input_key(self, name: str) -> tuple[int, bool]:
        """Identifies the ``a`` handed to ``name`` in this forward: equal for the modules that
        share it, never reused by another input before :meth:`start` (the tape keeps them)."""
        return self._source_of[name], self.modules[name].bias is not None

    def last_reader(self) -> bool:
        """Inside ``on_grad``: whether this module is the last of those sharing its ``a`` to get
        its gradient in this backward (after it, the tape lets go of that ``a``; a caller keeping
        something per shared input can let go too)."""
        return self._last

    def _forget(self) -> None:
        self._sources.clear()
        self._source_of.clear()
        self._prepared.clear()
        self._readers.clear()
        self._leaves = []

    def _leaf_hook(self, module: nn.Module, inputs, output):
        if self._anchor is None or not torch.is_grad_enabled():
            return None
        leaf = output.detach().requires_grad_(True)
        self._leaves.append(leaf)
        return leaf

    def _forward_hook(self, name: str):
        def hook(module: nn.Linear, inputs, output):
            if self._anchor is None:
                raise RuntimeError("LinearTape.start(mask) must be called before the forward pass")
            if name in self._source_of:
                raise ValueError(
                    f"module {name!r} ran twice in one forward pass; per-example gradients assume each "
                    "tracked Linear is applied once (exclude shared modules from the selection)"
                )
            x = inputs[0]
            # Keyed by object identity; the entry keeps ``x`` alive, so its id is not reused.
            source = self._sources.setdefault(id(x), (x, x.detach(), []))
            source[2].append(name)
            self._source_of[name] = id(x)
            if self._leaves and output.requires_grad:
                output.register_hook(lambda g: self._dispatch(name, module, g))
                return None
            self._anchor_used = True
            out = output + self._anchor.to(output.dtype)
            out.register_hook(lambda g: self._dispatch(name, module, g))
            return out

        return hook

    def _dispatch(self, name: str, module: nn.Linear, grad: torch.Tensor) -> None:
        start = time.perf_counter()
        raw = self._sources[self._source_of[name]][1]
        batch = raw.shape[0]
        key = self.input_key(name)
        if key not in self._readers:
            bias = module.bias is not None
            self._readers[key] = sum((self.modules[m].bias is not None) == bias
                                     for m in self._sources[key[0]][2])
        self._readers[key] -= 1
        self._last = self._readers[key] <= 0
        a = self._prepared.get(key)
        if a is None:
            a = raw.reshape(batch, -1, raw.shape[-1]).to(torch.promote_types(raw.dtype, torch.float32))
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            if self.token_mask is not None and self.mask_inputs:
                keep = self.token_mask.to(a.device).reshape(batch, -1, 1)
                a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
            self._prepared[key] = a
        g = grad.reshape(batch, -1, grad.shape[-1]).to(a.dtype)
        if self._last:  # every module reading this input has had it: a masked copy is freed
            del self._prepared[key], self._readers[key]  # (a next backward of the same forward recounts)
        self.on_grad(name, a, g)
        self.seconds += time.perf_counter() - start


def _input_embeddings(model: nn.Module | None) -> nn.Module | None:
    if model is None or not hasattr(model, "get_input_embeddings"):
        return None
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def grad_shape(module: nn.Linear) -> tuple[int, int]:
    """Shape ``(out, in(+1))`` of a module's gradient matrix ``[W | b]``."""
    return module.out_features, module.in_features + (module.bias is not None)



@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout), restoring the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
