"""Kronfluence 1.0.1 as an independent oracle (tests) and a speed reference (``bench``, which
times it against cinf: :func:`cinf_core.methods.bench.time_influence_vs_kronfluence`).

Kronfluence is optional (install with ``pip install --no-deps kronfluence==1.0.1 einconv
opt_einsum``: its declared torchvision dependency would replace the CPU torch). It runs the same
job as :func:`cinf_core.methods.gradient.influence_function`: EK-FAC over the same modules, the
same loss (cross-entropy summed over response tokens), the same Fisher and damping.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from typing import Sequence

import numpy as np
import torch

from ..data import EncodedExample, collate
from .config import CurvatureConfig
from .lm import check_examples, check_response_head, response_losses
from .modules import select_modules

KRONFLUENCE_HEURISTIC_DAMPING = 0.1


def import_kronfluence():
    """The kronfluence package, or an ImportError saying how to install it safely."""
    try:
        import kronfluence
    except ImportError as err:
        raise ImportError(
            "kronfluence is not installed; install it without its torchvision dependency: "
            "pip install --no-deps kronfluence==1.0.1 einconv opt_einsum"
        ) from err
    return kronfluence


def _kronfluence_damping(cfg: CurvatureConfig) -> float | None:
    if cfg.damping_mode == "absolute":
        return cfg.damping
    if abs(cfg.damping - KRONFLUENCE_HEURISTIC_DAMPING) > 1e-12:
        raise ValueError(
            f"kronfluence supports relative damping only as 0.1 x mean eigenvalue, got damping={cfg.damping}; "
            "use damping=0.1 or damping_mode='absolute'"
        )
    return None


def kronfluence_influence(
    lm,
    train: Sequence[EncodedExample],
    queries: Sequence[EncodedExample],
    cfg: CurvatureConfig,
    output_dir: str | None = None,
) -> np.ndarray:
    """Kronfluence's EK-FAC influence of ``train`` on each query's loss: ``[n_queries, n_train]``.

    Same sign as ``influence_function(..., per_query=True).T``. The model is deep-copied (Kronfluence
    wraps modules in place). Modules: ``select_modules(lm.model, cfg)``.
    """
    import_kronfluence()
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    check_examples(train, "training")
    check_examples(queries, "test-query")
    damping = _kronfluence_damping(cfg)
    names = list(select_modules(lm.model, cfg))

    class ResponseLossTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            # Sampled labels (true Fisher) come from the global RNG, as in Kronfluence's examples.
            seeds = torch.randint(0, 2**62, (len(batch["input_ids"]),)).tolist() if sample else None
            return response_losses(model, batch, sample_seeds=seeds).sum()

        def compute_measurement(self, batch, model):
            return response_losses(model, batch).sum()

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = ResponseLossTask()
    model = prepare_model(copy.deepcopy(lm.model).eval(), task)
    pad = lm.pad_token_id
    # The same loss code as cinf's passes: the output layer on response positions only.
    check_response_head(model, collate(list(train[:cfg.batch_size]), pad))
    loader = DataLoaderKwargs(collate_fn=lambda items: collate(items, pad))
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp, warnings.catch_warnings():
        # Kronfluence 1.0.1 builds a disabled torch.cuda.amp.GradScaler, deprecated in torch 2.x.
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
        analyzer = Analyzer(analysis_name="cinf", model=model, task=task, cpu=next(lm.model.parameters()).device.type == "cpu",
                            disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=list(train),
            per_device_batch_size=cfg.batch_size,
            dataloader_kwargs=loader,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=cfg.fisher == "empirical"),
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="ekfac",
            query_dataset=list(queries),
            train_dataset=list(train),
            per_device_query_batch_size=cfg.batch_size,
            per_device_train_batch_size=cfg.batch_size,
            dataloader_kwargs=loader,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return scores.double().cpu().numpy()
