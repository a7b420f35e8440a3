"""Latent diffusion: training throughput on cached latents against encoding every batch, and the VAE's cost.

Both variants run the trainer's own ``training_step`` (imported) on the same UNet (built by the trainer's
``build_unet`` from the trainer's flags with ``--vae``), the same optimizer and the same batch of images,
interleaved in one process (benchmarks/timing.py): "cached" steps on latents encoded once beforehand, as
``--vae`` training does (ddpm_plus/trainer/latent_cache.py); "encode every batch" first encodes the batch's
images with the VAE (posterior mode, then the scaling), as a loop without a cache must. The ratio
cached / encode-every-batch is the speed-up of caching per step; data loading (image decoding for the
online variant, the latent lookup for the cached one) is excluded from both. Also timed: the VAE's encode
and decode, milliseconds per image.

VAEs have random weights (speed does not depend on them; nothing is downloaded):

- ``tiny``: a 2-level AutoencoderKL of the tests' size at 16 px, the tests' tiny UNet on its 8x8 latents;
- ``sd64``: sd-vae-ft-mse's architecture (AutoencoderKL, 83.7M parameters, downsampling 8) at 64 px and the
  ``latent_256`` preset's 274M UNet on its 4x8x8 latents (attention at 4, 2, 1): the 256 px proportions at a
  size a CPU can step;
- ``sd256``: sd-vae-ft-mse's architecture at 256 px and the ``latent_256`` preset as it is (a GPU size).

    python -m benchmarks.latent_caching --size tiny --device cpu --threads 2
    python -m benchmarks.latent_caching --size sd256 --device cuda --batch 32 --json latent.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler

from ddpm_plus.pipelines.pipeline_latent_ddpm_plus import scale_latents

from .timing import interleaved, summary

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)
SIZES = {
    "tiny": dict(
        vae=dict(block_out_channels=(4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2),
        resolution=16,
        flags=[
            "--block_out_channels",
            "16",
            "32",
            "--layers_per_block",
            "1",
            "--attention_resolutions",
            "4",
            "--norm_num_groups",
            "8",
        ],
    ),  # fmt: skip
    "sd64": dict(vae=SD_VAE, resolution=64, flags=["--config", "latent_256", "--attention_resolutions", "4", "2", "1"]),
    "sd256": dict(vae=SD_VAE, resolution=256, flags=["--config", "latent_256"]),
}


def build_vae(size: str, folder: str) -> AutoencoderKL:
    """A random AutoencoderKL of the size's architecture; its config saved to ``folder`` for ``--vae``."""
    blocks = len(SIZES[size]["vae"]["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        sample_size=SIZES[size]["resolution"], **SIZES[size]["vae"],
    )  # fmt: skip
    vae.save_config(folder)
    return vae.eval().requires_grad_(False)


def encode_on_device(vae, images):
    """What a loop without a cache does per batch: the posterior mode, scaled, on the device."""
    with torch.no_grad():
        return scale_latents(vae.encode(images.to(vae.dtype)).latent_dist.mode().float(), vae.config)


def run(size="tiny", device="cpu", batch=None, rounds=5, steps_per_round=2) -> dict:
    from ddpm_plus.trainer import loop as train
    from ddpm_plus.trainer.args import parse_args

    device = torch.device(device)
    cuda = device.type == "cuda"
    batch = batch or (32 if cuda else 4)
    folder = tempfile.mkdtemp(prefix="ddpm_plus_bench_vae_")
    vae = build_vae(size, folder).to(device)
    resolution = SIZES[size]["resolution"]
    flags = SIZES[size]["flags"] + [
        "--vae", folder, "--center_crop", "--resolution", str(resolution), "--train_batch_size", str(batch), "--logger", "none",
        "--mixed_precision", "bf16" if cuda else "no", "--output_dir", tempfile.mkdtemp(prefix="ddpm_plus_bench_"),
    ] + (["--allow_tf32"] if cuda else [])  # fmt: skip
    args = parse_args(flags)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.allow_tf32)
    accelerator = train.build_accelerator(args)
    torch.manual_seed(0)
    unet = train.build_unet(args).to(device)
    optimizer = train.build_optimizer(args, unet, device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    lr_scheduler = get_scheduler("constant", optimizer)
    noise_scheduler = train.build_scheduler(args)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand((batch, args.channels, resolution, resolution), generator=g, device=device) * 2 - 1
    cached = encode_on_device(vae, images)  # encoded once, as the cache holds it
    counter = iter(range(10**9))

    def step(get_latents):
        def run_steps():
            for _ in range(steps_per_round):
                out = train.training_step(
                    {"pixel_values": get_latents()}, unet, noise_scheduler, optimizer, lr_scheduler, accelerator,
                    step_seed=next(counter), loss_type=args.loss, max_grad_norm=args.max_grad_norm,
                )  # fmt: skip
            return out.loss

        return run_steps

    unet.train()
    cases = {"cached latents": step(lambda: cached), "encode every batch": step(lambda: encode_on_device(vae, images))}
    samples = interleaved(cases, rounds=rounds, warmup=1, device=device)
    with torch.no_grad():
        codec = interleaved(
            {"encode": lambda: vae.encode(images).latent_dist.mode(), "decode": lambda: vae.decode(cached).sample},
            rounds=rounds, warmup=1, device=device,
        )  # fmt: skip
    rows = {name: steps_per_round * batch / summary(s)["median_s"] for name, s in samples.items()}
    return {
        "size": size,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "batch": batch,
        "resolution": resolution,
        "latent_shape": list(cached.shape[1:]),
        "unet_parameters_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "vae_parameters_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 4),
        "images_per_s": rows,
        "ratio_cached_over_encoding": rows["cached latents"] / rows["encode every batch"],
        "vae_ms_per_image": {k: 1000 * statistics.median(v) / batch for k, v in codec.items()},
        "rounds": rounds,
        "steps_per_round": steps_per_round,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="Default: 32 on CUDA, 4 on the CPU.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps_per_round", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU.")
    p.add_argument("--json", default=None, help="Also write the figures to this file.")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run(a.size, a.device, a.batch, a.rounds, a.steps_per_round)
    print(f"{result['size']} on {result['device']}: batch {result['batch']} of {result['resolution']} px images, "
          f"latents {result['latent_shape']}, UNet {result['unet_parameters_M']}M, VAE {result['vae_parameters_M']}M")  # fmt: skip
    for name, value in result["images_per_s"].items():
        print(f"  {name:>20}: {value:10.2f} images/s")
    print(f"  cached / encode every batch: {result['ratio_cached_over_encoding']:.2f}x")
    ms = result["vae_ms_per_image"]
    print(f"  VAE encode {ms['encode']:.3f} ms/image, decode {ms['decode']:.3f} ms/image")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
