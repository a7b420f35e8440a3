"""Sampling benchmark: ms per denoising step and images/s of the full 1000-step chain, diffusers'
DDPMPipeline (fp32, the stock way) against DDPMPlusPipeline and ddpm_plus.pipelines.fast_sampling.FastSampler with
each fast path, the same UNet weights, interleaved in one process. Also, on CUDA: a host-sync check of
the fast loop (torch.cuda.set_sync_debug_mode('error')) and a bf16-vs-fp32 statistics check."""

from __future__ import annotations

import math
import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler
from ddpm_plus.pipelines.fast_sampling import FastSampler

from . import models
from .timing import interleaved, summary

COMPILE_COST_S = 90  # budgeted per compiled variant (default mode took ~60 s for this UNet on an H200)


def variants(device: torch.device, with_compile: bool) -> dict[str, dict]:
    """FastSampler settings to time, by name."""
    if device.type != "cuda":
        v = {
            "fast fp32": dict(dtype=torch.float32, channels_last=False),
            "fast bf16": dict(dtype=torch.bfloat16, channels_last=False),
        }
        if with_compile:  # exercises the compiled step on the CPU (inductor's C++ backend)
            v["fast fp32+compile"] = dict(dtype=torch.float32, channels_last=False, compile="default")
        return v
    v = {
        "fast fp32 eager": dict(dtype=torch.float32, channels_last=False, cuda_graph=False),
        "fast bf16+cl eager": dict(dtype=torch.bfloat16, channels_last=True, cuda_graph=False),
        "fast bf16+cl+graph": dict(dtype=torch.bfloat16, channels_last=True, cuda_graph=True),
        "fast fp16+cl+graph": dict(dtype=torch.float16, channels_last=True, cuda_graph=True),
    }
    if with_compile:
        v["fast bf16+cl+compile+graph"] = dict(
            dtype=torch.bfloat16, channels_last=True, compile="default", cuda_graph=True
        )
        # torch.compile's own CUDA graphs instead of the sampler's capture (inductor's cache makes it cheaper)
        v["fast bf16+cl+compile(reduce-overhead)"] = dict(
            dtype=torch.bfloat16, channels_last=True, compile="reduce-overhead"
        )
    return v


def run(device="cpu", tiny=True, batch=None, steps=None, rounds=5, with_compile=False, deadline=None) -> dict:
    device = torch.device(device)
    batch = batch or (256 if device.type == "cuda" else 8)
    steps = steps or (20 if device.type == "cuda" else 10)
    unet = models.build(tiny).to(device).eval()
    stock = DDPMPipeline(unet, DDPMScheduler())
    ours = DDPMPlusPipeline(unet, DDPMPlusScheduler())
    for p in (stock, ours):
        p.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=device).manual_seed(0)
    cases = {
        "diffusers DDPMPipeline fp32": lambda: stock(batch, generator=gen, num_inference_steps=steps, output_type="np"),
        "DDPMPlusPipeline fp32": lambda: ours(batch, generator=gen, num_inference_steps=steps, output_type="np"),
    }
    notes, errors = [], {}
    for name, options in variants(device, with_compile).items():
        if options.get("compile") and deadline is not None and time.time() + COMPILE_COST_S > deadline:
            notes.append(f"skipped {name}: less than {COMPILE_COST_S} s of the time budget left for compiling")
            continue
        try:
            sampler = FastSampler(ours, **options)
            start = time.time()
            sampler(batch, steps, gen, output_type="np")  # first call: graph capture / compilation
            notes.append(f"{name}: first call (capture/compile) {time.time() - start:.1f} s")
        except Exception as e:  # record and go on: one broken path must not lose the other figures
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        cases[name] = lambda s=sampler: s(batch, steps, gen, output_type="np")
    samples = interleaved(cases, rounds=rounds, warmup=1, device=device)
    base = summary(samples["diffusers DDPMPipeline fp32"])["median_s"]
    rows = {}
    for name, s in samples.items():
        med = summary(s)["median_s"]
        rows[name] = {
            "ms_per_step": med / steps * 1e3,
            "images_per_s_1000_steps": batch / (med / steps * 1000),
            "speedup_vs_diffusers": base / med,
            "min_ms_per_step": min(s) / steps * 1e3,
        }
    result = {
        "device": _device_name(device),
        "unet": "tiny" if tiny else "ddpm_cifar10",
        "unet_parameters": models.num_parameters(unet),
        "batch": batch,
        "steps_per_call": steps,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "notes": notes,
        "errors": errors,
    }
    if device.type == "cuda":
        result["sync_check"] = sync_check(ours, batch, steps)
        result["stats_check"] = stats_check(ours, batch, device)
    return result


def sync_check(pipe, batch, steps) -> dict:
    """Run the eager fast loop with CUDA's sync debug mode set to 'error': any host sync raises."""
    out = {}
    for name, options in {"eager": dict(cuda_graph=False), "graph": dict(cuda_graph=True)}.items():
        sampler = FastSampler(pipe, dtype=torch.bfloat16, channels_last=True, **options)
        gen = torch.Generator(device="cuda").manual_seed(1)
        sampler(batch, steps, gen, output_type="latent")  # loads the table, captures the graph
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler(batch, steps, gen, output_type="latent")
            out[name] = "no host sync"
        except RuntimeError as e:
            out[name] = f"host sync: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out


def stats_check(pipe, batch, device, steps=50) -> dict:
    """Per-channel mean/std of bf16+channels_last+graph samples vs the fp32 pipeline, same generator,
    differences in standard errors of the mean (std/sqrt(N)) and of the std (std/sqrt(2N)); and the
    float32 CUDA-graph sampler's largest pixel difference from the pipeline."""
    ref = pipe(
        batch, generator=torch.Generator(device).manual_seed(7), num_inference_steps=steps, output_type="pt"
    ).images.double()
    fast = FastSampler(pipe, dtype=torch.bfloat16, channels_last=True)(
        batch, steps, torch.Generator(device).manual_seed(7), output_type="pt"
    ).images.double()
    n = ref[:, 0].numel()
    rows = []
    for c in range(ref.shape[1]):
        r, f = ref[:, c], fast[:, c]
        sd = r.std().item()
        rows.append(
            {
                "channel": c,
                "fp32_mean": r.mean().item(),
                "bf16_mean": f.mean().item(),
                "fp32_std": sd,
                "bf16_std": f.std().item(),
                "z_mean": (f.mean().item() - r.mean().item()) / (sd / math.sqrt(n)),
                "z_std": (f.std().item() - sd) / (sd / math.sqrt(2 * n)),
            }
        )
    # The captured float32 chain must reproduce the pipeline itself (same generator, same noise order).
    graph32 = FastSampler(pipe, dtype=torch.float32, channels_last=False, cuda_graph=True)(
        batch, steps, torch.Generator(device).manual_seed(7), output_type="pt"
    ).images.double()
    return {
        "steps": steps,
        "batch": batch,
        "channels": rows,
        "bf16_max_abs_pixel_diff": (ref - fast).abs().max().item(),
        "fp32_graph_max_abs_pixel_diff": (ref - graph32).abs().max().item(),
    }


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def report(r: dict) -> str:
    lines = [
        f"sampling ({r['device']}, {r['unet']} UNet {r['unet_parameters'] / 1e6:.2f}M params, batch {r['batch']}, "
        f"{r['steps_per_call']} steps per timed call, {r['rounds']} interleaved rounds, medians)"
    ]
    lines.append(f"  {'variant':<30} {'ms/step':>9} {'img/s @1000 steps':>18} {'x diffusers':>12}")
    for name, row in r["rows"].items():
        lines.append(
            f"  {name:<30} {row['ms_per_step']:>9.2f} {row['images_per_s_1000_steps']:>18.2f} "
            f"{row['speedup_vs_diffusers']:>12.2f}"
        )
    lines += [f"  note: {n}" for n in r["notes"]]
    lines += [f"  ERROR {k}: {v}" for k, v in r["errors"].items()]
    if "sync_check" in r:
        lines.append(f"  sync check: {r['sync_check']}")
        zs = [(round(c["z_mean"], 2), round(c["z_std"], 2)) for c in r["stats_check"]["channels"]]
        lines.append(
            f"  bf16 vs fp32 stats (z of mean, z of std per channel): {zs}; fp32 CUDA-graph sampler vs "
            f"pipeline, max |pixel diff|: {r['stats_check']['fp32_graph_max_abs_pixel_diff']:.2e}"
        )
    return "\n".join(lines)
