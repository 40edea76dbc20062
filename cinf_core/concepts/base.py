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

CONCEPT_KINDS: dict[str, type["Concept"]] = {}
"""The concept class of each stored ``kind``: how a row of the concepts table loads back."""


def register_concept_kind(*kinds: str):
    """Class decorator: concepts of these ``kinds`` are stored and loaded as this class."""
    def register(cls: type["Concept"]) -> type["Concept"]:
        if "from_record" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must define from_record to be a concept kind")
        for kind in kinds:
            if kind in CONCEPT_KINDS:
                raise ValueError(f"concept kind {kind!r} is already {CONCEPT_KINDS[kind].__name__}'s")
            CONCEPT_KINDS[kind] = cls
        return cls
    return register


def _stored_tensor(tensors: dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"the stored concept {name!r} has no tensor {key!r} (its file holds "
                         f"{sorted(tensors)}); rebuild the concept")
    return tensors[key]


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
        raise ValueError(f"{what} is all zeros, so it defines no direction; save the concept's "
                         "direction itself (e.g. trait minus neutral mean activations)")
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

    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What the store keeps of the concept: ``(config, tensors)``, a JSON-able config (the
        concepts table's ``config`` column) and the named tensors of its safetensors file."""
        raise NotImplementedError

    @classmethod
    def from_record(cls, name: str, kind: str, layer: int, config: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> "Concept":
        """The concept a stored record describes (the inverse of ``to_record``).

        Called on ``Concept`` it hands over to the class registered for ``kind``
        (:data:`CONCEPT_KINDS`); a kind no class is registered for is refused.
        """
        kind_cls = CONCEPT_KINDS.get(kind)
        if kind_cls is None:
            raise ValueError(
                f"the stored concept {name!r} has kind {kind!r}, which this version of cinf cannot "
                f"load (known kinds: {', '.join(sorted(CONCEPT_KINDS))}); update cinf or rebuild "
                "the concept")
        return kind_cls.from_record(name, kind, layer, config, tensors)

    def _check_kind(self) -> None:
        """Refuse a kind that would not load back as this class."""
        kind_cls = CONCEPT_KINDS.get(self.kind)
        if kind_cls is None or not isinstance(self, kind_cls):
            mine = sorted(k for k, c in CONCEPT_KINDS.items() if isinstance(self, c))
            raise ValueError(f"concept {self.name!r} has kind {self.kind!r}; a "
                             f"{type(self).__name__} has one of the kinds {mine}")

    @property
    def concept_id(self) -> str:
        key = json.dumps({"kind": self.kind, "layer": self.layer, "digest": self.digest()},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@register_concept_kind("direction", "persona_vector", "probe", "uploaded")
@dataclass
class DirectionConcept(Concept):
    """f_c = a_l . v_hat, a_l the mean activation at layer l over the response tokens.

    ``kind`` says where the direction came from: ``persona_vector``, ``probe``, ``uploaded`` (a
    user's file) or ``direction`` (built in code).
    """

    vector: torch.Tensor = None  # [d_model]

    def __post_init__(self):
        self._check_kind()
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

    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.config(), {"vector": self.vector}

    @classmethod
    def from_record(cls, name: str, kind: str, layer: int, config: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> "DirectionConcept":
        return cls(name=name, layer=layer, kind=kind, info=config.get("info", {}),
                   vector=_stored_tensor(tensors, "vector", name))


@register_concept_kind("sae_feature")
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
        self._check_kind()
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

    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {**self.config(), "feature": self.feature, "b_enc": float(self.b_enc)}
        return config, {"w_enc": self.w_enc, "w_dec": self.w_dec, "b_dec": self.b_dec}

    @classmethod
    def from_record(cls, name: str, kind: str, layer: int, config: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> "SAEFeatureConcept":
        return cls(name=name, layer=layer, info=config.get("info", {}),
                   feature=int(config["feature"]), w_enc=_stored_tensor(tensors, "w_enc", name),
                   b_enc=float(config["b_enc"]), w_dec=_stored_tensor(tensors, "w_dec", name),
                   b_dec=_stored_tensor(tensors, "b_dec", name))
