"""The reverse-process variance σ² of each :class:`VarianceType` for one step's coefficients (docs/math.md,
"Variances"): the fixed β̃' and β' columns, the learned log σ² (eq. (54)) and learned_range's interpolation
(eq. (55)), scaled by η² off the final step, and Analytic-DPM's optimal σ*² (Bao et al. 2022, Theorem 1).

Coefficients ``c`` are :class:`~ddpm_plus.schedulers.coefficients.StepCoefficients` as python floats or
tensors broadcastable against the sample; ``eta`` is the config's η.
"""

from __future__ import annotations

import math

import torch

from .arithmetic import compute_dtype
from .coefficients import StepCoefficients
from .options import VarianceType

__all__ = ["diffusers_variance", "learned_log_variance", "log_variance", "noise_std"]


def log_variance(kind: VarianceType, c: StepCoefficients, variance_output: torch.Tensor | None, dtype, eta):
    """log σ² of the step: a table column for the fixed and analytic types (python float or tensor), else
    from the model's ``variance_output`` (converted to ``dtype``)."""
    if kind.learned:
        return learned_log_variance(kind, c, variance_output.to(dtype), eta)
    if kind is VarianceType.ANALYTIC:  # Bao et al. 2022, Theorem 1
        return c.analytic_log_variance
    if kind.posterior:  # eqs. (52), (53); λ² = η²·β̃'
        return c.posterior_log_variance_clipped
    return c.large_log_variance_clipped


def learned_log_variance(kind: VarianceType, c: StepCoefficients, out: torch.Tensor, eta) -> torch.Tensor:
    """eq. (54) (the model outputs log σ²) or eq. (55) (Nichol & Dhariwal 2021, eq. 15: log σ² = f·log β'
    + (1 − f)·log β̃', clipped), the DDPM (η = 1) variance the model learned, times η² before a step
    that does not end at x_0 (Song et al. 2021, eq. (16): σ(η) = η·σ); η = 0: σ = 0 there."""
    if kind is VarianceType.LEARNED:
        log_var = out if eta in (0, 1) else out + c.log_eta_sq
    else:  # VarianceType.LEARNED_RANGE
        frac = (out + 1.0) / 2.0
        # with η ∉ {0, 1} posterior_log_variance_clipped already holds log(η²·β̃') (q_λ's variance)
        high = c.log_beta if eta in (0, 1) else c.log_beta + c.log_eta_sq
        log_var = frac * high + (1.0 - frac) * c.posterior_log_variance_clipped
    if eta == 0:
        log_var = torch.where(torch.as_tensor(c.prev_timestep, device=out.device) >= 0, -math.inf, log_var)
    return log_var


def noise_std(kind: VarianceType, c: StepCoefficients, log_var):
    """σ of the step: exp(log σ²/2) for a learned variance, else the table's σ column (the same number for
    python-float and tensor coefficients)."""
    if kind.learned:
        return torch.exp(0.5 * log_var)
    if kind is VarianceType.ANALYTIC:
        return c.analytic_std
    return c.posterior_std_clipped if kind.posterior else c.large_std_clipped


def diffusers_variance(kind: VarianceType, c: StepCoefficients, predicted_variance, eta) -> torch.Tensor:
    """What diffusers' ``DDPMScheduler._get_variance`` returns for ``kind``, with python-float coefficients:
    fixed_small β̃', fixed_small_log √β̃' (a standard deviation), fixed_large β', fixed_large_log log β',
    analytic σ*², learned the model output unchanged (η = 1), learned_range its log σ² (minimum: the clipped
    log β̃', not log 1e-20). With η ≠ 1: λ² = η²·β̃' and η²·β' (log_eta_sq = 0 at η = 1: the same numbers)."""
    if kind is VarianceType.FIXED_SMALL:
        value = c.posterior_variance
    elif kind is VarianceType.FIXED_SMALL_LOG:
        value = math.sqrt(c.posterior_variance)
    elif kind is VarianceType.FIXED_LARGE:
        value = c.beta * math.exp(c.log_eta_sq)
    elif kind is VarianceType.FIXED_LARGE_LOG:
        value = c.log_beta + c.log_eta_sq
    elif kind is VarianceType.ANALYTIC:
        value = math.exp(c.analytic_log_variance)
    elif kind is VarianceType.LEARNED and eta == 1:
        return predicted_variance
    else:
        pv = torch.as_tensor(predicted_variance)
        return learned_log_variance(kind, c, pv.to(compute_dtype(pv)), eta).to(pv.dtype)
    return torch.tensor(value, dtype=torch.float64)
