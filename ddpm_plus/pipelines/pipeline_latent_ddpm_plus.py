"""LatentDDPMPlusPipeline: DDPM sampling on the latents of a pretrained autoencoder (latent diffusion, Rombach
et al. 2022; DiT, Peebles & Xie 2023), decoded at the end.

Components: ``vae`` (diffusers ``AutoencoderKL`` or ``VQModel``), one denoiser, either ``unet`` (a
``UNet2DModel``, or a model with its config names such as an ADM UNet) or ``transformer`` (a
``DiTTransformer2DModel``), and ``scheduler`` (``DDPMPlusScheduler`` or any compatible diffusers scheduler). The
chain is :class:`~.pipeline_ddpm_plus.DDPMPlusPipeline`'s, step for step, on the latent z: class labels and
classifier-free guidance, learned variances (a denoiser with 2x output channels, e.g. DiT's learned sigma),
Analytic-DPM and any diffusers scheduler work as there. Latents live in the scaled space the denoiser was trained
on, z = (E(x) - shift_factor) * scaling_factor (the VAE config's factors; VQModel has no shift), and are decoded
as D(z / scaling_factor + shift_factor). ``output_type="latent"`` returns z undecoded.

Folders saved by diffusers' ``LDMPipeline`` (``vqvae`` + ``unet``) and ``DiTPipeline`` (``transformer`` + ``vae``,
``id2label``) load with :meth:`LatentDDPMPlusPipeline.from_pretrained` (see :meth:`~LatentDDPMPlusPipeline.
from_diffusers_pipeline` for what the conversion changes).
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    ImagePipelineOutput,
    LDMPipeline,
    VQModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..schedulers.scheduling_ddpm_plus import LEARNED_VARIANCE_TYPES, DDPMPlusScheduler
from .denoisers import DenoiserCall, DenoiserConfig, builtin_null_class, denoiser_config
from .pipeline_ddpm_plus import (
    OUTPUT_TYPES as PIXEL_OUTPUT_TYPES,
)
from .pipeline_ddpm_plus import (
    Conditioning,
    check_conditioning,
    check_sampling_inputs,
    conditioning_of,
    guidance_labels,
    guided_unet_output,
    postprocess,
    scheduler_takes_variance,
)

OUTPUT_TYPES = PIXEL_OUTPUT_TYPES + ("latent",)
FOREIGN_PIPELINES = ("LDMPipeline", "DiTPipeline")  # model_index.json class names that load by conversion
_DOWNLOAD_KEYS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")


class LatentDDPMPlusPipeline(DiffusionPipeline):
    """DDPM-family sampling in the latent space of ``vae``; see the module docstring."""

    model_cpu_offload_seq = "unet->transformer->vae"
    _optional_components = ["unet", "transformer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL | VQModel,
        scheduler: SchedulerMixin,
        unet=None,
        transformer=None,
        id2label: dict | None = None,
        null_class_id: int | None = None,
        class_dropout_prob: float | None = None,
    ):
        """Exactly one of ``unet``/``transformer``. ``id2label``, ``null_class_id``, ``class_dropout_prob``: as
        for ``DDPMPlusPipeline``; a DiT's null class (id ``num_embeds_ada_norm``) and label dropout are read off
        the model when not given."""
        super().__init__()
        view = check_components(vae, unet, transformer)
        self.register_modules(vae=vae, unet=unet, transformer=transformer, scheduler=scheduler)
        if getattr(scheduler, "config", {}).get("clip_sample"):
            warnings.warn(
                "the scheduler has clip_sample=True: it clips the predicted latents to [-clip_sample_range, "
                "clip_sample_range], a pixel-space range; latent models are sampled with clip_sample=False.",
                UserWarning,
                stacklevel=2,
            )
        builtin = builtin_null_class(transformer) if transformer is not None else None
        if builtin is not None and null_class_id is None and class_dropout_prob is None:
            null_class_id, class_dropout_prob = builtin.null_class_id, builtin.class_dropout_prob
        if id2label is not None or null_class_id is not None or class_dropout_prob is not None:
            conditioning = check_conditioning(view, id2label, null_class_id, class_dropout_prob)
            self.register_to_config(
                id2label=conditioning.id2label,
                null_class_id=conditioning.null_class_id,
                class_dropout_prob=conditioning.class_dropout_prob,
            )

    @property
    def denoiser(self):
        """The denoising network: ``unet`` or ``transformer``."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def denoiser_config(self) -> DenoiserConfig:
        """The denoiser's sample size, channels and class table, under UNet2DModel's config names."""
        return denoiser_config(self.denoiser)

    @property
    def conditioning(self) -> Conditioning:
        """The class conditioning: classes, names, null class and training dropout."""
        return conditioning_of(SimpleNamespace(unet=SimpleNamespace(config=self.denoiser_config), config=self.config))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of class names: a full ``id2label`` name, or one of its comma-separated synonyms as
        ``DiTPipeline.get_label_ids`` accepts them ("white shark"); unknown or ambiguous names are an error."""
        return [
            label_id_of(name, self.conditioning.id2label) for name in ([label] if isinstance(label, str) else label)
        ]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents z -> images in [-1, 1] (unclamped): ``vae.decode(z / scaling_factor + shift_factor)``
        (a VQModel quantises first, as ``LDMPipeline`` does)."""
        return self.vae.decode(unscale_latents(latents, self.vae.config).to(self.vae.dtype)).sample

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load as diffusers does. A folder (or Hub repo) saved by ``LDMPipeline`` or ``DiTPipeline`` is loaded
        by that class and converted (:meth:`from_diffusers_pipeline`); otherwise a stock ``DDPMScheduler`` is
        replaced by the ``DDPMPlusScheduler`` of the same config. A ``scheduler=`` keyword is always kept."""
        download = {k: kwargs[k] for k in _DOWNLOAD_KEYS if k in kwargs}
        index = cls.load_config(pretrained_model_name_or_path, **download)
        name = index.get("_class_name")
        if name in FOREIGN_PIPELINES:
            original = getattr(diffusers, name).from_pretrained(pretrained_model_name_or_path, **kwargs)
            scheduler = original.scheduler if "scheduler" in kwargs else None
            return cls.from_diffusers_pipeline(original, scheduler=scheduler, id2label=index.get("id2label"))
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if type(pipe.scheduler) is DDPMScheduler and "scheduler" not in kwargs:
            pipe.scheduler = DDPMPlusScheduler.from_config(pipe.scheduler.config)
        return pipe

    @classmethod
    def from_diffusers_pipeline(cls, pipe: DiffusionPipeline, scheduler=None, id2label: dict | None = None):
        """This pipeline on the modules of a loaded ``LDMPipeline`` (``vqvae`` -> ``vae``, ``unet``) or
        ``DiTPipeline`` (``vae``, ``transformer``; null class 1000 and label dropout from the model), sharing them.

        scheduler: None: the :func:`ddpm_plus_scheduler_for` the original's config (DDPMPlusScheduler, same
            config; ``learned_range`` for a learned-sigma denoiser such as DiT's).
        id2label: class names (default: the DiT's ``id2label`` as its model_index.json stores it, else rebuilt
            from ``pipe.labels``); a name held by several ids (ImageNet's "crane") gets the id appended.
        """
        if isinstance(pipe, LDMPipeline):
            denoiser, components, names = pipe.unet, {"vae": pipe.vqvae, "unet": pipe.unet}, None
        elif isinstance(pipe, DiTPipeline):
            denoiser, components = pipe.transformer, {"vae": pipe.vae, "transformer": pipe.transformer}
            names = id2label or pipe.config.get("id2label") or labels_to_id2label(getattr(pipe, "labels", None))
        else:
            raise ValueError(f"`pipe` must be a diffusers LDMPipeline or DiTPipeline; got {type(pipe).__name__}.")
        if scheduler is None:
            scheduler = ddpm_plus_scheduler_for(pipe.scheduler.config, denoiser_config(denoiser))
        return cls(scheduler=scheduler, **components, id2label=unique_names(names) if names else None)

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
        """As ``DDPMPlusPipeline.__call__``, on latents of the denoiser's shape; the images are decoded by the VAE.

        latents: the starting noise z_T (shape (batch, latent channels, h, w)); drawn from ``generator`` if None.
        class_labels: ids, ``id2label`` names or their synonyms (:meth:`get_label_ids`).
        output_type: "pil", "np", "pt" (decoded images in [0, 1]) or "latent" (the final scaled latents z_0).
        """
        class_labels = self._ids_of_names(class_labels)
        shape = check_sampling_inputs(
            self.denoiser_config, batch_size, generator, output_type, latents, class_labels, OUTPUT_TYPES
        )
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` may only contain ['latents']; got {bad}.")
        device = self._execution_device
        labels, nulls = guidance_labels(self.conditioning, class_labels, shape[0], guidance_scale, device)
        dtype = torch.float64 if self.denoiser.dtype == torch.float64 else torch.float32  # the chain's dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self._denoise(latents, generator, labels, nulls, guidance_scale, callback_on_step_end)
        image = latents if output_type == "latent" else postprocess(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    def _denoise(self, latents, generator, labels, nulls, guidance_scale, callback):
        """The reverse chain over ``scheduler.timesteps`` from ``latents`` (z_T) to z_0."""
        model, channels, dtype = DenoiserCall(self.denoiser), latents.shape[1], latents.dtype
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        keeps_variance = scheduler_takes_variance(self.scheduler)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t).to(self.denoiser.dtype)
            output = guided_unet_output(model, model_input, t, labels, nulls, guidance_scale, channels)
            if not keeps_variance and output.shape[1] == 2 * channels:
                output = output[:, :channels]
            latents = self.scheduler.step(output, t, latents, **step_kwargs).prev_sample.to(dtype)
            if callback is not None:
                latents = (callback(self, i, t, {"latents": latents}) or {}).pop("latents", latents)
        return latents

    def _ids_of_names(self, class_labels):
        """Class names (and DiT-style synonyms) among ``class_labels`` as ids; anything else unchanged."""
        if isinstance(class_labels, str):
            return self.get_label_ids(class_labels)
        if isinstance(class_labels, (list, tuple)) and any(isinstance(x, str) for x in class_labels):
            return [self.get_label_ids(x)[0] if isinstance(x, str) else x for x in class_labels]
        return class_labels


def check_components(vae, unet, transformer) -> DenoiserConfig:
    """Refuse a pipeline whose components do not fit together; returns the denoiser's config view."""
    if (unet is None) == (transformer is None):
        raise ValueError("pass exactly one denoiser: `unet` (e.g. a UNet2DModel) or `transformer` (a DiT).")
    if not isinstance(vae, (AutoencoderKL, VQModel)):
        raise ValueError(f"`vae` must be a diffusers AutoencoderKL or VQModel; got {type(vae).__name__}.")
    if getattr(vae.config, "latents_mean", None) is not None or getattr(vae.config, "latents_std", None) is not None:
        raise ValueError(
            "`vae` has latents_mean/latents_std in its config; this pipeline scales latents by scaling_factor "
            "and shift_factor only."
        )
    view = denoiser_config(unet if unet is not None else transformer)
    channels = latent_channels(vae)
    if view.in_channels != channels:
        name = "unet" if unet is not None else "transformer"
        raise ValueError(f"`{name}` takes {view.in_channels} input channels but `vae` has {channels} latent channels.")
    if view.out_channels not in (channels, 2 * channels):
        raise ValueError(
            f"the denoiser outputs {view.out_channels} channels; expected {channels} (the latent channels) or "
            f"{2 * channels} (with learned variances)."
        )
    return view


def latent_channels(vae) -> int:
    """The channels of the latents ``vae.decode`` takes (a VQModel's ``vq_embed_dim`` where set)."""
    return int(getattr(vae.config, "vq_embed_dim", None) or vae.config.latent_channels)


def scale_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents -> the denoiser's latents: (z - shift_factor) * scaling_factor."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (z - shift) * vae_config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The denoiser's latents -> VAE latents: latents / scaling_factor + shift_factor."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return latents / vae_config.scaling_factor + shift


def ddpm_plus_scheduler_for(config, view: DenoiserConfig) -> DDPMPlusScheduler:
    """``DDPMPlusScheduler`` of a scheduler config; ``variance_type="learned_range"`` (improved DDPM's and
    DiT's) when the denoiser outputs variance channels that the config names no learned type for."""
    learned = view.out_channels == 2 * view.in_channels
    if learned and config.get("variance_type") not in LEARNED_VARIANCE_TYPES:
        return DDPMPlusScheduler.from_config(config, variance_type="learned_range")
    return DDPMPlusScheduler.from_config(config)


def unique_names(id2label: dict) -> dict[str, str]:
    """``id2label`` with every name held by several ids suffixed with its id ("crane (134)", "crane (517)")."""
    names = {int(k): str(v) for k, v in id2label.items()}
    counts = Counter(names.values())
    return {str(i): f"{n} ({i})" if counts[n] > 1 else n for i, n in sorted(names.items())}


def labels_to_id2label(labels: dict | None) -> dict[str, str] | None:
    """``DiTPipeline.labels`` (synonym -> id) back to id -> "synonym, synonym" (synonyms sorted)."""
    if not labels:
        return None
    by_id: dict[int, list[str]] = {}
    for name, i in labels.items():
        by_id.setdefault(int(i), []).append(name)
    return {str(i): ", ".join(sorted(by_id[i])) for i in sorted(by_id)}


def synonyms(name: str) -> list[str]:
    """The comma-separated synonyms of an ImageNet-style class name ("great white shark, white shark")."""
    return [part.strip() for part in name.split(",")]


def label_id_of(name, id2label: dict | None) -> int:
    """The class id of a full ``id2label`` name or of one of its comma-separated synonyms (a name that
    :func:`unique_names` suffixed with its id counts without the suffix too: "crane" is then ambiguous)."""
    if not isinstance(name, str):
        raise ValueError(f"class names must be strings; got {name!r}.")
    if not id2label:
        raise ValueError(f"class name {name!r} given, but this pipeline stores no class names (`id2label`).")
    full = {v: int(k) for k, v in id2label.items()}
    if name in full:
        return full[name]
    ids = sorted(int(k) for k, v in id2label.items() if name in synonyms(v.removesuffix(f" ({k})")))
    if len(ids) > 1:
        raise ValueError(f"class name {name!r} is ambiguous: it names classes {ids}; pass an id or a full name.")
    if not ids:
        raise ValueError(f"unknown class name {name!r}; see the pipeline's `id2label` for the class names.")
    return ids[0]
