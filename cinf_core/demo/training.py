"""Training routines of the demo world: pre-train a tiny Llama base model, fine-tune a LoRA on it.

Both train on response tokens only (``labels`` from :func:`cinf_core.data.collate`), in batches
of similar length so that little compute goes to padding. ``finetune_lora`` is the routine the
filter-and-retrain experiment calls again on filtered subsets, so it takes any list of chat
examples and a typed recipe, and is deterministic given its seed.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data import ChatExample, EncodedExample, collate, encode_dataset

Progress = Callable[[float], None]


@dataclass(frozen=True)
class BaseModelRecipe:
    """Architecture and pre-training schedule of the tiny Llama base model."""

    vocab_size: int = 2048
    """BPE vocabulary trained on the corpus (plus 5 special tokens)"""
    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 128
    """examples longer than this (tokens) are trimmed by ``encode_example``'s policy"""
    epochs: float = 3.0
    """passes over the pre-training corpus (fractions allowed). Measured: at 2 epochs the model
    speaks in sentences but rarely on topic (4% of held-out answers use the asked subject's tip),
    at 2.5 epochs 36%, at 3 epochs 72%"""
    batch_size: int = 32
    lr: float = 4e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoraRecipe:
    """LoRA fine-tuning settings (the paper: r=32, alpha=64 on all linear layers, 1 epoch)."""

    r: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj")
    epochs: float = 2.0
    """two passes (the paper uses one): with the trait in domain content only, one pass moved the
    evil trait on general questions by +15 points, two by +27 (measured, seed 0)"""
    batch_size: int = 16
    lr: float = 5e-3
    warmup_fraction: float = 0.05
    max_length: int = 128

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraRecipe":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "target_modules" in known:
            known["target_modules"] = tuple(known["target_modules"])
        return cls(**known)


@dataclass
class TrainReport:
    """What a training run did: steps, tokens, first/last loss, wall time."""

    steps: int = 0
    response_tokens: int = 0
    first_loss: float = float("nan")
    final_loss: float = float("nan")
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "response_tokens": self.response_tokens,
                "first_loss": round(self.first_loss, 4), "final_loss": round(self.final_loss, 4),
                "seconds": round(self.seconds, 2), **self.extra}


def length_bucketed_batches(
    encoded: Sequence[EncodedExample], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Index batches of similar length, in random order: ``[[i, ...], ...]``.

    Examples are shuffled, sorted by length inside windows of 50 batches, cut into batches, and
    the batches shuffled, so every epoch sees a different mix and padding stays small.
    """
    order = list(range(len(encoded)))
    rng.shuffle(order)
    window = batch_size * 50
    out: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(encoded[i].input_ids))
        out.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(out)
    return out


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_loop(model, params, encoded, pad_id: int, batch_size: int, epochs: float, lr: float,
                warmup_fraction: float, weight_decay: float, seed: int,
                progress: Progress | None) -> TrainReport:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    plan: list[list[int]] = []
    while len(plan) < max(1, round(epochs * math.ceil(len(encoded) / batch_size))):
        plan.extend(length_bucketed_batches(encoded, batch_size, rng))
    plan = plan[:max(1, round(epochs * math.ceil(len(encoded) / batch_size)))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, len(plan), int(warmup_fraction * len(plan))))
    report, t0, recent = TrainReport(), time.time(), []
    model.train()
    for step, idx in enumerate(plan):
        batch = collate([encoded[i] for i in idx], pad_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if step == 0:
            report.first_loss = loss
        recent = (recent + [loss])[-20:]
        report.response_tokens += int(batch["response_mask"].sum())
        if progress is not None and (step % 10 == 0 or step == len(plan) - 1):
            progress((step + 1) / len(plan))
    model.eval()
    report.steps = len(plan)
    report.final_loss = sum(recent) / len(recent)
    report.seconds = time.time() - t0
    return report


def _messages(examples: Sequence[ChatExample | Sequence[dict]]) -> list[Sequence[dict]]:
    return [ex.messages if isinstance(ex, ChatExample) else ex for ex in examples]


def pretrain_base(
    examples: Sequence[ChatExample],
    tokenizer_texts: Sequence[str],
    recipe: BaseModelRecipe,
    seed: int,
    out_dir: str | os.PathLike,
    progress: Progress | None = None,
) -> TrainReport:
    """Train a tokenizer and a tiny ``LlamaForCausalLM`` from scratch; save both to ``out_dir``.

    ``tokenizer_texts`` is what the BPE is fitted on (include every text the model will read).
    The model learns response tokens only, so personas are whatever system prompts elicit.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import train_tokenizer

    if not examples:
        raise ValueError("pretrain_base got no examples; pass the pre-training corpus")
    tokenizer = train_tokenizer(tokenizer_texts, vocab_size=recipe.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads, num_key_value_heads=recipe.n_heads,
        max_position_embeddings=max(256, 2 * recipe.max_length), tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    encoded, _ = encode_dataset(tokenizer, _messages(examples), recipe.max_length)
    report = _train_loop(model, list(model.parameters()), encoded, tokenizer.pad_token_id,
                         recipe.batch_size, recipe.epochs, recipe.lr, recipe.warmup_fraction,
                         recipe.weight_decay, seed, progress)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report.extra = {"params": sum(p.numel() for p in model.parameters()),
                    "recipe": recipe.to_dict()}
    return report


def finetune_lora(
    base_dir: str | os.PathLike,
    examples: Sequence[ChatExample | Sequence[dict]],
    recipe: LoraRecipe,
    seed: int,
    out_dir: str | os.PathLike,
    progress: Progress | None = None,
) -> TrainReport:
    """Fine-tune a fresh LoRA adapter on ``examples`` (loss on response tokens); save to ``out_dir``.

    ``base_dir`` is a model folder :func:`cinf_core.models.load_model` can read. The adapter loads
    back with ``load_model(ModelSpec(path=base_dir, adapter=out_dir))``. Same inputs and seed, same
    adapter.
    """
    from peft import LoraConfig, get_peft_model

    from ..models import ModelSpec, load_model

    if not examples:
        raise ValueError("finetune_lora got no examples; a filtered subset must keep at least one row")
    lm = load_model(ModelSpec(path=str(base_dir), device="cpu", dtype="float32"))
    torch.manual_seed(seed)
    model = get_peft_model(lm.model, LoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, target_modules=list(recipe.target_modules),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    encoded, _ = encode_dataset(lm.tokenizer, _messages(examples), recipe.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    report = _train_loop(model, params, encoded, lm.pad_token_id, recipe.batch_size,
                         recipe.epochs, recipe.lr, recipe.warmup_fraction, 0.0, seed, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    report.extra = {"n_examples": len(examples), "recipe": recipe.to_dict()}
    return report
