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
    float64 model), with every
    position where ``token_mask`` is False set to zero (padding never counts, and NaNs computed at
    padding positions cannot leak in). Set ``token_mask`` ([batch, seq] bool) before each forward;
    ``None`` keeps every position. Call :meth:`backward` instead of ``scalar.backward()``: it only
    asks autograd for the module-output gradients, so no ``.grad`` is written into the model.

    ``mask_grads=False`` zeroes the inputs only: enough for per-example gradients
    ``sum_t g_t a_t^T`` and their products, whose padding terms are then ``g_t 0^T = 0`` for
    finite ``g_t`` (for a causal LM with right padding the gradient at a padding position is
    exactly zero anyway: no loss reads it and attention never looks at it), and one masking
    pass cheaper. Gradient covariances ``sum_t g_t g_t^T`` need the default.

    ``seconds`` sums the time spent handing gradients over (masking plus ``on_grad``), so a pass
    can be split into the model's forward/backward and the work done on the gradients.
    """

    def __init__(self, modules: dict[str, nn.Linear], on_grad: GradCallback, mask_grads: bool = True):
        self.modules = modules
        self.on_grad = on_grad
        self.mask_grads = mask_grads
        self.token_mask: torch.Tensor | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._anchor: torch.Tensor | None = None
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self.seconds = 0.0

    def __enter__(self) -> "LinearTape":
        for module in self.modules.values():
            for p in module.parameters():
                self._saved_requires_grad.append((p, p.requires_grad))
                p.requires_grad_(True)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad.clear()
        self._inputs.clear()
        self._anchor = None

    def start(self, token_mask: torch.Tensor | None) -> None:
        """Begin a new forward: forget the previous inputs, set the token mask [batch, seq]."""
        self._inputs.clear()
        self.token_mask = None if token_mask is None else token_mask.bool()
        if self.token_mask is not None and bool(self.token_mask.all()):
            self.token_mask = None  # no padding in this batch (length-sorted batches): no masking
        # Every tapped output gets ``+ anchor`` (an exact no-op); asking autograd for d/d(anchor)
        # makes it visit every tapped output once without storing their gradients.
        self._anchor = torch.zeros((), requires_grad=True)

    def backward(self, scalar: torch.Tensor, retain_graph: bool = False) -> None:
        """Run the backward of ``scalar``; ``on_grad`` fires for every tapped module it reaches."""
        if self._anchor is None:
            raise RuntimeError("LinearTape.start(mask) must be called before the forward pass")
        if not scalar.requires_grad:
            return  # no tapped module lies upstream of it: every gradient is zero
        torch.autograd.grad(scalar, [self._anchor], retain_graph=retain_graph, allow_unused=True)

    def _forward_hook(self, name: str):
        def hook(module: nn.Linear, inputs, output):
            if self._anchor is None:
                raise RuntimeError("LinearTape.start(mask) must be called before the forward pass")
            if name in self._inputs:
                raise ValueError(
                    f"module {name!r} ran twice in one forward pass; per-example gradients assume each "
                    "tracked Linear is applied once (exclude shared modules from the selection)"
                )
            self._inputs[name] = inputs[0].detach()
            out = output + self._anchor.to(output.dtype)
            out.register_hook(lambda g: self._dispatch(name, module, g))
            return out

        return hook

    def _dispatch(self, name: str, module: nn.Linear, grad: torch.Tensor) -> None:
        start = time.perf_counter()
        a = self._inputs[name]
        batch = a.shape[0]
        dtype = torch.promote_types(a.dtype, torch.float32)
        a = a.reshape(batch, -1, a.shape[-1]).to(dtype)
        g = grad.reshape(batch, -1, grad.shape[-1]).to(dtype)
        if module.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        if self.token_mask is not None:
            keep = self.token_mask.to(a.device).reshape(batch, -1, 1)
            a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
            if self.mask_grads:
                g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
        self.on_grad(name, a, g)
        self.seconds += time.perf_counter() - start


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
