"""What the model outputs, and what is derived from it: the prediction and variance channels, x̂_0 and ε̂ of
each :class:`PredictionType` (docs/math.md eqs. (32), (47)), and x̂_0's clipping or dynamic thresholding.

Coefficients ``c`` are one step's :class:`~ddpm_plus.schedulers.coefficients.StepCoefficients` as python
floats or tensors broadcastable against the sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .arithmetic import axpy, lincomb
from .coefficients import StepCoefficients
from .options import PredictionType, SchedulerConfigError, VarianceType

__all__ = [
    "clip_or_threshold",
    "epsilon_from_prediction",
    "original_sample_from_prediction",
    "split_prediction_and_variance",
]


def split_prediction_and_variance(variance_type: VarianceType, model_output: torch.Tensor, sample: torch.Tensor):
    """(prediction, variance output or None): a learned variance type reads the second half of the channels;
    fixed variance types ignore extra variance channels."""
    C, channels = sample.shape[1], model_output.shape[1]
    if variance_type.learned:
        if channels != 2 * C:
            raise SchedulerConfigError(
                "model_output",
                f"variance_type={variance_type.value!r} needs a model output with 2 x {C} = {2 * C} "
                f"channels (prediction, then variance); got {channels}. Use a UNet with "
                f"out_channels={2 * C} or a fixed variance_type.",
            )
        return model_output[:, :C], model_output[:, C:]
    if channels == 2 * C:
        return model_output[:, :C], None
    if channels != C:
        raise SchedulerConfigError(
            "model_output", f"model output has {channels} channels; expected {C} (or {2 * C} with variance channels)."
        )
    return model_output, None


def original_sample_from_prediction(
    kind: PredictionType, out: torch.Tensor, x_t: torch.Tensor, c: StepCoefficients
) -> torch.Tensor:
    """x̂_0: the output itself for x_0, eq. (32) for ε, eq. (47) for v (a new buffer except for x_0)."""
    if kind is PredictionType.SAMPLE:
        return out
    if kind is PredictionType.EPSILON:  # eq. (32): x̂_0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t
        return axpy(x_t, -c.sqrt_one_minus_alpha_prod, out).mul_(c.sqrt_recip_alpha_prod)
    # PredictionType.V_PREDICTION, eq. (47): x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v
    return lincomb(c.sqrt_alpha_prod, x_t, -c.sqrt_one_minus_alpha_prod, out)


def epsilon_from_prediction(
    kind: PredictionType, out: torch.Tensor, x_t: torch.Tensor, c: StepCoefficients
) -> torch.Tensor:
    """ε̂: the output itself for ε, eq. (32) inverted for x_0 (x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε), eq. (47) for v
    (v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0, so ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t)."""
    if kind is PredictionType.EPSILON:
        return out
    if kind is PredictionType.SAMPLE:
        return (x_t - c.sqrt_alpha_prod * out) / c.sqrt_one_minus_alpha_prod
    return c.sqrt_alpha_prod * out + c.sqrt_one_minus_alpha_prod * x_t


def clip_or_threshold(x0: torch.Tensor, config: Mapping, inplace: bool = False) -> torch.Tensor:
    """x̂_0 clipped to [−clip_sample_range, clip_sample_range], or with ``thresholding`` dynamically
    thresholded (Saharia et al. 2022): s = quantile(|x̂_0|, dynamic_thresholding_ratio) per sample, clamped
    to [1, sample_max_value], x̂_0 clamped to [−s, s] and divided by s. ``inplace`` clips ``x0`` itself."""
    if config["thresholding"]:
        # inf (ε-prediction at ᾱ_T = 0) -> the largest float, so the quantile is large, not NaN.
        flat = x0.reshape(x0.shape[0], -1).abs().float().nan_to_num(posinf=torch.finfo(torch.float32).max)
        s = torch.quantile(flat, config["dynamic_thresholding_ratio"], dim=1).to(x0.dtype)
        s = s.clamp(min=1.0, max=config["sample_max_value"]).reshape((-1,) + (1,) * (x0.ndim - 1))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    r = config["clip_sample_range"]
    return x0.clamp_(-r, r) if inplace else x0.clamp(-r, r)
