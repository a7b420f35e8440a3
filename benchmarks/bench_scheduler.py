"""Scheduler micro-benchmark: ``step()`` and ``add_noise()`` per call, batch 64x3x32x32, DDPMPlusScheduler
against diffusers' DDPMScheduler with the same (default) config: linear betas, fixed_small, epsilon,
clip_sample on. Timesteps as pipelines pass them: a Python int and a 0-d tensor from
``scheduler.timesteps``; add_noise with one timestep per example (as training does)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from ddpm_plus import DDPMPlusScheduler

from .timing import interleaved, summary


def run(device="cpu", rounds=15, calls=20, shape=(64, 3, 32, 32)) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(shape, generator=g, device=device)
    model_output = torch.randn(shape, generator=g, device=device)
    clean, noise = sample.clamp(-1, 1), model_output
    per_example_t = torch.randint(0, 1000, (shape[0],), generator=g, device=device)
    ours, stock = DDPMPlusScheduler(), DDPMScheduler()
    for s in (ours, stock):
        s.set_timesteps(1000, device=device)
    t_tensor_ours, t_tensor_stock = ours.timesteps[500], stock.timesteps[500]  # 0-d tensors, t = 499
    t_int = int(t_tensor_ours)
    cases = {
        "step_int": (
            lambda: ours.step(model_output, t_int, sample, generator=g),
            lambda: stock.step(model_output, t_int, sample, generator=g),
        ),
        "step_tensor": (
            lambda: ours.step(model_output, t_tensor_ours, sample, generator=g),
            lambda: stock.step(model_output, t_tensor_stock, sample, generator=g),
        ),
        "add_noise": (
            lambda: ours.add_noise(clean, noise, per_example_t),
            lambda: stock.add_noise(clean, noise, per_example_t),
        ),
    }
    flat = {}
    for name, (a, b) in cases.items():
        flat[f"{name}/ddpm_plus"], flat[f"{name}/diffusers"] = a, b
    # The floor every ancestral step pays: drawing the noise (randn_tensor's call, as both schedulers do).
    flat["randn_floor"] = lambda: torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    samples = interleaved(flat, rounds=rounds, warmup=3, device=device, calls_per_round=calls)
    results = {"device": str(device), "shape": list(shape), "threads": torch.get_num_threads(), "cases": {}}
    for name in cases:
        a, b = summary(samples[f"{name}/ddpm_plus"]), summary(samples[f"{name}/diffusers"])
        results["cases"][name] = {
            "ddpm_plus_us": a["median_s"] * 1e6,
            "diffusers_us": b["median_s"] * 1e6,
            "ratio_ours_over_diffusers": a["median_s"] / b["median_s"],
            "ddpm_plus_min_us": a["min_s"] * 1e6,
            "diffusers_min_us": b["min_s"] * 1e6,
        }
    results["randn_floor_us"] = summary(samples["randn_floor"])["median_s"] * 1e6
    return results


def report(r: dict) -> str:
    lines = [
        f"scheduler ({r['device']}, batch {'x'.join(map(str, r['shape']))}, {r['threads']} torch threads; "
        f"medians of interleaved rounds, min in brackets)"
    ]
    lines.append(f"  {'call':<12} {'ddpm_plus us':>16} {'diffusers us':>16} {'ours/diffusers':>15}")
    for name, c in r["cases"].items():
        lines.append(
            f"  {name:<12} {c['ddpm_plus_us']:>8.1f} [{c['ddpm_plus_min_us']:>5.0f}] "
            f"{c['diffusers_us']:>8.1f} [{c['diffusers_min_us']:>5.0f}] {c['ratio_ours_over_diffusers']:>15.3f}"
        )
    lines.append(f"  randn of one batch alone (floor of any ancestral step): {r['randn_floor_us']:.1f} us")
    return "\n".join(lines)
