"""ddpm_plus vs stock diffusers, side by side in one process.

    python -m benchmarks.run [--device cpu|cuda] [--only scheduler,sampling,training] [--json out.json]
                             [--unet cifar10|tiny] [--compile] [--threads N] [--budget_s S]

(from the repository root, with ddpm_plus installed).

Prints the device, absolute figures and ratios; every comparison is interleaved (rounds alternate the
variants; medians). The scheduler section always runs on the CPU (batch 64x3x32x32). Sampling and
training use the DDPM CIFAR-10 UNet (35.7M params; batch 256 / 128) on CUDA and a tiny UNet on the CPU
(--unet overrides). --compile adds the torch.compile variants (each costs ~1-2 min of compiling);
--budget_s skips those that would not fit. No figure here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

SECTIONS = ("scheduler", "sampling", "training")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="Default: cuda if available.")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"Comma-separated subset of {SECTIONS}.")
    p.add_argument("--json", default=None, help="Write all results to this JSON file (rewritten after each section).")
    p.add_argument(
        "--unet",
        default=None,
        choices=("cifar10", "tiny"),
        help="DDPM CIFAR-10 UNet (35.7M) or a tiny one (0.70M). Default: cifar10 on CUDA, tiny on the CPU.",
    )
    p.add_argument("--tiny", action="store_true", help="Same as --unet tiny.")
    p.add_argument("--compile", action="store_true", help="Also time the torch.compile variants.")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    p.add_argument("--rounds", type=int, default=5, help="Interleaved rounds for sampling and training.")
    p.add_argument("--budget_s", type=float, default=None, help="Skip compile variants that would end past this.")
    p.add_argument("--sampling_batch", type=int, default=None)
    p.add_argument("--sampling_steps", type=int, default=None, help="Denoising steps per timed sampling call.")
    p.add_argument("--training_batch", type=int, default=None)
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose from {SECTIONS}")
    args.only = only
    return args


def environment(device) -> dict:
    import diffusers
    import torch

    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    tiny = args.tiny or args.unet == "tiny" or (args.unet is None and device == "cpu")
    deadline = time.time() + args.budget_s if args.budget_s else None
    results = {"environment": environment(device)}
    print(f"# ddpm_plus benchmarks: {results['environment']}", flush=True)

    from . import bench_sampling, bench_scheduler, bench_training

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    runs = {
        "scheduler": lambda: bench_scheduler.run("cpu"),
        "sampling": lambda: bench_sampling.run(
            device,
            tiny=tiny,
            batch=args.sampling_batch,
            steps=args.sampling_steps,
            rounds=args.rounds,
            with_compile=args.compile,
            deadline=deadline,
        ),
        "training": lambda: bench_training.run(
            device,
            tiny=tiny,
            batch=args.training_batch,
            rounds=args.rounds,
            with_compile=args.compile,
            deadline=deadline,
        ),
    }
    reports = {
        "scheduler": bench_scheduler.report,
        "sampling": bench_sampling.report,
        "training": bench_training.report,
    }
    for section in args.only:
        start = time.time()
        try:
            results[section] = runs[section]()
            print(reports[section](results[section]), flush=True)
        except Exception as e:  # keep the other sections' figures
            import traceback

            traceback.print_exc()
            results[section] = {"error": f"{type(e).__name__}: {e}"}
        results[section]["wall_s"] = time.time() - start
        save()
    return results


if __name__ == "__main__":
    if not __package__:  # `python benchmarks/run.py`: the sibling modules are not importable that way
        raise SystemExit("error: run the benchmarks from the repository root as `python -m benchmarks.run ...`")
    main()
