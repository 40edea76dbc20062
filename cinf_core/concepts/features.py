"""SAE feature data over a training set, and Figure 4: the SAE features behind a trait.

Feature data (one forward pass over the data, truncated at the SAE's layer):
  A_ij     = mean activation of feature j over example i's response tokens   [n_examples, d_sae]
  density  = fraction of response tokens on which feature j fires (> 0)
  label    = the feature's top-activating distinct tokens
  top examples = the examples with the highest single-token activation of feature j
A is kept in a safetensors file beside the store (it is a dense matrix); the summaries and top
examples go to the store.

Figure 4 (our definition; the paper's exact procedure is not public):
  F_j^g = sum over examples i in group g of score_i * A_ij,   groups g = the data_origin labels,
  features ranked by sum_g F_j^g, top k kept.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import paths
from ..data import collate, encode_dataset
from ..models import LoadedModel, ModelSpec, hidden_states_at
from ..store import Store
from .sae import (SAETrainConfig, feature_activations, feature_labels, features_by_direction,
                  load_sae, sae_hook_layer, token_activation_sample, train_sae)

FIG4_DEFINITION = (
    "F_j^g = Σ_{i ∈ g} score_i · A_ij, where A_ij is the mean activation of SAE feature j over "
    "the response tokens of training example i and g is a data group (data_origin label); "
    "features are ranked by Σ_g F_j^g. The paper's exact procedure is not public: this is our "
    "definition."
)


def _matrix_path(workspace, sae_id: str, dataset_id: str) -> Path:
    return paths.artifact_dir(workspace, "features") / f"{sae_id}_{dataset_id}.safetensors"


@torch.no_grad()
def compute_feature_data(workspace, lm: LoadedModel, sae_name: str, dataset: str = "train",
                         batch_size: int = 16, max_length: int | None = 256, top_k: int = 10,
                         progress=None) -> dict:
    """Compute A, densities, labels and top examples of every feature; save them. Returns a summary."""
    from safetensors.torch import save_file

    store = Store(workspace)
    sae_row = store.get_sae(sae_name)
    ds_info = store.dataset(dataset)
    sae, layer = _sae_of_row(sae_row)
    examples = store.load_dataset(ds_info["dataset_id"]).examples
    encoded, _ = encode_dataset(lm.tokenizer, examples, max_length)
    n, d_sae = len(encoded), int(sae.cfg.d_sae)
    vocab = len(lm.tokenizer)
    mean_act = torch.zeros(n, d_sae)
    max_act = torch.zeros(n, d_sae)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    token_max = torch.zeros(vocab, d_sae)
    n_tokens = 0
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        batch = collate([encoded[i] for i in idx], lm.pad_token_id)
        hidden = hidden_states_at(lm.model, batch["input_ids"].to(lm.device),
                                  batch["attention_mask"].to(lm.device), [layer])[layer].float().cpu()
        mask = batch["response_mask"].bool()
        acts = feature_activations(sae, hidden[mask])  # [n_resp_tokens, d_sae]
        owner = torch.nonzero(mask)[:, 0]
        ids = batch["input_ids"][mask]
        counts = mask.sum(1).clamp_min(1).float()
        sums = torch.zeros(len(idx), d_sae).index_add_(0, owner, acts)
        mean_act[idx] = sums / counts[:, None]
        # scatter_reduce_ rather than index_reduce_ (the same maxima; the latter warns "beta")
        max_act[idx] = torch.zeros(len(idx), d_sae).scatter_reduce_(
            0, owner[:, None].expand_as(acts), acts, reduce="amax", include_self=True)
        token_max.scatter_reduce_(0, ids[:, None].expand_as(acts), acts, reduce="amax",
                                  include_self=True)
        fires += (acts > 0).sum(0).double()
        n_tokens += acts.shape[0]
        if progress is not None:
            progress("SAE features", (start + len(idx)) / n)
    vocab_strings = [lm.tokenizer.decode([t]) for t in range(vocab)]
    labels = feature_labels(vocab_strings, token_max, k=5)
    out = _matrix_path(workspace, sae_row["sae_id"], ds_info["dataset_id"])
    tmp = paths.temp_for(out)
    save_file({"mean_act": mean_act.contiguous(), "max_act": max_act.contiguous()}, str(tmp))
    os.replace(tmp, out)
    k = min(top_k, n)
    top = max_act.topk(k, dim=0)
    ex_rows = pd.DataFrame({
        "feature": np.repeat(np.arange(d_sae), k).astype(np.int32),
        "rank": np.tile(np.arange(1, k + 1), d_sae).astype(np.int32),
        "idx": top.indices.T.reshape(-1).numpy().astype(np.int32),
        "max_act": top.values.T.reshape(-1).numpy().astype(np.float64),
    })
    ex_rows = ex_rows[ex_rows["max_act"] > 0]
    feats = pd.DataFrame({
        "feature": np.arange(d_sae, dtype=np.int32),
        "density": (fires / max(n_tokens, 1)).numpy(),
        "mean_act": mean_act.mean(0).double().numpy(),
        "max_act": max_act.max(0).values.double().numpy(),
        "label": labels,
    })
    store.save_feature_data(sae_row["sae_id"], ds_info["dataset_id"], feats, ex_rows)
    return {"sae_id": sae_row["sae_id"], "dataset_id": ds_info["dataset_id"], "n_examples": n,
            "d_sae": d_sae, "n_tokens": n_tokens, "layer": layer,
            "dead_fraction": float((fires == 0).double().mean())}


def load_feature_matrix(workspace, sae_id: str, dataset_id: str) -> torch.Tensor:
    """A ``[n_examples, d_sae]``: mean feature activation over each example's response tokens."""
    from safetensors.torch import load_file

    path = _matrix_path(workspace, sae_id, dataset_id)
    if not path.exists():
        raise FileNotFoundError(f"no feature data for SAE {sae_id} on dataset {dataset_id}; "
                                "compute it first (python -m cinf_core features)")
    return load_file(str(path))["mean_act"]


def feature_influence(scores: np.ndarray, groups: np.ndarray, acts: torch.Tensor, k: int = 10
                      ) -> pd.DataFrame:
    """Figure 4 table: top ``k`` features by Σ_g F_j^g with one column per group.

    ``scores [n]``, ``groups [n]`` (labels), ``acts [n, d_sae]``. Returns columns
    ``feature, total, <group>...`` sorted by total, descending.
    """
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    a = acts.double().numpy()
    if a.shape[0] != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} scores but feature data for {a.shape[0]} examples; "
                         "the run and the feature data must cover the same dataset")
    table = {}
    for g in sorted(set(groups)):
        sel = groups == g
        table[g] = scores[sel] @ a[sel]
    frame = pd.DataFrame(table)
    frame.insert(0, "total", frame.sum(axis=1))
    frame.insert(0, "feature", np.arange(a.shape[1]))
    return frame.sort_values("total", ascending=False, kind="stable").head(k).reset_index(drop=True)


def trait_share(table: pd.DataFrame, trait: str) -> float:
    """Share of the top features' influence that comes from ``trait``-labelled data:
    ``sum_j F_j^trait / sum_j sum_g |F_j^g|`` (in [-1, 1]; groups can push either way)."""
    groups = [c for c in table.columns if c not in ("feature", "total")]
    total = np.abs(table[groups].to_numpy()).sum()
    return float(table[trait].sum() / total) if trait in table and total != 0 else float("nan")


def attribute_run_to_features(workspace, run_id: str, sae_name: str, k: int = 10) -> pd.DataFrame:
    """Compute and store a run's Figure 4 attributions (all features, every group); return top ``k``."""
    store = Store(workspace)
    run = store.run(run_id)
    sae_row = store.get_sae(sae_name)
    acts = load_feature_matrix(workspace, sae_row["sae_id"], run["dataset_id"])
    scored = store.scored_examples(run_id).sort_values("idx")
    groups = scored["data_origin"].fillna("unlabelled").to_numpy()
    full = feature_influence(scored["score"].to_numpy(), groups, acts, k=acts.shape[1])
    rows = [(int(f), g, float(v)) for f, *vals in full.drop(columns="total").itertuples(index=False)
            for g, v in zip([c for c in full.columns if c not in ("feature", "total")], vals)]
    store.add_feature_attributions(run_id, sae_row["sae_id"], rows)
    return full.head(k)


# ---------------------------------------------------------------- looking features up


def _sae_of_row(row: dict):
    """The SAE of a store row, and the layer it reads: its recorded hook layer, else the row's."""
    sae = load_sae(row["path"])
    layer = sae_hook_layer(sae)
    return sae, int(row["layer"]) if layer is None else layer


def load_registered_sae(workspace, sae_name: str):
    """A registered SAE (name or id) loaded from its folder, and the layer it reads.

    Refuses an SAE whose recorded hook layer disagrees with its row in the store.
    """
    row = Store(workspace).get_sae(sae_name)
    sae, layer = _sae_of_row(row)
    if pd.notna(row["layer"]) and int(row["layer"]) != layer:
        raise ValueError(f"SAE {row['name']!r} is registered at layer {row['layer']} but reads "
                         f"layer {layer}; register it again with layer={layer}")
    return sae, layer


def sae_model_spec(workspace, sae_name: str) -> ModelSpec:
    """The model an SAE reads: the one its store row records (else the workspace's fine-tuned one)."""
    store = Store(workspace)
    model_id = store.get_sae(sae_name)["model_id"]
    try:
        return store.get_model(model_id if isinstance(model_id, str) and model_id
                               else "finetuned")["spec"]
    except KeyError as err:
        raise KeyError(f"SAE {sae_name!r} records no model the workspace knows (model_id="
                       f"{model_id!r}); register the model it was trained on") from err


def concept_direction_at(workspace, concept: str, layer: int) -> torch.Tensor:
    """A stored concept's direction ``[d_model]`` at ``layer``: its own vector when it lives at that
    layer, else the row ``layer`` of its per-layer ``all_layers`` tensor (persona vectors)."""
    store = Store(workspace)
    loaded = store.load_concept(concept)
    if loaded.layer == layer:  # an SAE feature concept points along its decoder row
        return loaded.w_dec if loaded.kind == "sae_feature" else loaded.vector
    all_layers = store.concept_tensors(concept).get("all_layers")
    if all_layers is not None and all_layers.dim() == 2 and 0 <= layer < all_layers.shape[0]:
        return all_layers[layer]
    raise ValueError(f"concept {loaded.name!r} is a direction at layer {loaded.layer}, not at layer "
                     f"{layer}; pick a concept built at the SAE's layer")


def features_by_concept(workspace, sae, concept: str, k: int = 10,
                        layer: int | None = None) -> pd.DataFrame:
    """The SAE features behind a trait: the ``k`` features whose decoder rows have the highest
    cosine with a stored direction concept at the SAE's layer. Returns ``feature, cosine``."""
    if layer is None:
        layer = sae_hook_layer(sae)
    if layer is None:
        raise ValueError("this SAE does not record which layer it reads; pass layer=")
    top = features_by_direction(sae, concept_direction_at(workspace, concept, int(layer)), k=k)
    return pd.DataFrame({"feature": np.array([j for j, _ in top], dtype=np.int64),
                         "cosine": np.array([c for _, c in top], dtype=np.float64)})


def train_workspace_sae(
    workspace: str | os.PathLike, model: str, layer: int, dataset: str = "train",
    name: str | None = None, expansion: int = 4, k: int = 16, activation_tokens: int = 100_000,
    training_tokens: int = 400_000, lr: float = 1e-3, seed: int = 0, max_length: int = 256,
    progress=None,
) -> dict[str, Any]:
    """``python -m cinf_core train-sae``: train a top-k SAE (sae-lens) on a registered model's
    token activations at ``hidden_states[layer]`` over a registered dataset, register it, and
    compute its feature data over that dataset (top tokens, densities, top examples).

    The SAE is written to a temporary folder first and renamed when complete. Refuses a layer
    past the model's depth before any work. Returns a JSON-ready summary with the SAE's metrics.
    """
    from ..models import check_layer, load_model

    store = Store(workspace)
    row = store.get_model(model)
    examples = store.load_dataset(store.dataset(dataset)["dataset_id"]).examples
    lm = load_model(row["spec"])
    check_layer(lm.model, layer)
    if progress is not None:
        progress("SAE: activations", 0.0)
    acts = token_activation_sample(lm, examples, layer, activation_tokens, max_length, seed)
    name = name or f"sae-{row['name']}-L{layer}"
    folder = paths.artifact_dir(workspace, paths.SAES_DIR) / re.sub(r"[^\w.-]+", "_", name)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress("SAE: train", 0.0)
    sae, metrics = train_sae(acts, SAETrainConfig(
        d_sae=expansion * lm.hidden_size, hook_layer=layer, k=k, training_tokens=training_tokens,
        lr=lr, seed=seed, model_name=row["name"]), out_dir=tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    sae_id = store.add_sae(name, folder, layer, row["model_id"], metrics=metrics)
    features = compute_feature_data(workspace, lm, name, dataset=dataset, max_length=max_length,
                                    progress=progress)
    return {"sae_id": sae_id, "name": name, "layer": layer, "model": row["name"],
            "d_sae": expansion * lm.hidden_size, "n_activations": int(acts.shape[0]),
            "metrics": {k: round(float(v), 4) for k, v in metrics.items()}, "features": features}
