"""The exact variational bound of a pipeline on real images, in bits/dim on the data's own grid
(docs/math.md eqs. (59)-(67); respaced: the bound of the respaced model, eqs. (56)-(58)): -log p(x) for an unconditional model, -log p(x|c) with each image's
own class c for a class-conditional one; mean, standard error, the prior and decoder terms, and on the digits
the figure per source pixel comparable with 8x8 baselines."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .distributed import Shard
from .likelihood import conditional_vlb_terms, vlb_terms
from .options import EvaluationOptions, bound_timesteps
from .real_images import EvalImages

__all__ = ["LATENT_NUM_BINS", "dims_per_source_pixel", "bound_figures"]

LATENT_NUM_BINS = 256  # the decoder grid the trainer's losses use on latents (trainer/latent_cache.py), as DiT/ADM


def dims_per_source_pixel(resolution: int, channels: int) -> int | None:
    """Model dimensions per pixel of a source 8x8 greyscale digit: C·k² when the digits were nearest-upsampled
    by k = resolution / 8 and replicated to C channels, None when resolution is not a multiple of 8."""
    return channels * (resolution // 8) ** 2 if resolution % 8 == 0 else None


def bound_figures(
    unet, scheduler, reals: EvalImages, options: EvaluationOptions, class_ids=None, shard: Shard | None = None,
    latents: torch.Tensor | None = None,
) -> dict:  # fmt: skip
    """bits/dim of the bound on ``reals`` (``class_ids``: each image's class for a conditional model, else
    None) at ``options.bound_timesteps`` respaced timesteps (None: all T), noise drawn from ``options.seed``;
    split over the processes of ``shard``. With ``latents`` (the real images' scaled VAE latents, for a latent
    model): the bound of the latents, its figures named ``latent_...`` (the decoder term on the
    :data:`LATENT_NUM_BINS`-level grid that the trainer's hybrid and vlb losses use on latents)."""
    num_train = int(scheduler.config.num_train_timesteps)
    seq = bound_timesteps(num_train, options.bound_timesteps)
    kwargs = dict(
        timesteps=seq,
        num_bins=reals.num_bins if latents is None else LATENT_NUM_BINS,
        generator=torch.Generator().manual_seed(options.seed),
        batch_size=options.batch_size,
        progress=options.progress,
        shard=shard,
        on_grid=latents is None,
    )
    x = reals.images if latents is None else latents
    t0 = time.perf_counter()
    if class_ids is None:
        terms = vlb_terms(unet, scheduler, x, **kwargs)
    else:
        terms = conditional_vlb_terms(unet, scheduler, x, np.asarray(class_ids), **kwargs)
    out = {
        "bound_timesteps": "all" if seq is None else int(len(seq)),
        "num_train_timesteps": num_train,
        "variance_type": scheduler.config.variance_type,
        "prediction_type": scheduler.config.prediction_type,
        **_bits(terms, "" if latents is None else "latent_"),
        "bound_seconds": round(time.perf_counter() - t0, 2),
        # the mean term of the bound per timestep (the decoder L_0 at timestep 0), bits/dim
        "terms_timesteps": terms["timesteps"].tolist(),
        "terms_bpd_mean": [round(v, 8) for v in terms["terms_bpd"].mean(0).tolist()],
    }
    if class_ids is not None:
        out["bound_conditioning"] = "-log p(x|c), c = each image's own class"
    if latents is not None:
        out["latent_shape"] = list(latents.shape[1:])
        out["latent_num_bins"] = LATENT_NUM_BINS
        return out
    stderr = out["bits_per_dim_stderr"]
    images = reals.images
    factor = dims_per_source_pixel(images.shape[-1], images.shape[1]) if reals.is_digits else None
    if factor is not None:
        # Nearest upsampling and channel replication are injective: total nats are the same, spread over
        # C·(8k)² model dims instead of the 64 source pixels, so per source pixel = x C·k².
        out["bits_per_source_pixel"] = out["bits_per_dim"] * factor
        out["bits_per_source_pixel_stderr"] = stderr * factor
    out["comparable_to_8x8_baselines"] = "bits_per_source_pixel" if factor is not None else None
    return out


def _bits(terms: dict, prefix: str) -> dict:
    """The bound's mean, standard error, prior and decoder terms in bits/dim, keys prefixed with ``prefix``."""
    bpd = terms["total_bpd"]
    stderr = float(bpd.std(unbiased=True) / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    return {
        f"{prefix}bits_per_dim": float(bpd.mean()),
        f"{prefix}bits_per_dim_stderr": stderr,
        f"{prefix}prior_bits_per_dim": float(terms["prior_bpd"].mean()),
        f"{prefix}decoder_bits_per_dim": float(terms["terms_bpd"][:, terms["decoder_index"]].mean()),
    }
