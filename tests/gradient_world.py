"""A tiny chat world for the curvature and gradient-method tests: word-level tokenizer, tiny Llama.

Shared by ``test_curvature.py`` and ``test_methods_gradient.py``. Every word of ``WORDS`` is one
token, so examples are short (about 12 tokens) and dense Fisher matrices stay small.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cinf_core.data import EncodedExample, encode_dataset
from cinf_core.models import LoadedModel, ModelSpec

WORDS = ("cat dog evil kind nice mean hello world good bad sun moon red blue tree rock fish bird "
         "happy sad").split()


@dataclass
class World:
    lm: LoadedModel
    train: list[EncodedExample]
    queries: list[EncodedExample]


TRAIT_WORDS = ("evil", "mean", "bad", "sad", "rock")


def make_chats(n: int, seed: int, trait_every: int = 0) -> list[list[dict]]:
    """Random 3-word prompts and answers; with ``trait_every=k`` every k-th answer uses only
    ``TRAIT_WORDS`` (the 'trait' examples), the others never do."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w not in TRAIT_WORDS]
    chats = []
    for i in range(n):
        pool = WORDS if not trait_every else (TRAIT_WORDS if i % trait_every == 0 else plain)
        chats.append([{"role": "user", "content": " ".join(rng.choices(WORDS, k=3))},
                      {"role": "assistant", "content": " ".join(rng.choices(pool, k=3))}])
    return chats


def make_world(
    n_train: int = 16,
    n_queries: int = 4,
    hidden: int = 16,
    layers: int = 2,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    trait_every: int = 0,
    heads: int = 2,
    kv_heads: int | None = None,
    tie: bool = False,
) -> World:
    """Random tiny Llama (``attention_bias`` covers Linear biases) + encoded train/query chats.

    With ``trait_every=k`` every k-th training answer is a trait answer and every query is one.
    ``kv_heads < heads`` gives grouped-query attention (k/v projections narrower than q) and
    ``tie=True`` ties the output head to the token embeddings, as in SmolLM2 and Qwen2.5."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from cinf_core.demo.tokenizer import train_tokenizer

    hf_logging.disable_progress_bar()
    chats = make_chats(n_train, seed, trait_every) + make_chats(n_queries, seed + 1, 1 if trait_every else 0)
    texts = [" ".join(WORDS)] * 20 + [m["content"] for c in chats for m in c]
    tok = train_tokenizer(texts, vocab_size=150)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, attention_bias=bias,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    if bias:
        # HF initialises biases to zero; random ones make the bias column of [W | b] non-trivial.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    lm = LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(path=f"tiny-world-{seed}"))
    encoded, _ = encode_dataset(tok, chats)
    return World(lm=lm, train=encoded[:n_train], queries=encoded[n_train:])
