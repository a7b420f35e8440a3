"""DDPMPlusPipeline: unconditional (or class-conditional) image sampling with a UNet2DModel.

Unlike diffusers' DDPMPipeline it calls ``scale_model_input`` and uses ``init_noise_sigma``, so any
diffusers scheduler (DDIM, Euler, DPM-Solver, ...) samples correctly inside it, and it handles UNets
that also output variance channels (improved DDPM's learned variances): a scheduler that uses them gets
the full output (see :func:`scheduler_takes_variance`), any other the prediction channels only.

Class-conditional models and classifier-free guidance (Ho & Salimans 2022). A model trained by ddpm_plus with
``--class_conditional`` has a UNet with ``num_class_embeds = num_classes + 1``: ids ``0..num_classes-1`` are
the classes, id ``num_classes`` (``null_class_id``) is the "null" class that label dropout trained. The pipeline
stores ``id2label``, ``null_class_id`` and ``class_dropout_prob`` in its config (``model_index.json``), so they
survive ``save_pretrained``/``from_pretrained`` and the Hub. With guidance scale w the model output is

    eps_hat = eps(x_t, null) + w * (eps(x_t, c) - eps(x_t, null))

(docs/math.md eq. (78); Ho & Salimans 2022 eq. (6) with their w = ours - 1), both branches from one UNet call on a batch of 2B. It
is computed on the UNet's own output, whatever its ``prediction_type``: at fixed x_t and t the maps between
the eps, x0 and v parameterisations (docs/math.md eqs. (32), (33), (47), (48)) are affine in the prediction,
and the weights (1 - w) and w sum to 1, so guiding x0 or v directly equals converting both branches to eps,
guiding and converting back (tests/test_guidance.py checks it numerically). For learned variances only the
prediction channels are guided; the variance channels come from the conditional branch, as in GLIDE
(Nichol et al. 2022). w = 1 calls the UNet once, on the conditional batch only (plain conditional sampling).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..models.adm_unet import ADMUNetModel
from ..schedulers.scheduling_ddpm_plus import LEARNED_VARIANCE_TYPES, DDPMPlusScheduler
from .classifier_guidance import setup_classifier_guidance
from .conditioning import (
    Conditioning,
    apply_guidance,
    check_conditioning,
    conditioning_of,
    guidance_labels,
    guided_unet_output,
    is_class_conditional,
    label_id,
    labels_tensor,
)

# The conditioning helpers are defined in .conditioning; importers of this module may still take them from here.
__all__ = [
    "OUTPUT_TYPES",
    "Conditioning",
    "DDPMPlusPipeline",
    "apply_guidance",
    "check_conditioning",
    "check_sampling_inputs",
    "conditioning_of",
    "default_batch_size",
    "guidance_labels",
    "guided_unet_output",
    "is_class_conditional",
    "label_id",
    "labels_tensor",
    "postprocess",
    "scheduler_takes_variance",
]

OUTPUT_TYPES = ("pil", "np", "pt")


class DDPMPlusPipeline(DiffusionPipeline):
    """Pipeline for DDPM-family image generation.

    Components: ``unet`` (a ``UNet2DModel``, optionally with 2x output channels for learned variances)
    and ``scheduler`` (``DDPMPlusScheduler`` or any compatible diffusers scheduler).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: UNet2DModel | ADMUNetModel,
        scheduler: SchedulerMixin,
        id2label: dict | None = None,
        null_class_id: int | None = None,
        class_dropout_prob: float | None = None,
    ):
        """``id2label``: class names by id (keys may be ints or their strings, as in model_index.json);
        ``null_class_id``: the UNet's class id trained as "no class" (None: no null class, no guidance);
        ``class_dropout_prob``: the label dropout it was trained with (0: guidance is refused)."""
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if id2label is not None or null_class_id is not None or class_dropout_prob is not None:
            conditioning = check_conditioning(unet.config, id2label, null_class_id, class_dropout_prob)
            self.register_to_config(
                id2label=conditioning.id2label,
                null_class_id=conditioning.null_class_id,
                class_dropout_prob=conditioning.class_dropout_prob,
            )

    @property
    def conditioning(self) -> Conditioning:
        """The class conditioning of this pipeline: classes, names, null class and training dropout."""
        return conditioning_of(self)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of class names (as ``DiTPipeline.get_label_ids``); unknown names are an error."""
        return [label_id(name, self.conditioning) for name in ([label] if isinstance(label, str) else label)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load as diffusers does; a stock ``DDPMScheduler`` (e.g. from a ``DDPMPipeline`` directory)
        is replaced by the exact ``DDPMPlusScheduler`` built from the same config."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if type(pipe.scheduler) is DDPMScheduler and "scheduler" not in kwargs:
            pipe.scheduler = DDPMPlusScheduler.from_config(pipe.scheduler.config)
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | list[str] | int | str | None = None,
        guidance_scale: float = 1.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' convention)
        classifier: torch.nn.Module | None = None,
        classifier_scale: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images with ``num_inference_steps`` denoising steps.

        batch_size: the number of images; None: one per given latent, else one per class label, else 1.

        latents: the starting noise x_T (shape (batch, C, H, W)); drawn from ``generator`` if None.
        class_labels: for class-conditional UNets: class ids or names (``id2label``), one per image or one
            for the whole batch.
        guidance_scale: classifier-free guidance scale w (1: the conditional model; 0: the unconditional
            null-class model); needs a model trained with label dropout (``class_dropout_prob`` > 0).
        output_type: "pil" (list of PIL images), "np" (N,H,W,C float array in [0,1]) or "pt" (N,C,H,W tensor).
        callback_on_step_end: called as ``fn(pipe, i, t, {"latents": ...})`` after each step; may return
            a dict with a replacement "latents".
        classifier, classifier_scale: classifier guidance (Dhariwal & Nichol 2021) with a noisy classifier
            p(y | x_t) towards ``class_labels`` (which, for an unconditional UNet, name the classifier's classes);
            see :mod:`ddpm_plus.pipelines.classifier_guidance`. Composes with ``guidance_scale``.
        """
        conditional = is_class_conditional(self.unet.config)
        if batch_size is None:
            batch_size = default_batch_size(class_labels, latents)
        model_labels = class_labels if conditional or classifier is None else None
        shape = check_sampling_inputs(self.unet.config, batch_size, generator, output_type, latents, model_labels)
        self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        channels, device = shape[1], self._execution_device
        labels, null_labels = guidance_labels(self.conditioning, model_labels, batch_size, guidance_scale, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        steer = setup_classifier_guidance(
            classifier, classifier_scale, class_labels, labels, batch_size, self, channels, device
        )
        # The chain itself is kept in float32 (float64 for a float64 UNet) even with a half-precision UNet.
        dtype = torch.float64 if self.unet.dtype == torch.float64 else torch.float32
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma

        step_kwargs = {"generator": generator} if _accepts(self.scheduler.step, "generator") else {}
        guidance = (labels, null_labels, guidance_scale, channels)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            latents = self._denoise_step(latents, i, t, guidance, steer, step_kwargs).to(dtype)
            if callback_on_step_end is not None:
                tensors = {k: {"latents": latents}[k] for k in callback_on_step_end_tensor_inputs}
                latents = (callback_on_step_end(self, i, t, tensors) or {}).pop("latents", latents)

        image = postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    def _denoise_step(self, latents, index: int, t, guidance, steer, step_kwargs) -> torch.Tensor:
        """One step x_t -> x_prev: the (classifier-free guided) model output, then the scheduler's step, each
        shifted by the classifier's score when ``steer`` is given."""
        labels, null_labels, guidance_scale, channels = guidance
        model_input = self.scheduler.scale_model_input(latents, t).to(self.unet.dtype)
        model_output = guided_unet_output(self.unet, model_input, t, labels, null_labels, guidance_scale, channels)
        if not scheduler_takes_variance(self.scheduler) and model_output.shape[1] == 2 * channels:
            model_output = model_output[:, :channels]
        if steer is None:
            return self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
        score = steer.score(latents, t)
        model_output = steer.shift_output(model_output, score, t)
        prev = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
        return steer.shift_sample(prev, model_output, latents, score, index)

    def _check_callback_inputs(self, names) -> None:
        bad = [k for k in names if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only contain {self._callback_tensor_inputs}; got {bad}."
            )


def scheduler_takes_variance(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler.step`` expects a UNet's variance channels in its ``model_output``.

    True for ``DDPMPlusScheduler`` (it splits them itself; fixed variance types ignore them) and for a
    diffusers scheduler built with ``variance_type="learned"`` or ``"learned_range"`` (``DDPMScheduler``
    reads the variance from them, DPM-Solver drops them itself). Only a ``variance_type`` that the
    scheduler's class takes counts: DDIM or Euler built ``from_config`` of a learned-variance config keep
    the key as an unused config entry, and get the prediction channels only.
    """
    if isinstance(scheduler, DDPMPlusScheduler):
        return True
    if not _accepts(type(scheduler).__init__, "variance_type"):
        return False
    return scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES


def default_batch_size(class_labels, latents) -> int:
    """The batch size of a call that gives none: one image per latent, else per class label, else 1."""
    if latents is not None:
        return int(latents.shape[0])
    if torch.is_tensor(class_labels):
        return max(class_labels.numel(), 1)
    if class_labels is None or isinstance(class_labels, (str, int)):
        return 1
    return max(len(class_labels), 1)


def check_sampling_inputs(
    unet_config, batch_size, generator, output_type, latents, class_labels, output_types=OUTPUT_TYPES
) -> tuple[int, int, int, int]:
    """Validate a sampling call's arguments against the UNet's config; returns the sample shape, whose first
    entry is ``batch_size`` (None: :func:`default_batch_size`)."""
    if batch_size is None:
        batch_size = default_batch_size(class_labels, latents)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators but batch_size={batch_size}: "
            "pass one generator per image, or a single generator."
        )
    if output_type not in output_types:
        raise ValueError(f"`output_type` must be one of {output_types}; got {output_type!r}.")
    size = unet_config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, unet_config.in_channels, height, width)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"`latents` must have shape {shape}; got {tuple(latents.shape)}.")
    conditional = is_class_conditional(unet_config)
    if conditional and class_labels is None:
        raise ValueError("This UNet is class-conditional: pass `class_labels` (one label per image).")
    if not conditional and class_labels is not None:
        raise ValueError("`class_labels` were given but this UNet has no class embedding.")
    return shape


def postprocess(x: torch.Tensor, output_type: str):
    """x_0 in [-1, 1] (N, C, H, W) -> "pt" tensor in [0, 1], "np" (N, H, W, C) array or "pil" images."""
    image = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image.contiguous()
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return DiffusionPipeline.numpy_to_pil(image) if output_type == "pil" else image


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters
