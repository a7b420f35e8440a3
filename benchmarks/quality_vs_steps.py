"""Quality versus number of steps: DDPM, DDIM and Analytic-DPM on one trained model, no retraining.

For a pipeline whose scheduler carries an ``analytic_moments`` table (made by ``ddpm-plus analytic``):
- the bound in bits/dim on the bundled digits' held-out split, respaced to K timesteps ("linspace", as
  ``ddpm-plus evaluate --timesteps_respaced K``), for fixed_small, fixed_large and analytic (η = 1); the same
  x_t draws for every variance type (the UNet runs once per image and timestep, its outputs are reused);
- the digits Fréchet distance (proxy, not FID) of samples at each step count for DDPM fixed_small, DDPM
  fixed_large, DDIM (η = 0), Analytic-DDPM (η = 1), Analytic-DDIM (η = 0) and diffusers' DDIMScheduler and
  DPMSolverMultistepScheduler (DPM-Solver++, order 2), all hosted by ``DDPMPlusPipeline``, from the same
  initial noise, beside the floor (as many held-out real digits).

    python benchmarks/quality_vs_steps.py --pipeline runs/digits-a-analytic --json runs/quality-a.json

prints Markdown tables and writes JSON. CPU: about 15 minutes with the defaults (one thread).
"""

from __future__ import annotations

import argparse
import json
import math
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


def bounds(pipe, images, ks, seed, batch_size):
    from ddpm_plus import DDPMPlusScheduler
    from ddpm_plus.cli import _respaced_timesteps
    from ddpm_plus.evaluation.likelihood import vlb_terms

    T = int(pipe.scheduler.config.num_train_timesteps)
    rows = {}
    for k in ks:
        model = _CachedModel(pipe.unet)
        seq = None if k == T else _respaced_timesteps(T, k)
        for kind in BOUND_TYPES:
            scheduler = DDPMPlusScheduler.from_config(pipe.scheduler.config, variance_type=kind, eta=1.0)
            t0 = time.perf_counter()
            out = vlb_terms(
                model,
                scheduler,
                images,
                timesteps=seq,
                num_bins=17,
                generator=torch.Generator().manual_seed(seed),
                batch_size=batch_size,
                progress=False,
            )
            bpd = out["total_bpd"]
            rows[(k, kind)] = (float(bpd.mean()), float(bpd.std() / math.sqrt(len(bpd))))
            print(
                f"bound K={k} {kind}: {rows[(k, kind)][0]:.4f} ± {rows[(k, kind)][1]:.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    return rows


def make_scheduler(config, which, overrides):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ddpm_plus import DDPMPlusScheduler

    cls = {"plus": DDPMPlusScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[which]
    return cls.from_config(config, **overrides)


def frechet(pipe, steps, num_samples, seed, diffusers_max_steps):
    from ddpm_plus import DDPMPlusPipeline
    from ddpm_plus.data import digits_heldout_tensor
    from ddpm_plus.evaluation.digits_proxy import classifier_features, frechet_distance, load_or_train_digits_classifier

    classifier, _ = load_or_train_digits_classifier()
    train_feats = classifier_features(classifier, digits_heldout_tensor(8, 1, split="train"))
    held = digits_heldout_tensor(8, 1, split="test")
    perm = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))
    floor = frechet_distance(classifier_features(classifier, held[perm[:num_samples]]), train_feats)
    print(f"floor ({num_samples} held-out reals): {floor:.2f}")
    rows = {}
    for name, (which, overrides) in SAMPLERS.items():
        scheduler = make_scheduler(pipe.scheduler.config, which, overrides)
        sampler = DDPMPlusPipeline(pipe.unet, scheduler)
        sampler.set_progress_bar_config(disable=True)
        for k in steps:
            if which != "plus" and k > diffusers_max_steps:
                continue
            t0 = time.perf_counter()
            images = sampler(num_samples, torch.Generator().manual_seed(seed), k, output_type="pt").images
            rows[(name, k)] = frechet_distance(classifier_features(classifier, images * 2 - 1), train_feats)
            print(f"{name} {k} steps: {rows[(name, k)]:.2f} ({time.perf_counter() - t0:.0f} s)")
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

    import ddpm_plus  # noqa: F401
    from ddpm_plus import DDPMPlusPipeline
    from ddpm_plus.data import digits_heldout_tensor

    pipe = DDPMPlusPipeline.from_pretrained(args.pipeline)
    pipe.unet.eval()
    if pipe.scheduler.config.get("analytic_moments") is None:
        raise SystemExit("error: the pipeline's scheduler has no analytic_moments: run `ddpm-plus analytic` first")
    images = digits_heldout_tensor(8, 1, split="test")[: args.bound_images]
    with torch.no_grad():
        bound_rows = {} if args.no_bounds else bounds(pipe, images, args.bound_timesteps, args.seed, args.batch_size)
        fd_rows, floor = (
            ({}, None)
            if args.no_samples
            else frechet(pipe, args.steps, args.num_samples, args.seed, args.diffusers_max_steps)
        )
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
