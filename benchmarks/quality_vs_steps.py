"""Quality versus number of steps: DDPM, DDIM and Analytic-DPM on one trained model, no retraining.

For a pipeline whose scheduler carries an ``analytic_moments`` table (made by ``ddpm-plus analytic``):
- the bound in bits/dim on the bundled digits' held-out split, respaced to K timesteps (the evaluation
  engine's bound, as ``ddpm-plus evaluate --timesteps_respaced K``), for fixed_small, fixed_large and analytic
  (η = 1); the same x_t draws for every variance type (the UNet runs once per image and timestep, its outputs
  are reused);
- the digits Fréchet distance (proxy, not FID) of samples at each step count (sampled and quantised to uint8
  by the evaluation engine, as ``ddpm-plus evaluate`` does) for DDPM fixed_small, DDPM
  fixed_large, DDIM (η = 0), Analytic-DDPM (η = 1), Analytic-DDIM (η = 0) and diffusers' DDIMScheduler and
  DPMSolverMultistepScheduler (DPM-Solver++, order 2), all hosted by ``DDPMPlusPipeline``, from the same
  initial noise, beside the floor (as many held-out real digits).

    python benchmarks/quality_vs_steps.py --pipeline runs/digits-a-analytic --json runs/quality-a.json

prints Markdown tables and writes JSON. CPU: about 15 minutes with the defaults (one thread).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

SAMPLERS = {  # name -> (scheduler class, config overrides)
    "DDPM fixed_small": ("plus", {"variance_type": "fixed_small", "eta": 1.0}),
    "DDPM fixed_large": ("plus", {"variance_type": "fixed_large", "eta": 1.0}),
    "DDIM (η = 0)": ("plus", {"variance_type": "fixed_small", "eta": 0.0}),
    "Analytic-DDPM": ("plus", {"variance_type": "analytic", "eta": 1.0}),
    "Analytic-DDIM": ("plus", {"variance_type": "analytic", "eta": 0.0}),
    "diffusers DDIMScheduler": ("ddim", {}),
    "diffusers DPM-Solver++ (2M)": ("dpm", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
BOUND_TYPES = ("fixed_small", "fixed_large", "analytic")


class _CachedModel:
    """The UNet, called once per distinct (timestep, batch) input: vlb_terms draws the same x_t for the
    same generator seed, so the other variance types reuse the outputs."""

    def __init__(self, unet):
        self.unet, self.cache = unet, {}
        self.device, self.dtype = unet.device, unet.dtype

    def __call__(self, x, t):
        key = (int(t[0]), x.shape[0], float(x.double().sum()), float(x.double().abs().sum()))
        if key not in self.cache:
            self.cache[key] = self.unet(x, t).sample.detach().to("cpu", torch.float64)
        return self.cache[key]


def bounds(pipe, reals, ks, seed, batch_size):
    from ddpm_plus import DDPMPlusScheduler
    from ddpm_plus.evaluation.bound import bound_figures
    from ddpm_plus.evaluation.options import EvaluationOptions

    T = int(pipe.scheduler.config.num_train_timesteps)
    rows = {}
    for k in ks:
        model = _CachedModel(pipe.unet)
        options = EvaluationOptions(
            metrics="bpd", bound_timesteps=None if k == T else k, batch_size=batch_size, seed=seed
        )
        for kind in BOUND_TYPES:
            scheduler = DDPMPlusScheduler.from_config(pipe.scheduler.config, variance_type=kind, eta=1.0)
            t0 = time.perf_counter()
            out = bound_figures(model, scheduler, reals, options)
            rows[(k, kind)] = (out["bits_per_dim"], out["bits_per_dim_stderr"])
            print(
                f"bound K={k} {kind}: {rows[(k, kind)][0]:.4f} ± {rows[(k, kind)][1]:.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    return rows


def make_scheduler(config, which, overrides):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ddpm_plus import DDPMPlusScheduler

    cls = {"plus": DDPMPlusScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[which]
    return cls.from_config(config, **overrides)


def frechet(pipe, heldout, steps, num_samples, seed, diffusers_max_steps):
    from ddpm_plus import DDPMPlusPipeline
    from ddpm_plus.evaluation.digits_proxy import digits_proxy_figures
    from ddpm_plus.evaluation.engine import sample_uint8
    from ddpm_plus.evaluation.options import EvaluationOptions

    rows, floor = {}, None
    for name, (which, overrides) in SAMPLERS.items():
        scheduler = make_scheduler(pipe.scheduler.config, which, overrides)
        sampler = DDPMPlusPipeline(pipe.unet, scheduler)
        sampler.set_progress_bar_config(disable=True)
        for k in steps:
            if which != "plus" and k > diffusers_max_steps:
                continue
            t0 = time.perf_counter()
            options = EvaluationOptions(
                metrics="bpd", num_samples=num_samples, num_inference_steps=k, batch_size=num_samples, seed=seed
            )
            figures = digits_proxy_figures(sample_uint8(sampler, options, None), heldout, seed=seed)
            rows[(name, k)] = figures["frechet_proxy_samples_vs_train"]
            floor = figures["frechet_proxy_floor_heldout_vs_train"]  # the same held-out reals every time
            print(f"{name} {k} steps: {rows[(name, k)]:.2f} ({time.perf_counter() - t0:.0f} s)")
    print(f"floor ({num_samples} held-out reals): {floor:.2f}")
    return rows, floor


def markdown(bound_rows, ks, fd_rows, steps, floor, num_samples, num_images):
    lines = []
    if bound_rows:
        lines = [f"| bound, bits/dim ({num_images} held-out digits) | " + " | ".join(f"K = {k}" for k in ks) + " |"]
        lines.append("|---" * (len(ks) + 1) + "|")
        for kind in BOUND_TYPES:
            cells = [f"{bound_rows[(k, kind)][0]:.3f} ± {bound_rows[(k, kind)][1]:.3f}" for k in ks]
            lines.append(f"| {kind} (η = 1) | " + " | ".join(cells) + " |")
        lines.append("")
    if not fd_rows:
        return "\n".join(lines)
    lines += [
        f"| digits Fréchet proxy, {num_samples} samples (floor {floor:.2f}) | " + " | ".join(map(str, steps)) + " |",
    ]
    lines.append("|---" * (len(steps) + 1) + "|")
    for name in SAMPLERS:
        cells = [f"{fd_rows[(name, k)]:.2f}" if (name, k) in fd_rows else "—" for k in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline whose scheduler has analytic_moments")
    parser.add_argument("--bound_timesteps", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--bound_images", type=int, default=None, help="first N held-out images (default 360)")
    parser.add_argument("--steps", type=int, nargs="*", default=[10, 20, 50, 100, 1000])
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--diffusers_max_steps", type=int, default=1000, help="skip diffusers' schedulers above")
    parser.add_argument("--no_bounds", action="store_true")
    parser.add_argument("--no_samples", action="store_true")
    parser.add_argument("--batch_size", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ddpm_plus import DDPMPlusPipeline
    from ddpm_plus.evaluation.real_images import load_eval_images

    pipe = DDPMPlusPipeline.from_pretrained(args.pipeline)
    pipe.unet.eval()
    if pipe.scheduler.config.get("analytic_moments") is None:
        raise SystemExit("error: the pipeline's scheduler has no analytic_moments: run `ddpm-plus analytic` first")
    heldout = load_eval_images("digits", resolution=8, channels=1)  # the test split, as the model sees it
    reals = load_eval_images("digits", resolution=8, channels=1, max_images=args.bound_images)
    with torch.no_grad():
        bound_rows = {} if args.no_bounds else bounds(pipe, reals, args.bound_timesteps, args.seed, args.batch_size)
        fd_rows, floor = (
            ({}, None)
            if args.no_samples
            else frechet(pipe, heldout.images, args.steps, args.num_samples, args.seed, args.diffusers_max_steps)
        )
    images = reals.images
    table = markdown(bound_rows, args.bound_timesteps, fd_rows, args.steps, floor, args.num_samples, len(images))
    print(table)
    if args.json:
        result = {
            "pipeline": args.pipeline,
            "bound_images": len(images),
            "bounds": {f"{k}/{kind}": v for (k, kind), v in bound_rows.items()},
            "num_samples": args.num_samples,
            "frechet_proxy": {f"{name}/{k}": v for (name, k), v in fd_rows.items()},
            "frechet_floor": floor,
            "markdown": table,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
