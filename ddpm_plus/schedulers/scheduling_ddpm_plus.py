"""DDPMPlusScheduler: the DDPM forward process, posterior and ancestral sampler, exactly.

Equation numbers are those of ``docs/math.md``. Tables are 0-based as in diffusers: index ``i`` is the
paper's t = i + 1, and the "previous" of index 0 is ᾱ_0 := 1 (written as timestep ``-1`` below).

All coefficients come from one float64 formula set (:func:`_coefficient_table`). The arithmetic applied to
a sample runs in float32 (float64 for float64 samples) whatever the sample dtype; results come back in the
sample's dtype. Only :meth:`DDPMPlusScheduler.step` (and what diffusers defines on the sampling sequence:
``timesteps``, ``num_inference_steps``, ``previous_timestep``, ``_get_variance``, ``step_coefficients``)
depends on ``set_timesteps``; every other method is a pure function of the config and its arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "DDPMPlusScheduler",
    "DDPMPlusSchedulerOutput",
    "PMeanVariance",
    "Respacing",
    "StepCoefficients",
    "respace",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# Sampling-only: Analytic-DPM's optimal variance (Bao et al. 2022, Theorem 1) from the ``analytic_moments``
# table; a model is trained with one of VARIANCE_TYPES (the types diffusers' DDPMScheduler knows).
ANALYTIC_VARIANCE_TYPE = "analytic"
ALL_VARIANCE_TYPES = VARIANCE_TYPES + (ANALYTIC_VARIANCE_TYPE,)
MISSING_MOMENTS_HINT = (
    "variance_type='analytic' needs the table `analytic_moments` (Γ_t = E‖ε_θ(x_t, t)‖²/d for t = 0 … T−1) "
    "in the scheduler config. Make it with `ddpm-plus analytic PIPELINE --dataset digits --num_images M "
    "--output_dir OUT` (writes a pipeline that uses it), or in Python: "
    "`moments = ddpm_plus.estimate_analytic_moments(unet, scheduler, images)` and then "
    "`DDPMPlusScheduler.from_config(scheduler.config, variance_type='analytic', analytic_moments=moments.tolist())`."
)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass
class DDPMPlusSchedulerOutput(BaseOutput):
    """Output of :meth:`DDPMPlusScheduler.step`.

    prev_sample: x at the previous timestep of the sequence, to be fed back into the model.
    pred_original_sample: the model's x̂_0 (docs/math.md eq. (32)), clipped/thresholded if configured.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class PMeanVariance(NamedTuple):
    """The model's reverse distribution p(x_prev | x_t) = N(mean, variance) and its x̂_0."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_original_sample: torch.Tensor


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


_INT_FIELDS = ("timestep", "prev_timestep")


class Respacing(NamedTuple):
    """A sampling sequence and its neighbours (from :func:`respace`).

    timesteps: the sequence, strictly descending int64. prev_timestep / next_timestep: int64 arrays of
    length T; entry t is the next lower / higher timestep of the sequence (-1: none), for every t.
    """

    timesteps: np.ndarray
    prev_timestep: np.ndarray
    next_timestep: np.ndarray


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def _check_spacing(timestep_spacing: str, steps_offset: int) -> None:
    _one_of("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"`steps_offset` must be an integer >= 0; got {steps_offset!r}.")


MAX_NUM_TRAIN_TIMESTEPS = 100_000  # the float64 tables take a few hundred bytes per timestep
MIN_ALPHA_BAR = 1e-30  # smallest ᾱ_t (before a zero-SNR rescale): 1/√ᾱ and x̂_0 stay finite in float32


def _is_real(value) -> bool:
    """A finite int/float (numpy scalars included), not a bool."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(float(value))
    )


def _real(name: str, value, lo: float, hi: float, lo_open: bool = True, hi_open: bool = True) -> float:
    """``value`` as a float in the interval (lo, hi) (closed ends where asked), else a ValueError naming it."""
    ok = _is_real(value)
    v = float(value) if ok else math.nan
    if not (ok and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"`{name}` must be a finite number in {interval}; got {value!r}.")
    return v


def _flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")


def _integral(name: str, values: np.ndarray) -> np.ndarray:
    """int64 values of a numeric array whose entries are whole numbers, else a ValueError naming it."""
    if values.dtype == np.bool_ or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise ValueError(f"`{name}` must hold integer timesteps; got dtype {values.dtype}.")
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise ValueError(f"`{name}` must hold integer timesteps; got {values.tolist()!r}.")
    return values.astype(np.int64)


def _spaced(T: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Exactly ``n`` distinct descending timesteps in [0, T-1] (diffusers' conventions, defects removed)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise ValueError(f"`num_inference_steps` must be an integer in [1, {T}] (num_train_timesteps={T}); got {n!r}.")
    n = int(n)
    if spacing == "linspace":
        if n == 1:  # diffusers gives t = 0: one step from pure noise at the least noisy timestep
            return np.array([T - 1], dtype=np.int64)
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        seq = np.arange(n, dtype=np.int64) * (T // n) + steps_offset
        # With steps_offset > 0 and n = T the top step would be T: lower the offset to stay in range.
        return (seq - max(0, int(seq[-1]) - (T - 1)))[::-1].copy()
    # "trailing": T-1, T-1-T/n, ...; diffusers' float arange can produce n+1 steps ending at -1: keep n.
    return (np.round(np.arange(T, 0, -T / n)[:n]) - 1).astype(np.int64)


def _custom(timesteps, T: int, allow_increasing: bool) -> np.ndarray:
    """A user sequence, validated (1-D integers in [0, T-1], strictly monotone), as descending int64."""
    raw = timesteps.detach().cpu().numpy() if isinstance(timesteps, torch.Tensor) else timesteps
    seq = np.asarray(raw, dtype=np.float64) if np.ndim(raw) else np.asarray([raw], dtype=np.float64)
    if seq.ndim != 1 or seq.size == 0:
        raise ValueError(f"`timesteps` must be a non-empty 1-D sequence of integers; got shape {seq.shape}.")
    if np.any(seq != np.round(seq)):
        raise ValueError(f"`timesteps` must be integers; got {timesteps!r}.")
    d = np.diff(seq)
    if not (np.all(d < 0) or (allow_increasing and np.all(d > 0))):
        order = "strictly increasing or strictly decreasing" if allow_increasing else "strictly descending"
        raise ValueError(f"`timesteps` must be {order}; got {timesteps!r}.")
    if seq.max() > T - 1 or seq.min() < 0:
        raise ValueError(f"`timesteps` must lie in [0, {T - 1}] (num_train_timesteps={T}); got {timesteps!r}.")
    return np.sort(seq.astype(np.int64))[::-1].copy()


def respace(
    num_train_timesteps: int,
    num_inference_steps: int | None = None,
    *,
    timesteps=None,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    allow_increasing: bool = False,
) -> Respacing:
    """The one respacing function: ``num_inference_steps`` spaced by ``timestep_spacing`` (exactly that many
    distinct timesteps in [0, T-1]) or custom ``timesteps`` (strictly descending; either order with
    ``allow_increasing``), with every timestep's neighbours in the sequence. Used by the scheduler's
    ``set_timesteps``, by ``ddpm_plus.likelihood`` and by the CLI."""
    T = int(num_train_timesteps)
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("Pass exactly one of `num_inference_steps` or `timesteps`.")
    if timesteps is not None:
        seq = _custom(timesteps, T, allow_increasing)
    else:
        _check_spacing(timestep_spacing, steps_offset)
        seq = _spaced(T, num_inference_steps, timestep_spacing, int(steps_offset))
    ascending = seq[::-1]
    t = np.arange(T)
    below = np.searchsorted(ascending, t, side="left") - 1
    above = np.searchsorted(ascending, t, side="right")
    prev = np.where(below >= 0, ascending[np.maximum(below, 0)], -1)
    nxt = np.where(above < len(seq), ascending[np.minimum(above, len(seq) - 1)], -1)
    return Respacing(seq, prev.astype(np.int64), nxt.astype(np.int64))


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


def _coefficient_table(alphas_cumprod: np.ndarray, t, prev, nxt, eta=1.0, moments=None, x0_var_max=1.0):
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
        log_analytic = _analytic_log_variance(ab_t, t, prev, coef1, var, moments, x0_var_max)
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


ANALYTIC_DECODER_MIN_VARIANCE = 1e-12  # σ ≥ 1e-6 at the step to x_0: far below any bin of ≤ 16-bit data


def _analytic_log_variance(ab_t, t, prev, coef1, lam2, moments, x0_var_max) -> np.ndarray:
    """log σ*² = log(λ² + coef1²·Var(x_0|x_t)) with Var(x_0|x_t) = (1 − ᾱ_t)/ᾱ_t·(1 − Γ_t) clipped to
    [0, x0_var_max] (docs/math.md eqs. (75)-(76); Bao et al. 2022, Theorems 1 and 2). The paper's form
    λ² + (√(β̄_t/α') − √(β̄_prev − λ²))²·(1 − Γ_t), α' = ᾱ_t/ᾱ_prev, is the same number: coef1²·β̄_t/ᾱ_t =
    (√(β̄_t/α') − √(β̄_prev − λ²))². At ᾱ_t = 0 (zero SNR) Var(x_0|x_t) = Var(x_0) is taken as the maximum.
    At a step to x_0 (λ = 0: σ*² = Var(x_0|x_t)) σ*² is floored at ANALYTIC_DECODER_MIN_VARIANCE: an
    estimate Γ_t ≥ 1 (Monte Carlo error where x_t nearly determines x_0) would make the decoder a point
    mass; its discretised likelihood is then ≈ 1 whenever x̂_0 falls in x_0's bin."""
    if moments is None:
        return np.full(np.shape(t), np.nan)
    gamma = np.asarray(moments, dtype=np.float64)[t]
    x0_var = np.clip((1.0 - ab_t) / ab_t * (1.0 - gamma), 0.0, x0_var_max)
    x0_var = np.where(ab_t > 0, x0_var, x0_var_max)
    var = lam2 + coef1**2 * x0_var
    return np.log(np.where(prev >= 0, var, np.maximum(var, ANALYTIC_DECODER_MIN_VARIANCE)))


def _rows(table: StepCoefficients, index) -> StepCoefficients:
    return StepCoefficients(*(np.asarray(col[index]) for col in table))


def _to_torch(c: StepCoefficients, device=None) -> StepCoefficients:
    """numpy columns -> int64 (timesteps) and float64 tensors."""
    return StepCoefficients(
        *(
            torch.from_numpy(np.array(v, dtype=np.int64 if k in _INT_FIELDS else np.float64)).to(device)
            for k, v in zip(c._fields, c, strict=True)
        )
    )


class DDPMPlusScheduler(SchedulerMixin, ConfigMixin):
    """Exact DDPM scheduler (Ho et al. 2020) with improved-DDPM variances and exact respacing.

    Config keys and defaults are those of diffusers' ``DDPMScheduler``, so configs swap both ways with
    every Karras-compatible diffusers scheduler. These keys are new:

    rescale_betas_for_num_timesteps: scale the linear β range by 1000/T (improved-DDPM convention) so
        that a chain with T != 1000 steps still ends near N(0, I). Off by default (diffusers' numbers).
        The saved config holds the scaled beta_start/beta_end (and the flag reset to False).
    eta: the reverse family q_λ between consecutive timesteps, λ² = η²·β̃' (Song et al. 2021, eq. (16)):
        1 (default) the DDPM posterior, 0 DDIM (deterministic steps), in between an interpolation. η scales
        the standard deviation of every variance type except ``analytic``, which is optimal for each η.
    analytic_moments: Γ_t = E‖ε_θ(x_t, t)‖²/d for t = 0 … T−1 (:func:`ddpm_plus.estimate_analytic_moments`),
        needed by ``variance_type="analytic"``: Analytic-DPM's optimal reverse variance (Bao et al. 2022,
        Theorem 1), with Var(x_0|x_t) clipped to [0, clip_sample_range²] (data in
        [−clip_sample_range, clip_sample_range]). Stored in the config, so saved and pushed with it.

    Differences from ``DDPMScheduler`` are listed in the README ("Differences from diffusers'
    DDPMScheduler"). Coefficients: :meth:`coefficients` (full chain, or any pair) and
    :meth:`step_coefficients` (the current sampling sequence); the step formula: :meth:`ancestral_step`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        rescale_betas_for_num_timesteps: bool = False,
        eta: float = 1.0,
        analytic_moments: np.ndarray | list[float] | None = None,
    ):
        self._validate_config()
        if type(eta) is not float:  # a JSON-ready python float (validated above)
            self.register_to_config(eta=float(eta))
        if analytic_moments is not None:  # JSON-ready floats, whatever was passed (tensor, array, list)
            self.register_to_config(analytic_moments=[float(g) for g in np.asarray(analytic_moments).reshape(-1)])
        betas = self._make_betas()
        if rescale_betas_for_num_timesteps:
            # Record the resulting β range instead of the flag, so that every scheduler built from this
            # config (diffusers' included, which do not know the flag) gets the same schedule.
            defaults_used = [
                k for k in self.config.get("_use_default_values", []) if k not in ("beta_start", "beta_end")
            ]
            self.register_to_config(
                beta_start=float(betas[0]),
                beta_end=float(betas[-1]),
                rescale_betas_for_num_timesteps=False,
                _use_default_values=defaults_used,
            )
        # diffusers drops a config's keys unknown to another scheduler silently only when the config names
        # its class; a saved config always does, an in-memory one only with this entry.
        self.register_to_config(_class_name=type(self).__name__)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self._init_tables(betas)

    def _init_tables(self, betas: np.ndarray) -> None:
        """Float64 tables of the full training chain; index i = the paper's t = i + 1."""
        T = self.config.num_train_timesteps
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)  # ᾱ_t = α_1·…·α_t
        self._alphas_cumprod_np = alphas_cumprod
        self.betas = torch.from_numpy(betas)
        self.alphas = torch.from_numpy(alphas)
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)
        self.alphas_cumprod_prev = torch.from_numpy(np.concatenate([[1.0], alphas_cumprod[:-1]]))  # ᾱ_0 = 1
        self.one = torch.tensor(1.0, dtype=torch.float64)
        self.init_noise_sigma = 1.0
        t = np.arange(T)
        self._full = self._table(t, t - 1, np.where(t + 1 < T, t + 1, -1))
        self._full_rows: dict = {}  # timestep -> python-float row of self._full (a cache, same numbers)
        self._forward_cache: dict = {}  # (device, dtype) -> (√ᾱ, √(1−ᾱ)) for add_noise
        # Posterior q(x_{t-1} | x_t, x_0) of the training chain (eq. (30)).
        self.posterior_variance = torch.from_numpy(self._full.posterior_variance)
        self.posterior_log_variance_clipped = torch.from_numpy(self._full.posterior_log_variance_clipped)
        self.posterior_mean_coef1 = torch.from_numpy(self._full.posterior_mean_coef1)  # multiplies x_0
        self.posterior_mean_coef2 = torch.from_numpy(self._full.posterior_mean_coef2)  # multiplies x_t
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_sequence(respace(T, timesteps=t[::-1]), device=None)

    # ------------------------------------------------------------------ construction
    def _validate_config(self) -> None:
        c = self.config
        T = c.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"`num_train_timesteps` must be an integer in [1, {MAX_NUM_TRAIN_TIMESTEPS}] (its float64 tables "
                f"take a few hundred bytes per timestep); got {T!r}."
            )
        for flag in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "rescale_betas_for_num_timesteps"):
            _flag(flag, c[flag])
        _one_of("variance_type", c.variance_type, ALL_VARIANCE_TYPES)
        _one_of("prediction_type", c.prediction_type, PREDICTION_TYPES)
        _check_spacing(c.timestep_spacing, c.steps_offset)
        if c.trained_betas is None:
            _one_of("beta_schedule", c.beta_schedule, BETA_SCHEDULES)
            numbers = all(_is_real(v) for v in (c.beta_start, c.beta_end))
            if c.beta_schedule != "squaredcos_cap_v2" and not (numbers and 0.0 < c.beta_start < c.beta_end < 1.0):
                raise ValueError(
                    "`beta_start` and `beta_end` must satisfy 0 < beta_start < beta_end < 1; "
                    f"got beta_start={c.beta_start!r}, beta_end={c.beta_end!r}."
                )
        if c.rescale_betas_for_num_timesteps and (c.trained_betas is not None or c.beta_schedule != "linear"):
            raise ValueError(
                "`rescale_betas_for_num_timesteps=True` applies to beta_schedule='linear' only; "
                f"got beta_schedule={c.beta_schedule!r}, trained_betas={'set' if c.trained_betas is not None else None}."
            )
        self._validate_zero_snr()
        self._validate_reverse_family()
        _real("clip_sample_range", c.clip_sample_range, 0.0, math.inf)
        _real("sample_max_value", c.sample_max_value, 0.0, math.inf)
        _real("dynamic_thresholding_ratio", c.dynamic_thresholding_ratio, 0.0, 1.0, hi_open=False)

    def _validate_zero_snr(self) -> None:
        c = self.config
        if not c.rescale_betas_zero_snr:
            return
        if c.num_train_timesteps < 2:
            raise ValueError("`rescale_betas_zero_snr=True` needs num_train_timesteps >= 2 (it pins ᾱ_1 and ᾱ_T).")
        if c.prediction_type == "epsilon" and not (c.clip_sample or c.thresholding):
            raise ValueError(
                "`rescale_betas_zero_snr=True` makes ᾱ_T = 0, where the ε-prediction's x̂_0 = (x_T − ε̂)/√ᾱ_T "
                "is infinite: step() at t = T-1 would return inf/NaN. Use prediction_type 'v_prediction' or "
                "'sample', or keep prediction_type='epsilon' with clip_sample=True or thresholding=True "
                "(x̂_0 is then clipped to the sample range, as in diffusers)."
            )

    def _validate_reverse_family(self) -> None:
        """``eta`` in [0, 1]; ``analytic_moments`` None or T finite values >= 0, required by "analytic"."""
        c = self.config
        eta = c.eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) or not 0 <= eta <= 1:
            raise ValueError(
                f"`eta` must be a number in [0, 1] (1: DDPM's posterior, 0: DDIM, λ² = η²·β̃'); got {eta!r}."
            )
        moments = c.analytic_moments
        if moments is None:
            if c.variance_type == ANALYTIC_VARIANCE_TYPE:
                raise ValueError(MISSING_MOMENTS_HINT)
            return
        try:
            gamma = np.asarray(moments, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(
                f"`analytic_moments` must be a sequence of numbers; got {type(moments).__name__}."
            ) from None
        T = c.num_train_timesteps
        if gamma.shape != (T,) or not np.all(np.isfinite(gamma)) or np.any(gamma < 0):
            raise ValueError(
                f"`analytic_moments` must hold num_train_timesteps={T} finite values >= 0 (Γ_t for t = 0 … T−1, "
                f"from ddpm_plus.estimate_analytic_moments); got {gamma.size} values"
                + (f" in [{gamma.min():.3g}, {gamma.max():.3g}]." if gamma.size else ".")
            )

    def _make_betas(self) -> np.ndarray:
        c = self.config
        T = c.num_train_timesteps
        if c.trained_betas is not None:
            try:
                betas = np.asarray(c.trained_betas, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(
                    f"`trained_betas` must be a sequence of num_train_timesteps={T} numbers; got {type(c.trained_betas).__name__}."
                ) from None
            if betas.shape != (T,) or not np.all((betas > 0) & (betas < 1)):
                got = f" with range [{betas.min():.3g}, {betas.max():.3g}]" if betas.size else ""
                raise ValueError(
                    f"`trained_betas` must hold num_train_timesteps={T} values in (0, 1); got shape {betas.shape}{got}."
                )
            return self._checked_alphas(betas)
        if c.beta_schedule == "linear":
            scale = 1000.0 / T if c.rescale_betas_for_num_timesteps else 1.0
            if c.beta_end * scale >= 1.0:
                raise ValueError(
                    f"`rescale_betas_for_num_timesteps` with num_train_timesteps={T} scales beta_end to "
                    f"{c.beta_end * scale:.3g} >= 1; use more timesteps or a smaller beta_end."
                )
            return self._checked_alphas(np.linspace(c.beta_start * scale, c.beta_end * scale, T, dtype=np.float64))
        if c.beta_schedule == "scaled_linear":
            return self._checked_alphas(np.linspace(c.beta_start**0.5, c.beta_end**0.5, T, dtype=np.float64) ** 2)
        if c.beta_schedule == "squaredcos_cap_v2":
            return self._checked_alphas(cosine_alpha_bar_betas(T))
        # "sigmoid" (GeoDiff)
        return self._checked_alphas(
            1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (c.beta_end - c.beta_start) + c.beta_start
        )

    def _checked_alphas(self, betas: np.ndarray) -> np.ndarray:
        """``betas`` if ᾱ_t = ∏(1 − β) is strictly decreasing (every β ≥ 1.1e-16: 1 − β < 1 in float64) and
        ᾱ_T >= MIN_ALPHA_BAR, else a ValueError naming the schedule's arguments. Below that ᾱ underflows
        towards 0 and 1/√ᾱ_t, x̂_0 and the zero-SNR rescale overflow or divide 0 by 0."""
        c = self.config
        alphas_cumprod = np.cumprod(1.0 - betas)
        source = "trained_betas" if c.trained_betas is not None else f"beta_schedule={c.beta_schedule!r}"
        if c.trained_betas is None and c.beta_schedule != "squaredcos_cap_v2":
            source += f" with beta_start={c.beta_start!r}, beta_end={c.beta_end!r}"
        T = c.num_train_timesteps
        if not alphas_cumprod[-1] >= MIN_ALPHA_BAR:
            raise ValueError(
                f"{source} and num_train_timesteps={T} give ᾱ_T = {alphas_cumprod[-1]:.3g} < {MIN_ALPHA_BAR:g} "
                "(the signal underflows; 1/√ᾱ_t overflows): lower `beta_end` or `num_train_timesteps`, or use "
                "rescale_betas_zero_snr=True for an exactly zero terminal SNR."
            )
        if T > 1 and not np.all(np.diff(alphas_cumprod) < 0):
            first = int(np.flatnonzero(np.diff(alphas_cumprod) >= 0)[0]) + 1
            raise ValueError(
                f"{source} gives β_{first + 1} = {betas[first]:.3g}, too small to change ᾱ in float64 "
                "(`trained_betas`/`beta_start` must be >= 1.1e-16)."
            )
        return betas

    # ------------------------------------------------------------------ the sampling sequence
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the sampling timesteps (:func:`respace`): ``num_inference_steps`` spaced by
        ``timestep_spacing``, or custom strictly descending ``timesteps``. Affects only ``step`` and the
        sequence attributes; strided steps use the exact β' = 1 − ᾱ_t/ᾱ_prev."""
        c = self.config
        r = respace(
            c.num_train_timesteps,
            num_inference_steps,
            timesteps=timesteps,
            timestep_spacing=c.timestep_spacing,
            steps_offset=c.steps_offset,
        )
        self.custom_timesteps = timesteps is not None
        self.num_inference_steps = len(r.timesteps)
        self._set_sequence(r, device)

    def _set_sequence(self, r: Respacing, device) -> None:
        T = self.config.num_train_timesteps
        self._respacing = r
        # Rows for every t (visited or not): the step t -> the next lower visited timestep.
        self._seq = self._table(np.arange(T), r.prev_timestep, r.next_timestep)
        self._seq_rows: dict = {}  # timestep -> python-float row of self._seq (a cache, same numbers)
        self.timesteps = torch.from_numpy(r.timesteps.copy()).to(device)

    def previous_timestep(self, timestep):
        """The timestep the sampler visits after ``timestep`` (-1 after the last one). Types as in diffusers:
        a tensor for a tensor; for an int, an int before ``set_timesteps`` and a 0-d tensor after."""
        prev = self._respacing.prev_timestep
        if isinstance(timestep, torch.Tensor):
            return torch.from_numpy(prev).to(timestep.device)[timestep.long()]
        p = int(prev[int(timestep)])
        return torch.tensor(p) if self.custom_timesteps or self.num_inference_steps else p

    def step_coefficients(self, device=None) -> StepCoefficients:
        """Float64 coefficients of every step of the current sequence (entry i: ``timesteps[i]`` ->
        ``prev_timestep[i]``), as used by :meth:`step`. Documented in :class:`StepCoefficients`."""
        return _to_torch(_rows(self._seq, self.timesteps.cpu().numpy()), device)

    # ------------------------------------------------------------------ coefficients (pure)
    def coefficients(self, timestep, prev_timestep=None, next_timestep=None) -> StepCoefficients:
        """Float64 coefficients of the steps ``timestep -> prev_timestep``, shaped like ``timestep``.

        Defaults are the full training chain: ``prev_timestep = timestep - 1`` and ``next_timestep =
        timestep + 1`` (-1 at T-1). ``next_timestep`` (the step above) matters only where
        ``prev_timestep = -1``: it sets the clipped log-variance there (see :class:`StepCoefficients`).
        Independent of ``set_timesteps``."""
        c = self._lookup(timestep, prev_timestep, next_timestep)
        shape = tuple(torch.as_tensor(timestep).shape)
        return StepCoefficients(*(v.reshape(shape) for v in _to_torch(c)))

    def _lookup(self, timestep, prev_timestep=None, next_timestep=None, sequence=False) -> StepCoefficients:
        """numpy columns for 1-D ``timestep``: rows of a table, or the formula for explicit neighbours."""
        T = self.config.num_train_timesteps
        t = self._timestep_values("timestep", timestep)
        if prev_timestep is None and next_timestep is None:
            return _rows(self._seq if sequence else self._full, t)

        def neighbour(value, default):
            if value is None:
                return default
            return np.broadcast_to(torch.as_tensor(value).reshape(-1).long().cpu().numpy(), t.shape)

        prev = neighbour(prev_timestep, t - 1)
        nxt = neighbour(next_timestep, np.where(t + 1 < T, t + 1, -1))
        if np.any(prev >= t) or np.any(prev < -1):
            raise ValueError("`prev_timestep` must satisfy -1 <= prev_timestep < timestep.")
        if np.any((nxt != -1) & ((nxt <= t) | (nxt >= T))):
            raise ValueError(f"`next_timestep` must be -1 or satisfy timestep < next_timestep <= {T - 1}.")
        return self._table(t, prev, nxt)

    def _table(self, t, prev, nxt) -> StepCoefficients:
        """:func:`_coefficient_table` with this config's η, Γ table and data range."""
        c = self.config
        r = c.clip_sample_range
        return _coefficient_table(self._alphas_cumprod_np, t, prev, nxt, c.eta, c.analytic_moments, r * r)

    def _coefs(self, timestep, like: torch.Tensor, prev_timestep=None, next_timestep=None, sequence=False):
        """Coefficients to apply to ``like``: python floats for scalar arguments (rows cached), else tensors
        of shape (B, 1, ..., 1) in the compute dtype on its device. Same numbers either way."""
        scalar = all(_is_scalar(v) for v in (timestep, prev_timestep, next_timestep))
        if scalar and prev_timestep is None and next_timestep is None:
            cache = self._seq_rows if sequence else self._full_rows
            t = timestep if type(timestep) is int else int(_integral("timestep", _as_numpy("timestep", timestep))[0])
            row = cache.get(t)
            if row is None:
                row = cache[t] = StepCoefficients(*(float(v[0]) for v in self._lookup(t, sequence=sequence)))
            return row
        c = self._lookup(timestep, prev_timestep, next_timestep, sequence)
        if scalar:
            return StepCoefficients(*(float(v[0]) for v in c))
        dtype, shape = _compute_dtype(like), (-1,) + (1,) * (like.ndim - 1)
        return StepCoefficients(
            *(torch.from_numpy(np.asarray(v, np.float64)).to(like.device, dtype).reshape(shape) for v in c)
        )

    # ------------------------------------------------------------------ forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """docs/math.md eq. (16)/(23): x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, ᾱ in float64 until the final multiply."""
        self._check_forward_inputs("original_samples", original_samples, noise, timesteps)
        a, b = self._forward_coefficients(original_samples, timesteps)
        dtype = _compute_dtype(original_samples)
        out = torch.mul(original_samples.to(dtype), a).addcmul_(b, noise.to(dtype))  # one new buffer
        return out.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho 2022); ``sample`` is x_0."""
        self._check_forward_inputs("sample", sample, noise, timesteps)
        a, b = self._forward_coefficients(sample, timesteps)
        dtype = _compute_dtype(sample)
        return (a * noise.to(dtype) - b * sample.to(dtype)).to(sample.dtype)

    def _check_forward_inputs(self, name: str, x, noise, timesteps) -> None:
        """ValueErrors naming the argument: ``x`` a floating tensor, ``noise`` of its shape, ``timesteps`` a
        scalar or one per sample, integers in [0, T-1]. Values are checked for CPU timesteps (and python
        numbers/lists) only: on an accelerator the check would synchronise the device at every training step."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise ValueError(f"`{name}` must be a floating-point tensor of shape (batch, ...); got {_what(x)}.")
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
            raise ValueError(
                f"`noise` must be a tensor of the shape of `{name}`, {tuple(x.shape)}; got {_what(noise)}."
            )
        _check_timestep_shape("timesteps", timesteps, x.shape[0])
        if not isinstance(timesteps, torch.Tensor) or timesteps.device.type == "cpu":
            self._timestep_values("timesteps", timesteps)
        elif timesteps.dtype == torch.bool or timesteps.is_complex():
            raise ValueError(f"`timesteps` must hold integer timesteps; got dtype {timesteps.dtype}.")

    def _timestep_values(self, name: str, timesteps) -> np.ndarray:
        """``timesteps`` as an int64 numpy array, checked to be integers in [0, T-1] (ValueError naming ``name``)."""
        T = self.config.num_train_timesteps
        t = _integral(name, _as_numpy(name, timesteps))
        if t.size and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"`{name}` values must be in [0, {T - 1}]; got range [{t.min()}, {t.max()}].")
        return t

    def _forward_coefficients(self, sample: torch.Tensor, timesteps):
        """(√ᾱ_t, √(1−ᾱ_t)) of the full table, gathered per element in the compute dtype on the device."""
        dtype = _compute_dtype(sample)
        key = (sample.device, dtype)
        if key not in self._forward_cache:
            self._forward_cache[key] = tuple(
                torch.from_numpy(col).to(sample.device, dtype)
                for col in (self._full.sqrt_alpha_prod, self._full.sqrt_one_minus_alpha_prod)
            )
        sqrt_ab, sqrt_1m_ab = self._forward_cache[key]
        t = torch.as_tensor(timesteps, device=sample.device).long().reshape(-1)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return sqrt_ab[t].reshape(shape), sqrt_1m_ab[t].reshape(shape)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM needs no input scaling (present for interchangeability with other schedulers)."""
        return sample

    # ------------------------------------------------------------------ posterior and model distribution
    def q_posterior(self, original_sample, sample, timestep, prev_timestep=None, next_timestep=None):
        """eq. (30): q(x_prev | x_t, x_0) = N(μ̃, β̃) -> (mean, variance, log_variance) of the pair
        ``timestep -> prev_timestep`` (default: the full chain; see :meth:`coefficients`). With ``eta`` != 1
        it is the reverse family's q_λ(x_prev | x_t, x_0) = N(coef1·x_0 + coef2·x_t, λ²), λ² = η²·β̃
        (Song et al. 2021, eq. (7)). ``log_variance`` is clipped at a step to x_0 (β̃ = 0 there), as in
        improved DDPM."""
        c = self._coefs(timestep, sample, prev_timestep, next_timestep)
        dtype = _compute_dtype(sample, original_sample)
        mean = _lincomb(c.posterior_mean_coef1, original_sample.to(dtype), c.posterior_mean_coef2, sample.to(dtype))
        variance = _full_like(c.posterior_variance, mean)
        log_variance = _full_like(c.posterior_log_variance_clipped, mean)
        return mean.to(sample.dtype), variance.to(sample.dtype), log_variance.to(sample.dtype)

    def predict_original_sample(self, model_output: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x̂_0 from the model output: eq. (32) for ε, identity for x_0, eq. (47) for v."""
        prediction, _ = self._split_model_output(model_output, sample)
        dtype = _compute_dtype(sample, prediction)
        c = self._coefs(timestep, sample)
        return self._x0(prediction.to(dtype), sample.to(dtype), c).to(sample.dtype)

    def p_mean_variance(
        self, model_output, sample, timestep, prev_timestep=None, clip_denoised=None, next_timestep=None
    ) -> PMeanVariance:
        """The model's p(x_prev | x_t) for the pair ``timestep -> prev_timestep`` (default: the full chain):
        mean from eq. (50) (= eq. (35)/(36) for ε), the variance of ``variance_type``.
        ``clip_denoised=None`` follows the config; pass False for likelihoods."""
        c = self._coefs(timestep, sample, prev_timestep, next_timestep)
        mean, log_variance, x0 = self.reverse_moments(model_output, sample, c, clip_denoised)
        log_variance = _full_like(log_variance, mean)
        dtype = sample.dtype
        return PMeanVariance(mean.to(dtype), torch.exp(log_variance).to(dtype), log_variance.to(dtype), x0.to(dtype))

    def reverse_moments(self, model_output, sample, coefficients: StepCoefficients, clip_denoised=None):
        """The step formula: (mean, log σ², x̂_0) of p(x_prev | x_t) for one step's ``coefficients`` (python
        floats, or tensors broadcastable against ``sample``), in the compute dtype. Shared by ``step``,
        ``p_mean_variance`` and ``FastSampler``; ``clip_denoised=None`` follows the config."""
        c = coefficients
        prediction, variance_output = self._split_model_output(model_output, sample)
        dtype = _compute_dtype(sample, model_output)
        x_t, out = sample.to(dtype), prediction.to(dtype)
        x0 = self._x0(out, x_t, c)
        if clip_denoised is None:
            clip_denoised = self.config.clip_sample or self.config.thresholding
        if clip_denoised:  # clip x̂_0 in place only if it is a fresh buffer (not the model's output)
            x0 = self._clip_or_threshold(x0, inplace=x0 is not out)
        mean = _lincomb(c.posterior_mean_coef1, x0, c.posterior_mean_coef2, x_t)  # eq. (50)
        return mean, self._log_variance(c, variance_output, dtype), x0

    def _x0(self, out: torch.Tensor, x_t: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "sample":
            return out
        if kind == "epsilon":  # eq. (32): x̂_0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t
            return _axpy(x_t, -c.sqrt_one_minus_alpha_prod, out).mul_(c.sqrt_recip_alpha_prod)
        # v-prediction, eq. (47): x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v
        return _lincomb(c.sqrt_alpha_prod, x_t, -c.sqrt_one_minus_alpha_prod, out)

    def _log_variance(self, c: StepCoefficients, variance_output: torch.Tensor | None, dtype: torch.dtype):
        kind = self.config.variance_type
        if kind in ("fixed_small", "fixed_small_log"):  # eqs. (52), (53); λ² = η²·β̃'
            return c.posterior_log_variance_clipped
        if kind in ("fixed_large", "fixed_large_log"):
            return c.large_log_variance_clipped
        if kind == ANALYTIC_VARIANCE_TYPE:  # Bao et al. 2022, Theorem 1
            return c.analytic_log_variance
        return self._learned_log_variance(c, variance_output.to(dtype))

    def _learned_log_variance(self, c: StepCoefficients, out: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """eq. (54) (the model outputs log σ²) or eq. (55) (Nichol & Dhariwal 2021, eq. 15: log σ² = f·log β'
        + (1 − f)·log β̃', clipped), the DDPM (η = 1) variance the model learned, times η² before a step
        that does not end at x_0 (Song et al. 2021, eq. (16): σ(η) = η·σ); η = 0: σ = 0 there."""
        eta = self.config.eta
        if (kind or self.config.variance_type) == "learned":
            log_var = out if eta in (0, 1) else out + c.log_eta_sq
        else:
            frac = (out + 1.0) / 2.0
            # with η ∉ {0, 1} posterior_log_variance_clipped already holds log(η²·β̃') (q_λ's variance)
            high = c.log_beta if eta in (0, 1) else c.log_beta + c.log_eta_sq
            log_var = frac * high + (1.0 - frac) * c.posterior_log_variance_clipped
        if eta == 0:
            log_var = torch.where(torch.as_tensor(c.prev_timestep, device=out.device) >= 0, -math.inf, log_var)
        return log_var

    def _split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        """(prediction, variance output or None). Fixed variance types ignore extra variance channels."""
        C, channels = sample.shape[1], model_output.shape[1]
        if self.config.variance_type in LEARNED_VARIANCE_TYPES:
            if channels != 2 * C:
                raise ValueError(
                    f"variance_type={self.config.variance_type!r} needs a model output with 2 x {C} = {2 * C} "
                    f"channels (prediction, then variance); got {channels}. Use a UNet with "
                    f"out_channels={2 * C} or a fixed variance_type."
                )
            return model_output[:, :C], model_output[:, C:]
        if channels == 2 * C:
            return model_output[:, :C], None
        if channels != C:
            raise ValueError(f"model output has {channels} channels; expected {C} (or {2 * C} with variance channels).")
        return model_output, None

    def _clip_or_threshold(self, x0: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if self.config.thresholding:
            # Dynamic thresholding (Saharia et al. 2022): s = quantile(|x̂_0|), clamp to [−s, s], divide by s.
            # inf (ε-prediction at ᾱ_T = 0) -> the largest float, so the quantile is large, not NaN.
            flat = x0.reshape(x0.shape[0], -1).abs().float().nan_to_num(posinf=torch.finfo(torch.float32).max)
            s = torch.quantile(flat, self.config.dynamic_thresholding_ratio, dim=1).to(x0.dtype)
            s = s.clamp(min=1.0, max=self.config.sample_max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
            return torch.maximum(torch.minimum(x0, s), -s) / s
        r = self.config.clip_sample_range
        return x0.clamp_(-r, r) if inplace else x0.clamp(-r, r)

    # ------------------------------------------------------------------ sampling
    def ancestral_step(self, model_output, sample, coefficients: StepCoefficients, noise=None, clip_denoised=None):
        """x_prev = μ_θ + σ·z for one step (docs/math.md eq. (51)) -> (x_prev, x̂_0) in the compute dtype.
        No noise where ``coefficients.prev_timestep`` < 0 (the step to x_0) or when ``noise`` is None."""
        mean, log_variance, x0 = self.reverse_moments(model_output, sample, coefficients, clip_denoised)
        if noise is None:
            return mean, x0
        kind = self.config.variance_type
        if kind in LEARNED_VARIANCE_TYPES:
            std = torch.exp(0.5 * log_variance)
        elif kind == ANALYTIC_VARIANCE_TYPE:
            std = coefficients.analytic_std
        else:  # σ from the table: the same number for python-float and tensor coefficients
            std = (
                coefficients.posterior_std_clipped if kind.startswith("fixed_small") else coefficients.large_std_clipped
            )
        prev = coefficients.prev_timestep
        if isinstance(prev, torch.Tensor):  # per-step mask: σ = 0 where the chain ends
            mean.addcmul_(noise, std * (prev >= 0).to(mean.dtype))
        elif prev >= 0:
            _add_scaled_(mean, std, noise)  # mean is a fresh buffer
        return mean, x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMPlusSchedulerOutput | tuple:
        """One ancestral step x_t -> x_prev ~ N(μ_θ, σ²) on the current sequence; no noise at its final step."""
        _check_step_inputs(model_output, timestep, sample)
        c = self._coefs(timestep, sample, sequence=True)
        noise = None
        if isinstance(c.prev_timestep, torch.Tensor) or c.prev_timestep >= 0:
            dtype = _compute_dtype(sample, model_output)
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=dtype)
        prev_sample, x0 = self.ancestral_step(model_output, sample, c, noise)
        prev_sample, x0 = prev_sample.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev_sample, x0
        return DDPMPlusSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _get_variance(self, t, predicted_variance=None, variance_type=None) -> torch.Tensor:
        """diffusers' ``DDPMScheduler._get_variance`` at timestep ``t`` of the current sequence, with its
        meaning per ``variance_type`` and our float64 values: fixed_small β̃', fixed_small_log √β̃' (a
        standard deviation), fixed_large β', fixed_large_log log β', learned the model output unchanged,
        learned_range its log σ² (minimum: the clipped log β̃', not log 1e-20)."""
        kind = self.config.variance_type if variance_type is None else variance_type
        _one_of("variance_type", kind, ALL_VARIANCE_TYPES)
        c = self._coefs(t, self.one, sequence=True)
        if kind == ANALYTIC_VARIANCE_TYPE and self.config.analytic_moments is None:
            raise ValueError(MISSING_MOMENTS_HINT)
        fixed = {  # with η ≠ 1: λ² = η²·β̃' and η²·β' (log_eta_sq = 0 at η = 1: the same numbers)
            "fixed_small": c.posterior_variance,
            "fixed_small_log": math.sqrt(c.posterior_variance),
            "fixed_large": c.beta * math.exp(c.log_eta_sq),
            "fixed_large_log": c.log_beta + c.log_eta_sq,
            ANALYTIC_VARIANCE_TYPE: math.exp(c.analytic_log_variance),
        }
        if kind in fixed:
            return torch.tensor(fixed[kind], dtype=torch.float64)
        if predicted_variance is None:
            raise ValueError(f"variance_type={kind!r} needs `predicted_variance` (the model's variance output).")
        if kind == "learned" and self.config.eta == 1:
            return predicted_variance
        pv = torch.as_tensor(predicted_variance)
        return self._learned_log_variance(c, pv.to(_compute_dtype(pv)), kind).to(pv.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def _as_numpy(name: str, value) -> np.ndarray:
    """Timesteps (a number, sequence, array or tensor) as a 1-D numpy array; a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).cpu().numpy()
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise ValueError(f"`{name}` must be integer timesteps; got {_what(value)}.")
    try:
        return np.asarray(value).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be integer timesteps; got {_what(value)}.") from None


def _check_timestep_shape(name: str, timesteps, batch: int) -> None:
    shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else np.shape(timesteps)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, batch)):
        raise ValueError(
            f"`{name}` must be a scalar or a 1-D sequence with one timestep per sample ({batch}); got shape {shape}."
        )


def _check_step_inputs(model_output, timestep, sample) -> None:
    """step()'s arguments: floating tensors (batch, channels, ...) of the same batch and spatial shape, and
    a scalar timestep or one per sample (values are checked where the coefficients are looked up)."""
    for name, value in (("sample", sample), ("model_output", model_output)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim < 2:
            raise ValueError(
                f"`{name}` must be a floating-point tensor of shape (batch, channels, ...); got {_what(value)}."
            )
    if model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[2:]:
        raise ValueError(
            f"`model_output` of shape {tuple(model_output.shape)} must match `sample` of shape {tuple(sample.shape)} "
            "in every dimension but the channels."
        )
    _check_timestep_shape("timestep", timestep, sample.shape[0])


def _is_scalar(value) -> bool:
    """None, a number or a 0-d tensor (a 1-D tensor means one entry per batch element)."""
    return not (isinstance(value, torch.Tensor) and value.ndim > 0) and not isinstance(value, (list, tuple, np.ndarray))


def _axpy(x: torch.Tensor, a, y: torch.Tensor) -> torch.Tensor:
    """x + a·y in one new buffer; ``a`` a python float or a tensor broadcastable against ``y``."""
    return torch.add(x, y, alpha=a) if isinstance(a, float) else torch.addcmul(x, y, a)


def _add_scaled_(x: torch.Tensor, a, y: torch.Tensor) -> torch.Tensor:
    """x += a·y in place."""
    return x.add_(y, alpha=a) if isinstance(a, float) else x.addcmul_(y, a)


def _lincomb(a, x: torch.Tensor, b, y: torch.Tensor) -> torch.Tensor:
    """a·x + b·y in one new buffer (coefficients python floats or broadcastable tensors)."""
    return _add_scaled_(torch.mul(x, a), b, y)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never lower)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _full_like(value, like: torch.Tensor) -> torch.Tensor:
    """A python float or a broadcastable tensor, as a tensor of ``like``'s shape and dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).expand_as(like)
    return torch.full_like(like, value)
