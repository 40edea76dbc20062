"""Building concept directions: persona vectors, linear probes, uploaded vectors.

All three live in the residual stream at ``hidden_states[l]`` and are computed on response-mean
activations a_l (mean over response tokens only, never prompt or padding). The builders take a
loaded model and return tensors; ``make_persona_vector``, ``make_probe`` and
``make_uploaded_concept`` are their workspace-level steps behind ``python -m cinf_core
add-concept`` (load the model and data from the store, build, save the concept, return a JSON
summary).
"""
from __future__ import annotations

import math
import os
import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..data import ChatExample
from ..models import (LoadedModel, check_layer, generate, model_dimensions,
                      response_mean_activations)
from ..progress import ProgressFn, count_examples
from .base import DirectionConcept, check_vector

if TYPE_CHECKING:
    from ..experiments.judges import Judge


def _chat(system: str | None, question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def persona_vector(
    lm: LoadedModel,
    questions: Sequence[str],
    trait_system_prompt: str,
    helpful_system_prompt: str,
    layers: Sequence[int] | None = None,
    judge: "Judge | None" = None,
    trait: str | None = None,
    min_gap: float = 50.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    temperature: float = 0.0,
    samples_per_question: int = 1,
    batch_size: int = 16,
    progress: ProgressFn = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Persona vector: mean a_l under a trait-eliciting system prompt minus under a helpful one.

    For every question (``samples_per_question`` times) the model answers under each system
    prompt. With a ``judge`` (a :class:`cinf_core.experiments.judges.Judge`) only pairs whose trait
    answer outscores the helpful answer by at least ``min_gap`` (0-100 scale) are kept, so the
    difference reflects the trait rather than noise. Activations are taken on the conversation
    *with* its system prompt, averaged over the response tokens.

    Returns ``(vectors [len(layers), d_model], info)``; with ``layers=None`` every layer
    0..L is used, so row ``l`` is the vector for ``hidden_states[l]``. ``info`` holds the kept
    pairs, the generations, judge scores and per-layer norms. ``progress(stage, fraction)`` is
    called as the generations advance.
    """
    questions = list(questions)
    if not questions:
        raise ValueError("persona_vector needs at least one question")
    if not trait_system_prompt.strip() or not helpful_system_prompt.strip():
        raise ValueError("both the trait and the helpful system prompt must be non-empty")
    if judge is not None and not trait:
        raise ValueError("a judge needs the trait name to score (pass trait='evil', for example)")
    if samples_per_question < 1:
        raise ValueError(f"samples_per_question must be >= 1, got {samples_per_question}")
    layer_list = list(range(lm.num_layers + 1)) if layers is None else [int(l) for l in layers]
    for layer in layer_list:
        check_layer(lm.model, layer)

    asked = [q for q in questions for _ in range(samples_per_question)]
    trait_prompts = [_chat(trait_system_prompt, q) for q in asked]
    helpful_prompts = [_chat(helpful_system_prompt, q) for q in asked]
    report = count_examples(progress, "persona vector: generate", 2 * len(asked))
    trait_answers = generate(lm, trait_prompts, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, batch_size=batch_size,
                             progress=report)
    helpful_answers = generate(lm, helpful_prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed + 1, batch_size=batch_size,
                               progress=report)

    keep = [i for i in range(len(asked)) if trait_answers[i].strip() and helpful_answers[i].strip()]
    n_empty = len(asked) - len(keep)
    trait_scores = helpful_scores = None
    if judge is not None:
        trait_scores = judge.score(trait, asked, trait_answers)
        helpful_scores = judge.score(trait, asked, helpful_answers)
        # NaN (judge refused) compares False, so such pairs drop out.
        keep = [i for i in keep if trait_scores[i] - helpful_scores[i] >= min_gap]
    if not keep:
        why = (f"the judge separated none of the {len(asked)} pairs by min_gap={min_gap}; lower "
               "min_gap, sharpen the trait system prompt or add questions") if judge is not None else (
               "every generation was empty; raise max_new_tokens or check the model's chat template")
        raise ValueError(f"no pairs left for the persona vector: {why}")

    trait_convs = [_chat(trait_system_prompt, asked[i], trait_answers[i]) for i in keep]
    helpful_convs = [_chat(helpful_system_prompt, asked[i], helpful_answers[i]) for i in keep]
    report = count_examples(progress, "persona vector: activations", 2 * len(keep))
    acts_trait = response_mean_activations(lm, trait_convs, layer_list, batch_size=batch_size,
                                           progress=report)
    acts_helpful = response_mean_activations(lm, helpful_convs, layer_list, batch_size=batch_size,
                                             progress=report)
    vectors = acts_trait.mean(0) - acts_helpful.mean(0)  # [len(layers), d_model]

    info = {
        "method": "persona_vector",
        "layers": layer_list,
        "trait": trait,
        "trait_system_prompt": trait_system_prompt,
        "helpful_system_prompt": helpful_system_prompt,
        "questions": asked,
        "trait_responses": trait_answers,
        "helpful_responses": helpful_answers,
        "trait_scores": trait_scores,
        "helpful_scores": helpful_scores,
        "kept": keep,
        "n_pairs": len(asked),
        "n_kept": len(keep),
        "n_empty": n_empty,
        "min_gap": min_gap if judge is not None else None,
        "judge": judge.config() if judge is not None else None,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "norms": vectors.norm(dim=1).tolist(),
    }
    return vectors, info


def _as_messages(example: ChatExample | Sequence[dict] | str) -> list[dict[str, str]]:
    if isinstance(example, ChatExample):
        return example.messages
    if isinstance(example, str):
        return _chat(None, "", example)
    return list(example)


def linear_probe(
    lm: LoadedModel,
    pos_examples: Sequence[ChatExample | Sequence[dict] | str],
    neg_examples: Sequence[ChatExample | Sequence[dict] | str],
    layer: int,
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    name: str | None = None,
    batch_size: int = 16,
) -> tuple[DirectionConcept, dict[str, Any]]:
    """Logistic-regression probe on response-mean activations at ``layer``; its weight is the direction.

    Examples are ChatExamples, message lists (last message = response) or bare response strings
    (then the prompt is an empty user turn). Features are standardised for the fit and the weight
    is mapped back to raw activation space (w / sigma), so projecting a_l on the direction orders
    examples as the probe does. The direction points towards ``pos_examples``. ``info`` reports
    held-out accuracy on a stratified ``test_fraction`` split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    check_layer(lm.model, layer)
    n_pos, n_neg = len(pos_examples), len(neg_examples)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test_min = math.ceil(2 / test_fraction)
    if min(n_pos, n_neg) < 2 or n_pos + n_neg < n_test_min:
        raise ValueError(
            f"a probe needs at least 2 positive and 2 negative examples and {n_test_min} in all for "
            f"test_fraction={test_fraction}; got {n_pos} positive and {n_neg} negative"
        )
    convs = [_as_messages(e) for e in list(pos_examples) + list(neg_examples)]
    acts = response_mean_activations(lm, convs, layer, batch_size=batch_size).numpy()  # [n, d]
    y = np.array([1] * n_pos + [0] * n_neg)
    x_tr, x_te, y_tr, y_te = train_test_split(acts, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(C=C, max_iter=5000, random_state=seed)
    clf.fit(scaler.transform(x_tr), y_tr)
    # Constant features have scale 1 in sklearn, so the division is safe.
    vector = torch.tensor(clf.coef_[0] / scaler.scale_, dtype=torch.float32)
    check_vector(vector, lm.hidden_size, "probe weight")
    info = {
        "method": "linear_probe",
        "layer": layer,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "n_train": int(len(y_tr)),
        "n_test": int(len(y_te)),
        "train_accuracy": float(clf.score(scaler.transform(x_tr), y_tr)),
        "test_accuracy": float(clf.score(scaler.transform(x_te), y_te)),
        "C": C,
        "seed": seed,
    }
    concept = DirectionConcept(name=name or f"probe L{layer}", layer=layer, kind="probe",
                               vector=vector, info=info)
    return concept, info


# ---------------------------------------------------------------- workspace steps


def make_persona_vector(
    workspace: str | os.PathLike,
    trait: str,
    model: str,
    layer: int,
    trait_system_prompt: str,
    helpful_system_prompt: str,
    questions: Sequence[str],
    name: str | None = None,
    use_workspace_judge: bool = False,
    min_gap: float = 50.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    progress: ProgressFn = None,
) -> dict[str, Any]:
    """Extract a persona vector with a registered model and save it as a concept.

    The concept uses row ``layer``; every layer's vector is saved beside it (``all_layers``,
    ``[L+1, d_model]``). With ``use_workspace_judge`` the workspace's judge (store meta
    ``judge``) filters the pairs by ``min_gap``. Returns a JSON-ready summary.
    """
    from ..experiments.judges import make_judge
    from ..models import load_model
    from ..store import Store

    store = Store(workspace)
    row = store.get_model(model)
    judge = None
    if use_workspace_judge:
        spec = store.get_meta("judge")
        if spec is None:
            raise ValueError("this workspace has no judge; build the demo world or run without "
                             "use_workspace_judge")
        judge = make_judge(spec)
    if progress is not None:
        progress("persona vector: load model", 0.0)
    lm = load_model(row["spec"])
    check_layer(lm.model, layer)
    vectors, info = persona_vector(lm, questions, trait_system_prompt, helpful_system_prompt,
                                   judge=judge, trait=trait, min_gap=min_gap,
                                   max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    keep_info = ("n_pairs", "n_kept", "n_empty", "min_gap", "judge", "trait_system_prompt",
                 "helpful_system_prompt", "max_new_tokens", "seed", "norms")
    concept = DirectionConcept(
        name=name or f"persona-{trait}", layer=layer, kind="persona_vector",
        vector=vectors[layer].clone(),
        info={"trait": trait, "source": "persona_vector", "model": row["name"],
              "questions": info["questions"], **{k: info[k] for k in keep_info}})
    concept_id = store.save_concept(concept, row["model_id"], extra_tensors={"all_layers": vectors})
    return {"concept_id": concept_id, "name": concept.name, "layer": layer, "trait": trait,
            "n_pairs": info["n_pairs"], "n_kept": info["n_kept"],
            "norm": float(vectors[layer].norm())}


def make_probe(
    workspace: str | os.PathLike,
    name: str | None,
    dataset: str,
    positive_label: str,
    model: str,
    layer: int,
    negative_label: str | None = None,
    max_per_class: int = 500,
    test_fraction: float = 0.25,
    seed: int = 0,
    progress: ProgressFn = None,
    label_column: str = "data_origin",
    trait: str | None = None,
) -> dict[str, Any]:
    """Train a linear probe on a registered labelled dataset and save it as a concept.

    Positives are examples whose ``label_column`` (any metadata field of the rows; default
    ``data_origin``) equals ``positive_label``; negatives those labelled ``negative_label``
    (default: every other label). Each class is subsampled to ``max_per_class`` (seeded). The
    concept records ``trait`` (default: the positive label). Returns a JSON-ready summary with
    held-out accuracy.
    """
    from ..models import load_model
    from ..store import Store

    store = Store(workspace)
    row = store.get_model(model)
    examples = store.load_dataset(dataset).examples
    values = [ex.metadata.get(label_column) for ex in examples]
    values = [None if v is None else str(v) for v in values]
    labels = sorted({v for v in values if v is not None})
    if not labels:
        columns = sorted({k for ex in examples for k in ex.metadata})
        raise ValueError(f"dataset {dataset!r} has no column {label_column!r}; its columns are "
                         f"{columns}: pick the one that holds the labels")
    pos = [ex for ex, v in zip(examples, values) if v == positive_label]
    neg = [ex for ex, v in zip(examples, values) if v is not None and v != positive_label
           and (negative_label is None or v == negative_label)]
    if not pos or not neg:
        raise ValueError(
            f"dataset {dataset!r} has {len(pos)} examples labelled {positive_label!r} and "
            f"{len(neg)} negatives; its labels ({label_column}) are {labels}: pick a positive label "
            "from them, and a dataset with at least one other label"
        )
    rng = random.Random(seed)
    pos = rng.sample(pos, min(len(pos), max_per_class))
    neg = rng.sample(neg, min(len(neg), max_per_class))
    if progress is not None:
        progress("probe: load model", 0.0)
    lm = load_model(row["spec"])
    if progress is not None:
        progress("probe: activations and fit", 0.2)
    concept, info = linear_probe(lm, pos, neg, layer, test_fraction=test_fraction, seed=seed,
                                 name=name)
    concept.info.update(trait=trait or positive_label, source="linear_probe", dataset=dataset,
                        model=row["name"], negative_label=negative_label, label_column=label_column)
    concept_id = store.save_concept(concept, row["model_id"])
    if progress is not None:
        progress("probe: activations and fit", 1.0)
    return {"concept_id": concept_id, "name": concept.name, "layer": layer,
            "trait": concept.info["trait"], "n_pos": info["n_pos"], "n_neg": info["n_neg"],
            "test_accuracy": info["test_accuracy"]}


# ---------------------------------------------------------------- uploaded vectors

UPLOAD_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


def _single_tensor(named: dict[str, Any], path: Path, key: str | None) -> Any:
    if key is not None:
        if key not in named:
            raise ValueError(f"{path} has no entry {key!r}; it holds {sorted(named)}")
        return named[key]
    if len(named) != 1:
        raise ValueError(
            f"{path} holds {len(named)} entries {sorted(named)[:10]}; pass key=<name> to pick the vector"
        )
    return next(iter(named.values()))


def _read_vector_file(path: Path, key: str | None) -> torch.Tensor:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds a pickled object that is not a plain tensor, refused for safety "
                f"({str(err).splitlines()[0]}); save the vector itself with torch.save(tensor, path)"
            ) from err
        if isinstance(obj, dict):
            obj = _single_tensor(obj, path, key)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(
                f"{path} holds a {type(obj).__name__}, not a tensor; save the vector itself with "
                "torch.save(tensor, path)"
            )
        return obj
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(
                f"{path} holds pickled Python objects, refused for safety; save a numeric array "
                "with np.save(path, array.astype('float32'))"
            ) from err
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"{path} has dtype {arr.dtype}; save a real floating-point array")
        return torch.from_numpy(np.ascontiguousarray(arr))
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return _single_tensor(load_file(str(path), device="cpu"), path, key)
    raise ValueError(f"unsupported vector file {path.name}; use one of {', '.join(UPLOAD_SUFFIXES)}")


def load_uploaded_vector(
    path: str | os.PathLike, d_model: int, n_layers: int, layer: int, key: str | None = None
) -> torch.Tensor:
    """Read a user's concept vector for ``layer``: returns float32 ``[d_model]``.

    Accepts ``.pt``/``.pth`` (``torch.load(weights_only=True)``; a tensor or a one-entry dict),
    ``.npy`` (no pickle) and ``.safetensors`` (one tensor, or ``key``). The content is one vector
    (``[d_model]`` or ``[1, d_model]``) or one row per layer (``[n_layers + 1, d_model]``, row
    ``layer`` is taken). Anything else - wrong shape, integer dtype, NaN/inf, all zeros, pickled
    objects - is refused with a message naming the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vector file not found: {path}")
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer {layer} is out of range; the model has layers 0..{n_layers}")
    vec = _read_vector_file(path, key).detach()
    if not vec.is_floating_point():
        raise ValueError(f"{path} has dtype {vec.dtype}; save the vector as float32")
    shape = tuple(vec.shape)
    if vec.dim() == 2 and vec.shape[0] == n_layers + 1 and vec.shape[1] == d_model:
        vec = vec[layer]
    elif vec.dim() == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.dim() != 1 or vec.shape[0] != d_model:
        raise ValueError(
            f"{path} holds shape {shape}; expected ({d_model},) or (1, {d_model}) for one vector, or "
            f"({n_layers + 1}, {d_model}) with one row per layer 0..{n_layers} of this model"
        )
    vec = vec.to(torch.float32).contiguous()
    return check_vector(vec, d_model, f"vector in {path.name}")


def make_uploaded_concept(
    workspace: str | os.PathLike,
    path: str | os.PathLike,
    model: str,
    layer: int,
    name: str | None = None,
    key: str | None = None,
    trait: str | None = None,
) -> dict[str, Any]:
    """Save a user's vector file as a concept (kind ``uploaded``) of a registered model.

    The file is read by :func:`load_uploaded_vector` against the model's hidden size and layer
    count (from its config; the weights are not loaded). ``name`` defaults to the file's stem;
    ``trait`` (optional) records which trait the vector stands for. Returns a JSON-ready summary.
    """
    from ..store import Store

    store = Store(workspace)
    row = store.get_model(model)
    n_layers, d_model = model_dimensions(row["spec"])
    path = Path(path)
    vector = load_uploaded_vector(path, d_model, n_layers, layer, key)
    info = {"source": f"upload:{path.name}", **({"trait": trait} if trait else {})}
    concept = DirectionConcept(name=name or path.stem, layer=layer, kind="uploaded", info=info,
                               vector=vector)
    concept_id = store.save_concept(concept, row["model_id"])
    return {"concept_id": concept_id, "name": concept.name, "layer": layer, "trait": trait,
            "model": row["name"], "norm": float(vector.norm())}
