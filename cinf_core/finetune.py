"""LoRA fine-tuning on chat examples: the routine that makes a fine-tuned model from a base model.

Filter-and-retrain calls :func:`finetune_lora` once per cell on a filtered subset of the
fine-tuning set, and the demo world fine-tunes its model with it. The loss is on response tokens
only (``labels`` from :func:`cinf_core.data.collate`); batches hold examples of similar length, so
little compute goes to padding. Same inputs and seed, same adapter.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data import ChatExample, EncodedExample, collate, encode_dataset
from .progress import ProgressFn


@dataclass(frozen=True)
class LoraRecipe:
    """LoRA fine-tuning settings (the paper: r=32, alpha=64 on all linear layers, 1 epoch; the
    defaults here are the demo world's recipe for its tiny model)."""

    r: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj")
    epochs: float = 2.0
    """passes over the examples (fractions allowed)"""
    batch_size: int = 16
    lr: float = 5e-3
    warmup_fraction: float = 0.05
    max_length: int = 128
    """examples longer than this (tokens) are trimmed by ``encode_example``'s policy"""

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


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss Hugging Face computes from ``labels`` (mean next-token cross-entropy over the
    response tokens of a :func:`cinf_core.data.collate` batch), with the output layer applied to
    the response positions only: about half of a chat's tokens are prompt or padding, and their
    vocabulary projection, softmax and backward passes are skipped."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state  # [batch, seq, d_model]
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [n_response, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def _loss_fn(model, batch: dict[str, torch.Tensor]):
    """:func:`response_loss` when it gives the model's own loss on ``batch``; else the model's
    own (an architecture that scales or caps the logits after the output layer)."""
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], use_cache=False).loss
        fast = response_loss(model, batch)
    if torch.allclose(fast, own, rtol=1e-4, atol=1e-5):
        return response_loss
    return lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          labels=b["labels"], use_cache=False).loss


def train_loop(model, params, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int,
               epochs: float, lr: float, warmup_fraction: float, weight_decay: float, seed: int,
               progress: ProgressFn = None, stage: str = "train") -> TrainReport:
    """Train ``params`` of ``model`` on the response tokens of ``encoded`` with AdamW.

    ``epochs`` passes (fractions allowed) of length-bucketed batches, warm-up then cosine decay,
    gradients clipped to norm 1; the model is left in eval mode. ``progress(stage, fraction)``
    is called every 10 steps.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    n_steps = max(1, round(epochs * math.ceil(len(encoded) / batch_size)))
    plan: list[list[int]] = []
    while len(plan) < n_steps:
        plan.extend(length_bucketed_batches(encoded, batch_size, rng))
    plan = plan[:n_steps]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, len(plan), int(warmup_fraction * len(plan))))
    report, t0, recent = TrainReport(), time.time(), []
    if progress is not None:
        progress(stage, 0.0)
    model.train()
    loss_fn = None
    for step, idx in enumerate(plan):
        batch = collate([encoded[i] for i in idx], pad_id)
        loss_fn = loss_fn or _loss_fn(model, batch)
        batch_loss = loss_fn(model, batch)
        batch_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = float(batch_loss.detach())
        if step == 0:
            report.first_loss = loss
        recent = (recent + [loss])[-20:]
        report.response_tokens += int(batch["response_mask"].sum())
        if progress is not None and (step % 10 == 0 or step == len(plan) - 1):
            progress(stage, (step + 1) / len(plan))
    model.eval()
    report.steps = len(plan)
    report.final_loss = sum(recent) / len(recent)
    report.seconds = time.time() - t0
    return report


def finetune_lora(
    base_dir: str | os.PathLike,
    examples: Sequence[ChatExample | Sequence[dict]],
    recipe: LoraRecipe,
    seed: int,
    out_dir: str | os.PathLike,
    progress: ProgressFn = None,
) -> TrainReport:
    """Fine-tune a fresh LoRA adapter on ``examples`` (loss on response tokens); save to ``out_dir``.

    ``base_dir`` is a model folder :func:`cinf_core.models.load_model` can read. The adapter loads
    back with ``load_model(ModelSpec(path=base_dir, adapter=out_dir))``. Same inputs and seed, same
    adapter. ``progress`` hears stage ``"fine-tune LoRA"``.
    """
    from peft import LoraConfig, get_peft_model

    from .models import ModelSpec, load_model

    if not examples:
        raise ValueError("finetune_lora got no examples; a filtered subset must keep at least one row")
    lm = load_model(ModelSpec(path=str(base_dir), device="cpu", dtype="float32"))
    torch.manual_seed(seed)
    model = get_peft_model(lm.model, LoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, target_modules=list(recipe.target_modules),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    encoded, _ = encode_dataset(lm.tokenizer, examples, recipe.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    report = train_loop(model, params, encoded, lm.pad_token_id, recipe.batch_size, recipe.epochs,
                        recipe.lr, recipe.warmup_fraction, 0.0, seed, progress, "fine-tune LoRA")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    report.extra = {"n_examples": len(examples), "recipe": recipe.to_dict()}
    return report


TRAIN_REPORT_FILE = "cinf_train_report.json"
"""Written beside an adapter cinf trained: its :class:`TrainReport`, recipe included."""


def recorded_recipe(adapter_dir: str | os.PathLike) -> LoraRecipe | None:
    """The full recipe of an adapter cinf trained (from its report), else None."""
    path = Path(adapter_dir) / TRAIN_REPORT_FILE
    try:
        recipe = json.loads(path.read_text()).get("recipe")
    except (OSError, ValueError):
        return None
    return LoraRecipe.from_dict(recipe) if isinstance(recipe, dict) else None


def finetune_registered(workspace, model: str, dataset: str, name: str, recipe: LoraRecipe,
                        seed: int = 0, role: str = "finetuned", progress: ProgressFn = None) -> dict:
    """``python -m cinf_core finetune``: train a LoRA adapter on a registered dataset over a
    registered base model and register base + adapter as model ``name``.

    The adapter is written under ``artifacts/models/<name>-adapter`` (into a temporary folder
    first, so a killed run leaves no half adapter); a second call with the same base, dataset,
    recipe and seed reuses it. Returns a JSON-ready summary.
    """
    import shutil

    from . import paths
    from .models import ModelSpec
    from .store import Store

    store = Store(workspace)
    row = store.get_model(model)
    spec = row["spec"]
    if spec.adapter:
        raise ValueError(f"model {row['name']!r} already carries an adapter; fine-tune from the "
                         "base model (register it with `add-model BASE_FOLDER --role base`)")
    info = store.dataset(dataset)
    examples = store.load_dataset(info["dataset_id"]).examples
    key = {"base": row["model_id"], "dataset": info["dataset_id"], "recipe": recipe.to_dict(),
           "seed": seed}
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    out = paths.artifact_dir(workspace, paths.MODELS_DIR) / f"{safe}-adapter"
    report_path = out / TRAIN_REPORT_FILE
    reused = report_path.exists() and json.loads(report_path.read_text()).get("key") == key
    if not reused:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        report = finetune_lora(spec.path, examples, recipe, seed, tmp, progress).as_dict()
        (tmp / TRAIN_REPORT_FILE).write_text(json.dumps({**report, "key": key}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    report = json.loads(report_path.read_text())
    model_id = store.add_model(name, ModelSpec(path=spec.path, adapter=str(out), name=name),
                               role=role)
    return {"model_id": model_id, "name": name, "adapter": str(out), "reused": reused,
            "n_examples": len(examples), "recipe": recipe.to_dict(),
            **{k: report[k] for k in ("seconds", "final_loss", "steps") if k in report}}
