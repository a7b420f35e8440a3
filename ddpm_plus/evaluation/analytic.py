"""Analytic-DPM's moment table: Γ_t = E‖ε_θ(x_t, t)‖²/d (Bao, Li, Zhu, Zhang, ICLR 2022).

For a model trained with fixed variances, the reverse variance that minimises each term of the bound has
a closed form in one statistic of the model (Bao et al. 2022, Theorem 1): with the reverse family q_λ of
DDIM (λ² = η²·β̃', Song et al. 2021, eq. (16)),

    σ*² = λ² + (√(β̄_t/α') − √(β̄_prev − λ²))²·(1 − Γ_t),   β̄ = 1 − ᾱ, α' = ᾱ_t/ᾱ_prev,

where (β̄_t/ᾱ_t)(1 − Γ_t) is Var(x_0|x_t) averaged over pixels (clipped to [0, ((b − a)/2)²] for data in
[a, b], their Theorem 2). :func:`estimate_analytic_moments` estimates Γ_t by Monte Carlo over training
images; ``DDPMPlusScheduler(variance_type="analytic", analytic_moments=Γ)`` uses it.

The ε of any parameterisation is used (x_0- and v-models are converted with docs/math.md eqs. (32), (47)).
The estimate is unbiased for each t (one x_t ~ q(x_t|x_0) per image and timestep, eq. (16)); its Monte
Carlo standard error is about √(2/d)·√(1/N) for N images of d dimensions where Γ_t ≈ 1 (the spread of
‖ε‖²/d), e.g. 0.0056 for the 8×8 digits and N = 1,000. With ``num_timesteps=K`` only K evenly spaced
timesteps (0 and T−1 included) are evaluated and Γ is linearly interpolated in between; its error is
measured in the README ("Few-step sampling: DDIM and Analytic-DPM").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..pipelines.pipeline_ddpm_plus import is_class_conditional
from ..schedulers.coefficients import gaussian_analytic_moments
from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler, respace
from .distributed import Shard, gather_rows
from .likelihood import call_model, model_device_dtype

__all__ = ["estimate_analytic_moments", "gaussian_analytic_moments"]


def _is_class_conditional(model) -> bool:
    """A UNet2DModel (or any model with a diffusers config) that takes class labels."""
    config = getattr(model, "config", None)
    return config is not None and is_class_conditional(config)


@torch.no_grad()
def estimate_analytic_moments(
    unet: Callable | torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    num_timesteps: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = True,
    *,
    class_labels: torch.Tensor | None = None,
    timesteps=None,
    return_stderr: bool = False,
    shard: Shard | None = None,
):
    """Γ_t = E‖ε_θ(x_t, t)‖²/d over ``images`` for t = 0 … T−1, as a float64 tensor of shape [T].

    unet: a ``UNet2DModel`` or any callable ``unet(x, t)`` returning a tensor or an object with ``.sample``
        (learned-variance outputs: the prediction channels are used). It runs under ``no_grad`` in its
        own dtype on its own device.
    scheduler: the model's scheduler (any config ``DDPMPlusScheduler`` accepts; diffusers' included).
    images: [N, C, H, W] in [−1, 1] (the training images, or a sample of them).
    num_timesteps: None (every timestep) or K ≥ 2: Γ at K evenly spaced timesteps, linearly interpolated.
    timesteps: instead, the timesteps to evaluate (0 and T−1 are added), interpolated in between: e.g.
        every t < 50 and every 10th above, where Γ of quantised data changes fastest near t = 0.
    generator: a CPU generator for the noise; the draws do not depend on ``batch_size``.
    class_labels: [N] labels of the images, passed to the model as ``class_labels=`` (required by a
        class-conditional UNet: Γ is then averaged over the images with their own labels).
    return_stderr: also return the Monte Carlo standard error of each entry (NaN where interpolated).
    shard: this process's share (evaluation/distributed.py): it runs the model on its blocks of ``batch_size``
        images, every process draws all the noise, and the norms are gathered: Γ is the same for any number
        of processes.
    """
    scheduler = DDPMPlusScheduler.from_config(scheduler.config, variance_type="fixed_small", analytic_moments=None)
    T = int(scheduler.config.num_train_timesteps)
    x0_all, class_labels = _checked_images(unet, images, batch_size, class_labels)
    timesteps = _evaluated_timesteps(T, num_timesteps, timesteps)
    device, dtype = model_device_dtype(unet, images.device)
    n, shard = x0_all.shape[0], shard or Shard()
    blocks = shard.blocks(n, batch_size)
    all_norms = torch.zeros(len(timesteps), n, dtype=torch.float64)
    iterator = enumerate(timesteps.tolist())
    if progress:
        iterator = tqdm(iterator, total=len(timesteps), desc="analytic moments", unit="t", leave=False)
    for k, t in iterator:
        all_norms[k] = _squared_norms(unet, scheduler, x0_all, t, class_labels, blocks, generator, (device, dtype))
    all_norms = gather_rows(shard, all_norms, blocks, dim=1)
    mean, stderr = np.empty(len(timesteps)), np.empty(len(timesteps))
    for k, norms in enumerate(all_norms):
        mean[k] = float(norms.mean())
        stderr[k] = float(norms.std() / math.sqrt(n)) if n > 1 else math.nan
    gamma = np.interp(np.arange(T), timesteps, mean)
    if not return_stderr:
        return torch.from_numpy(gamma)
    full_stderr = np.full(T, np.nan)
    full_stderr[timesteps] = stderr
    return torch.from_numpy(gamma), torch.from_numpy(full_stderr)


def _checked_images(unet, images, batch_size, class_labels):
    """(the images as float64 on CPU, the class labels as int64 or None) after checking them and
    ``batch_size``; a class-conditional UNet needs the labels."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty 4-D tensor [N, C, H, W]; got {getattr(images, 'shape', images)}")
    x0_all = images.detach().to("cpu", torch.float64)
    if not torch.isfinite(x0_all).all():
        raise ValueError("images must be finite (in [-1, 1])")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if class_labels is None and _is_class_conditional(unet):
        raise ValueError("this UNet is class-conditional: pass the images' `class_labels` (Γ is averaged over them)")
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels).reshape(-1).long()
        if class_labels.shape[0] != x0_all.shape[0]:
            raise ValueError(f"class_labels has {class_labels.shape[0]} entries for {x0_all.shape[0]} images")
    return x0_all, class_labels


def _evaluated_timesteps(T: int, num_timesteps, timesteps) -> np.ndarray:
    """The ascending timesteps at which Γ is estimated: every one, ``num_timesteps`` evenly spaced, or the
    given ``timesteps`` with 0 and T−1 added."""
    if timesteps is not None:
        if num_timesteps is not None:
            raise ValueError("pass at most one of num_timesteps and timesteps")
        chosen = respace(T, timesteps=timesteps, allow_increasing=True).timesteps  # validates them
        return np.union1d(chosen, [0, T - 1])
    if num_timesteps is None:
        return np.arange(T)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or not 2 <= num_timesteps <= T:
        raise ValueError(f"num_timesteps must be None or an integer in [2, {T}]; got {num_timesteps!r}")
    return respace(T, num_timesteps, timestep_spacing="linspace").timesteps[::-1].copy()


def _squared_norms(unet, scheduler, x0_all, t: int, class_labels, blocks: list[range], generator, runtime):
    """‖ε_θ(x_t, t)‖²/d of one x_t ~ q(x_t|x_0) per image (eq. (16)), float64, on the images of ``blocks``
    (0 elsewhere; the noise is drawn for every image); the model runs per block on its ``runtime``."""
    device, dtype = runtime
    ab = float(scheduler.alphas_cumprod[t])
    noise = torch.randn(x0_all.shape, generator=generator, dtype=torch.float64)
    x_t_all = math.sqrt(ab) * x0_all + math.sqrt(1.0 - ab) * noise  # eq. (16)
    norms = torch.zeros(x0_all.shape[0], dtype=torch.float64)
    for block in blocks:
        start = block.start
        x_t = x_t_all[start : block.stop]
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=device)
        if class_labels is None:
            out = call_model(unet, x_t.to(device, dtype), t_batch)
        else:
            labels = class_labels[start : block.stop].to(device)
            out = call_model(
                lambda x, s, labels=labels: unet(x, s, class_labels=labels), x_t.to(device, dtype), t_batch
            )
        # ε̂ of any parameterisation, float64: eq. (32) inverted for an x_0-model, eq. (47) for a v-model
        eps = scheduler.predict_epsilon(out.to("cpu", torch.float64), x_t, t)
        norms[start : start + x_t.shape[0]] = eps.flatten(1).pow(2).sum(1) / x0_all[0].numel()
    return norms
