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
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..schedulers.scheduling_ddpm_plus import LEARNED_VARIANCE_TYPES, DDPMPlusScheduler

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
        unet: UNet2DModel,
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
        """
        shape = check_sampling_inputs(self.unet.config, batch_size, generator, output_type, latents, class_labels)
        self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        batch_size, channels = shape[:2]
        device = self._execution_device
        class_labels, null_labels = guidance_labels(self.conditioning, class_labels, batch_size, guidance_scale, device)
        # The chain itself is kept in float32 (float64 for a float64 UNet) even with a half-precision UNet.
        dtype = torch.float64 if self.unet.dtype == torch.float64 else torch.float32
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {"generator": generator} if _accepts(self.scheduler.step, "generator") else {}
        keeps_variance = scheduler_takes_variance(self.scheduler)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t).to(self.unet.dtype)
            model_output = guided_unet_output(
                self.unet, model_input, t, class_labels, null_labels, guidance_scale, channels
            )
            if not keeps_variance and model_output.shape[1] == 2 * channels:
                model_output = model_output[:, :channels]
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample.to(dtype)
            if callback_on_step_end is not None:
                tensors = {k: {"latents": latents}[k] for k in callback_on_step_end_tensor_inputs}
                latents = (callback_on_step_end(self, i, t, tensors) or {}).pop("latents", latents)

        image = postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

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


class Conditioning(NamedTuple):
    """A pipeline's class conditioning. ``num_classes`` is None for an unconditional UNet, and for class
    embeddings that take no ids (``class_embed_type`` "timestep"/"identity"): labels are then not checked."""

    conditional: bool
    num_classes: int | None
    id2label: dict[str, str] | None  # keys: the ids as strings (as JSON stores them)
    null_class_id: int | None
    class_dropout_prob: float | None


def is_class_conditional(unet_config) -> bool:
    """Whether a UNet with this config takes ``class_labels`` (a class embedding of any kind)."""
    return (
        getattr(unet_config, "num_class_embeds", None) is not None
        or getattr(unet_config, "class_embed_type", None) is not None
    )


def _embeds_ids(unet_config) -> bool:
    return unet_config.class_embed_type is None and unet_config.num_class_embeds is not None


def check_conditioning(unet_config, id2label, null_class_id, class_dropout_prob) -> Conditioning:
    """Validate a pipeline's class metadata against its UNet; returns it normalised (``id2label`` keys as
    strings, ordered by id)."""
    if not _embeds_ids(unet_config):
        raise ValueError(
            "`id2label`, `null_class_id` and `class_dropout_prob` need a UNet with a class embedding "
            "(num_class_embeds set, class_embed_type None)."
        )
    embeds = int(unet_config.num_class_embeds)
    if null_class_id is not None and (isinstance(null_class_id, bool) or null_class_id != embeds - 1):
        raise ValueError(
            f"`null_class_id` must be the UNet's last class id, num_class_embeds - 1 = {embeds - 1}; got {null_class_id!r}."
        )
    num_classes = embeds if null_class_id is None else embeds - 1
    if class_dropout_prob is not None and not (
        isinstance(class_dropout_prob, (int, float)) and 0 <= class_dropout_prob < 1
    ):
        raise ValueError(f"`class_dropout_prob` must be in [0, 1); got {class_dropout_prob!r}.")
    names = None
    if id2label is not None:
        try:
            ids = {int(k): str(v) for k, v in dict(id2label).items()}
        except (TypeError, ValueError):
            raise ValueError(f"`id2label` must map integer class ids to names; got {id2label!r}.") from None
        bad = sorted(i for i in ids if not 0 <= i < num_classes)
        if bad:
            raise ValueError(f"`id2label` has ids {bad} outside the {num_classes} classes 0..{num_classes - 1}.")
        if len(set(ids.values())) != len(ids):
            raise ValueError("`id2label` names must be unique (a name must resolve to one class id).")
        names = {str(i): ids[i] for i in sorted(ids)}
    dropout = None if class_dropout_prob is None else float(class_dropout_prob)
    return Conditioning(True, num_classes, names, null_class_id, dropout)


def conditioning_of(pipe) -> Conditioning:
    """The :class:`Conditioning` of ``pipe`` (its UNet's class embedding and the metadata in its config)."""
    unet_config = pipe.unet.config
    config = getattr(pipe, "config", {}) or {}
    if not _embeds_ids(unet_config):
        conditional = unet_config.class_embed_type is not None
        return Conditioning(conditional, None, None, None, None)
    null = config.get("null_class_id")
    embeds = int(unet_config.num_class_embeds)
    return Conditioning(
        True, embeds if null is None else embeds - 1, config.get("id2label"), null, config.get("class_dropout_prob")
    )


def label_id(label, conditioning: Conditioning) -> int:
    """One class label (an id, or a name of ``id2label``) as a checked class id."""
    n = conditioning.num_classes
    if isinstance(label, str):
        names = {v: int(k) for k, v in (conditioning.id2label or {}).items()}
        if not names:
            raise ValueError(f"class name {label!r} given, but this pipeline stores no class names (`id2label`).")
        if label not in names:
            raise ValueError(f"unknown class name {label!r}; the classes are {sorted(names, key=names.get)}.")
        return names[label]
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"class labels must be integer ids or class names; got {label!r}.")
    if n is not None and not 0 <= label < n:
        null = conditioning.null_class_id
        note = (
            f"; {null} is the null class, sampled with guidance_scale=0" if null is not None and label == null else ""
        )
        raise ValueError(f"class id {label} is out of range: this model has {n} classes (ids 0..{n - 1}){note}.")
    return label


def labels_tensor(class_labels, batch_size: int, device, conditioning: Conditioning | None = None):
    """``class_labels`` (ids or names; one per image, or one for the batch) as a 1-D id tensor on ``device``
    (None stays None); ids are checked against ``conditioning``'s classes when it knows them."""
    if class_labels is None:
        return None
    conditioning = conditioning or Conditioning(True, None, None, None, None)
    if torch.is_tensor(class_labels):
        if class_labels.dtype.is_floating_point or class_labels.dtype.is_complex or class_labels.dtype == torch.bool:
            raise ValueError(f"`class_labels` must be integer class ids; got a {class_labels.dtype} tensor.")
        items = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (str, int)):
        items = [class_labels]
    else:
        items = list(class_labels)
        items = [x.item() if torch.is_tensor(x) or hasattr(x, "dtype") else x for x in items]
    ids = [label_id(x, conditioning) for x in items]
    if len(ids) == 1:
        ids = ids * batch_size
    if len(ids) != batch_size:
        raise ValueError(
            f"`class_labels` must hold one label per image (batch_size={batch_size}) or one for the batch; "
            f"got {len(ids)}."
        )
    return torch.tensor(ids, dtype=torch.long, device=device)


def guidance_labels(conditioning: Conditioning, class_labels, batch_size: int, guidance_scale, device):
    """Check ``class_labels`` and ``guidance_scale`` before sampling; returns (labels, null labels), the
    null labels None when the UNet is called once per step (w = 1, or an unconditional model)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"`guidance_scale` must be a number; got {guidance_scale!r}.")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"`guidance_scale` must be finite; got {guidance_scale!r}.")
    labels = labels_tensor(class_labels, batch_size, device, conditioning)
    if guidance_scale == 1:
        return labels, None
    if not conditioning.conditional:
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a class-conditional model; this UNet has no class embedding."
        )
    if conditioning.null_class_id is None:
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a null class, and this pipeline has none (`null_class_id` "
            "is not set: it was not trained for classifier-free guidance, e.g. by ddpm_plus --class_conditional). "
            "Sample it with guidance_scale=1."
        )
    if not conditioning.class_dropout_prob:
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a model trained with label dropout, but this one was trained "
            "with class_dropout_prob=0: its null class never saw training. Sample it with guidance_scale=1."
        )
    return labels, torch.full_like(labels, conditioning.null_class_id)


def apply_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float, channels: int):
    """out(null) + w (out(c) - out(null)) on the first ``channels`` channels (the prediction); any further
    channels (learned variances) are the conditional branch's. In at least float32."""
    dtype = torch.promote_types(conditional.dtype, torch.float32)
    cond, uncond = conditional[:, :channels].to(dtype), unconditional[:, :channels].to(dtype)
    guided = uncond + guidance_scale * (cond - uncond)
    if conditional.shape[1] == channels:
        return guided
    return torch.cat([guided, conditional[:, channels:].to(dtype)], dim=1)


def guided_unet_output(unet, model_input, t, class_labels, null_labels, guidance_scale, channels: int):
    """The UNet output for ``class_labels``, guided when ``null_labels`` is given: one call on the batch
    [x, x] with labels [c, null] (2B), then :func:`apply_guidance`. Without null labels, one plain call."""
    if null_labels is None:
        return unet(model_input, t, class_labels=class_labels).sample
    both = unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([class_labels, null_labels])).sample
    conditional, unconditional = both.chunk(2)
    return apply_guidance(conditional, unconditional, guidance_scale, channels)


def postprocess(x: torch.Tensor, output_type: str):
    """x_0 in [-1, 1] (N, C, H, W) -> "pt" tensor in [0, 1], "np" (N, H, W, C) array or "pil" images."""
    image = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image.contiguous()
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return DiffusionPipeline.numpy_to_pil(image) if output_type == "pil" else image


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters
