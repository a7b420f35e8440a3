"""DDPMPlusPipeline: unconditional (or class-conditional) image sampling with a UNet2DModel.

Unlike diffusers' DDPMPipeline it calls ``scale_model_input`` and uses ``init_noise_sigma``, so any
diffusers scheduler (DDIM, Euler, DPM-Solver, ...) samples correctly inside it, and it handles UNets
that also output variance channels (improved DDPM's learned variances): a scheduler that uses them gets
the full output (see :func:`scheduler_takes_variance`), any other the prediction channels only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_ddpm_plus import LEARNED_VARIANCE_TYPES, DDPMPlusScheduler

OUTPUT_TYPES = ("pil", "np", "pt")


class DDPMPlusPipeline(DiffusionPipeline):
    """Pipeline for DDPM-family image generation.

    Components: ``unet`` (a ``UNet2DModel``, optionally with 2x output channels for learned variances)
    and ``scheduler`` (``DDPMPlusScheduler`` or any compatible diffusers scheduler).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

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
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' convention)
    ) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images with ``num_inference_steps`` denoising steps.

        latents: the starting noise x_T (shape (batch, C, H, W)); drawn from ``generator`` if None.
        class_labels: one integer label per image, for class-conditional UNets.
        output_type: "pil" (list of PIL images), "np" (N,H,W,C float array in [0,1]) or "pt" (N,C,H,W tensor).
        callback_on_step_end: called as ``fn(pipe, i, t, {"latents": ...})`` after each step; may return
            a dict with a replacement "latents".
        """
        shape = check_sampling_inputs(self.unet.config, batch_size, generator, output_type, latents, class_labels)
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only contain {self._callback_tensor_inputs}; got {bad}."
            )
        channels = shape[1]
        device = self._execution_device
        # The chain itself is kept in float32 (float64 for a float64 UNet) even with a half-precision UNet.
        dtype = torch.float64 if self.unet.dtype == torch.float64 else torch.float32
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        class_labels = labels_tensor(class_labels, batch_size, device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {"generator": generator} if _accepts(self.scheduler.step, "generator") else {}
        keeps_variance = scheduler_takes_variance(self.scheduler)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t).to(self.unet.dtype)
            model_output = self.unet(model_input, t, class_labels=class_labels).sample
            if not keeps_variance and model_output.shape[1] == 2 * channels:
                model_output = model_output[:, :channels]
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample.to(dtype)
            if callback_on_step_end is not None:
                available = {"latents": latents}
                tensors = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                outputs = callback_on_step_end(self, i, t, tensors) or {}
                latents = outputs.pop("latents", latents)

        image = postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


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


def check_sampling_inputs(
    unet_config, batch_size, generator, output_type, latents, class_labels, output_types=OUTPUT_TYPES
) -> tuple[int, int, int, int]:
    """Validate a sampling call's arguments against the UNet's config; returns the sample shape."""
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
    conditional = unet_config.num_class_embeds is not None or unet_config.class_embed_type is not None
    if conditional and class_labels is None:
        raise ValueError("This UNet is class-conditional: pass `class_labels` (one label per image).")
    if not conditional and class_labels is not None:
        raise ValueError("`class_labels` were given but this UNet has no class embedding.")
    return shape


def labels_tensor(class_labels, batch_size: int, device) -> torch.Tensor | None:
    """``class_labels`` as a 1-D tensor on ``device``, one label per image (None stays None)."""
    if class_labels is None:
        return None
    class_labels = torch.as_tensor(class_labels, device=device).reshape(-1)
    if class_labels.shape[0] != batch_size:
        raise ValueError(f"`class_labels` must hold batch_size={batch_size} labels; got {len(class_labels)}.")
    return class_labels


def postprocess(x: torch.Tensor, output_type: str):
    """x_0 in [-1, 1] (N, C, H, W) -> "pt" tensor in [0, 1], "np" (N, H, W, C) array or "pil" images."""
    image = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image.contiguous()
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return DiffusionPipeline.numpy_to_pil(image) if output_type == "pil" else image


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters
