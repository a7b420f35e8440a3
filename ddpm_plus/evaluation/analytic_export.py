"""A pipeline that samples with Analytic-DPM's optimal variance: its moment table Γ estimated over real images
(:func:`~ddpm_plus.evaluation.analytic.estimate_analytic_moments`) and written into its scheduler
(``variance_type="analytic"``), as ``ddpm-plus analytic`` does."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..pipelines.pipeline_ddpm_plus import is_class_conditional
from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler
from .analytic import estimate_analytic_moments
from .errors import EvaluationError
from .options import bound_timesteps

__all__ = ["analytic_timesteps", "apply_analytic_moments", "save_analytic_pipeline"]


def analytic_timesteps(num_train_timesteps: int, k: int | None, all_below: int = 0) -> np.ndarray | None:
    """The timesteps at which Γ is estimated: None (all T), or K evenly spaced ones (the bound's rule,
    :func:`~ddpm_plus.evaluation.options.bound_timesteps`: 2 <= K <= T) and every t < ``all_below``."""
    if k is None:
        return None
    spaced = bound_timesteps(num_train_timesteps, k).numpy()
    return np.union1d(spaced, np.arange(min(all_below, num_train_timesteps))) if all_below > 0 else spaced


def apply_analytic_moments(
    pipe, images: torch.Tensor, labels: torch.Tensor | None, *, num_timesteps=None, all_timesteps_below=0,
    eta=None, batch_size=256, seed=0, progress=False, shard=None,
) -> dict:  # fmt: skip
    """Estimate Γ of ``pipe`` over ``images`` (a class-conditional UNet: with their ``labels``) and give
    ``pipe`` a scheduler with ``variance_type="analytic"`` (and ``eta`` if given); returns the table, its
    standard errors and what it was estimated from. ``shard``: this process's share of the images
    (evaluation/distributed.py); the table is the same for any number of processes."""
    unet = pipe.unet.eval()
    if not is_class_conditional(unet.config):
        labels = None
    elif labels is None:
        raise EvaluationError("a class-conditional UNet needs labelled images: use --dataset digits")
    timesteps = analytic_timesteps(int(pipe.scheduler.config.num_train_timesteps), num_timesteps, all_timesteps_below)
    t0 = time.perf_counter()
    gamma, stderr = estimate_analytic_moments(
        unet, pipe.scheduler, images, timesteps=timesteps, batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed), progress=progress, class_labels=labels, return_stderr=True,
        shard=shard,
    )  # fmt: skip
    overrides = {"variance_type": "analytic", "analytic_moments": gamma.tolist()}
    if eta is not None:
        overrides["eta"] = eta
    try:
        pipe.scheduler = DDPMPlusScheduler.from_config(pipe.scheduler.config, **overrides)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    evaluated = np.flatnonzero(np.isfinite(stderr.numpy()))
    return {
        "num_images": int(images.shape[0]),
        "timesteps_evaluated": int(len(evaluated)),
        "seconds": round(time.perf_counter() - t0, 2),
        "eta": pipe.scheduler.config.eta,
        "gamma_min_max": [float(gamma.min()), float(gamma.max())],
        "max_stderr": float(np.nanmax(stderr.numpy())),
        "analytic_moments": gamma.tolist(),
        "stderr": [None if not math.isfinite(v) else v for v in stderr.tolist()],
    }


def save_analytic_pipeline(pipe, results: dict, output_dir) -> Path:
    """``pipe`` saved to ``output_dir`` with ``analytic_moments.json`` (``results``) beside it."""
    out = Path(output_dir)
    pipe.save_pretrained(out)
    (out / "analytic_moments.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return out
