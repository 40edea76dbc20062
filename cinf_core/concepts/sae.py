"""Sparse autoencoders on the residual stream: train (sae-lens), load, and turn features into concepts.

An SAE here reads ``hidden_states[l]`` (the layer convention of :mod:`cinf_core.models`). The
layer is stored in the saved config's metadata as ``hook_layer`` (and ``hook_name =
"hidden_states.<l>"``) so that a feature concept can refuse a layer it was not trained on. SAEs
from sae-lens releases name their hook the TransformerLens way; ``blocks.<i>.hook_resid_post``
reads as layer ``i + 1`` and ``blocks.<i>.hook_resid_pre`` as layer ``i`` (HF's last hidden state
also includes the final norm, so an SAE on the last block's output matches layer L only
approximately).

``sae_lens`` takes seconds to import, so every function imports it lazily.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from .. import paths
from ..models import LoadedModel, model_dimensions, token_activations
from .base import SAEFeatureConcept, check_vector

if TYPE_CHECKING:
    from sae_lens import SAE

SUPPORTED_ARCHITECTURES = ("standard", "topk")
"""Architectures :func:`train_sae` can train."""
CONCEPT_ARCHITECTURES = ("standard", "topk", "jumprelu")
"""Architectures whose pre-activation is ``(h - b_dec) @ W_enc + b_enc`` (what a concept measures)."""

_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
_HIDDEN_STATES = re.compile(r"^hidden_states\.(\d+)$")


@dataclass
class SAETrainConfig:
    """How to train an SAE on activations of one layer."""

    d_sae: int
    """Number of features (dictionary size); 4-16 x d_model is usual."""
    hook_layer: int
    """``hidden_states`` index the activations come from (recorded in the saved config)."""
    architecture: str = "topk"
    """``"topk"`` (exactly ``k`` features per token) or ``"standard"`` (ReLU + L1 penalty)."""
    k: int = 16
    """Active features per token (topk only)."""
    l1_coefficient: float = 5.0
    """Weight of the L1 sparsity penalty (standard only)."""
    l1_warm_up_steps: int = 0
    """Steps over which the L1 weight ramps up from 0 (standard only)."""
    training_tokens: int = 500_000
    """Activation vectors seen in training (steps = training_tokens // batch_size)."""
    batch_size: int = 1024
    lr: float = 3e-4
    lr_warm_up_steps: int = 0
    lr_decay_fraction: float = 0.2
    """Fraction of steps, at the end, over which the learning rate decays linearly to 0."""
    dead_feature_window: int = 200
    """Steps without firing after which a feature counts as dead (topk feeds dead ones the aux loss)."""
    heldout_fraction: float = 0.1
    """Share of a tensor input kept out of training to measure FVU, dead features and L0."""
    seed: int = 0
    device: str = "cpu"
    model_name: str | None = None
    """Recorded in the metadata (which model the activations came from)."""

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; use one of {SUPPORTED_ARCHITECTURES}"
            )
        if self.d_sae < 1 or self.batch_size < 1 or self.training_tokens < self.batch_size:
            raise ValueError(
                f"need d_sae >= 1, batch_size >= 1 and training_tokens >= batch_size; got d_sae="
                f"{self.d_sae}, batch_size={self.batch_size}, training_tokens={self.training_tokens}"
            )
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.lr_decay_fraction < 1.0:
            raise ValueError(f"lr_decay_fraction must be in [0, 1), got {self.lr_decay_fraction}")

    @property
    def steps(self) -> int:
        return self.training_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_sae_lens() -> None:
    """Import sae_lens once (seconds), hiding the deprecation warning its TransformerLens import raises."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*'utils' module has been deprecated",
                                category=DeprecationWarning)
        import sae_lens  # noqa: F401


# ---------------------------------------------------------------- activation feeding


def _batches_forever(data: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled mini-batches ``[batch, d]``, reshuffling at every pass over ``data``."""
    if data.shape[0] < batch_size:
        raise ValueError(
            f"only {data.shape[0]} training activation vectors for batch_size={batch_size}; lower "
            "batch_size or collect activations over more tokens"
        )
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(data.shape[0], generator=gen)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size]]


class _ScaledProvider:
    """Feeds batches to the trainer multiplied by ``scale``; errors clearly if the source runs dry."""

    def __init__(self, source: Iterator[torch.Tensor], scale: float, d_in: int, device: str):
        self.source, self.scale, self.d_in, self.device = source, scale, d_in, device
        self.n_batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        try:
            batch = next(self.source)
        except StopIteration:
            raise RuntimeError(
                f"the activation iterator ran out after {self.n_batches} batches; give more "
                "batches or lower training_tokens"
            ) from None
        _check_activations(batch, self.d_in, "an activation batch")
        self.n_batches += 1
        return batch.to(self.device, torch.float32) * self.scale


def _check_activations(x: Any, d_in: int | None, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a non-empty tensor [n_tokens, d_model], got {shape}")
    if d_in is not None and x.shape[1] != d_in:
        raise ValueError(f"{what} has width {x.shape[1]} but the SAE reads d_model={d_in}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf; recompute the activations")
    return x


# ---------------------------------------------------------------- training


def train_sae(
    activations: torch.Tensor | Iterable[torch.Tensor],
    config: SAETrainConfig | None = None,
    out_dir: str | Path | None = None,
    heldout: torch.Tensor | None = None,
    **overrides: Any,
) -> tuple["SAE", dict[str, float]]:
    """Train an SAE with sae-lens's ``SAETrainer`` on residual-stream activations.

    ``activations`` is a tensor ``[n_tokens, d_model]`` (split into train / held-out by
    ``heldout_fraction``) or an iterator of ``[batch_size, d_model]`` batches (then ``heldout`` is used
    for the metrics, or else the iterator's first batch is set aside for them). Settings come from
    ``config`` or, without one, from keyword arguments (``d_sae=..., hook_layer=...``).

    Activations are scaled to mean norm sqrt(d_model) while training and the factor is folded
    into the weights afterwards (what sae-lens's ``expected_average_only_in`` does); ``b_dec``
    starts at the training mean. With ``out_dir`` the SAE is written with ``save_model`` and loads
    back with ``SAE.load_from_disk``. Returns ``(sae, metrics)``, metrics from :func:`sae_metrics`
    on the held-out activations.
    """
    import_sae_lens()
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = config if config is not None else SAETrainConfig(**overrides)
    if config is not None and overrides:
        raise ValueError("pass either a SAETrainConfig or keyword settings, not both")

    if isinstance(activations, torch.Tensor):
        data = _check_activations(activations, None, "activations").detach().to(torch.float32).cpu()
        if heldout is not None:
            train, held = data, heldout
        else:
            n_held = max(1, int(round(cfg.heldout_fraction * data.shape[0])))
            if data.shape[0] - n_held < 2:
                raise ValueError(f"only {data.shape[0]} activation vectors; give at least a few hundred")
            order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
            train, held = data[order[n_held:]], data[order[:n_held]]
        sample = train
        source: Iterator[torch.Tensor] = _batches_forever(train, cfg.batch_size, cfg.seed)
    else:
        source = iter(activations)
        held = heldout if heldout is not None else next(source)
        sample = _check_activations(held, None, "held-out activations")
    held = _check_activations(held, sample.shape[1], "held-out activations").detach().to(torch.float32)
    d_in = sample.shape[1]

    # Scale so that the mean activation norm is sqrt(d_in): lr and init behave the same at any width.
    scale = math.sqrt(d_in) / float(sample.norm(dim=1).mean().clamp_min(1e-12))
    metadata = SAEMetadata(hook_layer=cfg.hook_layer, hook_name=f"hidden_states.{cfg.hook_layer}",
                           model_name=cfg.model_name, cinf_train_config=cfg.to_dict())
    common = dict(d_in=d_in, d_sae=cfg.d_sae, device=cfg.device, normalize_activations="none",
                  metadata=metadata)
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=cfg.l1_warm_up_steps, **common))
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0).to(sae.b_dec) * scale)

    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr,  # constant schedule; sae-lens asserts lr_end is set
        lr_scheduler_name="constant",
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(cfg.lr_decay_fraction * cfg.steps),
        device=cfg.device,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(cfg.dead_feature_window, 100),
        logger=LoggingConfig(log_to_wandb=False),
    )
    provider = _ScaledProvider(source, scale, d_in, cfg.device)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
    sae = trainer.fit()
    sae.fold_activation_norm_scaling_factor(scale)
    sae.eval()

    metrics = sae_metrics(sae, held)
    metrics["steps"] = float(cfg.steps)
    sae.cfg.metadata.cinf_metrics = dict(metrics)
    if out_dir is not None:
        sae.save_model(str(out_dir))
    return sae, metrics


@torch.no_grad()
def sae_metrics(sae: "SAE", activations: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction quality on ``activations [n_tokens, d_model]``.

    ``fvu``: fraction of variance unexplained, sum |x - x_hat|^2 / sum |x - mean(x)|^2;
    ``dead_fraction``: share of features never active on these activations; ``mean_l0``: mean
    number of active features per token; ``n_tokens``.
    """
    x_all = _check_activations(activations, int(sae.cfg.d_in), "activations").to(torch.float32)
    mean = x_all.mean(0)
    err = total = l0 = 0.0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size].to(sae.W_enc.device, sae.W_enc.dtype)
        acts = sae.encode(x)
        x_hat = sae.decode(acts).float()
        active = acts != 0
        err += float(((x.float() - x_hat) ** 2).sum())
        total += float(((x.float() - mean.to(x.device)) ** 2).sum())
        l0 += float(active.sum())
        fired |= active.any(0).cpu()
    return {
        "fvu": err / max(total, 1e-12),
        "dead_fraction": float((~fired).float().mean()),
        "mean_l0": l0 / x_all.shape[0],
        "n_tokens": float(x_all.shape[0]),
    }


# ---------------------------------------------------------------- loading


def load_sae(path_or_release: str | Path, sae_id: str | None = None, device: str = "cpu") -> "SAE":
    """An SAE from a local folder (``cfg.json`` + weights, e.g. from :func:`train_sae`) or a release.

    A local folder loads with ``SAE.load_from_disk``; otherwise ``path_or_release`` is a sae-lens
    release (see ``sae_lens.pretrained_saes.yaml``) and ``sae_id`` the SAE inside it, downloaded
    with ``SAE.from_pretrained`` (needs network or a local HF cache).
    """
    import_sae_lens()
    from sae_lens import SAE

    path = Path(path_or_release).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(
                f"{path} holds no SAE: cfg.json is missing; pass a folder written by train_sae or "
                "SAE.save_model"
            )
        return SAE.load_from_disk(str(path), device=device)
    if sae_id is None:
        raise FileNotFoundError(
            f"no SAE folder at {path}; pass an existing folder, or a sae-lens release name together "
            "with sae_id"
        )
    try:
        return SAE.from_pretrained(str(path_or_release), sae_id, device=device)
    except ValueError as err:
        raise ValueError(f"could not find SAE {sae_id!r} in release {path_or_release!r}: {err}") from err
    except (OSError, ConnectionError) as err:
        raise OSError(
            f"could not download SAE {sae_id!r} of release {path_or_release!r}: {err}. This needs "
            "network access to the Hugging Face hub (or a local HF cache); otherwise pass a local "
            "SAE folder (cfg.json + weights, written by SAE.save_model)"
        ) from err


def sae_hook_layer(sae: "SAE") -> int | None:
    """The ``hidden_states`` index an SAE reads, from its metadata; None when it does not say."""
    meta = sae.cfg.metadata
    if meta.get("hook_layer") is not None:
        return int(meta.get("hook_layer"))
    hook = meta.get("hook_name") or ""
    for pattern, offset in ((_HIDDEN_STATES, 0), (_RESID_POST, 1), (_RESID_PRE, 0)):
        match = pattern.match(hook)
        if match:
            return int(match.group(1)) + offset
    return None


def split_release(source: str) -> tuple[str, str]:
    """``(release, sae_id)`` of a sae-lens pretrained SAE written ``RELEASE/ID``, split where a
    release of ``sae_lens/pretrained_saes.yaml`` ends (ids may hold slashes themselves)."""
    import_sae_lens()
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    for release in sorted(get_pretrained_saes_directory(), key=len, reverse=True):
        if source.startswith(release + "/") and len(source) > len(release) + 1:
            return release, source[len(release) + 1:]
    raise FileNotFoundError(
        f"{source} is neither an SAE folder nor RELEASE/ID of a sae-lens pretrained SAE; pass a "
        "folder holding cfg.json and the weights (SAE.save_model), or a release and id listed in "
        "sae_lens/pretrained_saes.yaml, e.g. gpt2-small-res-jb/blocks.8.hook_resid_pre"
    )


def token_activation_sample(lm: LoadedModel, examples: Sequence, layer: int,
                            n_tokens: int, max_length: int, seed: int) -> torch.Tensor:
    """Activations ``[<= n_tokens, d_model]`` of every non-padding token at ``layer``, over a
    random order of ``examples`` (the SAE's training data)."""
    import random

    from ..data import batches, encode_dataset
    from ..models import hidden_states_at

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    encoded, _ = encode_dataset(lm.tokenizer, [examples[i] for i in order], max_length)
    chunks, total = [], 0
    with torch.no_grad():
        for _, batch in batches(encoded, 32, lm.pad_token_id):
            hidden = hidden_states_at(lm.model, batch["input_ids"], batch["attention_mask"],
                                      [layer])[layer]
            chunks.append(hidden[batch["attention_mask"].bool()].float())
            total += chunks[-1].shape[0]
            if total >= n_tokens:
                break
    return torch.cat(chunks)[:n_tokens]


def register_sae(workspace: str | os.PathLike, source: str, model: str, layer: int,
                 name: str | None = None) -> dict[str, Any]:
    """Register an SAE that reads ``hidden_states[layer]`` of a registered model.

    ``source`` is an sae-lens folder (registered where it is) or a pretrained ``RELEASE/ID``
    (downloaded with ``SAE.from_pretrained``, then saved under ``artifacts/saes``). A folder
    that does not record its layer is saved there too, with ``layer`` recorded, so its feature
    concepts can check it. Refuses, before anything is written, an SAE whose ``d_in`` is not the
    model's hidden size and a layer past the model's depth or other than the SAE's own. Returns
    a JSON-ready summary.
    """
    from ..store import Store

    store = Store(workspace)
    row = store.get_model(model)
    n_layers, d_model = model_dimensions(row["spec"])
    folder = Path(source).expanduser()
    sae = load_sae(folder) if folder.exists() else load_sae(*split_release(source))
    recorded = sae_hook_layer(sae)
    for what, at in (("--layer", layer), ("the SAE's own layer", recorded)):
        if at is not None and not 0 <= at <= n_layers:
            raise ValueError(
                f"SAE {source}: {what} is {at}, past the depth of model {row['name']!r}, which "
                f"has layers 0..{n_layers} (hidden_states index; 0 = embeddings); register the "
                "model this SAE was trained on, or an SAE of this model")
    if recorded is not None and recorded != layer:
        raise ValueError(f"SAE {source} reads layer {recorded} (hook "
                         f"{sae.cfg.metadata.get('hook_name')!r}), not {layer}; pass --layer "
                         f"{recorded}")
    d_in = int(sae.cfg.d_in)
    if d_in != d_model:
        raise ValueError(f"SAE {source} reads vectors of width d_in={d_in}, but model "
                         f"{row['name']!r} has hidden size {d_model}; pick an SAE trained on "
                         "this model (or register the model it was trained on)")
    name = name or (folder.name if folder.exists() else source)
    if not folder.exists() or recorded is None:
        sae.cfg.metadata.hook_layer = layer
        folder = paths.artifact_dir(workspace, paths.SAES_DIR) / re.sub(r"[^\w.-]+", "_", name)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save_model(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)  # the same name registered again
        os.replace(tmp, folder)
    metrics = sae.cfg.metadata.get("cinf_metrics") or {}
    sae_id = store.add_sae(name, folder, layer, row["model_id"], metrics=metrics)
    return {"sae_id": sae_id, "name": name, "layer": layer, "model": row["name"],
            "d_in": d_in, "d_sae": int(sae.cfg.d_sae), "architecture": sae.cfg.architecture(),
            "path": str(folder.resolve())}


# ---------------------------------------------------------------- features


def sae_feature_concept(sae: "SAE", feature: int, layer: int, name: str | None = None) -> SAEFeatureConcept:
    """Feature ``feature`` of ``sae`` as a concept at ``layer``.

    The concept's measurement is the feature's encoder pre-activation exactly as the SAE computes
    it: ``b_dec`` subtraction (or its absence) and TopK decoder-norm rescaling are folded into
    ``w_enc``/``b_enc``. Refuses an SAE trained on another layer, a feature out of range, and
    architectures or input normalisations whose pre-activation is not affine in ``h``.
    """
    sae_layer = sae_hook_layer(sae)
    if sae_layer is None:
        raise ValueError(
            "this SAE does not record which layer it reads (metadata hook_layer / hook_name); if you "
            "know it, set sae.cfg.metadata.hook_layer = <hidden_states index> first"
        )
    if sae_layer != layer:
        raise ValueError(
            f"the SAE was trained on layer {sae_layer} but the concept asks for layer {layer}; use "
            f"layer {sae_layer} or an SAE trained on layer {layer}"
        )
    d_sae = int(sae.cfg.d_sae)
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise ValueError(f"feature {feature!r} is out of range; this SAE has features 0..{d_sae - 1}")
    arch = sae.cfg.architecture()
    if arch not in CONCEPT_ARCHITECTURES:
        raise ValueError(
            f"SAE architecture {arch!r} is not supported for feature concepts; use one of "
            f"{CONCEPT_ARCHITECTURES}"
        )
    if sae.cfg.normalize_activations != "none" or sae.cfg.reshape_activations != "none":
        raise ValueError(
            f"this SAE normalises or reshapes its input (normalize_activations="
            f"{sae.cfg.normalize_activations!r}, reshape_activations={sae.cfg.reshape_activations!r}), "
            "so a feature's pre-activation is not affine in the residual stream; use an SAE with "
            "'none' (train_sae folds its scaling into the weights)"
        )
    with torch.no_grad():
        w_enc = sae.W_enc[:, feature].detach().float().cpu().clone()
        b_enc = float(sae.b_enc[feature])
        w_dec = sae.W_dec[feature].detach().float().cpu().clone()
        b_dec = sae.b_dec.detach().float().cpu().clone()
        if not sae.cfg.apply_b_dec_to_input:
            b_enc += float(b_dec @ w_enc)
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            norm = float(w_dec.norm())
            w_enc, b_enc = w_enc * norm, b_enc * norm
    check_vector(w_dec, int(sae.cfg.d_in), f"decoder row of feature {feature}")
    label = name or f"sae L{layer} #{feature}"
    info = {"sae_architecture": arch, "d_sae": d_sae,
            "sae_model_name": sae.cfg.metadata.get("model_name"),
            "sae_hook_name": sae.cfg.metadata.get("hook_name")}
    return SAEFeatureConcept(name=label, layer=layer, feature=feature, w_enc=w_enc, b_enc=b_enc,
                             w_dec=w_dec, b_dec=b_dec, info=info)


def make_sae_feature_concept(
    workspace: str | os.PathLike, sae: str, feature: int, name: str | None = None,
    trait: str | None = None, model: str | None = None, layer: int | None = None,
) -> dict[str, Any]:
    """Save feature ``feature`` of a registered SAE as a concept (at the SAE's layer).

    ``trait`` (optional) records which trait the feature stands for. ``model`` and ``layer``, when
    given, must be the SAE's own (they are checked, not chosen). Returns a JSON-ready summary.
    """
    from ..store import Store

    store = Store(workspace)
    row = store.get_sae(sae)
    if layer is not None and int(layer) != int(row["layer"]):
        raise ValueError(f"SAE {sae!r} reads layer {row['layer']}, not layer {layer}; leave the "
                         f"layer out or pick an SAE trained on layer {layer}")
    if model is not None and store.get_model(model)["model_id"] != row["model_id"]:
        raise ValueError(f"SAE {sae!r} was trained on another model than {model!r}; leave the "
                         "model out (the SAE's own is used) or pick an SAE of that model")
    loaded = load_sae(row["path"])
    concept = sae_feature_concept(loaded, int(feature), int(row["layer"]),
                                  name=name or f"{row['name']} #{int(feature)}")
    concept.info["sae"] = row["name"]
    if trait:
        concept.info["trait"] = trait
    concept_id = store.save_concept(concept, row["model_id"])
    return {"concept_id": concept_id, "name": concept.name, "layer": concept.layer,
            "feature": concept.feature, "sae": row["name"], "trait": trait}


@torch.no_grad()
def feature_activations(sae: "SAE", hidden: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """SAE feature activations (post-nonlinearity): ``[n_tok, d_model] -> [n_tok, d_sae]`` (fp32, CPU)."""
    x_all = _check_activations(hidden, int(sae.cfg.d_in), "hidden states")
    out = []
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size].to(sae.W_enc.device, sae.W_enc.dtype)
        out.append(sae.encode(x).float().cpu())
    return torch.cat(out)


def feature_labels(token_strings: Sequence[str], acts: torch.Tensor, k: int = 5) -> list[str]:
    """A short label per feature: its ``k`` top-activating distinct tokens, strongest first.

    ``token_strings`` has one string per row of ``acts [n_tok, d_sae]``. A feature that never
    fires on these tokens is labelled ``"(inactive)"``.
    """
    if acts.dim() != 2 or acts.shape[0] != len(token_strings):
        raise ValueError(
            f"acts must be [n_tokens, d_sae] with one row per token string; got {tuple(acts.shape)} "
            f"for {len(token_strings)} tokens"
        )
    # Looking at a few times k candidates per feature leaves room for repeated tokens.
    n_cand = min(acts.shape[0], max(4 * k, 32))
    values, index = acts.float().topk(n_cand, dim=0)
    labels = []
    for j in range(acts.shape[1]):
        seen: list[str] = []
        for value, i in zip(values[:, j].tolist(), index[:, j].tolist()):
            if value <= 0 or len(seen) == k:
                break
            text = token_strings[i].strip() or repr(token_strings[i])
            if text not in seen:
                seen.append(text)
        labels.append(", ".join(seen) if seen else "(inactive)")
    return labels


def features_by_direction(sae: "SAE", vector: torch.Tensor, k: int = 10) -> list[tuple[int, float]]:
    """The ``k`` features whose decoder rows point most along ``vector``: ``[(feature, cosine)]``."""
    d_in = int(sae.cfg.d_in)
    vec = check_vector(vector.detach().float().cpu(), d_in, "direction")
    w_dec = sae.W_dec.detach().float().cpu()
    cos = (w_dec @ vec) / (w_dec.norm(dim=1).clamp_min(1e-12) * vec.norm())
    top = cos.topk(min(k, cos.shape[0]))
    return [(int(i), float(c)) for c, i in zip(top.values, top.indices)]


def features_for_text(sae: "SAE", hidden: torch.Tensor, k: int = 10, reduce: str = "max"
                      ) -> list[tuple[int, float]]:
    """Features that fire on a phrase: ``hidden [n_tok, d_model]`` -> top ``k`` ``[(feature, value)]``.

    ``reduce`` pools each feature over the phrase's tokens (``"max"`` or ``"mean"``); features
    that never fire are left out.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    acts = feature_activations(sae, hidden)
    pooled = acts.max(0).values if reduce == "max" else acts.mean(0)
    top = pooled.topk(min(k, pooled.shape[0]))
    return [(int(i), float(v)) for v, i in zip(top.values, top.indices) if v > 0]


# ---------------------------------------------------------------- features on text


def _checked_layer(sae: "SAE", layer: int | None) -> int:
    """The layer to read for ``sae``: its recorded hook layer, which ``layer`` (if given) must match."""
    sae_layer = sae_hook_layer(sae)
    if layer is None and sae_layer is None:
        raise ValueError(
            "this SAE does not record which layer it reads (metadata hook_layer / hook_name); pass "
            "layer=<hidden_states index>"
        )
    if layer is not None and sae_layer is not None and int(layer) != sae_layer:
        raise ValueError(f"the SAE was trained on layer {sae_layer}, not layer {layer}")
    return int(sae_layer if sae_layer is not None else layer)


def phrase_hidden(lm: LoadedModel, text: str, layer: int) -> tuple[list[str], torch.Tensor]:
    """A phrase's tokens and hidden states ``[n_tok, d_model]`` at ``layer`` (one truncated forward).

    The phrase is read as the assistant's response to an empty user turn, the way the SAE saw its
    training data (response tokens); the chat template's end-of-turn tokens after the phrase are
    dropped (kept when the tokenizer cannot map tokens back to characters).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("type a phrase to look up")
    messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
    tokens, hidden = token_activations(lm, messages, layer)
    tok = lm.tokenizer
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    response = tok.apply_chat_template(messages, tokenize=False)[len(prompt):]
    start = response.find(text)
    try:
        offsets = tok(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError, TypeError):
        offsets = None
    if start >= 0 and offsets is not None and len(offsets) == len(tokens):
        keep = [i for i, (a, b) in enumerate(offsets) if b > start and a < start + len(text)]
        if keep:
            return [tokens[i] for i in keep], hidden[keep]
    return tokens, hidden


@dataclass
class PhraseFeatures:
    """The features that fire on a phrase, and each one's activation on every token."""

    tokens: list[str]
    """The phrase's tokens (decoded strings)."""
    features: list[tuple[int, float]]
    """``(feature, pooled activation)``, strongest first; features that never fire are left out."""
    token_acts: torch.Tensor
    """``[n_tokens, len(features)]``: activation of each listed feature on each token."""


@torch.no_grad()
def features_for_phrase(lm: LoadedModel, sae: "SAE", text: str, k: int = 10, reduce: str = "max",
                        layer: int | None = None) -> PhraseFeatures:
    """Which features fire on ``text``: run ``lm`` up to the SAE's layer, encode, keep the top ``k``.

    ``lm`` must be the model the SAE was trained on; ``reduce`` pools over the phrase's tokens (see
    :func:`features_for_text`).
    """
    tokens, hidden = phrase_hidden(lm, text, _checked_layer(sae, layer))
    top = features_for_text(sae, hidden, k=k, reduce=reduce)
    acts = feature_activations(sae, hidden)[:, [j for j, _ in top]]
    return PhraseFeatures(tokens=tokens, features=top, token_acts=acts)


@torch.no_grad()
def feature_token_activations(lm: LoadedModel, sae: "SAE", examples: Sequence[Sequence[dict]],
                              feature: int, layer: int | None = None,
                              max_length: int | None = None) -> list[tuple[list[str], list[float]]]:
    """Per-token activation of one feature over each example's response tokens.

    ``examples`` are message lists (a chat each). Returns one ``(tokens, activations)`` per example:
    the response tokens as decoded strings and feature ``feature``'s activation on each (what a
    top-activating example's highlighting shows; its max is the example's max activation).
    """
    d_sae = int(sae.cfg.d_sae)
    if isinstance(feature, bool) or not 0 <= int(feature) < d_sae:
        raise ValueError(f"feature {feature!r} is out of range; this SAE has features 0..{d_sae - 1}")
    at = _checked_layer(sae, layer)
    out = []
    for messages in examples:
        tokens, hidden = token_activations(lm, messages, at, max_length)
        if not tokens:
            out.append(([], []))
            continue
        acts = feature_activations(sae, hidden)[:, int(feature)]
        out.append((tokens, acts.tolist()))
    return out
