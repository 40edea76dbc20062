"""Filter and retrain: does removing what a method flags remove the trait? (Figures 2 and 5)

For each cell (method, mode, fraction, seed): rank the fine-tuning set by the method's scores for
the trait, drop the top (``most``) or bottom (``least``) fraction, retrain the LoRA adapter from the
base model with the original recipe and the cell's seed, sample answers to the held-out questions,
score the trait with the judge, and measure capability on held-out normal data of the fine-tuning
domains (next-token accuracy on response tokens, %). References: the base model (everything
removed) and the model retrained on everything (0% removed), per seed.

Every cell is a row in the store. A job claims a cell before computing it, so two jobs on the same
grid split the work; a finished cell is never recomputed; a killed job leaves its claimed cell to
be taken over and resumes from the cells still missing. Adapters of finished cells are deleted.
With ``workers > 1`` the job starts that many processes on the grid (one intra-op thread each):
on small models separate processes use the cores far better than threads inside one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import paths
from ..data import ChatExample, collate, encode_dataset
from ..finetune import LoraRecipe, finetune_lora, recorded_recipe
from ..models import LoadedModel, ModelSpec, generate, load_model
from ..progress import ProgressFn
from ..store import Store, config_hash

DEFAULT_METHODS = ("influence_function", "concept_influence", "vector_filter",
                   "projection_difference", "random")
MODES = ("most", "least")
# The grid's reference cells: the base model (everything removed) and "all" (retrained on
# everything, 0% removed; the start of every curve).
REFERENCE_CELLS = ("base", "all")


@dataclass
class RetrainConfig:
    """The grid of one filter-and-retrain experiment."""

    trait: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    modes: tuple[str, ...] = MODES
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self):
        from ..methods.runner import ScoreConfig

        for key in self.methods:  # every method key gets the same checks as a score request
            ScoreConfig(method=key, trait=self.trait)
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; use 'most' and/or 'least'")
        bad = [f for f in self.fractions if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"fractions must lie strictly between 0 and 1, got {bad}")
        if not self.seeds:
            raise ValueError("give at least one seed")


@dataclass
class RetrainEnv:
    """What the experiment retrains and measures with, read from the workspace."""

    base_spec: ModelSpec
    train_dataset_id: str
    heldout_questions: list[str]
    capability_examples: list[ChatExample]
    judge_spec: dict
    lora: dict
    eval_samples: int = 2
    eval_temperature: float = 1.0
    max_new_tokens: int = 64
    eval_seed: int = 1234
    extra: dict = field(default_factory=dict)


def results_grid(trait: str) -> RetrainConfig:
    """The small grid the results job runs for every trait, so the Filter & retrain page shows
    Figure 2 without anyone launching an experiment: Remove Most 0.25 and 0.5 by Concept
    Influence, Vector Filter, Influence Function and Random, 2 seeds (19 cells with the
    references). Its cells join the same experiment as a bigger grid launched later."""
    return RetrainConfig(trait=trait, methods=("concept_influence", "vector_filter",
                                               "influence_function", "random"),
                         modes=("most",), fractions=(0.25, 0.5), seeds=(0, 1))


def environment(store: Store) -> RetrainEnv:
    """The recipe from the workspace: one set under meta key ``retrain``, the demo world's, or
    (a user's workspace) the fine-tuned adapter's own LoRA settings (:func:`adapter_recipe`).

    Retraining also needs the base model (role ``base``), held-out questions (a dataset with role
    ``heldout``), capability data (role ``capability``) and a judge; a missing one is named with
    the command that adds it.
    """
    recipe = store.get_meta("retrain")
    if recipe is None:
        world = store.get_meta("demo_world")
        if world is not None:
            cfg = world["config"]
            recipe = {"lora": cfg["lora"], "eval_samples": cfg["eval_samples"],
                      "eval_temperature": cfg["eval_temperature"],
                      "max_new_tokens": cfg["max_new_tokens"]}
        else:
            recipe = {"lora": adapter_recipe(_registered(store, "finetuned", "model")).to_dict()}
    judge = store.get_meta("judge")
    if judge is None:
        raise ValueError("retraining scores the trait with the workspace judge, and this workspace "
                         "has none; set one with `python -m cinf_core set-judge --classifier DIR` "
                         "or `set-judge --base-url URL --model NAME`")
    heldout = _registered(store, "heldout", "dataset")
    capability = _registered(store, "capability", "dataset")
    return RetrainEnv(
        base_spec=_registered(store, "base", "model")["spec"],
        train_dataset_id=store.dataset("train")["dataset_id"],
        heldout_questions=[ex.prompt_text for ex in heldout],
        capability_examples=list(capability.examples),
        judge_spec=judge, lora=recipe["lora"],
        eval_samples=int(recipe.get("eval_samples", 2)),
        eval_temperature=float(recipe.get("eval_temperature", 1.0)),
        max_new_tokens=int(recipe.get("max_new_tokens", 64)))


_HOW_TO_ADD = {
    ("base", "model"): "register the model before fine-tuning: `python -m cinf_core add-model "
                       "BASE_FOLDER --name base --role base`",
    ("finetuned", "model"): "register the fine-tuned model: `python -m cinf_core add-model "
                            "BASE_FOLDER --adapter ADAPTER_FOLDER --role finetuned`",
    ("heldout", "dataset"): "add held-out questions whose answers the judge scores: `python -m "
                            "cinf_core add-dataset QUESTIONS.jsonl --role heldout`",
    ("capability", "dataset"): "add normal chats to measure capability on (next-token accuracy): "
                               "`python -m cinf_core add-dataset CHATS.jsonl --role capability`",
}


def _registered(store: Store, role: str, what: str):
    """The model row or the dataset with ``role``; a clear error naming the command otherwise."""
    try:
        return store.get_model(role) if what == "model" else store.load_dataset(role)
    except KeyError:
        raise ValueError(f"retraining needs a {what} with role {role!r}, and this workspace has "
                         f"none; {_HOW_TO_ADD[(role, what)]}") from None


def adapter_recipe(model_row: dict) -> LoraRecipe:
    """The LoRA recipe to retrain with when the workspace sets none: the whole recipe of an
    adapter cinf trained (``finetune`` records it), else rank, alpha and target modules from the
    adapter's ``adapter_config.json`` and the rest :class:`LoraRecipe`'s defaults (an experiment
    records the recipe it used)."""
    adapter = model_row["spec"].adapter
    if not adapter:
        raise ValueError(f"model {model_row['name']!r} has no adapter to copy a LoRA recipe from; "
                         "register the fine-tuned model with --adapter ADAPTER_FOLDER")
    recorded = recorded_recipe(adapter)
    if recorded is not None:  # an adapter `finetune` trained: its whole recipe
        return recorded
    path = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the LoRA settings in {path} ({err}); retraining copies "
                         "rank, alpha and target modules from it") from None
    fields = {"r": config.get("r"), "alpha": config.get("lora_alpha")}
    modules = config.get("target_modules")
    if isinstance(modules, list) and modules:  # a regex string keeps the default module list
        fields["target_modules"] = tuple(sorted(modules))
    return LoraRecipe.from_dict({k: v for k, v in fields.items() if v is not None})


def retrain_unavailable(store: Store) -> str | None:
    """None when the workspace can retrain (it has a recipe and a judge), else why not."""
    try:
        environment(store)
    except ValueError as err:
        return str(err)
    except KeyError as err:  # a recipe, dataset or model the workspace lacks
        return (f"this workspace lacks {err.args[0] if err.args else err} for retraining "
                "(a demo world has everything; else set meta 'retrain' and register the "
                "heldout and capability datasets and the base model)")
    return None


def trait_score(lm: LoadedModel, judge, trait: str, questions: Sequence[str], samples: int,
                temperature: float, max_new_tokens: int, seed: int) -> float:
    """Mean judge score (0-100) of ``samples`` sampled answers per question, no system prompt."""
    asked = [q for q in questions for _ in range(samples)]
    answers = generate(lm, [[{"role": "user", "content": q}] for q in asked],
                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       batch_size=64)
    scores = judge.score(trait, asked, answers)
    return float(np.mean(scores))


@torch.no_grad()
def capability(lm: LoadedModel, examples: Sequence[ChatExample], max_length: int | None = 256,
               batch_size: int = 32) -> float:
    """Next-token accuracy (%) on the response tokens of ``examples`` (greedy prediction)."""
    encoded, _ = encode_dataset(lm.tokenizer, examples, max_length)
    hits = total = 0
    for s in range(0, len(encoded), batch_size):
        batch = collate(encoded[s:s + batch_size], lm.pad_token_id)
        logits = lm.model(input_ids=batch["input_ids"].to(lm.device),
                          attention_mask=batch["attention_mask"].to(lm.device), use_cache=False).logits
        pred = logits[:, :-1].argmax(-1).cpu()
        target = batch["labels"][:, 1:]
        keep = target != -100
        hits += int((pred[keep] == target[keep]).sum())
        total += int(keep.sum())
    if total == 0:
        raise ValueError("capability data has no response tokens")
    return 100.0 * hits / total


def ranked_indices(store: Store, method: str, trait: str, seed: int, progress: ProgressFn) -> list[int]:
    """Example indices by descending score of ``method`` (a method key: ``concept_influence@start3``
    is Concept Influence over the answer start) for ``trait``, scoring it if needed."""
    from ..methods.runner import ScoreConfig, score

    cfg = ScoreConfig(method=method, trait=trait, seed=seed)
    run_id = score(store.workspace, cfg, progress=progress)["run_id"]
    frame = store.scores(run_id)
    return frame.sort_values("score", ascending=False, kind="stable")["idx"].astype(int).tolist()


def kept_indices(order: Sequence[int], mode: str, fraction: float) -> list[int]:
    """Drop the top (``most``) or bottom (``least``) ``fraction`` of ``order``; keep the rest sorted."""
    n_remove = int(round(fraction * len(order)))
    removed = set(order[:n_remove] if mode == "most" else order[len(order) - n_remove:])
    return sorted(set(order) - removed)


def _grid(cfg: RetrainConfig) -> list[dict]:
    cells = [{"method": "base", "mode": "none", "fraction": 1.0, "seed": 0}]
    cells += [{"method": "all", "mode": "none", "fraction": 0.0, "seed": s} for s in cfg.seeds]
    for seed in cfg.seeds:
        for fraction in cfg.fractions:
            for method in cfg.methods:
                for mode in cfg.modes:
                    cells.append({"method": method, "mode": mode, "fraction": float(fraction),
                                  "seed": seed})
    return [{**c, "trait": cfg.trait} for c in cells]


def grid_size(cfg: RetrainConfig) -> int:
    """How many cells ``cfg``'s grid has, references included."""
    return len(_grid(cfg))


def experiment_id(store: Store, cfg: RetrainConfig, env: RetrainEnv) -> str:
    """Cells with the same trait, data, base model, recipe and evaluation share results (each
    method key is its own set of cells in it)."""
    return config_hash({"trait": cfg.trait, "data": env.train_dataset_id,
                        "base": env.base_spec.model_id, "lora": env.lora, "judge": env.judge_spec,
                        "eval": [env.eval_samples, env.eval_temperature, env.max_new_tokens,
                                 env.eval_seed, "merged"], "questions": env.heldout_questions,
                        "capability": len(env.capability_examples)})


def cells_missing(store: Store, cfg: RetrainConfig) -> int:
    """How many cells of ``cfg``'s grid (references included) have no finished result yet."""
    done = store.retrain_cells(experiment_id(store, cfg, environment(store)))
    done = done[done["status"] == "complete"]
    have = set(zip(done["method"], done["mode"], done["fraction"].astype(float),
                   done["seed"].astype(int)))
    return sum((c["method"], c["mode"], float(c["fraction"]), int(c["seed"])) not in have
               for c in _grid(cfg))


def run_grid(workspace, cfg: RetrainConfig, progress: ProgressFn = None,
             max_cells: int | None = None, workers: int = 1) -> dict:
    """Compute every missing cell of the grid (claiming each first); return the summary.

    ``workers > 1``: score every method the grid needs here first, then start ``workers - 1``
    helper processes (``python -m cinf_core retrain ... --workers 1``, logs under the
    experiment's artifact folder) that claim cells beside this one, and wait for them.
    """
    from .judges import make_judge

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    store = Store(workspace)
    env = environment(store)
    exp_id = experiment_id(store, cfg, env)
    judge = make_judge(env.judge_spec)
    recipe = LoraRecipe.from_dict(env.lora)
    train = store.load_dataset(env.train_dataset_id).examples
    owner = f"{socket.gethostname()}:{os.getpid()}"
    work_dir = paths.artifact_dir(workspace, "retrain", exp_id)
    orders: dict[tuple[str, int], list[int]] = {}
    cells = _grid(cfg)
    done_here = 0
    t_grid = time.perf_counter()

    def order(method: str, seed: int) -> list[int]:
        key = (method, seed if method == "random" else 0)
        if key not in orders:
            orders[key] = ranked_indices(store, method, cfg.trait, key[1], None)
        return orders[key]

    helpers: list[tuple[subprocess.Popen, Path]] = []
    if workers > 1 and (max_cells is None or max_cells > 0):
        for method in cfg.methods:  # helpers must not score the same run concurrently
            for seed in (cfg.seeds if method == "random" else (0,)):
                order(method, seed)
        helpers = _start_helpers(workspace, cfg, workers - 1, work_dir)
        torch.set_num_threads(1)
    try:
        for k, cell in enumerate(cells):
            if max_cells is not None and done_here >= max_cells:
                break
            if not store.claim_retrain_cell(exp_id, cell, owner):
                continue
            t0 = time.perf_counter()
            try:
                if cell["method"] == "base":
                    lm, n_kept = load_model(env.base_spec), 0
                else:
                    if cell["method"] == "all":
                        keep = list(range(len(train)))
                    else:
                        keep = kept_indices(order(cell["method"], cell["seed"]), cell["mode"], cell["fraction"])
                    n_kept = len(keep)
                    out = work_dir / f"cell-{k}"
                    finetune_lora(env.base_spec.path, [train[i] for i in keep], recipe, cell["seed"], out)
                    # Merged for evaluation: the same function, without LoRA's extra matmuls.
                    lm = load_model(ModelSpec(path=env.base_spec.path, adapter=str(out), merge_adapter=True))
                score = trait_score(lm, judge, cfg.trait, env.heldout_questions, env.eval_samples,
                                    env.eval_temperature, env.max_new_tokens, env.eval_seed + cell["seed"])
                cap = capability(lm, env.capability_examples)
            except BaseException:
                store.add_retrain_cell(exp_id, {**cell, "status": "failed", "owner": owner})
                raise
            finally:
                shutil.rmtree(work_dir / f"cell-{k}", ignore_errors=True)
            store.add_retrain_cell(exp_id, {**cell, "trait_score": score, "capability": cap,
                                            "n_kept": n_kept, "wall_s": time.perf_counter() - t0,
                                            "owner": owner})
            done_here += 1
            if progress:
                finished = store.retrain_cells(exp_id)
                progress(f"retrain {cfg.trait}", int((finished["status"] == "complete").sum()) / len(cells))
    except BaseException:
        for proc, _ in helpers:
            proc.terminate()
        raise
    finally:
        failed = _wait_helpers(helpers)
    if failed:
        raise RuntimeError(f"{len(failed)} retrain helper process(es) failed; see {', '.join(failed)} "
                           "(rerun the same command: finished cells are kept)")
    summary = summarize(store, exp_id, cfg)
    summary["computed_here"] = done_here
    summary["workers"] = workers
    summary["grid_seconds"] = round(time.perf_counter() - t_grid, 1)
    return summary


def _start_helpers(workspace, cfg: RetrainConfig, n: int, work_dir: Path) -> list:
    """Start ``n`` helper processes on the same grid, one intra-op thread each."""
    cmd = [sys.executable, "-m", "cinf_core", "retrain", "--workspace", str(workspace), "--no-progress",
           "--trait", cfg.trait, "--methods", *cfg.methods, "--modes", *cfg.modes,
           "--fractions", *map(str, cfg.fractions), "--seeds", *map(str, cfg.seeds), "--workers", "1"]
    env = dict(os.environ, CINF_THREADS="1", OMP_NUM_THREADS="1")
    helpers = []
    for i in range(n):
        log = work_dir / f"helper-{i}.log"
        with open(log, "w") as fh:
            helpers.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), log))
    return helpers


def _wait_helpers(helpers: list) -> list[str]:
    """Wait for every helper; the logs of those that failed."""
    failed = []
    for proc, log in helpers:
        if proc.wait() != 0:
            failed.append(str(log))
    return failed


def summarize(store: Store, exp_id: str, cfg: RetrainConfig) -> dict:
    """Mean and standard error over seeds per (method, mode, fraction)."""
    frame = store.retrain_cells(exp_id)
    frame = frame[frame["status"] == "complete"]
    out = {"trait": cfg.trait, "experiment_id": exp_id, "base": None, "finetuned": None,
           "cells": [], "n_cells_complete": int(len(frame)), "n_cells_total": len(_grid(cfg))}
    for (method, mode, fraction), group in frame.groupby(["method", "mode", "fraction"]):
        scores = group["trait_score"].to_numpy(dtype=float)
        sem = float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else float("nan")
        row = {"method": method, "mode": mode, "fraction": float(fraction),
               "trait_mean": float(scores.mean()), "trait_sem": sem,
               "capability_mean": float(group["capability"].mean()), "n_seeds": int(len(scores)),
               "n_kept": int(group["n_kept"].iloc[0]), "wall_s_mean": float(group["wall_s"].mean())}
        if method == "base":
            out["base"] = row["trait_mean"]
            out["base_capability"] = row["capability_mean"]
        elif method == "all":
            out["finetuned"] = row["trait_mean"]
            out["finetuned_sem"] = sem
            out["finetuned_capability"] = row["capability_mean"]
        out["cells"].append(row)
    return out
