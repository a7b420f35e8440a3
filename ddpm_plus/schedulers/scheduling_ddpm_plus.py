"""DDPMPlusScheduler: the DDPM forward process, posterior and ancestral sampler, exactly.

This module is the diffusers adapter (``SchedulerMixin`` + ``ConfigMixin``): config, state (the tables of
the training chain and of the current sampling sequence) and the diffusers API. The algebra lives in
sibling modules, each a set of pure functions:

- :mod:`.options`: the typed options (``VarianceType``, ``PredictionType``, ...) and ``SchedulerConfigError``;
- :mod:`.validation`: the config and argument checks;
- :mod:`.schedules`: the β schedules; :mod:`.respacing`: the sampling sequence (:func:`respace`);
- :mod:`.coefficients`: the float64 coefficient table (:class:`StepCoefficients`) over ᾱ; :mod:`.tables`:
  the tables of one config (training chain, sampling sequence) and their lookup;
- :mod:`.parameterisations`: x̂_0 and ε̂ from the model output; :mod:`.variances`: σ² per variance type;
- :mod:`.arithmetic`: the compute dtype and the linear combinations applied to a sample.

Equation numbers are those of ``docs/math.md``. Tables are 0-based as in diffusers: index ``i`` is the
paper's t = i + 1, and the "previous" of index 0 is ᾱ_0 := 1 (written as timestep ``-1`` below).

All coefficients come from one float64 formula set (:func:`~.coefficients.coefficient_table`). The
arithmetic applied to a sample runs in float32 (float64 for float64 samples) whatever the sample dtype;
results come back in the sample's dtype. Only :meth:`DDPMPlusScheduler.step` (and what diffusers defines
on the sampling sequence: ``timesteps``, ``num_inference_steps``, ``previous_timestep``, ``_get_variance``,
``step_coefficients``) depends on ``set_timesteps``; every other method is a pure function of the config
and its arguments. Every invalid config value or argument raises a ``SchedulerConfigError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .arithmetic import add_scaled_, compute_dtype, full_like, lincomb
from .coefficients import ANALYTIC_DECODER_MIN_VARIANCE, StepCoefficients, rows, to_torch
from .options import (
    ALL_VARIANCE_TYPES,
    ANALYTIC_VARIANCE_TYPE,
    BETA_SCHEDULES,
    LEARNED_VARIANCE_TYPES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    VARIANCE_TYPES,
    PredictionType,
    SchedulerConfigError,
    VarianceType,
)
from .parameterisations import (
    clip_or_threshold,
    epsilon_from_prediction,
    original_sample_from_prediction,
    split_prediction_and_variance,
)
from .respacing import Respacing, respace
from .schedules import MIN_ALPHA_BAR, cosine_alpha_bar_betas, make_betas, rescale_zero_terminal_snr
from .tables import CoefficientTables
from .validation import (
    MAX_NUM_TRAIN_TIMESTEPS,
    MISSING_MOMENTS_HINT,
    check_forward_inputs,
    check_step_inputs,
    one_of,
    validate_config,
)
from .variances import diffusers_variance, log_variance, noise_std

__all__ = [
    "DDPMPlusScheduler",
    "DDPMPlusSchedulerOutput",
    "PMeanVariance",
    "Respacing",
    "StepCoefficients",
    "respace",
    # re-exported from the sibling modules (imported from here by other modules and by user code)
    "ALL_VARIANCE_TYPES",
    "ANALYTIC_DECODER_MIN_VARIANCE",
    "ANALYTIC_VARIANCE_TYPE",
    "BETA_SCHEDULES",
    "LEARNED_VARIANCE_TYPES",
    "MAX_NUM_TRAIN_TIMESTEPS",
    "MIN_ALPHA_BAR",
    "MISSING_MOMENTS_HINT",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "PredictionType",
    "SchedulerConfigError",
    "VarianceType",
    "cosine_alpha_bar_betas",
    "rescale_zero_terminal_snr",
]


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

    The config holds plain strings (diffusers' values); :attr:`variance_kind` and :attr:`prediction_kind`
    are the typed members. Differences from ``DDPMScheduler`` are listed in the README ("Differences from
    diffusers' DDPMScheduler"). Coefficients: :meth:`coefficients` (full chain, or any pair) and
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
        validate_config(self.config)
        if type(eta) is not float:  # a JSON-ready python float (validated above)
            self.register_to_config(eta=float(eta))
        if analytic_moments is not None:  # JSON-ready floats, whatever was passed (tensor, array, list)
            self.register_to_config(analytic_moments=[float(g) for g in np.asarray(analytic_moments).reshape(-1)])
        betas = make_betas(self.config)
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
        c = self.config
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)  # ᾱ_t = α_1·…·α_t
        r = c.clip_sample_range  # Var(x_0|x_t) <= r·r (not r**2: pow rounds differently for some r)
        self._tables = CoefficientTables(alphas_cumprod, c.eta, c.analytic_moments, r * r)
        self.betas = torch.from_numpy(betas)
        self.alphas = torch.from_numpy(alphas)
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)
        self.alphas_cumprod_prev = torch.from_numpy(np.concatenate([[1.0], alphas_cumprod[:-1]]))  # ᾱ_0 = 1
        self.one = torch.tensor(1.0, dtype=torch.float64)
        self.init_noise_sigma = 1.0
        full = self._tables.full  # posterior q(x_{t-1} | x_t, x_0) of the training chain (eq. (30))
        self.posterior_variance = torch.from_numpy(full.posterior_variance)
        self.posterior_log_variance_clipped = torch.from_numpy(full.posterior_log_variance_clipped)
        self.posterior_mean_coef1 = torch.from_numpy(full.posterior_mean_coef1)  # multiplies x_0
        self.posterior_mean_coef2 = torch.from_numpy(full.posterior_mean_coef2)  # multiplies x_t
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_sequence(respace(c.num_train_timesteps, timesteps=full.timestep[::-1]), device=None)

    @property
    def variance_kind(self) -> VarianceType:
        """The config's ``variance_type`` as a :class:`VarianceType` member."""
        return VarianceType(self.config.variance_type)

    @property
    def prediction_kind(self) -> PredictionType:
        """The config's ``prediction_type`` as a :class:`PredictionType` member."""
        return PredictionType(self.config.prediction_type)

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
        self._respacing = r
        self._tables.set_sequence(r)
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
        return to_torch(rows(self._tables.sequence, self.timesteps.cpu().numpy()), device)

    # ------------------------------------------------------------------ coefficients (pure)
    def coefficients(self, timestep, prev_timestep=None, next_timestep=None) -> StepCoefficients:
        """Float64 coefficients of the steps ``timestep -> prev_timestep``, shaped like ``timestep``.

        Defaults are the full training chain: ``prev_timestep = timestep - 1`` and ``next_timestep =
        timestep + 1`` (-1 at T-1). ``next_timestep`` (the step above) matters only where
        ``prev_timestep = -1``: it sets the clipped log-variance there (see :class:`StepCoefficients`).
        Independent of ``set_timesteps``."""
        c = self._tables.lookup(timestep, prev_timestep, next_timestep)
        shape = tuple(torch.as_tensor(timestep).shape)
        return StepCoefficients(*(v.reshape(shape) for v in to_torch(c)))

    # ------------------------------------------------------------------ forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """docs/math.md eq. (16)/(23): x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, ᾱ in float64 until the final multiply."""
        check_forward_inputs("original_samples", original_samples, noise, timesteps, self.config.num_train_timesteps)
        a, b = self._tables.forward(original_samples, timesteps)
        dtype = compute_dtype(original_samples)
        out = torch.mul(original_samples.to(dtype), a).addcmul_(b, noise.to(dtype))  # one new buffer
        return out.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho 2022); ``sample`` is x_0."""
        check_forward_inputs("sample", sample, noise, timesteps, self.config.num_train_timesteps)
        a, b = self._tables.forward(sample, timesteps)
        dtype = compute_dtype(sample)
        return (a * noise.to(dtype) - b * sample.to(dtype)).to(sample.dtype)

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
        c = self._tables.for_sample(timestep, sample, prev_timestep, next_timestep)
        dtype = compute_dtype(sample, original_sample)
        mean = lincomb(c.posterior_mean_coef1, original_sample.to(dtype), c.posterior_mean_coef2, sample.to(dtype))
        variance = full_like(c.posterior_variance, mean)
        log_variance = full_like(c.posterior_log_variance_clipped, mean)
        return mean.to(sample.dtype), variance.to(sample.dtype), log_variance.to(sample.dtype)

    def split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        """(prediction, variance output or None) of a model output for ``sample``: a learned ``variance_type``
        reads the second half of the channels; fixed variance types ignore extra variance channels."""
        return split_prediction_and_variance(self.variance_kind, model_output, sample)

    def predict_original_sample(self, model_output: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x̂_0 from the model output: eq. (32) for ε, identity for x_0, eq. (47) for v."""
        prediction, _ = self.split_model_output(model_output, sample)
        dtype = compute_dtype(sample, prediction)
        c = self._tables.for_sample(timestep, sample)
        x0 = original_sample_from_prediction(self.prediction_kind, prediction.to(dtype), sample.to(dtype), c)
        return x0.to(sample.dtype)

    def predict_epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """ε̂ from the model output: identity for ε, eq. (32) inverted for x_0, eq. (47) for v."""
        prediction, _ = self.split_model_output(model_output, sample)
        dtype = compute_dtype(sample, prediction)
        c = self._tables.for_sample(timestep, sample)
        eps = epsilon_from_prediction(self.prediction_kind, prediction.to(dtype), sample.to(dtype), c)
        return eps.to(sample.dtype)

    def p_mean_variance(
        self, model_output, sample, timestep, prev_timestep=None, clip_denoised=None, next_timestep=None
    ) -> PMeanVariance:
        """The model's p(x_prev | x_t) for the pair ``timestep -> prev_timestep`` (default: the full chain):
        mean from eq. (50) (= eq. (35)/(36) for ε), the variance of ``variance_type``.
        ``clip_denoised=None`` follows the config; pass False for likelihoods."""
        c = self._tables.for_sample(timestep, sample, prev_timestep, next_timestep)
        mean, log_var, x0 = self.reverse_moments(model_output, sample, c, clip_denoised)
        log_var = full_like(log_var, mean)
        dtype = sample.dtype
        return PMeanVariance(mean.to(dtype), torch.exp(log_var).to(dtype), log_var.to(dtype), x0.to(dtype))

    def reverse_moments(self, model_output, sample, coefficients: StepCoefficients, clip_denoised=None):
        """The step formula: (mean, log σ², x̂_0) of p(x_prev | x_t) for one step's ``coefficients`` (python
        floats, or tensors broadcastable against ``sample``), in the compute dtype. Shared by ``step``,
        ``p_mean_variance`` and ``FastSampler``; ``clip_denoised=None`` follows the config."""
        c = coefficients
        prediction, variance_output = self.split_model_output(model_output, sample)
        dtype = compute_dtype(sample, model_output)
        x_t, out = sample.to(dtype), prediction.to(dtype)
        x0 = original_sample_from_prediction(self.prediction_kind, out, x_t, c)
        if clip_denoised is None:
            clip_denoised = self.config.clip_sample or self.config.thresholding
        if clip_denoised:  # clip x̂_0 in place only if it is a fresh buffer (not the model's output)
            x0 = clip_or_threshold(x0, self.config, inplace=x0 is not out)
        mean = lincomb(c.posterior_mean_coef1, x0, c.posterior_mean_coef2, x_t)  # eq. (50)
        return mean, log_variance(self.variance_kind, c, variance_output, dtype, self.config.eta), x0

    # ------------------------------------------------------------------ sampling
    def ancestral_step(self, model_output, sample, coefficients: StepCoefficients, noise=None, clip_denoised=None):
        """x_prev = μ_θ + σ·z for one step (docs/math.md eq. (51)) -> (x_prev, x̂_0) in the compute dtype.
        No noise where ``coefficients.prev_timestep`` < 0 (the step to x_0) or when ``noise`` is None."""
        mean, log_var, x0 = self.reverse_moments(model_output, sample, coefficients, clip_denoised)
        if noise is None:
            return mean, x0
        std = noise_std(self.variance_kind, coefficients, log_var)
        prev = coefficients.prev_timestep
        if isinstance(prev, torch.Tensor):  # per-step mask: σ = 0 where the chain ends
            mean.addcmul_(noise, std * (prev >= 0).to(mean.dtype))
        elif prev >= 0:
            add_scaled_(mean, std, noise)  # mean is a fresh buffer
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
        check_step_inputs(model_output, timestep, sample)
        c = self._tables.for_sample(timestep, sample, sequence=True)
        noise = None
        if isinstance(c.prev_timestep, torch.Tensor) or c.prev_timestep >= 0:
            dtype = compute_dtype(sample, model_output)
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=dtype)
        prev_sample, x0 = self.ancestral_step(model_output, sample, c, noise)
        prev_sample, x0 = prev_sample.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev_sample, x0
        return DDPMPlusSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _get_variance(self, t, predicted_variance=None, variance_type=None) -> torch.Tensor:
        """diffusers' ``DDPMScheduler._get_variance`` at timestep ``t`` of the current sequence, with its
        meaning per ``variance_type`` (default: the config's) and our float64 values
        (:func:`~.variances.diffusers_variance`)."""
        name = self.config.variance_type if variance_type is None else variance_type
        one_of("variance_type", name, ALL_VARIANCE_TYPES)
        kind = VarianceType(name)
        c = self._tables.for_sample(t, self.one, sequence=True)
        if kind is VarianceType.ANALYTIC and self.config.analytic_moments is None:
            raise SchedulerConfigError("variance_type", MISSING_MOMENTS_HINT)
        if kind.learned and predicted_variance is None:
            raise SchedulerConfigError(
                "predicted_variance",
                f"variance_type={kind.value!r} needs `predicted_variance` (the model's variance output).",
            )
        return diffusers_variance(kind, c, predicted_variance, self.config.eta)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
