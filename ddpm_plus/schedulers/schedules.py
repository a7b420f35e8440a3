"""β schedules of the training chain (float64): linear, scaled_linear, cosine, sigmoid or trained β, and the
zero-terminal-SNR rescale. Every schedule is checked to give a strictly decreasing ᾱ_t ≥ MIN_ALPHA_BAR."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .options import BetaSchedule, SchedulerConfigError

__all__ = ["MIN_ALPHA_BAR", "cosine_alpha_bar_betas", "make_betas", "rescale_zero_terminal_snr"]

MIN_ALPHA_BAR = 1e-30  # smallest ᾱ_t (before a zero-SNR rescale): 1/√ᾱ and x̂_0 stay finite in float32


def cosine_alpha_bar_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008,
    β capped at 0.999."""
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift and scale √ᾱ so that ᾱ_T = 0 while keeping √ᾱ_1."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def make_betas(c: Mapping) -> np.ndarray:
    """The float64 β_1 … β_T of a validated scheduler config (before any zero-SNR rescale): ``trained_betas``
    or ``beta_schedule`` with ``beta_start``/``beta_end`` (scaled by 1000/T with
    ``rescale_betas_for_num_timesteps``). A :class:`SchedulerConfigError` for β outside (0, 1) or a ᾱ that
    underflows or stalls."""
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        return _checked_alphas(_trained_betas(c["trained_betas"], T), c)
    schedule = BetaSchedule(c["beta_schedule"])
    start, end = c["beta_start"], c["beta_end"]
    if schedule is BetaSchedule.LINEAR:
        scale = 1000.0 / T if c["rescale_betas_for_num_timesteps"] else 1.0
        if end * scale >= 1.0:
            raise SchedulerConfigError(
                "rescale_betas_for_num_timesteps",
                f"`rescale_betas_for_num_timesteps` with num_train_timesteps={T} scales beta_end to "
                f"{end * scale:.3g} >= 1; use more timesteps or a smaller beta_end.",
            )
        return _checked_alphas(np.linspace(start * scale, end * scale, T, dtype=np.float64), c)
    if schedule is BetaSchedule.SCALED_LINEAR:
        return _checked_alphas(np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2, c)
    if schedule is BetaSchedule.SQUAREDCOS_CAP_V2:
        return _checked_alphas(cosine_alpha_bar_betas(T), c)
    # BetaSchedule.SIGMOID (GeoDiff)
    return _checked_alphas(1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (end - start) + start, c)


def _trained_betas(trained_betas, T: int) -> np.ndarray:
    try:
        betas = np.asarray(trained_betas, dtype=np.float64)
    except (TypeError, ValueError):
        raise SchedulerConfigError(
            "trained_betas",
            f"`trained_betas` must be a sequence of num_train_timesteps={T} numbers; got {type(trained_betas).__name__}.",
        ) from None
    if betas.shape != (T,) or not np.all((betas > 0) & (betas < 1)):
        got = f" with range [{betas.min():.3g}, {betas.max():.3g}]" if betas.size else ""
        raise SchedulerConfigError(
            "trained_betas",
            f"`trained_betas` must hold num_train_timesteps={T} values in (0, 1); got shape {betas.shape}{got}.",
        )
    return betas


def _checked_alphas(betas: np.ndarray, c: Mapping) -> np.ndarray:
    """``betas`` if ᾱ_t = ∏(1 − β) is strictly decreasing (every β ≥ 1.1e-16: 1 − β < 1 in float64) and
    ᾱ_T >= MIN_ALPHA_BAR, else an error naming the schedule's arguments. Below that ᾱ underflows towards 0
    and 1/√ᾱ_t, x̂_0 and the zero-SNR rescale overflow or divide 0 by 0."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    trained = c["trained_betas"] is not None
    ranged = not trained and BetaSchedule(c["beta_schedule"]) is not BetaSchedule.SQUAREDCOS_CAP_V2
    source = "trained_betas" if trained else f"beta_schedule={c['beta_schedule']!r}"
    if ranged:
        source += f" with beta_start={c['beta_start']!r}, beta_end={c['beta_end']!r}"
    T = c["num_train_timesteps"]
    if not alphas_cumprod[-1] >= MIN_ALPHA_BAR:
        raise SchedulerConfigError(
            "trained_betas" if trained else ("beta_end", "num_train_timesteps"),
            f"{source} and num_train_timesteps={T} give ᾱ_T = {alphas_cumprod[-1]:.3g} < {MIN_ALPHA_BAR:g} "
            "(the signal underflows; 1/√ᾱ_t overflows): lower `beta_end` or `num_train_timesteps`, or use "
            "rescale_betas_zero_snr=True for an exactly zero terminal SNR.",
        )
    if T > 1 and not np.all(np.diff(alphas_cumprod) < 0):
        first = int(np.flatnonzero(np.diff(alphas_cumprod) >= 0)[0]) + 1
        raise SchedulerConfigError(
            "trained_betas" if trained else ("beta_start" if ranged else "num_train_timesteps"),
            f"{source} gives β_{first + 1} = {betas[first]:.3g}, too small to change ᾱ in float64 "
            "(`trained_betas`/`beta_start` must be >= 1.1e-16).",
        )
    return betas
