"""The Concept contract: something measurable at one layer of a model.

A concept is either a *direction* (persona vector, linear probe, uploaded vector) or an *SAE
feature*. Every method takes one. ``measure`` is the behaviour Concept Influence differentiates;
``direction`` is what Vector Filter and Projection Difference project on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import response_mean


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def check_vector(vec: torch.Tensor, d_model: int, what: str = "concept vector") -> torch.Tensor:
    """A finite 1-D float vector of length ``d_model`` with non-zero norm, else a clear error."""
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(vec).__name__}")
    if vec.dim() != 1 or vec.shape[0] != d_model:
        raise ValueError(
            f"{what} has shape {tuple(vec.shape)} but the model's hidden size is {d_model}; "
            f"give a vector of shape ({d_model},) for the chosen layer"
        )
    if not vec.is_floating_point():
        raise ValueError(f"{what} has dtype {vec.dtype}; give a floating-point vector")
    if not torch.isfinite(vec).all():
        raise ValueError(f"{what} contains NaN or inf values; recompute or clean it")
    if float(vec.norm()) == 0.0:
        raise ValueError(f"{what} is all zeros; it defines no direction")
    return vec


@dataclass
class Concept:
    """Base: a name, a kind, a layer (``hidden_states`` index) and free-form provenance."""

    name: str
    layer: int
    kind: str = "direction"
    info: dict[str, Any] = field(default_factory=dict)

    def direction(self) -> torch.Tensor:
        """Unit direction ``[d_model]`` in the residual stream at ``layer``."""
        raise NotImplementedError

    def measure(self, hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Concept measurement per sequence: ``[batch, seq, d] x [batch, seq] -> [batch]``."""
        raise NotImplementedError

    def digest(self) -> str:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "digest": self.digest(),
                "info": self.info}

    @property
    def concept_id(self) -> str:
        key = json.dumps({"kind": self.kind, "layer": self.layer, "digest": self.digest()},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class DirectionConcept(Concept):
    """f_c = a_l . v_hat, a_l the response-mean activation (DESIGN.md §1)."""

    vector: torch.Tensor = None  # [d_model]

    def __post_init__(self):
        if self.vector is None:
            raise ValueError(f"concept {self.name!r} needs a vector")
        d_model = self.vector.shape[0] if isinstance(self.vector, torch.Tensor) and self.vector.dim() == 1 else -1
        check_vector(self.vector, d_model, f"concept {self.name!r}")
        self.vector = self.vector.detach().to(torch.float32).cpu()

    def direction(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def measure(self, hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        v = self.direction().to(hidden.device, hidden.dtype)
        return response_mean(hidden, response_mask) @ v

    def digest(self) -> str:
        return _tensor_digest(self.vector)


@dataclass
class SAEFeatureConcept(Concept):
    """An SAE feature: measurement is the encoder *pre-activation* averaged over response tokens.

    pre_j(h) = (h - b_dec) . W_enc[:, j] + b_enc[j]  (ReLU/JumpReLU outputs have zero gradient
    where the feature is inactive, so CI differentiates the pre-activation). As a direction the
    feature uses its decoder row W_dec[j].
    """

    feature: int = 0
    w_enc: torch.Tensor = None  # [d_model]
    b_enc: float = 0.0
    w_dec: torch.Tensor = None  # [d_model]
    b_dec: torch.Tensor = None  # [d_model]
    kind: str = "sae_feature"

    def __post_init__(self):
        for name in ("w_enc", "w_dec", "b_dec"):
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"SAE feature concept {self.name!r} needs {name}")
            setattr(self, name, t.detach().to(torch.float32).cpu())

    def direction(self) -> torch.Tensor:
        return self.w_dec / self.w_dec.norm()

    def measure(self, hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        pre = (hidden - self.b_dec.to(hidden)) @ self.w_enc.to(hidden) + self.b_enc
        mask = response_mask.to(hidden.dtype)
        return (pre * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def digest(self) -> str:
        return _tensor_digest(torch.cat([self.w_enc, self.w_dec, self.b_dec,
                                         torch.tensor([self.b_enc, float(self.feature)])]))
