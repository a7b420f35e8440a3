"""Classifier guidance with a noisy classifier p_φ(y | x_t, t) (Dhariwal & Nichol 2021, Sec. 4).

The classifier's score g = s·∇_x log p_φ(y | x_t) (s: ``classifier_scale``) steers each step:
- ancestral steps (their Algorithm 1): the reverse mean moves to μ + Σ·g, Σ the step's variance;
- deterministic DDIM-type steps (their Algorithm 2): ε̂ moves to ε̂ − √(1 − ᾱ_t)·g.
Both compose with classifier-free guidance: g shifts the (already guided) model output or mean.

A classifier is any module called as ``classifier(x_t, t)`` with raw timesteps 0..T−1, returning logits
[N, num_classes], whose ``config`` names its classes (``num_classes`` or ``out_channels``) and input size
(``image_size`` or ``sample_size``): the ddpm_plus ADM classifier, or a diffusers-style model.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from ..schedulers.options import PredictionType
from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler
from .conditioning import Conditioning, labels_tensor


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is None and isinstance(config, dict):
            value = config.get(name)
        if value is not None:
            return value
    return None


def check_classifier(classifier, unet_config, num_classes: int | None, classifier_scale) -> None:
    """Refuse, before any model call, a classifier whose classes or resolution do not match the model."""
    if isinstance(classifier_scale, bool) or not isinstance(classifier_scale, (int, float)):
        raise ValueError(f"`classifier_scale` must be a number; got {classifier_scale!r}.")
    if not math.isfinite(classifier_scale):
        raise ValueError(f"`classifier_scale` must be finite; got {classifier_scale!r}.")
    if not callable(classifier):
        raise ValueError(f"`classifier` must be a module called as classifier(x_t, t); got {type(classifier)}.")
    config = getattr(classifier, "config", None)
    classes = _config_value(config, "num_classes", "out_channels")
    size = _config_value(config, "image_size", "sample_size")
    if classes is None or size is None:
        raise ValueError(
            "`classifier` must have a config naming its classes (num_classes or out_channels) and its input size "
            "(image_size or sample_size), e.g. a model converted by `ddpm-plus convert guided-diffusion-classifier`."
        )
    if num_classes is not None and int(classes) != int(num_classes):
        raise ValueError(f"`classifier` has {classes} classes but the model has {num_classes}.")
    sample_size = unet_config.sample_size
    model_size = tuple(sample_size) if not isinstance(sample_size, int) else (sample_size, sample_size)
    classifier_size = tuple(size) if not isinstance(size, int) else (size, size)
    if classifier_size != model_size:
        raise ValueError(f"`classifier` takes {classifier_size} images but the model samples {model_size}.")


def classifier_score(classifier, x_t: torch.Tensor, timestep, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """g = s·∇_x log p_φ(y | x_t, t) in float32 (float64 for float64 input), one gradient per image."""
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    t = torch.as_tensor(timestep, device=x_t.device)
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    with torch.enable_grad():
        x = x_t.detach().to(dtype).requires_grad_(True)
        logits = classifier(x.to(_module_dtype(classifier, dtype)), t)
        logits = getattr(logits, "sample", logits)
        log_probs = torch.log_softmax(logits.to(dtype), dim=-1)
        selected = log_probs[torch.arange(x.shape[0], device=x.device), labels]
        (grad,) = torch.autograd.grad(selected.sum(), x)
    return grad * scale


def shift_prediction_by_score(model_output, score, alpha_prod: float, prediction_type: str, channels: int):
    """Algorithm 2 on the prediction channels: δε̂ = −√(1−ᾱ_t)·g, written in the model's parameterisation at
    fixed x_t (a = √ᾱ_t, b = √(1−ᾱ_t)): x̂_0 = (x_t − b·ε)/a gives δx̂_0 = (b²/a)·g, and v = a·ε − b·x̂_0 =
    ε/a − (b/a)·x_t gives δv = −(b/a)·g (docs/math.md eqs. (32), (47))."""
    dtype = score.dtype
    a, b = math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod)
    out = model_output[:, :channels].to(dtype)
    kind = PredictionType(prediction_type)
    if kind is PredictionType.EPSILON:
        shifted = out - b * score
    elif kind is PredictionType.SAMPLE:
        shifted = out + (b * b / a) * score
    else:
        shifted = out - (b / a) * score
    if model_output.shape[1] == channels:
        return shifted
    return torch.cat([shifted, model_output[:, channels:].to(dtype)], dim=1)


def _module_dtype(module, fallback: torch.dtype) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    params = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return params.dtype if params is not None else fallback


class ClassifierGuidance:
    """Classifier guidance for one sampling call: the classifier, its scale and labels, and which of the two
    algorithms the scheduler's steps take (ancestral: Algorithm 1; DDIM-type: Algorithm 2)."""

    def __init__(self, classifier, scale: float, labels: torch.Tensor, scheduler, channels: int):
        self.classifier, self.scale, self.labels, self.channels = classifier, float(scale), labels, channels
        self.scheduler = scheduler
        self.ancestral = _is_ancestral(scheduler)
        # the step table of the current sequence (``set_timesteps`` has run) for Algorithm 1's Σ
        self._coefficients = scheduler.step_coefficients(device=labels.device) if self.ancestral else None

    def score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return classifier_score(self.classifier, x_t, t, self.labels, self.scale)

    def shift_output(self, model_output: torch.Tensor, score: torch.Tensor, t) -> torch.Tensor:
        """Algorithm 2 (DDIM-type steps); ancestral steps leave the model output as it is."""
        if self.ancestral:
            return model_output
        alpha_prod = float(self.scheduler.alphas_cumprod[int(t)])
        prediction_type = self.scheduler.config.prediction_type
        return shift_prediction_by_score(model_output, score, alpha_prod, prediction_type, self.channels)

    def shift_sample(self, prev_sample, model_output, x_t, score, index: int) -> torch.Tensor:
        """Algorithm 1 (ancestral steps): x_prev = μ + Σ·g + σ z, i.e. the step's sample plus Σ·g (the noise is
        additive, so shifting the sample after the step equals shifting the mean before it)."""
        if not self.ancestral:
            return prev_sample
        row = type(self._coefficients)(*(column[index] for column in self._coefficients))
        if self.scheduler.variance_kind.posterior:  # Σ = β̃ unclipped (0 at the step to x_0), as theirs
            variance = row.posterior_variance.to(score.dtype)
        else:
            variance = torch.exp(self.scheduler.reverse_moments(model_output, x_t, row)[1])
        return (prev_sample + variance * score).to(prev_sample.dtype)


def _is_ancestral(scheduler) -> bool:
    """DDPMPlusScheduler with η = 1 steps ancestrally (Algorithm 1); with η < 1, and any scheduler with
    ``alphas_cumprod`` and a prediction type (DDIM, ...), the ε̂ shift of Algorithm 2 applies. diffusers'
    DDPMScheduler is refused: its step variance is not public."""
    if isinstance(scheduler, DDPMPlusScheduler):
        return float(scheduler.config.get("eta", 1.0)) == 1.0
    if isinstance(scheduler, DDPMScheduler) or not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"classifier guidance needs DDPMPlusScheduler (ancestral, Algorithm 1) or a DDIM-type scheduler with "
            f"`alphas_cumprod` (Algorithm 2); got {type(scheduler).__name__}."
        )
    return False


def setup_classifier_guidance(
    classifier, classifier_scale, class_labels, model_labels, batch_size: int, pipe, channels: int, device
) -> ClassifierGuidance | None:
    """Check everything before the first model call and return the guidance of this call (None without a
    classifier). ``model_labels``: the model's checked label ids, or None for an unconditional model, whose
    ``class_labels`` then only name the classifier's classes."""
    if classifier is None:
        if classifier_scale != 1.0:
            raise ValueError(f"`classifier_scale`={classifier_scale} needs a `classifier`.")
        return None
    conditioning = pipe.conditioning
    check_classifier(classifier, pipe.unet.config, conditioning.num_classes, classifier_scale)
    if class_labels is None:
        raise ValueError("classifier guidance needs `class_labels`: the classes to steer the samples towards.")
    labels = model_labels
    if labels is None:
        classes = int(_config_value(classifier.config, "num_classes", "out_channels"))
        labels = labels_tensor(class_labels, batch_size, device, Conditioning(True, classes, None, None, None))
    return ClassifierGuidance(classifier, classifier_scale, labels, pipe.scheduler, channels)
