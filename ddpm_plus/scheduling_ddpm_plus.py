"""DDPMPlusScheduler: the DDPM forward process, posterior and ancestral sampler, exactly.

Equation numbers refer to the seed tutorial (``ddpm-math-zh.md``; English restatement with errata in
``notes/math.md``). Tables are 0-based as in diffusers: index ``i`` is the tutorial's ``t = i + 1``,
and the "previous" of index 0 is ᾱ_0 := 1 (written as timestep ``-1`` below).

Everything is computed once in float64. The arithmetic applied to a sample runs in float32 (float64
for float64 samples) whatever the sample dtype, and results come back in the sample's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass
class DDPMPlusSchedulerOutput(BaseOutput):
    """Output of :meth:`DDPMPlusScheduler.step`.

    prev_sample: x_{t-1} (or x at the previous respaced timestep), to be fed back into the model.
    pred_original_sample: the model's x̂_0 (eq. 32), after clipping/thresholding if configured.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class PMeanVariance(NamedTuple):
    """The model's reverse distribution p(x_prev | x_t) = N(mean, variance) and its x̂_0."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_original_sample: torch.Tensor


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def cosine_alpha_bar_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, β capped at 0.999."""
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


class DDPMPlusScheduler(SchedulerMixin, ConfigMixin):
    """Exact DDPM scheduler (Ho et al. 2020) with improved-DDPM variances and exact respacing.

    Config keys and defaults are those of diffusers' ``DDPMScheduler``, so configs swap both ways with
    every Karras-compatible diffusers scheduler. One key is new:

    rescale_betas_for_num_timesteps: scale the linear β range by 1000/T (improved-DDPM convention) so
        that a chain with T != 1000 steps still ends near N(0, I). Off by default (diffusers' numbers).
        The saved config holds the scaled beta_start/beta_end (and the flag reset to False).

    Differences from ``DDPMScheduler`` (each is a defect there): all tables in float64; ``add_noise``
    never rounds ᾱ to the sample dtype; ``fixed_large_log``, ``learned`` (log-variance output) and
    ``learned_range`` follow improved DDPM and are never NaN; respacing gives exactly N timesteps in
    [0, T-1]; no noise at the final step; invalid settings fail at construction.
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

        # Tables of the full training chain, float64, index i = tutorial's t = i + 1.
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)  # ᾱ_t = α_1·…·α_t
        alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])  # ᾱ_{t-1}, ᾱ_0 = 1
        self.betas = torch.from_numpy(betas)
        self.alphas = torch.from_numpy(alphas)
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)
        self.alphas_cumprod_prev = torch.from_numpy(alphas_cumprod_prev)
        self.one = torch.tensor(1.0, dtype=torch.float64)
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_sequence(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64), device=None)

        # Posterior q(x_{t-1} | x_t, x_0) of the training chain (eq. 30), for users and the likelihood.
        full = self._pair_coefficients(np.arange(num_train_timesteps), self._prev_np, self._next_np)
        self.posterior_variance = torch.from_numpy(full["posterior_variance"])
        self.posterior_log_variance_clipped = torch.from_numpy(full["log_variance_small"])
        self.posterior_mean_coef1 = torch.from_numpy(full["coef_x0"])  # multiplies x_0
        self.posterior_mean_coef2 = torch.from_numpy(full["coef_xt"])  # multiplies x_t

    # ------------------------------------------------------------------ construction
    def _validate_config(self) -> None:
        c = self.config
        if not isinstance(c.num_train_timesteps, int) or c.num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be an integer >= 2; got {c.num_train_timesteps!r}.")
        _one_of("variance_type", c.variance_type, VARIANCE_TYPES)
        _one_of("prediction_type", c.prediction_type, PREDICTION_TYPES)
        _one_of("timestep_spacing", c.timestep_spacing, TIMESTEP_SPACINGS)
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
        if c.rescale_betas_zero_snr and c.prediction_type == "epsilon":
            raise ValueError(
                "`rescale_betas_zero_snr=True` makes ᾱ_T = 0, where x_0 cannot be recovered from an ε "
                "prediction: use prediction_type 'v_prediction' or 'sample' (got 'epsilon')."
            )
        if not isinstance(c.steps_offset, int) or c.steps_offset < 0:
            raise ValueError(f"`steps_offset` must be an integer >= 0; got {c.steps_offset!r}.")
        if c.clip_sample_range <= 0 or c.sample_max_value <= 0:
            raise ValueError(
                "`clip_sample_range` and `sample_max_value` must be > 0; "
                f"got {c.clip_sample_range!r} and {c.sample_max_value!r}."
            )
        if not 0.0 < c.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(
                f"`dynamic_thresholding_ratio` must be in (0, 1]; got {c.dynamic_thresholding_ratio!r}."
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

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the sampling timesteps: ``num_inference_steps`` spaced by ``timestep_spacing``, or custom
        strictly descending ``timesteps``. Strided steps use the exact β' = 1 − ᾱ_t/ᾱ_prev."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            seq = np.asarray(list(timesteps), dtype=np.float64)
            if seq.ndim != 1 or seq.size == 0 or np.any(seq != np.round(seq)):
                raise ValueError(f"`timesteps` must be a non-empty list of integers; got {timesteps!r}.")
            if np.any(np.diff(seq) >= 0):
                raise ValueError(f"`timesteps` must be strictly descending; got {timesteps!r}.")
            if seq[0] > T - 1 or seq[-1] < 0:
                raise ValueError(f"`timesteps` must lie in [0, {T - 1}] (num_train_timesteps={T}); got {timesteps!r}.")
            seq = seq.astype(np.int64)
            self.custom_timesteps = True
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise ValueError(f"`num_inference_steps` must be an integer in [1, {T}]; got {num_inference_steps!r}.")
            if not 1 <= num_inference_steps <= T:
                raise ValueError(
                    f"`num_inference_steps` must be in [1, {T}] (num_train_timesteps={T}); got {num_inference_steps}."
                )
            seq = self._spaced_timesteps(int(num_inference_steps))
            self.custom_timesteps = False
        self.num_inference_steps = len(seq)
        self._set_sequence(seq, device)

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """Exactly ``n`` distinct descending timesteps in [0, T-1] (diffusers' conventions, defects removed)."""
        T, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if spacing == "linspace":
            if n == 1:  # diffusers gives t = 0: one step from pure noise at the least noisy timestep
                return np.array([T - 1], dtype=np.int64)
            return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        if spacing == "leading":
            seq = np.arange(n, dtype=np.int64) * (T // n) + self.config.steps_offset
            # With steps_offset > 0 and n = T the top step would be T: lower the offset to stay in range.
            return (seq - max(0, int(seq[-1]) - (T - 1)))[::-1].copy()
        # "trailing": T-1, T-1-T/n, ...; diffusers' float arange can produce n+1 steps ending at -1: keep n.
        return (np.round(np.arange(T, 0, -T / n)[:n]) - 1).astype(np.int64)

    def _set_sequence(self, seq: np.ndarray, device) -> None:
        T = self.config.num_train_timesteps
        ascending = np.sort(seq)
        t = np.arange(T)
        # prev(t): the next lower timestep the sampler visits (-1: none, ᾱ_prev = 1);
        # next(t): the next higher one (-1: none). Defined for every t, visited or not.
        below = np.searchsorted(ascending, t, side="left") - 1
        above = np.searchsorted(ascending, t, side="right")
        self._prev_np = np.where(below >= 0, ascending[np.maximum(below, 0)], -1)
        self._next_np = np.where(above < len(ascending), ascending[np.minimum(above, len(ascending) - 1)], -1)
        coefs = self._pair_coefficients(t, self._prev_np, self._next_np)
        self._table_np = coefs  # float64 numpy columns, indexed by timestep
        self._table_cache: dict = {}  # (device, dtype) -> forward-process tables for add_noise
        self._row_cache: dict = {}  # timestep -> python-float coefficients for step()
        self.timesteps = torch.from_numpy(seq.copy()).to(device)

    def previous_timestep(self, timestep):
        """The timestep the sampler visits after ``timestep`` (-1 after the last one)."""
        if isinstance(timestep, torch.Tensor) and timestep.ndim > 0:
            prev = torch.from_numpy(self._prev_np).to(timestep.device)
            return prev[timestep.long()]
        return int(self._prev_np[int(timestep)])

    # ------------------------------------------------------------------ coefficients
    def _pair_coefficients(self, t: np.ndarray, prev: np.ndarray, nxt: np.ndarray) -> dict[str, np.ndarray]:
        """Float64 coefficients of the step t -> prev (prev = -1: to x_0), with the exact β' of the pair."""
        ab = self.alphas_cumprod.numpy()
        ab_t = ab[t]
        ab_p = np.where(prev >= 0, ab[np.maximum(prev, 0)], 1.0)
        beta_p = 1.0 - ab_t / ab_p  # β' = 1 − ᾱ_t/ᾱ_prev (respacing)
        with np.errstate(divide="ignore", invalid="ignore"):
            var = beta_p * (1.0 - ab_p) / (1.0 - ab_t)  # β̃ (eq. 30, σ² of eq. 29)
            # β̃ of the pair (next, t): improved DDPM's clipped log-variance at the final step, where β̃ = 0.
            ab_n = np.where(nxt >= 0, ab[np.maximum(nxt, 0)], 0.0)
            var_next = (1.0 - ab_n / ab_t) * (1.0 - ab_t) / (1.0 - ab_n)
            final_log_var = np.where(nxt >= 0, np.log(var_next), np.log(beta_p))
            log_small = np.where(prev >= 0, np.log(np.where(prev >= 0, var, 1.0)), final_log_var)
            log_large = np.where(prev >= 0, np.log(beta_p), final_log_var)
            return {
                "prev": prev.astype(np.float64),
                "sqrt_alpha_prod": np.sqrt(ab_t),
                "sqrt_one_minus_alpha_prod": np.sqrt(1.0 - ab_t),
                "sqrt_recip_alpha_prod": 1.0 / np.sqrt(ab_t),
                "sqrt_recipm1_alpha_prod": np.sqrt(1.0 / ab_t - 1.0),
                # μ̃ = coef_x0·x_0 + coef_xt·x_t (eq. 30), with β', α' = ᾱ_t/ᾱ_prev of the pair
                "coef_x0": np.sqrt(ab_p) * beta_p / (1.0 - ab_t),
                "coef_xt": np.sqrt(ab_t / ab_p) * (1.0 - ab_p) / (1.0 - ab_t),
                "posterior_variance": var,
                "log_variance_small": log_small,
                "log_variance_large": log_large,
                "log_beta": np.log(beta_p),
            }

    def _coefficients(self, timestep, sample: torch.Tensor, prev_timestep=None) -> dict:
        """Coefficients for ``timestep``: python floats for a scalar timestep, else tensors of shape
        (B, 1, ..., 1) in the compute dtype on the sample's device."""
        T = self.config.num_train_timesteps
        scalar = not (isinstance(timestep, torch.Tensor) and timestep.ndim > 0)
        if scalar and prev_timestep is None:
            t = int(timestep)
            if not 0 <= t < T:
                raise ValueError(f"`timestep` must be in [0, {T - 1}]; got {t}.")
            if t not in self._row_cache:
                self._row_cache[t] = {k: float(v[t]) for k, v in self._table_np.items()}
            return self._row_cache[t]
        t = torch.as_tensor(timestep).reshape(-1).long().cpu().numpy()
        if t.size and (t.min() < 0 or t.max() >= T):
            raise ValueError(f"`timestep` values must be in [0, {T - 1}]; got range [{t.min()}, {t.max()}].")
        if prev_timestep is None:
            cols = {k: v[t] for k, v in self._table_np.items()}
        else:
            prev = np.broadcast_to(torch.as_tensor(prev_timestep).reshape(-1).long().cpu().numpy(), t.shape)
            if np.any(prev >= t) or np.any(prev < -1):
                raise ValueError("`prev_timestep` must satisfy -1 <= prev_timestep < timestep.")
            cols = self._pair_coefficients(t, prev, self._next_np[t])
        if scalar:
            return {k: float(v[0]) for k, v in cols.items()}
        dtype = _compute_dtype(sample)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return {k: torch.from_numpy(v).to(sample.device, dtype).reshape(shape) for k, v in cols.items()}

    # ------------------------------------------------------------------ forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Eq. (16)/(23): x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, with ᾱ kept in float64 until the final multiply."""
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
        """(√ᾱ_t, √(1−ᾱ_t)) gathered per element, in the compute dtype on the sample's device."""
        dtype = _compute_dtype(sample)
        key = (sample.device, dtype)
        if key not in self._table_cache:
            self._table_cache[key] = (
                torch.from_numpy(self._table_np["sqrt_alpha_prod"]).to(sample.device, dtype),
                torch.from_numpy(self._table_np["sqrt_one_minus_alpha_prod"]).to(sample.device, dtype),
            )
        sqrt_ab, sqrt_1m_ab = self._table_cache[key]
        t = torch.as_tensor(timesteps, device=sample.device).long().reshape(-1)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return sqrt_ab[t].reshape(shape), sqrt_1m_ab[t].reshape(shape)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM needs no input scaling (present for interchangeability with other schedulers)."""
        return sample

    # ------------------------------------------------------------------ posterior and model distribution
    def q_posterior(self, original_sample: torch.Tensor, sample: torch.Tensor, timestep, prev_timestep=None):
        """Eq. (30): q(x_prev | x_t, x_0) = N(μ̃, β̃) -> (mean, variance, log_variance).

        ``log_variance`` is clipped at the final step (β̃ = 0 there) as in improved DDPM."""
        c = self._coefficients(timestep, sample, prev_timestep)
        dtype = _compute_dtype(sample, original_sample)
        mean = c["coef_x0"] * original_sample.to(dtype) + c["coef_xt"] * sample.to(dtype)
        variance = _full_like(c["posterior_variance"], mean)
        log_variance = _full_like(c["log_variance_small"], mean)
        return mean.to(sample.dtype), variance.to(sample.dtype), log_variance.to(sample.dtype)

    def predict_original_sample(self, model_output: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x̂_0 from the model output: eq. (32) for ε, identity for x_0, √ᾱ·x_t − √(1−ᾱ)·v for v."""
        model_output, _ = self._split_model_output(model_output, sample)
        c = self._coefficients(timestep, sample)
        return self._predict_x0(model_output, sample, c).to(sample.dtype)

    def _predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, c: dict) -> torch.Tensor:
        dtype = _compute_dtype(sample, model_output)
        x_t, out = sample.to(dtype), model_output.to(dtype)
        kind = self.config.prediction_type
        if kind == "sample":
            return out
        if kind == "epsilon":
            a, b = "sqrt_recip_alpha_prod", "sqrt_recipm1_alpha_prod"
        else:  # v_prediction
            a, b = "sqrt_alpha_prod", "sqrt_one_minus_alpha_prod"
        # eq. (32): x̂_0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t; v: x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v
        if isinstance(c[a], float):  # scalar timestep: one pass into one new buffer
            return torch.mul(x_t, c[a]).sub_(out, alpha=c[b])
        return c[a] * x_t - c[b] * out

    def p_mean_variance(
        self, model_output: torch.Tensor, sample: torch.Tensor, timestep, prev_timestep=None, clip_denoised=None
    ) -> PMeanVariance:
        """The model's p(x_prev | x_t): mean from eq. (30) with x̂_0 (= eq. 35/36 for ε), and the variance
        of ``variance_type``. ``clip_denoised=None`` follows the config; pass False for likelihoods."""
        mean, log_variance, x0 = self._model_mean_log_variance(
            model_output, sample, timestep, prev_timestep, clip_denoised
        )
        log_variance = _full_like(log_variance, mean)
        return PMeanVariance(
            mean.to(sample.dtype),
            torch.exp(log_variance).to(sample.dtype),
            log_variance.to(sample.dtype),
            x0.to(sample.dtype),
        )

    def _model_mean_log_variance(self, model_output, sample, timestep, prev_timestep=None, clip_denoised=None):
        """(mean, log σ², x̂_0) in the compute dtype; log σ² is a float or broadcastable tensor."""
        model_output, variance_output = self._split_model_output(model_output, sample)
        c = self._coefficients(timestep, sample, prev_timestep)
        dtype = _compute_dtype(sample, model_output)
        x0 = self._predict_x0(model_output, sample, c)
        if clip_denoised is None:
            clip_denoised = self.config.clip_sample or self.config.thresholding
        if clip_denoised:
            # x̂_0 is a fresh buffer unless the model predicts it directly: clip that one out of place
            x0 = self._clip_or_threshold(x0, inplace=x0 is not model_output)
        if isinstance(c["coef_x0"], float):  # μ̃ (eq. 30) in one new buffer
            mean = torch.mul(x0, c["coef_x0"]).add_(sample.to(dtype), alpha=c["coef_xt"])
        else:
            mean = c["coef_x0"] * x0 + c["coef_xt"] * sample.to(dtype)
        return mean, self._log_variance(c, variance_output, dtype), x0

    def _log_variance(self, c: dict, variance_output: torch.Tensor | None, dtype: torch.dtype):
        kind = self.config.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            return c["log_variance_small"]
        if kind in ("fixed_large", "fixed_large_log"):
            return c["log_variance_large"]
        out = variance_output.to(dtype)
        if kind == "learned":  # the model outputs log σ² (improved DDPM)
            return out
        # learned_range: log σ² = f·log β' + (1 − f)·log β̃ (clipped), f = (v + 1)/2
        frac = (out + 1.0) / 2.0
        return frac * c["log_beta"] + (1.0 - frac) * c["log_variance_small"]

    def _split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        """(prediction, variance output or None). Fixed variance types ignore extra variance channels."""
        C = sample.shape[1]
        channels = model_output.shape[1]
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
            flat = x0.reshape(x0.shape[0], -1).abs()
            s = torch.quantile(flat.float(), self.config.dynamic_thresholding_ratio, dim=1).to(x0.dtype)
            s = s.clamp(min=1.0, max=self.config.sample_max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
            return torch.maximum(torch.minimum(x0, s), -s) / s
        r = self.config.clip_sample_range
        return x0.clamp_(-r, r) if inplace else x0.clamp(-r, r)

    # ------------------------------------------------------------------ sampling
    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMPlusSchedulerOutput | tuple:
        """One ancestral step x_t -> x_prev ~ N(μ_θ, σ²), no noise at the final step (tutorial's conclusion)."""
        mean, log_variance, x0 = self._model_mean_log_variance(model_output, sample, timestep)
        prev = self.previous_timestep(timestep)
        if isinstance(prev, torch.Tensor) or prev >= 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=mean.dtype)
            if isinstance(log_variance, float) and not isinstance(prev, torch.Tensor):
                mean.add_(noise, alpha=math.exp(0.5 * log_variance))  # mean is a fresh buffer
            else:
                std = torch.exp(0.5 * torch.as_tensor(log_variance, dtype=mean.dtype, device=mean.device))
                if isinstance(prev, torch.Tensor):  # per-example timesteps: no noise where the chain ends
                    std = std * (prev >= 0).to(mean.dtype).reshape((-1,) + (1,) * (sample.ndim - 1))
                mean = mean + std * noise
        prev_sample, x0 = mean.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev_sample, x0
        return DDPMPlusSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never lower)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _full_like(value, like: torch.Tensor) -> torch.Tensor:
    """A python float or a (B, 1, ..., 1) tensor, as a tensor broadcastable against ``like``."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).expand_as(like)
    return torch.full_like(like, value)
