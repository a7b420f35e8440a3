"""The ``ddpm-plus`` command line.

``ddpm-plus evaluate PIPELINE_DIR_OR_REPO_ID`` reports, for a saved ddpm_plus/diffusers DDPM pipeline:
- bits/dim of the exact variational bound on the bundled digits (held-out split by default, 17 levels);
- a sample grid PNG;
- the "digits Frechet distance (proxy, not FID)" of the samples against the digits train split, in the
  features of a small classifier trained on that split, beside the same distance for held-out real digits
  (the reference floor, same number of images);
- optionally the literature FID, only with an Inception weights file supplied by the user (torch-fidelity).
Results are printed as a table and written as JSON; ``--push_to_hub`` puts them into the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .image_grid import image_grid

__all__ = ["main", "build_parser", "evaluate"]

PROXY_NAME = "digits Frechet distance (proxy, not FID)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-plus", description="ddpm_plus command line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser(
        "evaluate",
        help="bits/dim, samples and a Frechet-distance proxy of a saved pipeline on the bundled digits",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("pipeline", metavar="PIPELINE_DIR_OR_REPO_ID")
    ev.add_argument(
        "--split",
        default="test",
        choices=("test", "train", "all"),
        help="digits split for bits/dim (default: the held-out 'test' split, 360 images)",
    )
    ev.add_argument("--num_bins", type=int, default=17, help="grid levels of the data (17 for the digits)")
    ev.add_argument("--resolution", type=int, default=None, help="default: the UNet's sample_size")
    ev.add_argument("--max_images", type=int, default=None, help="evaluate bits/dim on the first N images only")
    ev.add_argument("--num_samples", type=int, default=64, help="images to sample for the grid and the proxy")
    ev.add_argument("--inference_steps", type=int, default=100, help="denoising steps for sampling")
    ev.add_argument(
        "--timesteps_respaced",
        type=int,
        default=None,
        metavar="K",
        help="bound on K evenly spaced timesteps (faster, looser) instead of all T",
    )
    ev.add_argument("--batch_size", type=int, default=256, help="images per UNet call in the bound")
    ev.add_argument(
        "--output_dir",
        default=None,
        help="where the grid and JSON go (default: PIPELINE_DIR/evaluation, or ./evaluation-<repo>)",
    )
    ev.add_argument("--json", default=None, help="JSON path (default: OUTPUT_DIR/eval_results.json)")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--classifier_cache_dir",
        default=None,
        help="where the digits classifier's safetensors weights are cached (default: ~/.cache/ddpm_plus)",
    )
    ev.add_argument(
        "--inception_weights",
        default=None,
        metavar="PATH",
        help="literature FID with this local Inception weights file (needs torch-fidelity; never downloads)",
    )
    ev.add_argument("--push_to_hub", action="store_true", help="write the results into the model card and push")
    ev.add_argument("--hub_model_id", default=None, help="repo to push to (default: the evaluated repo id)")
    ev.add_argument("--hub_private_repo", action="store_true")
    ev.add_argument(
        "--hub_token",
        default=None,
        help="discouraged (visible to other users of the machine): set HF_TOKEN or run `hf auth login`",
    )
    ev.add_argument("--no_progress", action="store_true", help="hide progress bars")
    _add_train_and_push_parsers(sub)
    return parser


TRAIN_EXTRA_MODULES = ("accelerate", "datasets", "sklearn", "tensorboard", "yaml")
TRAIN_EXTRA_HINT = 'pip install "ddpm-plus[train]"'


def _add_train_and_push_parsers(sub) -> None:
    # `train` hands every argument after it to ddpm_plus.train (its own parser, its own --help).
    sub.add_parser(
        "train",
        add_help=False,
        help="train a DDPM in one process (flags: ddpm-plus train --help; "
        "many processes: accelerate launch -m ddpm_plus.train)",
    )
    from .hub import add_push_arguments

    add_push_arguments(
        sub.add_parser(
            "push",
            help="push a training output directory's pipeline, model card and "
            "last sample grid to the Hub (never checkpoints or logs)",
        )
    )


def _missing_train_extra(err: ImportError) -> str | None:
    """The message for a module of the [train] extras that cannot be imported, else None."""
    name = (err.name or "").split(".")[0]
    if name not in TRAIN_EXTRA_MODULES:
        return None
    return f"error: this command needs the training extras ({name} is not installed): {TRAIN_EXTRA_HINT}"


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        from .train import main as train_main

        train_main(argv[1:], prog="ddpm-plus train")
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "push":
        from .hub import push_command

        return push_command(args)
    if args.command == "evaluate":
        _evaluate_without_leaking_the_token(args)
    return 0


def _evaluate_without_leaking_the_token(args) -> None:
    """``evaluate``, with a ``--hub_token`` warned about and never printed in an error."""
    from .hub import TOKEN_ON_COMMAND_LINE, HubPushError, redact

    if args.hub_token:
        print(f"warning: {TOKEN_ON_COMMAND_LINE}", file=sys.stderr)
    try:
        evaluate(args)
    except HubPushError as err:
        raise SystemExit(f"error: {redact(str(err), args.hub_token)}") from None


def _check_args(args) -> None:
    for name in ("num_bins",):
        if getattr(args, name) < 2:
            raise SystemExit(f"error: --{name} must be >= 2, got {getattr(args, name)}")
    for name in ("num_samples", "inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {getattr(args, name)}")
    for name in ("timesteps_respaced", "max_images", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {value}")
    if args.num_samples < 2:
        raise SystemExit("error: --num_samples must be >= 2 (a Frechet distance needs a covariance)")
    if args.inception_weights is not None:
        if not Path(args.inception_weights).is_file():
            raise SystemExit(f"error: --inception_weights {args.inception_weights!r} is not a file")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise SystemExit(
                "error: --inception_weights needs torch-fidelity (pip install torch-fidelity); "
                "ddpm-plus never downloads Inception weights"
            ) from None


def _respaced_timesteps(num_train: int, k: int) -> torch.Tensor:
    """K timesteps evenly spaced over [0, T-1] (the scheduler module's ``respace``, "linspace" spacing),
    descending, always containing 0 and T-1."""
    from .scheduling_ddpm_plus import respace

    if k > num_train:
        raise SystemExit(f"error: --timesteps_respaced {k} exceeds num_train_timesteps={num_train}")
    if k < 2 <= num_train:
        raise SystemExit("error: --timesteps_respaced needs K >= 2 (the bound's steps run from T-1 down to 0)")
    return torch.from_numpy(respace(num_train, k, timestep_spacing="linspace").timesteps)


def _inception_fid(samples01: torch.Tensor, reals01: torch.Tensor, weights: str) -> float:
    """Literature FID with torch-fidelity's Inception and a user-supplied weights file (no download)."""
    import torch_fidelity

    class _Images(torch.utils.data.Dataset):
        def __init__(self, x):
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            self.x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(samples01),
        input2=_Images(reals01),
        fid=True,
        cuda=torch.cuda.is_available(),
        feature_extractor_weights_path=weights,
        verbose=False,
    )
    return float(metrics["frechet_inception_distance"])


def evaluate(args) -> dict:
    """Run the evaluation described by parsed ``args``; returns the results dict (also written as JSON)."""
    from diffusers import DiffusionPipeline

    import ddpm_plus  # noqa: F401  (registers DDPMPlusPipeline/DDPMPlusScheduler with diffusers)

    from .data import digits_heldout_tensor
    from .evaluation import classifier_features, frechet_distance, load_or_train_digits_classifier
    from .likelihood import vlb_terms

    _check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local = Path(args.pipeline).is_dir()
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    size = unet.config.sample_size
    native = size if isinstance(size, int) else int(size[0])
    if not isinstance(size, int) and len(set(size)) != 1:
        raise SystemExit(f"error: only square UNets are supported, sample_size={size}")
    resolution = args.resolution or native
    channels = int(unet.config.in_channels)
    out_dir = Path(
        args.output_dir
        or (Path(args.pipeline) / "evaluation" if local else f"evaluation-{args.pipeline.replace('/', '__')}")
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    images = digits_heldout_tensor(resolution, channels, split=args.split)
    if args.max_images is not None:
        images = images[: args.max_images]
    num_train = int(scheduler.config.num_train_timesteps)
    seq = None if args.timesteps_respaced is None else _respaced_timesteps(num_train, args.timesteps_respaced)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    terms = vlb_terms(
        unet,
        scheduler,
        images,
        timesteps=seq,
        num_bins=args.num_bins,
        generator=gen,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    bound_seconds = time.perf_counter() - t0
    bpd = terms["total_bpd"]
    n = len(bpd)
    stderr = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    factor = dims_per_source_pixel(resolution, channels)
    results = {
        "pipeline": str(args.pipeline),
        "dataset": f"bundled scikit-learn digits, split={args.split!r}",
        "num_images": n,
        "resolution": resolution,
        "channels": channels,
        "num_bins": args.num_bins,
        "bound_timesteps": "all" if seq is None else int(len(seq)),
        "num_train_timesteps": num_train,
        "variance_type": scheduler.config.variance_type,
        "prediction_type": scheduler.config.prediction_type,
        "bits_per_dim": float(bpd.mean()),
        "bits_per_dim_stderr": stderr,
        "prior_bits_per_dim": float(terms["prior_bpd"].mean()),
        "decoder_bits_per_dim": float(terms["terms_bpd"][:, terms["decoder_index"]].mean()),
        "bound_seconds": round(bound_seconds, 2),
        # the mean term of the bound per timestep (the decoder L_0 at timestep 0), bits/dim
        "terms_timesteps": terms["timesteps"].tolist(),
        "terms_bpd_mean": [round(v, 8) for v in terms["terms_bpd"].mean(0).tolist()],
    }
    if factor is not None:
        # Nearest upsampling and channel replication are injective: total nats are the same, spread over
        # C·(8k)² model dims instead of the 64 source pixels, so per source pixel = x C·k².
        results["bits_per_source_pixel"] = float(bpd.mean()) * factor
        results["bits_per_source_pixel_stderr"] = stderr * factor
        results["comparable_to_8x8_baselines"] = "bits_per_source_pixel"
    else:
        results["comparable_to_8x8_baselines"] = None

    # Samples, grid, and the classifier-feature Frechet distances.
    sample_gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        # "np" (N, H, W, C in [0, 1]) is what both DDPMPlusPipeline and diffusers' DDPMPipeline return.
        samples = pipe(
            batch_size=args.num_samples,
            generator=sample_gen,
            num_inference_steps=args.inference_steps,
            output_type="np",
        ).images
    samples01 = torch.from_numpy(np.asarray(samples, dtype=np.float32)).permute(0, 3, 1, 2)
    grid_path = out_dir / "samples_grid.png"
    image_grid(samples01).save(grid_path)
    classifier, accuracy = load_or_train_digits_classifier(args.classifier_cache_dir)
    train_feats = classifier_features(classifier, digits_heldout_tensor(8, 1, split="train"))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    reals = images[perm[: args.num_samples]]
    results.update(
        {
            "num_samples": args.num_samples,
            "inference_steps": args.inference_steps,
            "sample_grid": str(grid_path),
            "classifier_heldout_accuracy": accuracy,
            "frechet_proxy_name": PROXY_NAME,
            "frechet_proxy_samples_vs_train": frechet_distance(
                classifier_features(classifier, samples01 * 2 - 1), train_feats
            ),
            "frechet_proxy_floor_heldout_vs_train": frechet_distance(
                classifier_features(classifier, reals), train_feats
            ),
            "frechet_proxy_floor_num_images": int(len(reals)),
        }
    )
    if args.inception_weights is not None:
        results["fid_inception"] = _inception_fid(samples01, (reals + 1) / 2, args.inception_weights)

    json_path = Path(args.json) if args.json else out_dir / "eval_results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    results["json"] = str(json_path)
    print(format_table(results))
    if args.push_to_hub:
        _push(args, results, local)
    return results


def dims_per_source_pixel(resolution: int, channels: int) -> int | None:
    """Model dimensions per pixel of a source 8x8 greyscale digit: C·k² when the digits were nearest-upsampled
    by k = resolution / 8 and replicated to C channels, None when resolution is not a multiple of 8."""
    return channels * (resolution // 8) ** 2 if resolution % 8 == 0 else None


def card_metrics(results: dict) -> dict:
    """The figures that go into the model card's Evaluation table."""
    where = (
        f"digits {results['dataset'].split('split=')[-1]}, {results['num_images']} images, {results['num_bins']} levels"
    )
    rows = {f"bits/dim ({where})": f"{results['bits_per_dim']:.4f} ± {results['bits_per_dim_stderr']:.4f}"}
    if "bits_per_source_pixel" in results:
        rows["bits per source 8x8 pixel"] = f"{results['bits_per_source_pixel']:.4f}"
    rows[f"{PROXY_NAME}, {results['num_samples']} samples"] = round(results["frechet_proxy_samples_vs_train"], 3)
    rows["same, held-out real digits (floor)"] = round(results["frechet_proxy_floor_heldout_vs_train"], 3)
    if "fid_inception" in results:
        rows["FID (Inception, user-supplied weights)"] = round(results["fid_inception"], 3)
    return rows


def format_table(results: dict) -> str:
    rows = [
        ("bits/dim (model dims)", f"{results['bits_per_dim']:.4f} ± {results['bits_per_dim_stderr']:.4f}"),
    ]
    if "bits_per_source_pixel" in results:
        rows.append(
            (
                "bits/dim per source 8x8 pixel (compare to baselines)",
                f"{results['bits_per_source_pixel']:.4f} ± {results['bits_per_source_pixel_stderr']:.4f}",
            )
        )
    rows += [
        ("  prior L_T / decoder L_0", f"{results['prior_bits_per_dim']:.5f} / {results['decoder_bits_per_dim']:.4f}"),
        (
            "images / bins / timesteps",
            f"{results['num_images']} / {results['num_bins']} / {results['bound_timesteps']}",
        ),
        (f"{PROXY_NAME}", f"{results['frechet_proxy_samples_vs_train']:.3f} ({results['num_samples']} samples)"),
        (
            "  floor: held-out real vs train",
            f"{results['frechet_proxy_floor_heldout_vs_train']:.3f} "
            f"({results['frechet_proxy_floor_num_images']} images)",
        ),
        ("classifier held-out accuracy", f"{results['classifier_heldout_accuracy']:.4f}"),
    ]
    if "fid_inception" in results:
        rows.append(("FID (Inception, user-supplied weights)", f"{results['fid_inception']:.3f}"))
    rows += [("sample grid", results["sample_grid"]), ("json", results.get("json", ""))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _push(args, results: dict, local: bool) -> None:
    from . import hub

    repo_id = args.hub_model_id or (None if local else args.pipeline)
    if repo_id is None:
        raise SystemExit("error: --push_to_hub on a local directory needs --hub_model_id")
    if local:
        source = Path(args.pipeline)
    else:
        from huggingface_hub import snapshot_download

        source = Path(
            snapshot_download(
                args.pipeline, local_dir=Path(results["sample_grid"]).parent / "pipeline", token=args.hub_token
            )
        )
    if not (source / "README.md").is_file():
        hub.write_model_card(source)
    hub.set_card_evaluation(source, card_metrics(results))
    hub.push_output_dir(
        source,
        repo_id,
        private=args.hub_private_repo,
        token=args.hub_token,
        commit_message="Add ddpm-plus evaluation results",
    )
    print(f"pushed {source} with the evaluation in its model card to {repo_id}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except ImportError as err:
        message = _missing_train_extra(err)
        if message is None:
            raise
        raise SystemExit(message) from None


if __name__ == "__main__":
    sys.exit(main())
