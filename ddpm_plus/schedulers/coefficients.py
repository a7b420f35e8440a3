"""The float64 coefficient algebra: pure functions of an ᾱ table (no scheduler state, no torch arithmetic).

Equation numbers are those of ``docs/math.md``. Tables are 0-based as in diffusers: index ``i`` is the
paper's t = i + 1, and the "previous" of index 0 is ᾱ_0 := 1 (written as timestep ``-1`` below). All
coefficients of a step come from one formula set, :func:`coefficient_table`; Analytic-DPM's optimal
variance from :func:`analytic_log_variance`, and the closed-form Γ of Gaussian data from
:func:`gaussian_analytic_moments`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "ANALYTIC_DECODER_MIN_VARIANCE",
    "INT_FIELDS",
    "StepCoefficients",
    "analytic_log_variance",
    "coefficient_table",
    "gaussian_analytic_moments",
    "rows",
    "to_torch",
]


class StepCoefficients(NamedTuple):
    """Coefficients of reverse steps ``timestep -> prev_timestep`` (``-1``: the step ends at x_0), one entry
    per step, with β' = 1 − ᾱ_t/ᾱ_prev of the pair (docs/math.md eq. (56); β' = β_t on the full chain).

    From :meth:`DDPMPlusScheduler.coefficients` / :meth:`~DDPMPlusScheduler.step_coefficients`: int64
    (timesteps) and float64 tensors. ``posterior_log_variance_clipped`` is log β̃' except where β̃' = 0 (a
    step ending at x_0), where it is log β̃ of the pair (next_timestep -> timestep) (Nichol & Dhariwal 2021),
    or log β' if there is no next timestep.

    With ``eta`` ≠ 1 the "posterior" columns are those of the reverse family q_λ(x_prev | x_t, x_0) of
    DDIM (Song et al. 2021, eqs. (7), (12), (16)) with λ² = η²·β̃' (η = 1: the DDPM posterior, η = 0: DDIM):
    mean coef1·x_0 + coef2·x_t with coef2 = √(1 − ᾱ_prev − λ²)/√(1 − ᾱ_t), coef1 = √ᾱ_prev − coef2·√ᾱ_t,
    variance λ²; fixed_large's variance is η²·β'. The step to x_0 is the same for every η.
    """

    timestep: Any
    prev_timestep: Any
    sqrt_alpha_prod: Any  # √ᾱ_t
    sqrt_one_minus_alpha_prod: Any  # √(1 − ᾱ_t)
    sqrt_recip_alpha_prod: Any  # 1/√ᾱ_t
    posterior_mean_coef1: Any  # μ̃ = coef1·x_0 + coef2·x_t, eqs. (30), (58)
    posterior_mean_coef2: Any
    posterior_variance: Any  # β̃' = β'(1 − ᾱ_prev)/(1 − ᾱ_t), eqs. (30), (58)
    posterior_log_variance_clipped: Any  # fixed_small; learned_range's minimum
    beta: Any  # β'
    log_beta: Any  # log β': learned_range's maximum
    large_log_variance_clipped: Any  # fixed_large: log β', clipped like the posterior at a step to x_0
    posterior_std_clipped: Any  # σ of fixed_small: exp(posterior_log_variance_clipped / 2)
    large_std_clipped: Any  # σ of fixed_large: exp(large_log_variance_clipped / 2)
    log_eta_sq: Any  # log η² where the step does not end at x_0, else 0: scales learned variances
    analytic_log_variance: Any  # log σ*² (Bao et al. 2022, Theorem 1); NaN without `analytic_moments`
    analytic_std: Any  # σ*


INT_FIELDS = ("timestep", "prev_timestep")
ANALYTIC_DECODER_MIN_VARIANCE = 1e-12  # σ ≥ 1e-6 at the step to x_0: far below any bin of ≤ 16-bit data


def coefficient_table(alphas_cumprod: np.ndarray, t, prev, nxt, eta=1.0, moments=None, x0_var_max=1.0):
    """The one formula set: float64 :class:`StepCoefficients` of the steps t -> prev (prev = -1: to x_0).
    ``nxt`` (the timestep above t, -1: none) only sets the clipped log-variance of a step ending at x_0;
    ``eta`` picks the reverse family q_λ, ``moments`` (Γ, length T, or None) the analytic variance, whose
    Var(x_0|x_t) is clipped to [0, ``x0_var_max``]."""
    t, prev, nxt = (np.asarray(a, dtype=np.int64) for a in (t, prev, nxt))
    ab_t = alphas_cumprod[t]
    ab_p = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], 1.0)
    ab_n = np.where(nxt >= 0, alphas_cumprod[np.maximum(nxt, 0)], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # ᾱ_T = 0 (zero SNR): 1/√ᾱ_T = inf
        beta = 1.0 - ab_t / ab_p  # β', eq. (56)
        var = beta * (1.0 - ab_p) / (1.0 - ab_t)  # β̃', eqs. (30), (58)
        var_next = (1.0 - ab_n / ab_t) * (1.0 - ab_t) / (1.0 - ab_n)  # β̃ of (nxt -> t): clip, eq. (53)
        log_beta = np.log(beta)
        clip = np.where(nxt >= 0, np.log(np.where(nxt >= 0, var_next, 1.0)), log_beta)
        if eta == 1.0:  # the DDPM posterior, eq. (30) (kept as is: bit-identical to the η-free code)
            coef1 = np.sqrt(ab_p) * beta / (1.0 - ab_t)
            coef2 = np.sqrt(ab_t / ab_p) * (1.0 - ab_p) / (1.0 - ab_t)
            log_eta_sq = np.zeros_like(beta)
        else:  # q_λ, λ² = η²·β̃', docs/math.md eqs. (73)-(74); prev = -1 gives λ = 0, coef1 = 1, coef2 = 0
            var = eta**2 * var
            coef2 = np.sqrt(np.maximum(1.0 - ab_p - var, 0.0)) / np.sqrt(1.0 - ab_t)
            coef1 = np.sqrt(ab_p) - coef2 * np.sqrt(ab_t)
            log_eta_sq = np.where(prev >= 0, 2.0 * np.log(eta), 0.0)
        log_small = np.where(prev >= 0, np.log(np.where(prev >= 0, var, 1.0)), clip)
        log_large = np.where(prev >= 0, log_beta + log_eta_sq, clip)
        log_analytic = analytic_log_variance(ab_t, t, prev, coef1, var, moments, x0_var_max)
        return StepCoefficients(
            timestep=t,
            prev_timestep=prev,
            sqrt_alpha_prod=np.sqrt(ab_t),
            sqrt_one_minus_alpha_prod=np.sqrt(1.0 - ab_t),
            sqrt_recip_alpha_prod=1.0 / np.sqrt(ab_t),
            posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2,
            posterior_variance=var,
            posterior_log_variance_clipped=log_small,
            beta=beta,
            log_beta=log_beta,
            large_log_variance_clipped=log_large,
            posterior_std_clipped=np.exp(0.5 * log_small),
            large_std_clipped=np.exp(0.5 * log_large),
            log_eta_sq=log_eta_sq,
            analytic_log_variance=log_analytic,
            analytic_std=np.exp(0.5 * log_analytic),
        )


def analytic_log_variance(ab_t, t, prev, coef1, lam2, moments, x0_var_max) -> np.ndarray:
    """log σ*² = log(λ² + coef1²·Var(x_0|x_t)) with Var(x_0|x_t) = (1 − ᾱ_t)/ᾱ_t·(1 − Γ_t) clipped to
    [0, x0_var_max] (docs/math.md eqs. (75)-(76); Bao et al. 2022, Theorems 1 and 2). The paper's form
    λ² + (√(β̄_t/α') − √(β̄_prev − λ²))²·(1 − Γ_t), α' = ᾱ_t/ᾱ_prev, is the same number: coef1²·β̄_t/ᾱ_t =
    (√(β̄_t/α') − √(β̄_prev − λ²))². At ᾱ_t = 0 (zero SNR) Var(x_0|x_t) = Var(x_0) is taken as the maximum.
    At a step to x_0 (λ = 0: σ*² = Var(x_0|x_t)) σ*² is floored at ANALYTIC_DECODER_MIN_VARIANCE: an
    estimate Γ_t ≥ 1 (Monte Carlo error where x_t nearly determines x_0) would make the decoder a point
    mass; its discretised likelihood is then ≈ 1 whenever x̂_0 falls in x_0's bin. NaN without ``moments``."""
    if moments is None:
        return np.full(np.shape(t), np.nan)
    gamma = np.asarray(moments, dtype=np.float64)[t]
    x0_var = np.clip((1.0 - ab_t) / ab_t * (1.0 - gamma), 0.0, x0_var_max)
    x0_var = np.where(ab_t > 0, x0_var, x0_var_max)
    var = lam2 + coef1**2 * x0_var
    return np.log(np.where(prev >= 0, var, np.maximum(var, ANALYTIC_DECODER_MIN_VARIANCE)))


def gaussian_analytic_moments(alphas_cumprod, s: float) -> np.ndarray:
    """Γ_t in closed form for x_0 ~ N(μ, s²I) and the exact ε model: (1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t) (float64).

    E[ε|x_t] = √(1−ᾱ_t)(x_t − √ᾱ_t μ)/D_t with D_t = ᾱ_t s² + 1 − ᾱ_t, so E‖E[ε|x_t]‖²/d = (1 − ᾱ_t)/D_t."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    return (1.0 - ab) / (ab * s * s + 1.0 - ab)


def rows(table: StepCoefficients, index) -> StepCoefficients:
    """The entries ``index`` of every column of a numpy table."""
    return StepCoefficients(*(np.asarray(col[index]) for col in table))


def to_torch(c: StepCoefficients, device=None) -> StepCoefficients:
    """numpy columns -> int64 (timesteps) and float64 tensors."""
    return StepCoefficients(
        *(
            torch.from_numpy(np.array(v, dtype=np.int64 if k in INT_FIELDS else np.float64)).to(device)
            for k, v in zip(c._fields, c, strict=True)
        )
    )
