"""Settings of an EK-FAC fit: which Linear modules, which Fisher, how much damping."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

KINDS = ("attn", "mlp", "both")
DAMPING_MODES = ("relative", "absolute")
FISHERS = ("sampled", "empirical")

# Fields that change the fitted factors (and so the cache key). Damping is applied when
# preconditioning and batch size does not change the result, so neither forces a refit.
FACTOR_FIELDS = (
    "block_start", "block_stop", "block_stride", "kinds", "lora_only", "fisher", "seed", "max_length",
)


@dataclass
class CurvatureConfig:
    """How to fit EK-FAC factors over the Linear modules of a causal LM.

    Every field carries its help text in ``metadata["help"]``. Round-trips through
    :meth:`to_dict`/:meth:`from_dict`; :meth:`digest` hashes the fields that change the factors.
    """

    block_start: int = field(default=0, metadata={"help": "First transformer block tracked."})
    block_stop: int | None = field(
        default=None, metadata={"help": "Blocks tracked stop before this index (None: all blocks)."}
    )
    block_stride: int = field(
        default=1, metadata={"help": "Track every k-th block from block_start (the paper's strided subset)."}
    )
    kinds: str = field(
        default="both",
        metadata={"help": "Which Linear modules of a block: 'attn' (self-attention), 'mlp' or 'both'."},
    )
    lora_only: bool = field(
        default=False,
        metadata={"help": "Track only the LoRA A/B Linear modules of a peft adapter (what fine-tuning moved)."},
    )
    fisher: str = field(
        default="sampled",
        metadata={
            "help": "'sampled': true Fisher, labels drawn from the model's own predictive distribution "
            "(an unbiased estimate of the Gauss-Newton matrix; Kronfluence's default). 'empirical': the "
            "dataset's labels (deterministic; the empirical Fisher)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the sampled labels (per example, so batch size does not matter)."}
    )
    damping: float = field(
        default=0.1,
        metadata={"help": "Damping lambda added to the EK-FAC eigenvalues before inverting."},
    )
    damping_mode: str = field(
        default="relative",
        metadata={
            "help": "'relative': lambda = damping x mean eigenvalue, per module (scale-free; Kronfluence's "
            "heuristic with damping=0.1). 'absolute': lambda = damping."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Training examples per forward/backward pass."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Token budget per example when chat examples are encoded here (None: no limit)."},
    )

    def __post_init__(self) -> None:
        if self.kinds not in KINDS:
            raise ValueError(f"kinds={self.kinds!r} is not valid; use one of {', '.join(KINDS)}")
        if self.damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"damping_mode={self.damping_mode!r} is not valid; use one of {', '.join(DAMPING_MODES)}"
            )
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher={self.fisher!r} is not valid; use one of {', '.join(FISHERS)}")
        if not self.damping > 0:
            raise ValueError(f"damping={self.damping!r} must be > 0 (it keeps H + lambda*I invertible)")
        if self.block_stride < 1:
            raise ValueError(f"block_stride={self.block_stride} must be >= 1")
        if self.block_start < 0:
            raise ValueError(f"block_start={self.block_start} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2 tokens (or None)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CurvatureConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown CurvatureConfig field(s) {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    def digest(self) -> str:
        """Hash of the fields that determine the fitted factors (16 hex chars)."""
        key = json.dumps({k: getattr(self, k) for k in FACTOR_FIELDS}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @staticmethod
    def help() -> dict[str, str]:
        """Field name -> help text, for CLIs and forms."""
        return {f.name: f.metadata.get("help", "") for f in fields(CurvatureConfig)}
