"""What the evaluation engine needs to know about a pipeline, pixel or latent (``LatentDDPMPlusPipeline``): its
denoiser, class conditioning and image geometry, and for a latent model the real images' latents.

A latent model is scored on its decoded images (the pipeline's output) by the same sample metrics as a pixel
model. Its bound is the bound of the latents: the real images are encoded as the trainer encodes them (an
``AutoencoderKL``'s posterior mode, a ``VQModel``'s latents before quantisation) and scaled as the pipeline
scales them, z = (E(x) - shift_factor) * scaling_factor. Those are "latent bits/dim": bits per latent
dimension of a continuous code, not comparable with pixel bits/dim (docs/evaluation.md).
"""

from __future__ import annotations

import torch
from diffusers import VQModel

from ..pipelines.pipeline_ddpm_plus import Conditioning, conditioning_of
from ..pipelines.pipeline_latent_ddpm_plus import LatentDDPMPlusPipeline, scale_latents
from .distributed import Shard, gather_rows
from .errors import EvaluationError

__all__ = ["is_latent", "denoiser_of", "pipeline_conditioning", "pipeline_geometry", "encode_latents"]


def is_latent(pipe) -> bool:
    return isinstance(pipe, LatentDDPMPlusPipeline)


def denoiser_of(pipe):
    """The denoising network: a latent pipeline's ``unet`` or ``transformer``, else ``pipe.unet``."""
    return pipe.denoiser if is_latent(pipe) else pipe.unet


def pipeline_conditioning(pipe) -> Conditioning:
    return pipe.conditioning if is_latent(pipe) else conditioning_of(pipe)


def _square(size, what: str) -> int:
    if not isinstance(size, int) and len(set(size)) != 1:
        raise EvaluationError(f"only square {what} can be evaluated, this one has sample_size={size}")
    return size if isinstance(size, int) else int(size[0])


def pipeline_geometry(pipe, resolution: int | None = None) -> tuple[int, int]:
    """(resolution, channels) of the images to compare ``pipe``'s samples with: ``resolution`` (default the
    UNet's ``sample_size``; for a latent pipeline the latent size times the VAE's downsampling) and the
    channels of its images (a latent pipeline: the VAE's input channels)."""
    if not is_latent(pipe):
        return resolution or _square(pipe.unet.config.sample_size, "UNets"), int(pipe.unet.config.in_channels)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = _square(pipe.denoiser_config.sample_size, "denoisers")
    if resolution is not None and resolution != size * factor:
        raise EvaluationError(
            f"a latent pipeline samples {size * factor}x{size * factor} images ({size}x{size} latents, VAE "
            f"downsampling {factor}); got resolution={resolution}"
        )
    return size * factor, int(pipe.vae.config.in_channels)


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, batch_size: int, shard: Shard | None = None) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> the denoiser's scaled latents (float32, CPU), encoded in blocks of
    ``batch_size`` split over the processes of ``shard`` and gathered."""
    shard, vae = shard or Shard(), pipe.vae
    blocks = shard.blocks(len(images), batch_size)
    out = None
    for block in blocks:
        x = images[block.start : block.stop].to(vae.device, vae.dtype)
        z = vae.encode(x).latents if isinstance(vae, VQModel) else vae.encode(x).latent_dist.mode()
        z = scale_latents(z.float(), vae.config).cpu()
        if out is None:
            out = torch.zeros(len(images), *z.shape[1:])
        out[block.start : block.stop] = z
    if out is None:  # this process has no block: the shape from the VAE's config
        out = torch.zeros(len(images), *_latent_shape(pipe, images.shape[-1]))
    return gather_rows(shard, out, blocks)


def _latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    config = pipe.denoiser_config
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(config.in_channels), resolution // factor, resolution // factor
