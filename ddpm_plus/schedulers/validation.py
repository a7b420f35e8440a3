"""The scheduler's config and argument checks.

Every check raises :class:`~ddpm_plus.schedulers.options.SchedulerConfigError` (a ``ValueError``) whose
``argument`` is the config key or call argument at fault and whose message names it, the allowed values and
what it got. The config is checked once, at construction (:func:`validate_config`); call arguments where
the call is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .options import (
    ALL_VARIANCE_TYPES,
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    BetaSchedule,
    PredictionType,
    SchedulerConfigError,
    VarianceType,
)

__all__ = [
    "MAX_NUM_TRAIN_TIMESTEPS",
    "MISSING_MOMENTS_HINT",
    "as_numpy",
    "check_forward_inputs",
    "check_neighbours",
    "check_spacing",
    "check_step_inputs",
    "check_timestep_shape",
    "describe",
    "integral",
    "is_real",
    "one_of",
    "timestep_values",
    "validate_config",
]

MAX_NUM_TRAIN_TIMESTEPS = 100_000  # the float64 tables take a few hundred bytes per timestep
MISSING_MOMENTS_HINT = (
    "variance_type='analytic' needs the table `analytic_moments` (Γ_t = E‖ε_θ(x_t, t)‖²/d for t = 0 … T−1) "
    "in the scheduler config. Make it with `ddpm-plus analytic PIPELINE --dataset digits --num_images M "
    "--output_dir OUT` (writes a pipeline that uses it), or in Python: "
    "`moments = ddpm_plus.estimate_analytic_moments(unet, scheduler, images)` and then "
    "`DDPMPlusScheduler.from_config(scheduler.config, variance_type='analytic', analytic_moments=moments.tolist())`."
)
_FLAGS = ("clip_sample", "thresholding", "rescale_betas_zero_snr", "rescale_betas_for_num_timesteps")


# ---------------------------------------------------------------- values


def one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise SchedulerConfigError(name, f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def is_real(value) -> bool:
    """A finite int/float (numpy scalars included), not a bool."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(float(value))
    )


def _real(name: str, value, lo: float, hi: float, lo_open: bool = True, hi_open: bool = True) -> float:
    """``value`` as a float in the interval (lo, hi) (closed ends where asked), else an error naming it."""
    ok = is_real(value)
    v = float(value) if ok else math.nan
    if not (ok and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise SchedulerConfigError(name, f"`{name}` must be a finite number in {interval}; got {value!r}.")
    return v


def _flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise SchedulerConfigError(name, f"`{name}` must be True or False; got {value!r}.")


def describe(value) -> str:
    """A short description of an argument for messages: dtype and shape of a tensor, else type and repr."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


# ---------------------------------------------------------------- the config


def validate_config(c: Mapping) -> None:
    """Check every config value of ``DDPMPlusScheduler`` (before any table is built)."""
    T = c["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_NUM_TRAIN_TIMESTEPS:
        raise SchedulerConfigError(
            "num_train_timesteps",
            f"`num_train_timesteps` must be an integer in [1, {MAX_NUM_TRAIN_TIMESTEPS}] (its float64 tables "
            f"take a few hundred bytes per timestep); got {T!r}.",
        )
    for flag in _FLAGS:
        _flag(flag, c[flag])
    one_of("variance_type", c["variance_type"], ALL_VARIANCE_TYPES)
    one_of("prediction_type", c["prediction_type"], PREDICTION_TYPES)
    check_spacing(c["timestep_spacing"], c["steps_offset"])
    _check_beta_range(c)
    _check_zero_snr(c)
    _check_reverse_family(c)
    _real("clip_sample_range", c["clip_sample_range"], 0.0, math.inf)
    _real("sample_max_value", c["sample_max_value"], 0.0, math.inf)
    _real("dynamic_thresholding_ratio", c["dynamic_thresholding_ratio"], 0.0, 1.0, hi_open=False)


def check_spacing(timestep_spacing: str, steps_offset: int) -> None:
    one_of("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise SchedulerConfigError("steps_offset", f"`steps_offset` must be an integer >= 0; got {steps_offset!r}.")


def _check_beta_range(c: Mapping) -> None:
    """The schedule's name and β range (``trained_betas`` are checked where the β are made)."""
    trained = c["trained_betas"] is not None
    if not trained:
        one_of("beta_schedule", c["beta_schedule"], BETA_SCHEDULES)
        start, end = c["beta_start"], c["beta_end"]
        numbers = is_real(start) and is_real(end)
        if BetaSchedule(c["beta_schedule"]) is not BetaSchedule.SQUAREDCOS_CAP_V2 and not (
            numbers and 0.0 < start < end < 1.0
        ):
            raise SchedulerConfigError(
                ("beta_start", "beta_end"),
                "`beta_start` and `beta_end` must satisfy 0 < beta_start < beta_end < 1; "
                f"got beta_start={start!r}, beta_end={end!r}.",
            )
    if c["rescale_betas_for_num_timesteps"] and (
        trained or BetaSchedule(c["beta_schedule"]) is not BetaSchedule.LINEAR
    ):
        raise SchedulerConfigError(
            "rescale_betas_for_num_timesteps",
            "`rescale_betas_for_num_timesteps=True` applies to beta_schedule='linear' only; "
            f"got beta_schedule={c['beta_schedule']!r}, trained_betas={'set' if trained else None}.",
        )


def _check_zero_snr(c: Mapping) -> None:
    if not c["rescale_betas_zero_snr"]:
        return
    if c["num_train_timesteps"] < 2:
        raise SchedulerConfigError(
            "rescale_betas_zero_snr",
            "`rescale_betas_zero_snr=True` needs num_train_timesteps >= 2 (it pins ᾱ_1 and ᾱ_T).",
        )
    if PredictionType(c["prediction_type"]) is PredictionType.EPSILON and not (c["clip_sample"] or c["thresholding"]):
        raise SchedulerConfigError(
            "rescale_betas_zero_snr",
            "`rescale_betas_zero_snr=True` makes ᾱ_T = 0, where the ε-prediction's x̂_0 = (x_T − ε̂)/√ᾱ_T "
            "is infinite: step() at t = T-1 would return inf/NaN. Use prediction_type 'v_prediction' or "
            "'sample', or keep prediction_type='epsilon' with clip_sample=True or thresholding=True "
            "(x̂_0 is then clipped to the sample range, as in diffusers).",
        )


def _check_reverse_family(c: Mapping) -> None:
    """``eta`` in [0, 1]; ``analytic_moments`` None or T finite values >= 0, required by "analytic"."""
    eta = c["eta"]
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) or not 0 <= eta <= 1:
        raise SchedulerConfigError(
            "eta", f"`eta` must be a number in [0, 1] (1: DDPM's posterior, 0: DDIM, λ² = η²·β̃'); got {eta!r}."
        )
    moments = c["analytic_moments"]
    if moments is None:
        if VarianceType(c["variance_type"]) is VarianceType.ANALYTIC:
            raise SchedulerConfigError(("variance_type", "analytic_moments"), MISSING_MOMENTS_HINT)
        return
    try:
        gamma = np.asarray(moments, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise SchedulerConfigError(
            "analytic_moments", f"`analytic_moments` must be a sequence of numbers; got {type(moments).__name__}."
        ) from None
    T = c["num_train_timesteps"]
    if gamma.shape != (T,) or not np.all(np.isfinite(gamma)) or np.any(gamma < 0):
        raise SchedulerConfigError(
            "analytic_moments",
            f"`analytic_moments` must hold num_train_timesteps={T} finite values >= 0 (Γ_t for t = 0 … T−1, "
            f"from ddpm_plus.estimate_analytic_moments); got {gamma.size} values"
            + (f" in [{gamma.min():.3g}, {gamma.max():.3g}]." if gamma.size else "."),
        )


# ---------------------------------------------------------------- timesteps and tensors of a call


def integral(name: str, values: np.ndarray) -> np.ndarray:
    """int64 values of a numeric array whose entries are whole numbers, else an error naming it."""
    if values.dtype == np.bool_ or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise SchedulerConfigError(name, f"`{name}` must hold integer timesteps; got dtype {values.dtype}.")
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise SchedulerConfigError(name, f"`{name}` must hold integer timesteps; got {values.tolist()!r}.")
    return values.astype(np.int64)


def as_numpy(name: str, value) -> np.ndarray:
    """Timesteps (a number, sequence, array or tensor) as a 1-D numpy array; an error naming ``name``."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).cpu().numpy()
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise SchedulerConfigError(name, f"`{name}` must be integer timesteps; got {describe(value)}.")
    try:
        return np.asarray(value).reshape(-1)
    except (TypeError, ValueError):
        raise SchedulerConfigError(name, f"`{name}` must be integer timesteps; got {describe(value)}.") from None


def timestep_values(name: str, timesteps, num_train_timesteps: int) -> np.ndarray:
    """``timesteps`` as an int64 numpy array, checked to be integers in [0, T-1] (an error naming ``name``)."""
    T = num_train_timesteps
    t = integral(name, as_numpy(name, timesteps))
    if t.size and (t.min() < 0 or t.max() >= T):
        raise SchedulerConfigError(name, f"`{name}` values must be in [0, {T - 1}]; got range [{t.min()}, {t.max()}].")
    return t


def check_neighbours(t: np.ndarray, prev: np.ndarray, nxt: np.ndarray, num_train_timesteps: int) -> None:
    """Explicit neighbours of the steps ``t -> prev``: -1 <= prev < t, and nxt = -1 or t < nxt <= T-1."""
    if np.any(prev >= t) or np.any(prev < -1):
        raise SchedulerConfigError("prev_timestep", "`prev_timestep` must satisfy -1 <= prev_timestep < timestep.")
    if np.any((nxt != -1) & ((nxt <= t) | (nxt >= num_train_timesteps))):
        raise SchedulerConfigError(
            "next_timestep",
            f"`next_timestep` must be -1 or satisfy timestep < next_timestep <= {num_train_timesteps - 1}.",
        )


def check_timestep_shape(name: str, timesteps, batch: int) -> None:
    shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else np.shape(timesteps)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, batch)):
        raise SchedulerConfigError(
            name,
            f"`{name}` must be a scalar or a 1-D sequence with one timestep per sample ({batch}); got shape {shape}.",
        )


def check_forward_inputs(name: str, x, noise, timesteps, num_train_timesteps: int) -> None:
    """``x`` a floating tensor, ``noise`` of its shape, ``timesteps`` a scalar or one per sample, integers in
    [0, T-1]. Values are checked for CPU timesteps (and python numbers/lists) only: on an accelerator the
    check would synchronise the device at every training step."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise SchedulerConfigError(
            name, f"`{name}` must be a floating-point tensor of shape (batch, ...); got {describe(x)}."
        )
    if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
        raise SchedulerConfigError(
            "noise", f"`noise` must be a tensor of the shape of `{name}`, {tuple(x.shape)}; got {describe(noise)}."
        )
    check_timestep_shape("timesteps", timesteps, x.shape[0])
    if not isinstance(timesteps, torch.Tensor) or timesteps.device.type == "cpu":
        timestep_values("timesteps", timesteps, num_train_timesteps)
    elif timesteps.dtype == torch.bool or timesteps.is_complex():
        raise SchedulerConfigError(
            "timesteps", f"`timesteps` must hold integer timesteps; got dtype {timesteps.dtype}."
        )


def check_step_inputs(model_output, timestep, sample) -> None:
    """step()'s arguments: floating tensors (batch, channels, ...) of the same batch and spatial shape, and
    a scalar timestep or one per sample (values are checked where the coefficients are looked up)."""
    for name, value in (("sample", sample), ("model_output", model_output)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim < 2:
            raise SchedulerConfigError(
                name,
                f"`{name}` must be a floating-point tensor of shape (batch, channels, ...); got {describe(value)}.",
            )
    if model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[2:]:
        raise SchedulerConfigError(
            "model_output",
            f"`model_output` of shape {tuple(model_output.shape)} must match `sample` of shape {tuple(sample.shape)} "
            "in every dimension but the channels.",
        )
    check_timestep_shape("timestep", timestep, sample.shape[0])
