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


def _coefficient_table(alphas_cumprod: np.ndarray, t, prev, nxt) -> StepCoefficients:
    """The one formula set: float64 coefficients of the steps t -> prev (prev = -1: to x_0). ``nxt`` (the
    timestep above t, -1: none) only sets the clipped log-variance of a step ending at x_0."""
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
        log_small = np.where(prev >= 0, np.log(np.where(prev >= 0, var, 1.0)), clip)
        log_large = np.where(prev >= 0, log_beta, clip)
        return StepCoefficients(
            timestep=t,
            prev_timestep=prev,
            sqrt_alpha_prod=np.sqrt(ab_t),
            sqrt_one_minus_alpha_prod=np.sqrt(1.0 - ab_t),
            sqrt_recip_alpha_prod=1.0 / np.sqrt(ab_t),
            posterior_mean_coef1=np.sqrt(ab_p) * beta / (1.0 - ab_t),  # eq. (30)
            posterior_mean_coef2=np.sqrt(ab_t / ab_p) * (1.0 - ab_p) / (1.0 - ab_t),
            posterior_variance=var,
            posterior_log_variance_clipped=log_small,
            beta=beta,
            log_beta=log_beta,
            large_log_variance_clipped=log_large,
            posterior_std_clipped=np.exp(0.5 * log_small),
            large_std_clipped=np.exp(0.5 * log_large),
        )


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
    every Karras-compatible diffusers scheduler. One key is new:

    rescale_betas_for_num_timesteps: scale the linear β range by 1000/T (improved-DDPM convention) so
        that a chain with T != 1000 steps still ends near N(0, I). Off by default (diffusers' numbers).
        The saved config holds the scaled beta_start/beta_end (and the flag reset to False).

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
    ):
        self._validate_config()
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
        self._full = _coefficient_table(alphas_cumprod, t, t - 1, np.where(t + 1 < T, t + 1, -1))
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
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"`num_train_timesteps` must be an integer >= 1; got {T!r}.")
        _one_of("variance_type", c.variance_type, VARIANCE_TYPES)
        _one_of("prediction_type", c.prediction_type, PREDICTION_TYPES)
        _check_spacing(c.timestep_spacing, c.steps_offset)
        if c.trained_betas is None:
            _one_of("beta_schedule", c.beta_schedule, BETA_SCHEDULES)
            if c.beta_schedule != "squaredcos_cap_v2" and not 0.0 < c.beta_start < c.beta_end < 1.0:
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
        if c.clip_sample_range <= 0 or c.sample_max_value <= 0:
            raise ValueError(
                "`clip_sample_range` and `sample_max_value` must be > 0; "
                f"got {c.clip_sample_range!r} and {c.sample_max_value!r}."
            )
        if not 0.0 < c.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"`dynamic_thresholding_ratio` must be in (0, 1]; got {c.dynamic_thresholding_ratio!r}.")

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

    def _make_betas(self) -> np.ndarray:
        c = self.config
        T = c.num_train_timesteps
        if c.trained_betas is not None:
            betas = np.asarray(c.trained_betas, dtype=np.float64)
            if betas.shape != (T,) or not np.all((betas > 0) & (betas < 1)):
                raise ValueError(
                    f"`trained_betas` must hold num_train_timesteps={T} values in (0, 1); "
                    f"got shape {betas.shape} with range [{betas.min():.3g}, {betas.max():.3g}]."
                )
            return betas
        if c.beta_schedule == "linear":
            scale = 1000.0 / T if c.rescale_betas_for_num_timesteps else 1.0
            if c.beta_end * scale >= 1.0:
                raise ValueError(
                    f"`rescale_betas_for_num_timesteps` with num_train_timesteps={T} scales beta_end to "
                    f"{c.beta_end * scale:.3g} >= 1; use more timesteps or a smaller beta_end."
                )
            return np.linspace(c.beta_start * scale, c.beta_end * scale, T, dtype=np.float64)
        if c.beta_schedule == "scaled_linear":
            return np.linspace(c.beta_start**0.5, c.beta_end**0.5, T, dtype=np.float64) ** 2
        if c.beta_schedule == "squaredcos_cap_v2":
            return cosine_alpha_bar_betas(T)
        # "sigmoid" (GeoDiff)
        return 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (c.beta_end - c.beta_start) + c.beta_start

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
        self._seq = _coefficient_table(self._alphas_cumprod_np, np.arange(T), r.prev_timestep, r.next_timestep)
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
        t = torch.as_tensor(timestep).reshape(-1).long().cpu().numpy()
        if t.size and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"`timestep` values must be in [0, {T - 1}]; got range [{t.min()}, {t.max()}].")
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
        return _coefficient_table(self._alphas_cumprod_np, t, prev, nxt)

    def _coefs(self, timestep, like: torch.Tensor, prev_timestep=None, next_timestep=None, sequence=False):
        """Coefficients to apply to ``like``: python floats for scalar arguments (rows cached), else tensors
        of shape (B, 1, ..., 1) in the compute dtype on its device. Same numbers either way."""
        scalar = all(_is_scalar(v) for v in (timestep, prev_timestep, next_timestep))
        if scalar and prev_timestep is None and next_timestep is None:
            cache = self._seq_rows if sequence else self._full_rows
            t = int(timestep)
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
        a, b = self._forward_coefficients(original_samples, timesteps)
        dtype = _compute_dtype(original_samples)
        out = torch.mul(original_samples.to(dtype), a).addcmul_(b, noise.to(dtype))  # one new buffer
        return out.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho 2022); ``sample`` is x_0."""
        a, b = self._forward_coefficients(sample, timesteps)
        dtype = _compute_dtype(sample)
        return (a * noise.to(dtype) - b * sample.to(dtype)).to(sample.dtype)

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
        ``timestep -> prev_timestep`` (default: the full chain; see :meth:`coefficients`). ``log_variance``
        is clipped at a step to x_0 (β̃ = 0 there), as in improved DDPM."""
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
        if kind in ("fixed_small", "fixed_small_log"):  # eqs. (52), (53)
            return c.posterior_log_variance_clipped
        if kind in ("fixed_large", "fixed_large_log"):
            return c.large_log_variance_clipped
        out = variance_output.to(dtype)
        if kind == "learned":  # the model outputs log σ², eq. (54)
            return out
        # learned_range, eq. (55) (Nichol & Dhariwal 2021, eq. 15): log σ² = f·log β' + (1 − f)·log β̃' (clipped)
        frac = (out + 1.0) / 2.0
        return frac * c.log_beta + (1.0 - frac) * c.posterior_log_variance_clipped

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
        _one_of("variance_type", kind, VARIANCE_TYPES)
        c = self._coefs(t, self.one, sequence=True)
        fixed = {
            "fixed_small": c.posterior_variance,
            "fixed_small_log": math.sqrt(c.posterior_variance),
            "fixed_large": c.beta,
            "fixed_large_log": c.log_beta,
        }
        if kind in fixed:
            return torch.tensor(fixed[kind], dtype=torch.float64)
        if predicted_variance is None:
            raise ValueError(f"variance_type={kind!r} needs `predicted_variance` (the model's variance output).")
        if kind == "learned":
            return predicted_variance
        pv = torch.as_tensor(predicted_variance)
        frac = (pv.to(_compute_dtype(pv)) + 1.0) / 2.0
        return (frac * c.log_beta + (1.0 - frac) * c.posterior_log_variance_clipped).to(pv.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


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
