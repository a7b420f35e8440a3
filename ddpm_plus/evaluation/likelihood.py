"""Exact variational bound of a DDPM, in bits per dimension (docs/math.md, "Likelihood").

    L = L_T + sum_{t=2..T} L_{t-1} + L_0                                   (Ho et al. 2020, eq. 5)
    L_T     = KL(q(x_T|x_0) || N(0, I))                  q(x_T|x_0): docs/math.md eq. (23)
    L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))  posterior: docs/math.md eqs. (25)-(30)
    L_0     = -log p(x_0|x_1), a Gaussian discretised to ``num_bins`` levels on [-1, 1]
    bits/dim = L / (D ln 2), D = C*H*W.

Code timestep ``i`` is the paper's t = i + 1, so code step 0 is the decoder. Everything is accumulated
in float64, x_0 is never clipped, and the model runs under ``torch.no_grad`` in its own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import Shard, gather_rows

__all__ = [
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "vb_term_nats",
    "vlb_terms",
    "bits_per_dim",
    "call_model",
    "model_device_dtype",
]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    tensors = [v for v in (mean1, logvar1, mean2, logvar2) if torch.is_tensor(v)]
    dtype = torch.float64 if not tensors else tensors[0].dtype
    for v in tensors[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    device = tensors[0].device if tensors else None
    mean1, logvar1, mean2, logvar2 = (
        torch.as_tensor(v, dtype=dtype, device=device) for v in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_diff_ndtr(lo, hi):
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails.

    Reflects the pair to the side where Phi is small (Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)), then
    log(Phi(b) - Phi(a)) = log Phi(b) + log(-expm1(log Phi(a) - log Phi(b))), exact up to rounding
    (improved-diffusion's tanh approximation of Phi is not used).
    """
    reflect = (lo + hi) > 0
    a = torch.where(reflect, -hi, lo)
    b = torch.where(reflect, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    diff = torch.special.log_ndtr(a) - log_b
    # diff < 0 whenever lo < hi; the clamp only guards rounding in degenerate (zero-width) cases.
    diff = diff.clamp(max=-torch.finfo(diff.dtype).tiny)
    return log_b + torch.log(-torch.expm1(diff))


def discretized_gaussian_log_likelihood(x, means, log_scales, num_bins: int = 256):
    """Elementwise log-probability (nats, float64) of ``x`` on the grid of ``num_bins`` levels in [-1, 1].

    Bin k (k = 0..num_bins-1) is centred at -1 + 2k/(num_bins-1) with width 2/(num_bins-1); the edge bins
    are open: (-inf, -1 + h] and [1 - h, inf) with h = 1/(num_bins-1). The probabilities of the
    ``num_bins`` bins sum to 1 for any mean and scale.
    """
    _check_num_bins(num_bins)
    x = torch.as_tensor(x).to(torch.float64)
    means = torch.as_tensor(means).to(device=x.device, dtype=torch.float64)
    log_scales = torch.as_tensor(log_scales).to(device=x.device, dtype=torch.float64)
    half = 1.0 / (num_bins - 1)
    centred = x - means
    inv_stdv = torch.exp(-log_scales)
    lo = (centred - half) * inv_stdv
    hi = (centred + half) * inv_stdv
    left = x < -1.0 + half  # the lowest grid level (-1); half a bin of slack for rounding
    right = x > 1.0 - half  # the highest grid level (+1)
    interior = _log_diff_ndtr(lo, hi)
    return torch.where(left, torch.special.log_ndtr(hi), torch.where(right, torch.special.log_ndtr(-lo), interior))


def vb_term_nats(
    scheduler,
    model_output,
    x_start,
    x_t,
    timesteps,
    prev_timesteps,
    *,
    num_bins: int = 256,
    next_timesteps=None,
):
    """Elementwise term of the bound in nats, one timestep per batch element.

    Where ``prev_timesteps`` is -1 (the step that ends at x_0): the decoder NLL -log p(x_0|x_1) with the
    model's mean and log-variance (for fixed types the scheduler's clipped beta~_2, improved DDPM). Elsewhere:
    KL(q(x_prev|x_t, x_0) || p(x_prev|x_t)) with the exact beta' = 1 - abar_t / abar_prev between the two
    timesteps. x_0 is never clipped (``clip_denoised=False``). ``next_timesteps`` (default: t + 1, the full
    chain) sets the clipped decoder variance of fixed types: pass the respaced chain's step above 0 for
    improved-diffusion's respaced convention (README, "Respaced bound convention").
    """
    timesteps = torch.as_tensor(timesteps, device=x_t.device).long().reshape(-1)
    prev_timesteps = torch.as_tensor(prev_timesteps, device=x_t.device).long().reshape(-1)
    if timesteps.numel() == 1 and x_t.shape[0] != 1:
        timesteps = timesteps.expand(x_t.shape[0])
    if prev_timesteps.numel() == 1 and x_t.shape[0] != 1:
        prev_timesteps = prev_timesteps.expand(x_t.shape[0])
    out = scheduler.p_mean_variance(
        model_output, x_t, timesteps, prev_timestep=prev_timesteps, clip_denoised=False, next_timestep=next_timesteps
    )
    model_mean = out.mean.to(torch.float64)
    model_log_variance = out.log_variance.to(torch.float64)
    is_decoder = (prev_timesteps < 0).reshape((-1,) + (1,) * (x_t.ndim - 1))

    # KL terms (at decoder positions q_posterior's clipped log-variance keeps them finite; discarded there).
    true_mean, _, true_log_variance = scheduler.q_posterior(
        x_start, x_t, timesteps, prev_timestep=prev_timesteps, next_timestep=next_timesteps
    )
    kl = normal_kl(true_mean.to(torch.float64), true_log_variance.to(torch.float64), model_mean, model_log_variance)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=model_mean, log_scales=0.5 * model_log_variance, num_bins=num_bins
    )
    return torch.where(is_decoder, decoder_nll, kl)


def call_model(model, sample, timesteps):
    """``model(sample, timesteps)`` as a tensor: a diffusers output's ``.sample``, a tuple's first entry."""
    out = model(sample, timesteps)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise TypeError(f"model must return a tensor or an object with .sample, got {type(out).__name__}")
    return out


def model_device_dtype(model, fallback_device):
    """(device, floating dtype) the model runs in: its ``device``/``dtype`` attributes or first parameter;
    ``fallback_device`` and float32 where it has neither."""
    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    if (device is None or dtype is None) and isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            device, dtype = device or param.device, dtype or param.dtype
    device = torch.device(device) if device is not None else fallback_device
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32
    return device, dtype


def _check_num_bins(num_bins) -> None:
    """The one check of ``num_bins`` (used by the decoder likelihood and the image grid check)."""
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")


def _check_images(images, num_bins):
    _check_num_bins(num_bins)
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"images must be a 4-D tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
    x = images.to(torch.float64)
    if not torch.isfinite(x).all() or x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6:
        raise ValueError("images must be finite and in [-1, 1]")
    levels = (x + 1.0) * (num_bins - 1) / 2.0
    off = (levels - levels.round()).abs().max().item()
    if off > 1e-3:
        raise ValueError(
            f"images are not on the grid of num_bins={num_bins} levels in [-1, 1] (largest offset {off:.3g} of a "
            "bin); pass the num_bins the data was quantised with (256 for 8-bit images, 17 for the digits)"
        )


@torch.no_grad()
def vlb_terms(
    model: Callable | torch.nn.Module,
    scheduler,
    x_start: torch.Tensor,
    *,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    num_bins: int = 256,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    on_grid: bool = True,
):
    """Every term of the bound for each image, in bits/dim (float64, on CPU).

    Returns a dict: ``timesteps`` [K] (the sequence, in the order given; default 0..T-1),
    ``terms_bpd`` [B, K] (column k: the term whose x_t is at ``timesteps[k]``; the decoder L_0 at
    ``decoder_index``, KL terms L_{t-1} elsewhere), ``decoder_index`` (int), ``prior_bpd`` [B] (L_T at the
    sequence's largest timestep) and ``total_bpd`` [B] = prior + sum of terms.

    On a subsequence tau_0 = 0 < tau_1 < ... < tau_{K-1}, step k uses beta'_k = 1 - abar_{tau_k}/abar_{tau_{k-1}};
    the decoder step (0 -> x_0) is the same as on the full chain, with improved DDPM's clipped beta~_2 for
    fixed variance types. One x_t ~ q(x_t|x_0) is drawn per image and term (``generator``, on CPU, in the
    same order whatever ``batch_size``), so the total is an unbiased one-sample estimate of the bound.
    ``scheduler`` may be any scheduler whose config DDPMPlusScheduler accepts (e.g. diffusers'
    DDPMScheduler): the bound uses a fresh ``DDPMPlusScheduler.from_config(scheduler.config)``, with its
    variance type, ``analytic`` included (Analytic-DPM's optimal variance, Bao et al. 2022, Theorem 1:
    the minimum over σ² of each KL term for the exact model), and its ``eta``: for 0 < η < 1 the terms are
    KL(q_λ(x_prev|x_t, x_0) || p(x_prev|x_t)) of DDIM's family (Song et al. 2021, eq. (16)), a bound on the
    same likelihood since q_λ keeps the marginals q(x_t|x_0).

    ``shard`` (evaluation/distributed.py): this process runs the model on its blocks of ``batch_size`` images;
    every process draws all the noise, and the terms are gathered. ``on_grid=False``: ``x_start`` (latents)
    need not lie on the grid; L_0 is then the mass of a box of width 2/(num_bins - 1) around each coordinate.
    """
    from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler

    scheduler = DDPMPlusScheduler.from_config(scheduler.config)
    batch_size = _checked_batch_size(scheduler, x_start, num_bins, batch_size, on_grid)
    shard = shard or Shard()
    chain, seq = _bound_sequence(int(scheduler.config.num_train_timesteps), timesteps)
    device, model_dtype = model_device_dtype(model, x_start.device)
    to_bpd = 1.0 / (x_start[0].numel() * math.log(2.0))
    x0_all = x_start.detach().to("cpu", torch.float64)
    # L_T: KL(q(x_T|x_0) || N(0, I)) with q from eq. (23), at the largest timestep of the sequence.
    abar_top = scheduler.alphas_cumprod[int(chain.timesteps[0])].to(torch.float64)
    prior_bpd = normal_kl(abar_top.sqrt() * x0_all, torch.log1p(-abar_top), 0.0, 0.0).flatten(1).sum(1) * to_bpd
    terms = torch.zeros(len(x0_all), seq.numel(), dtype=torch.float64)
    blocks = shard.blocks(len(x0_all), batch_size)
    for k, t in tqdm(list(enumerate(seq.tolist())), desc="bits/dim", unit="t", leave=False, disable=not progress):
        x_t_all = _sample_x_t(scheduler, x0_all, t, generator)
        for b in blocks:
            nats = _block_nats(model, scheduler, x0_all[b.start : b.stop], x_t_all[b.start : b.stop], t,
                               int(chain.prev_timestep[t]), num_bins, (device, model_dtype))  # fmt: skip
            terms[b.start : b.stop, k] = nats * to_bpd
    terms, decoder_index = gather_rows(shard, terms, blocks), int((seq == 0).nonzero()[0, 0])
    prior_bpd = prior_bpd.cpu()
    return dict(timesteps=seq, terms_bpd=terms, decoder_index=decoder_index, prior_bpd=prior_bpd,
                total_bpd=prior_bpd + terms.sum(1))  # fmt: skip


def _block_nats(model, scheduler, x0, x_t, t: int, prev: int, num_bins: int, runtime) -> torch.Tensor:
    """The bound's term at timestep ``t`` (from ``t`` to ``prev``) of one block of images, nats per image."""
    device, model_dtype = runtime
    x0, x_t = x0.to(device), x_t.to(device)
    t_batch = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
    out = call_model(model, x_t.to(model_dtype), t_batch).to(torch.float64)
    prev_batch = torch.full_like(t_batch, prev)
    return vb_term_nats(scheduler, out, x0, x_t, t_batch, prev_batch, num_bins=num_bins).flatten(1).sum(1).cpu()


def _checked_batch_size(scheduler, x_start, num_bins, batch_size, on_grid: bool = True) -> int:
    """``batch_size`` (default: every image at once) after checking it, η > 0 and the images (finite; with
    ``on_grid`` also in [-1, 1] on the grid of ``num_bins`` levels)."""
    if scheduler.config.eta == 0:
        raise ValueError(
            "the bound is not defined for eta=0 (DDIM): q_λ(x_prev|x_t, x_0) has λ = 0, a point mass, so each "
            "KL term is infinite; evaluate it with eta > 0 (eta=1: DDPM's posterior)"
        )
    if on_grid:
        _check_images(x_start, num_bins)
    elif not torch.is_tensor(x_start) or x_start.ndim != 4 or not torch.isfinite(x_start).all():
        raise ValueError("latents must be a finite 4-D tensor [N, C, H, W]")
    batch_size = x_start.shape[0] if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def _bound_sequence(num_train: int, timesteps):
    """(respaced chain, the timesteps in the order given) of the bound; default 0..T-1, and 0 (the decoder
    step) must be among them."""
    from ..schedulers.scheduling_ddpm_plus import respace

    if timesteps is None:
        timesteps = torch.arange(num_train)
    chain = respace(num_train, timesteps=timesteps, allow_increasing=True)  # validates the sequence
    if int(chain.timesteps[-1]) != 0:
        raise ValueError(
            f"timesteps must contain 0 (the decoder step); the smallest given is {int(chain.timesteps[-1])}"
        )
    return chain, torch.as_tensor(timesteps).reshape(-1).long().cpu()


def _sample_x_t(scheduler, x0_all: torch.Tensor, t: int, generator) -> torch.Tensor:
    """One x_t ~ q(x_t|x_0) per image (eq. (16)), float64 on CPU, the noise drawn from ``generator``."""
    abar = scheduler.alphas_cumprod[t].to(torch.float64)
    noise = torch.randn(x0_all.shape, generator=generator, dtype=torch.float64)
    return abar.sqrt() * x0_all + (1.0 - abar).sqrt() * noise


def bits_per_dim(
    model,
    scheduler,
    images: torch.Tensor,
    *,
    num_bins: int = 256,
    timesteps=None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Per-image bits/dim of the variational bound (float64 tensor [N]); see ``vlb_terms``.

    ``images`` are [N, C, H, W] in [-1, 1] on the grid of ``num_bins`` levels (256 for 8-bit data).
    """
    return vlb_terms(
        model,
        scheduler,
        images,
        timesteps=timesteps,
        num_bins=num_bins,
        generator=generator,
        batch_size=batch_size,
        progress=progress,
    )["total_bpd"]


class _WithClassLabel(torch.nn.Module):
    """``unet(x, t)`` of a class-conditional UNet with every image labelled ``class_id`` (for the bound)."""

    def __init__(self, unet, class_id: int):
        super().__init__()
        self.unet, self.class_id = unet, class_id

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, x, t):
        return self.unet(x, t, class_labels=torch.full((x.shape[0],), self.class_id, device=x.device))


def conditional_vlb_terms(unet, scheduler, images, class_ids, **kwargs) -> dict:
    """vlb_terms of -log p(x | c) with each image's own class id: one call per class, results in image order."""
    class_ids = np.asarray(class_ids)
    out = None
    shard, dealt = kwargs.pop("shard", None) or Shard(), 0
    for class_id in sorted(set(class_ids.tolist())):
        idx = torch.from_numpy(np.flatnonzero(class_ids == class_id))
        model = _WithClassLabel(unet, int(class_id))
        terms = vlb_terms(model, scheduler, images[idx], shard=shard.shifted(dealt), **kwargs)
        dealt += -(-len(idx) // (kwargs.get("batch_size") or len(idx)))  # the next class deals on from here
        if out is None:
            out = {k: terms[k] for k in ("timesteps", "decoder_index")}
            out["terms_bpd"] = torch.zeros(len(images), terms["terms_bpd"].shape[1], dtype=torch.float64)
            out["prior_bpd"] = torch.zeros(len(images), dtype=torch.float64)
            out["total_bpd"] = torch.zeros(len(images), dtype=torch.float64)
        for key in ("terms_bpd", "prior_bpd", "total_bpd"):
            out[key][idx] = terms[key]
    return out
