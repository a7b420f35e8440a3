"""Training benchmark: images/s of the trainer's own ``ddpm_plus.trainer.loop.training_step`` (imported, not copied)
on the trainer's own UNet (``build_unet``), optimizer (``build_optimizer``), scheduler and accelerator, against a loop doing exactly what
diffusers' examples/unconditional_image_generation/train_unconditional.py does per step with
``--mixed_precision fp16`` (on the CPU: its fp32 path), same UNet shape and batch, interleaved.

The stock loop uses torch.autocast + GradScaler directly, which is what accelerate runs for fp16 on one
device: accelerate's process-wide state cannot hold fp16 (stock) and bf16 (ours) in one process.
Batches are synthetic tensors already on the device: this times the step, not the data loader."""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from . import models
from .timing import interleaved, summary

COMPILE_COST_S = 120  # budgeted for compiling the training step (forward + backward took ~60 s on an H200)


def import_trainer():
    """``ddpm_plus.trainer.loop`` and ``ddpm_plus.trainer.args``; where ``datasets`` cannot be imported (the GPU
    machine), a stand-in module is registered first: only the data loading uses it, and the step benchmarked
    here does not."""
    note = None
    try:
        import datasets  # noqa: F401
    except Exception as e:  # missing, or incompatible with the machine's pyarrow/fsspec
        stub = types.ModuleType("datasets")
        stub.__getattr__ = lambda name: _Unavailable
        sys.modules["datasets"] = stub
        note = f"datasets not importable ({type(e).__name__}: {e}); a stand-in was registered to import the trainer"
    return importlib.import_module("ddpm_plus.trainer.loop"), importlib.import_module("ddpm_plus.trainer.args"), note


class _Unavailable:
    def __init__(self, *args, **kwargs):
        pass


def stock_fp16_step(unet, optimizer, lr_scheduler, scaler, noise_scheduler, images, weight_dtype, device):
    """One step of diffusers' train_unconditional.py (epsilon prediction, no EMA), as accelerate runs it."""
    clean_images = images.to(weight_dtype)
    noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=device)
    bsz = clean_images.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
        model_output = unet(noisy_images, timesteps).sample
    loss = F.mse_loss(model_output.float(), noise.float())
    if scaler is not None:  # accelerator.backward / clip_grad_norm_ / optimizer.step with fp16
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
    return loss


def run(device="cpu", tiny=True, batch=None, rounds=5, steps_per_round=None, with_compile=False, deadline=None) -> dict:
    device = torch.device(device)
    cuda = device.type == "cuda"
    batch = batch or (128 if cuda else 8)
    steps_per_round = steps_per_round or (5 if cuda else 2)
    tf32_defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # torch's, untouched
    train, train_args, note = import_trainer()
    notes = [note] if note else []
    precision = "bf16" if cuda else "no"
    flags = (
        models.TRAIN_FLAGS["tiny" if tiny else "cifar10"]
        + [
            "--train_batch_size",
            str(batch),
            "--mixed_precision",
            precision,
            "--logger",
            "none",
            "--output_dir",
            tempfile.mkdtemp(prefix="ddpm_plus_bench_"),
            "--max_train_steps",
            "100000",
        ]
        + (["--allow_tf32"] if cuda else [])
    )
    args = train_args.parse_args(flags)
    accelerator = train.build_accelerator(args)  # one per process (accelerate's state is process-wide)
    noise_scheduler = train.build_scheduler(args)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand((batch, args.channels, args.resolution, args.resolution), generator=g, device=device) * 2 - 1

    def ours(*extra_flags, compile_mode=None):
        a = train_args.parse_args(flags + list(extra_flags))
        torch.manual_seed(0)
        # the set-up of ddpm_plus.trainer.loop.prepare() for these flags, with its own builders
        unet = train.build_unet(a).to(device)
        if a.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        optimizer = train.build_optimizer(a, unet, device)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        if a.compile:
            unet = torch.compile(unet, dynamic=False, **({"mode": compile_mode} if compile_mode else {}))
        lr_scheduler = get_scheduler(
            a.lr_scheduler, optimizer, num_warmup_steps=a.lr_warmup_steps, num_training_steps=a.max_train_steps
        )
        unet.train()
        counter = iter(range(10**9))

        def step():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(a.allow_tf32)
            out = None
            for _ in range(steps_per_round):
                out = train.training_step(
                    {"pixel_values": images},
                    unet,
                    noise_scheduler,
                    optimizer,
                    lr_scheduler,
                    accelerator,
                    step_seed=next(counter),
                    loss_type=a.loss,
                    snr_gamma=a.snr_gamma,
                    max_grad_norm=a.max_grad_norm,
                )
            return out.loss

        return step

    def stock():
        torch.manual_seed(0)
        unet = train.build_unet(args).to(device)
        # the example's defaults: AdamW(lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8), cosine, 500 warmup
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=100000)
        scaler = torch.amp.GradScaler("cuda") if cuda else None
        weight_dtype = torch.float16 if cuda else torch.float32
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        unet.train()

        def step():
            # the example sets no TF32 flag: torch's defaults (matmul off, cuDNN convolutions on)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_defaults
            out = None
            for _ in range(steps_per_round):
                out = stock_fp16_step(unet, optimizer, lr_scheduler, scaler, sched, images, weight_dtype, device)
            return out

        return step

    stock_name = "diffusers example " + ("fp16 autocast" if cuda else "fp32")
    ours_name = f"train.py {'--mixed_precision bf16 --allow_tf32 (fused AdamW)' if cuda else '(fp32)'}"
    cases = {stock_name: stock(), ours_name: ours()}
    cases[ours_name + " --channels_last"] = ours("--channels_last")
    if with_compile:
        if deadline is not None and time.time() + COMPILE_COST_S > deadline:
            notes.append(f"skipped the compiled step: less than {COMPILE_COST_S} s of the time budget left")
        else:
            start = time.time()
            try:
                fn = ours("--channels_last", "--compile")
                fn()
                notes.append(f"compiled step: first call {time.time() - start:.1f} s")
                cases[ours_name + " --channels_last --compile"] = fn
            except Exception as e:  # record it and keep the eager figures
                notes.append(f"compiled step failed after {time.time() - start:.1f} s: {type(e).__name__}: {e}")
        # Information for choosing a default: the same compiled graph with torch.compile's CUDA graphs
        # (inductor's cache makes this compile cheap). Not a train.py flag.
        if cuda and (deadline is None or time.time() + COMPILE_COST_S / 2 < deadline):
            start = time.time()
            try:
                fn = ours("--channels_last", "--compile", compile_mode="reduce-overhead")
                fn()
                notes.append(f"compiled step (mode reduce-overhead): first call {time.time() - start:.1f} s")
                cases[ours_name + " --channels_last --compile + mode=reduce-overhead (not a flag)"] = fn
            except Exception as e:
                notes.append(f"reduce-overhead step failed after {time.time() - start:.1f} s: {type(e).__name__}: {e}")
    losses = {name: fn().item() for name, fn in cases.items()}  # warm-up; finite losses expected
    samples = interleaved(cases, rounds=rounds, warmup=0, device=device)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_defaults
    base = summary(samples[stock_name])["median_s"]
    rows = {
        name: {
            "images_per_s": steps_per_round * batch / summary(s)["median_s"],
            "speedup_vs_diffusers": base / summary(s)["median_s"],
            "warmup_loss": losses[name],
        }
        for name, s in samples.items()
    }
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "unet": "tiny" if tiny else "ddpm_cifar10",
        "batch": batch,
        "steps_per_round": steps_per_round,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "notes": notes,
    }


def report(r: dict) -> str:
    lines = [
        f"training ({r['device']}, {r['unet']} UNet, batch {r['batch']}, {r['steps_per_round']} steps per timed "
        f"round, {r['rounds']} interleaved rounds, medians)"
    ]
    lines.append(f"  {'loop':<76} {'images/s':>10} {'x diffusers':>12}")
    for name, row in r["rows"].items():
        lines.append(f"  {name:<76} {row['images_per_s']:>10.1f} {row['speedup_vs_diffusers']:>12.2f}")
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)
