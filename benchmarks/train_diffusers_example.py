"""Train the way diffusers' examples/unconditional_image_generation/train_unconditional.py does (its
DDPMScheduler, its add_noise, its F.mse_loss on the noise, AdamW, get_scheduler, EMAModel), with the UNet,
data and hyper-parameters of a ddpm_plus training config, and save a diffusers ``DDPMPipeline``.

It is the "diffusers example" row of the README quality table: the saved pipeline is then scored with
ddpm_plus' exact bound (``ddpm-plus evaluate``, which rebuilds a DDPMPlusScheduler from the same config).

    python -m benchmarks.train_diffusers_example --config digits --output_dir runs/digits-d-diffusers
(from the repository root; any trainer flag may follow, e.g. --max_train_steps 1000; only the ones used here
matter).
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F


def main(argv=None):
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ddpm_plus.data import DIGITS_NUM_BINS, ImageTransform, load_digits_dataset, prepare_dataset
    from ddpm_plus.trainer.args import parse_args  # the same flags and presets as the trainer
    from ddpm_plus.trainer.loop import build_unet

    args = parse_args(argv)
    if args.dataset_name is not None or args.train_data_dir is not None:
        raise SystemExit("error: this benchmark trains on the bundled digits only")
    if args.variance_type != "fixed_small" or args.prediction_type != "epsilon" or args.loss != "simple":
        raise SystemExit("error: the diffusers example trains epsilon / fixed_small / simple MSE only")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        beta_start=args.beta_start,
        beta_end=args.beta_end,
    )
    model = build_unet(args)
    transform = ImageTransform(
        args.resolution,
        args.channels,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        num_bins=DIGITS_NUM_BINS,
        generator=gen,
    )
    data = prepare_dataset(load_digits_dataset("train"), transform)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    ema = (
        EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=type(model),
            model_config=model.config,
        )
        if args.use_ema
        else None
    )

    bs, step, start, loss = args.train_batch_size, 0, time.perf_counter(), torch.tensor(float("nan"))
    model.train()
    while step < args.max_train_steps:
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(perm) - bs + 1, bs):
            clean = torch.stack([data[int(j)]["pixel_values"] for j in perm[i : i + bs]])
            noise = torch.randn(clean.shape, generator=gen)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,), generator=gen).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            if ema is not None:
                ema.step(model.parameters())
            step += 1
            if step % max(1, args.logging_steps) == 0:
                print(
                    f"step {step}/{args.max_train_steps} loss {loss.item():.4f} "
                    f"{step * bs / (time.perf_counter() - start):.1f} images/s",
                    flush=True,
                )
            if step >= args.max_train_steps:
                break
    if ema is not None:
        ema.copy_to(model.parameters())
    model.eval()
    DDPMPipeline(unet=model, scheduler=noise_scheduler).save_pretrained(args.output_dir, safe_serialization=True)
    seconds = time.perf_counter() - start
    print(
        f"done: {step} steps in {seconds:.0f} s, final loss {loss.item():.4f}, "
        f"{step * bs / seconds:.1f} images/s -> {args.output_dir}"
    )
    return 0 if math.isfinite(loss.item()) else 1


if __name__ == "__main__":
    sys.exit(main())
