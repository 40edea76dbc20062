"""Memory a rank needs, computed from the shapes of the EK-FAC factors.

For a tracked Linear ``in -> out`` EK-FAC keeps the eigenvectors of A (``in x in``), of S
(``out x out``) and the corrected eigenvalues (``out x in``), all fp32, plus one preconditioned
behaviour gradient (``out x in``) per behaviour. A rank also holds the model weights and, while
scoring, the per-example gradients of one module for a batch (``batch x out x in``).
"""
from __future__ import annotations

from dataclasses import dataclass

# Public architecture shapes (from each model's config.json on the hub).
PRESETS = {
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}

GIB = 2**30


@dataclass
class MemoryEstimate:
    n_modules: int
    factor_gib: float
    weights_gib: float
    batch_grad_gib: float

    @property
    def total_gib(self) -> float:
        return self.factor_gib + self.weights_gib + self.batch_grad_gib

    def as_dict(self) -> dict:
        return {"n_modules": self.n_modules, "factor_gib": round(self.factor_gib, 2),
                "weights_gib": round(self.weights_gib, 2),
                "batch_grad_gib": round(self.batch_grad_gib, 2), "total_gib": round(self.total_gib, 2)}


def linear_shapes(cfg: dict, kinds: str = "both") -> list[tuple[str, int, int]]:
    """``(name, in, out)`` of the Linear modules of one Llama/Qwen-style block."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    head = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    attn = [("q_proj", d, d), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", d, d)]
    mlp = [("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)]
    return {"attn": attn, "mlp": mlp, "both": attn + mlp}[kinds]


def estimate(cfg: dict, block_stride: int = 1, kinds: str = "both", below_layer: int | None = None,
             n_behaviours: int = 1, batch_size: int = 8, weight_bytes: int = 2,
             lora_rank: int | None = None, with_base: bool = False,
             lora_targets: tuple[str, ...] | None = None) -> MemoryEstimate:
    """Memory per rank for EK-FAC over every ``block_stride``-th block (below ``below_layer``).

    With ``lora_rank`` only LoRA A (``in -> r``) and B (``r -> out``) modules are tracked; with
    ``with_base`` too, each adapted Linear's frozen base weight as well (what cinf's default
    selection tracks on a peft model: ``base_layer``, ``lora_A`` and ``lora_B``).
    ``lora_targets``: the module names the adapter adapts (default: all of a block's Linears).
    """
    n_blocks = cfg["num_hidden_layers"] if below_layer is None else below_layer
    blocks = list(range(0, n_blocks, block_stride))
    floats = 0
    biggest = 0
    n_modules = 0
    for _ in blocks:
        for name, d_in, d_out in linear_shapes(cfg, kinds):
            adapted = bool(lora_rank) and (lora_targets is None or name in lora_targets)
            pairs = [(d_in, lora_rank), (lora_rank, d_out)] if adapted else []
            if with_base or not lora_rank:
                pairs.append((d_in, d_out))
            for i, o in pairs:
                floats += i * i + o * o + (1 + n_behaviours) * i * o
                biggest = max(biggest, i * o)
                n_modules += 1
    embeddings = 1 if cfg.get("tie_word_embeddings") else 2  # a tied head is the embedding
    params = (cfg["num_hidden_layers"] * sum(i * o for _, i, o in linear_shapes(cfg, "both"))
              + embeddings * cfg["vocab_size"] * cfg["hidden_size"])
    return MemoryEstimate(n_modules=n_modules, factor_gib=4 * floats / GIB,
                          weights_gib=weight_bytes * params / GIB,
                          batch_grad_gib=4 * batch_size * biggest / GIB)


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def config_shapes(config) -> dict:
    """The shapes :func:`estimate` needs, from a Hugging Face config (object or dict); refuses a
    config that lacks them (an architecture that is not Llama/Qwen-style)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    cfg = {k: get(k) for k in SHAPE_KEYS}
    cfg["num_key_value_heads"] = cfg["num_key_value_heads"] or cfg["num_attention_heads"]
    cfg["tie_word_embeddings"] = bool(cfg["tie_word_embeddings"])
    missing = [k for k, v in cfg.items() if v is None]
    if missing:
        raise ValueError(f"the model's config has no {', '.join(missing)}; memory estimates "
                         "cover Llama/Qwen-style decoders")
    return cfg


def memory_table(models: dict[str, dict] | None = None,
                 lora_ranks: dict[str, int] | None = None,
                 lora_targets: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """The README table: every model (default: the presets) under the settings users run; LoRA
    at the model's own rank where ``lora_ranks`` gives one, else r=32. A model with its own
    adapter rank gets first the row of cinf's default selection on it (base and LoRA modules);
    ``lora_targets`` names the modules each model's adapter adapts (default: all)."""
    rows = []
    for name, cfg in (models or PRESETS).items():
        n = cfg["num_hidden_layers"]
        r = (lora_ranks or {}).get(name, 32)
        targets = (lora_targets or {}).get(name)
        own = [(f"IF, all blocks: base + LoRA r={r} (the default on this adapter)",
                dict(lora_rank=r, with_base=True, lora_targets=targets))
               ] if name in (lora_ranks or {}) else []
        settings = own + [
            ("IF, all blocks", dict()),
            ("IF, every 4th block", dict(block_stride=4)),
            ("CI at layer 2L/3, every 4th block", dict(block_stride=4, below_layer=2 * n // 3)),
            (f"LoRA r={r} only, all blocks", dict(lora_rank=r, lora_targets=targets)),
        ]
        for label, kwargs in settings:
            rows.append({"model": name, "setting": label, **estimate(cfg, **kwargs).as_dict()})
    return rows
