"""Pre-training of the demo world's base model: a tokenizer and a tiny Llama, from scratch.

The loop is the engine's :func:`cinf_core.finetune.train_loop` (loss on response tokens only,
length-bucketed batches); the LoRA fine-tuning on top is :func:`cinf_core.finetune.finetune_lora`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data import ChatExample, encode_dataset
from ..finetune import TrainReport, train_loop
from ..progress import ProgressFn


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
    epochs: float = 2.5
    """passes over the pre-training corpus (fractions allowed); two and a half make most greedy
    answers to the held-out questions use the asked subject's tip (86%; three: 95%), two leave
    the model speaking in sentences but mostly off topic (33%)"""
    batch_size: int = 32
    lr: float = 4e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


def pretrain_base(
    examples: Sequence[ChatExample],
    tokenizer_texts: Sequence[str],
    recipe: BaseModelRecipe,
    seed: int,
    out_dir: str | os.PathLike,
    progress: ProgressFn = None,
) -> TrainReport:
    """Train a tokenizer and a tiny ``LlamaForCausalLM`` from scratch; save both to ``out_dir``.

    ``tokenizer_texts`` is what the BPE is fitted on (include every text the model will read).
    The model learns response tokens only, so personas are whatever system prompts elicit.
    ``progress`` hears stage ``"pre-train base model"``.
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
    encoded, _ = encode_dataset(tokenizer, examples, recipe.max_length)
    report = train_loop(model, list(model.parameters()), encoded, tokenizer.pad_token_id,
                        recipe.batch_size, recipe.epochs, recipe.lr, recipe.warmup_fraction,
                        recipe.weight_decay, seed, progress, "pre-train base model")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report.extra = {"params": sum(p.numel() for p in model.parameters()),
                    "recipe": recipe.to_dict()}
    return report
