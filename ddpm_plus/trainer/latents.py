"""Latent diffusion training (``--vae``): the autoencoder, the shape of the denoiser on its latents, the weights
hash that keys the latent cache and the latent scaling factor (Rombach et al. 2022).

The VAE is a diffusers ``AutoencoderKL`` or ``VQModel``, from a local folder or a Hub id (``--vae``, optionally
``--vae_subfolder``; a local folder holding ``vae/config.json`` and no ``config.json`` is read from ``vae/``). It
is loaded from safetensors only, never with remote code, and with ``local_files_only`` when
``HF_HUB_OFFLINE`` is set. Its config is read while the flags are checked, so a wrong ``--vae`` or an image size
it cannot encode is refused before any data is read.

Encoding: an ``AutoencoderKL`` gives the mode (mean) of its posterior, a ``VQModel`` its latents before
quantisation (its ``decode`` quantises, as LDM's VQ models do). The denoiser trains on
z = (E(x) - shift_factor) * scaling_factor, the scaling of ``LatentDDPMPlusPipeline``.
``--latent_scaling_factor`` defaults to the VAE config's ``scaling_factor``; ``measure`` sets it to 1 / std of the
first :data:`SCALING_SAMPLES` cached latents (LDM's ``scale_by_std``). Either way it is written into the VAE's
config, so the saved pipeline decodes with the factor it was trained with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel
from huggingface_hub import constants as hub_constants

from ..pipelines.pipeline_latent_ddpm_plus import latent_channels, scale_latents

__all__ = [
    "MEASURE",
    "SCALING_SAMPLES",
    "check_latent_flags",
    "denoiser_shape",
    "encode",
    "load_vae",
    "measure_scaling_factor",
    "scaling_factor_flag",
    "set_scaling_factor",
    "vae_weights_hash",
]

logger = logging.getLogger("ddpm_plus.train")

VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
MEASURE = "measure"
SCALING_SAMPLES = 1024  # latents whose std sets the factor under --latent_scaling_factor measure
LATENT_ONLY_FLAGS = ("vae_subfolder", "latent_scaling_factor", "latent_cache_dir")


def scaling_factor_flag(text: str):
    """``--latent_scaling_factor``: a positive finite number, or ``measure``."""
    if text == MEASURE:
        return MEASURE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or '{MEASURE}', got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or '{MEASURE}', got {text!r}")
    return value


def add_latent_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("latent diffusion (train on the latents of a pretrained VAE)")
    g.add_argument(
        "--vae",
        default=None,
        help="AutoencoderKL or VQModel: a local folder or a Hub id (e.g. stabilityai/sd-vae-ft-mse); the images "
        "are encoded once and the latents cached (see --latent_cache_dir).",
    )
    g.add_argument("--vae_subfolder", default=None, help="Subfolder of --vae holding the VAE (e.g. vae).")
    g.add_argument(
        "--latent_scaling_factor",
        type=scaling_factor_flag,
        default=None,
        help=f"Latent scale: a number, or '{MEASURE}' for 1/std of the first {SCALING_SAMPLES} latents "
        "(default: the VAE config's scaling_factor); saved in the pipeline's vae/config.json.",
    )
    g.add_argument(
        "--latent_cache_dir",
        default=None,
        help="Where the latent shards go (default $DDPM_PLUS_CACHE/latents, else ~/.cache/ddpm_plus/latents).",
    )


def _location(args) -> tuple[str, str | None]:
    """(path or Hub id, subfolder) of ``--vae``; a local folder with only ``vae/config.json`` means ``vae``."""
    path, subfolder = args.vae, args.vae_subfolder
    if subfolder is None and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        if (Path(path) / "vae" / "config.json").is_file():
            subfolder = "vae"
    return path, subfolder


def _offline(path: str) -> bool:
    return Path(path).is_dir() or bool(hub_constants.HF_HUB_OFFLINE)


def read_vae_config(args) -> dict:
    """The VAE's config (its ``_class_name`` one of :data:`VAE_CLASSES`); a ValueError naming ``--vae``."""
    path, subfolder = _location(args)
    where = f"--vae {path}" + (f" (subfolder {subfolder})" if subfolder else "")
    try:
        config = AutoencoderKL.load_config(path, subfolder=subfolder, local_files_only=_offline(path))
    except Exception as e:  # OSError, EnvironmentError, HTTP errors: not a folder, not on the Hub, offline...
        raise ValueError(f"{where}: cannot read the VAE's config.json ({type(e).__name__}: {e})") from None
    name = config.get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"{where} is a {name}; expected one of {', '.join(VAE_CLASSES)}")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise ValueError(f"{where} has latents_mean/latents_std; only scaling_factor/shift_factor VAEs are supported")
    return config


def downsampling_factor(config: dict) -> int:
    """Image size / latent size of a diffusers AutoencoderKL/VQModel: one halving per encoder block but the last."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_latent_flags(args) -> None:
    """Check the latent flags against the VAE's config before anything is loaded; fills ``args.latent_channels``,
    ``args.latent_size`` (the denoiser's shape), ``args.channels`` and ``args.clip_sample``."""
    if args.vae is None:
        given = [f"--{name}" for name in LATENT_ONLY_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --vae")
        args.latent_channels = args.latent_size = None
        args.clip_sample = True if args.clip_sample is None else args.clip_sample
        return
    config = read_vae_config(args)
    in_channels = int(config.get("in_channels", 3))
    if args.channels is not None and args.channels != in_channels:
        raise ValueError(f"--channels {args.channels}: the VAE (--vae {args.vae}) encodes {in_channels}-channel images")
    if in_channels not in (1, 3):
        raise ValueError(f"--vae {args.vae} encodes {in_channels}-channel images; the data pipeline gives 1 or 3")
    args.channels = in_channels
    factor = downsampling_factor(config)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the VAE's downsampling factor {factor}")
    if not args.center_crop:
        raise ValueError("--vae caches one encoding per image: pass --center_crop (random crops cannot be cached)")
    if args.clip_sample:
        raise ValueError("--clip_sample clips to [-1, 1], a pixel range; latent models use --no-clip_sample")
    args.clip_sample = False
    args.latent_channels = int(config.get("vq_embed_dim") or config["latent_channels"])
    args.latent_size = args.resolution // factor


def denoiser_shape(args) -> tuple[int, int]:
    """(channels, sample size) of the denoiser: the latents' with ``--vae``, else the images'."""
    if getattr(args, "vae", None):
        return args.latent_channels, args.latent_size
    return args.channels, args.resolution


def load_vae(args, device) -> AutoencoderKL | VQModel:
    """The frozen VAE of ``--vae`` on ``device`` (eval mode, float32, no gradients), safetensors only."""
    path, subfolder = _location(args)
    cls = VAE_CLASSES[read_vae_config(args)["_class_name"]]
    try:
        vae = cls.from_pretrained(
            path, subfolder=subfolder, use_safetensors=True, local_files_only=_offline(path), torch_dtype=torch.float32
        )
    except Exception as e:
        raise ValueError(f"--vae {path}: cannot load the {cls.__name__} weights ({type(e).__name__}: {e})") from None
    if latent_channels(vae) != args.latent_channels:  # the flags were checked against the config just read
        raise ValueError(f"--vae {path}: the model has {latent_channels(vae)} latent channels, its config another")
    vae.requires_grad_(False)
    return vae.to(device).eval()


def vae_weights_hash(vae) -> str:
    """A digest of the VAE's class, config (less its scaling/shift factors, which do not change the encoding)
    and every weight's bytes: the latent cache's key for the encoder."""
    digest = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in dict(vae.config).items() if k not in ("scaling_factor", "shift_factor")}
    digest.update(json.dumps([type(vae).__name__, config], sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> unscaled float32 latents on the CPU: an AutoencoderKL's posterior mode, a VQModel's
    pre-quantisation latents."""
    x = pixels.to(vae.device, vae.dtype)
    if isinstance(vae, VQModel):
        z = vae.encode(x).latents
    else:
        z = vae.encode(x).latent_dist.mode()
    return z.float().cpu()


def measure_scaling_factor(latents: torch.Tensor, shift_factor: float | None = None) -> float:
    """1 / std of the first :data:`SCALING_SAMPLES` latents (after the shift), as LDM's ``scale_by_std``."""
    sample = latents[:SCALING_SAMPLES].double() - (shift_factor or 0.0)
    std = float(sample.flatten().std())
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"--latent_scaling_factor {MEASURE}: the latents' std is {std}; pass a number instead")
    return 1.0 / std


def set_scaling_factor(args, vae, latents: torch.Tensor) -> float:
    """Resolve ``--latent_scaling_factor`` (default, number or measured on ``latents``) into the VAE's config."""
    value = args.latent_scaling_factor
    if value == MEASURE:
        value = measure_scaling_factor(latents, getattr(vae.config, "shift_factor", None))
        logger.info("latent scaling factor measured on %d latents: %.6g", min(len(latents), SCALING_SAMPLES), value)
    elif value is None:
        value = float(vae.config.scaling_factor)
    vae.register_to_config(scaling_factor=float(value))
    return float(value)


def scaled(latents: torch.Tensor, vae) -> torch.Tensor:
    """Cached latents in the denoiser's space (the VAE config's scaling and shift)."""
    return scale_latents(latents, vae.config)
