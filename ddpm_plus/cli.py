"""The ``ddpm-plus`` command line.

``ddpm-plus evaluate PIPELINE_DIR_OR_REPO_ID`` evaluates a saved ddpm_plus/diffusers DDPM pipeline on a
dataset: the bundled digits (default), a local image folder or a Hub dataset, converted to the model's
channels and resolution exactly as the trainer converts them. ``--metrics`` chooses among
- bpd: bits/dim of the exact variational bound, on the data's own grid (17 levels for the digits, 256 for
  8-bit images);
- fid, kid, precision_recall: torch-fidelity's inception-v3-compat features (``--inception_weights FILE``
  offline);
- fd_dinov2: the Frechet distance in DINOv2 features (transformers' Dinov2Model, ``--dinov2_model``).
Default: bpd and fid; on the digits also the "digits Frechet distance (proxy, not FID)" in the features of a
small classifier, beside its floor. The samples are quantised to uint8 once and every sample metric uses
those images (``--save_samples DIR`` writes them as PNG). Reference statistics of the real images are cached
(``ddpm-plus reference-stats`` precomputes them). A class-conditional pipeline is sampled class-balanced at
``--guidance_scale``; its bound is -log p(x|c) with each image's own class.
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
        help="bits/dim, FID, KID, precision/recall and FD_DINOv2 of a saved pipeline on a dataset",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("pipeline", metavar="PIPELINE_DIR_OR_REPO_ID")
    ev.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (bundled, default), a local image folder (imagefolder) or a Hub dataset id",
    )
    ev.add_argument("--dataset_config", default=None, help="the Hub dataset's configuration name")
    ev.add_argument("--split", default=None, help="dataset split (default: 'test' for the digits, 'train' otherwise)")
    ev.add_argument("--image_column", default="image", help="image column of a Hub dataset or folder")
    ev.add_argument(
        "--label_column",
        default="label",
        help="class column, for the bound -log p(x|c) of a class-conditional pipeline (default: label)",
    )
    ev.add_argument(
        "--metrics",
        default=None,
        help="comma-separated, from bpd, fid, kid, precision_recall, fd_dinov2 (default: bpd,fid; "
        "the digits Frechet proxy is always added on the digits)",
    )
    ev.add_argument("--resolution", type=int, default=None, help="default: the UNet's sample_size")
    ev.add_argument(
        "--max_images",
        type=int,
        default=None,
        help="use the first N images of the dataset only (bits/dim and reference statistics)",
    )
    ev.add_argument(
        "--num_samples", type=int, default=64, help="images to sample (for the grid and every sample metric)"
    )
    ev.add_argument("--inference_steps", type=int, default=100, help="denoising steps for sampling")
    ev.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale of a class-conditional pipeline (1: none, 0: its unconditional model)",
    )
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
    from .evaluation.sample_evaluation import add_metric_source_arguments

    add_metric_source_arguments(ev)
    ev.add_argument(
        "--save_samples", default=None, metavar="DIR", help="write the uint8 samples every metric used as PNG files"
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
    _add_analytic_parser(sub)
    _add_reference_stats_parser(sub)
    return parser


def _add_reference_stats_parser(sub) -> None:
    from .evaluation.sample_evaluation import add_metric_source_arguments

    rs = sub.add_parser(
        "reference-stats",
        help="precompute (and cache) a dataset's Inception/DINOv2 reference statistics for evaluate and training",
    )
    rs.add_argument("--dataset", default="digits", help="'digits', a local image folder or a Hub dataset id")
    rs.add_argument("--dataset_config", default=None)
    rs.add_argument("--split", default=None, help="default: 'test' for the digits, 'train' otherwise")
    rs.add_argument("--image_column", default="image")
    rs.add_argument("--resolution", type=int, required=True, help="the model's resolution")
    rs.add_argument("--channels", type=int, default=3, choices=(1, 3), help="the model's channels")
    rs.add_argument("--max_images", type=int, default=None)
    rs.add_argument("--metrics", default="fid", help="which extractors: fid (Inception) and/or fd_dinov2")
    rs.add_argument("--device", default=None)
    rs.add_argument("--no_progress", action="store_true")
    add_metric_source_arguments(rs)


ANALYTIC_DESCRIPTION = """Estimate Analytic-DPM's moment table Γ_t = E‖ε_θ(x_t, t)‖²/d (Bao et al. 2022) of a saved
pipeline over a set of images and write a copy of the pipeline whose scheduler uses it
(variance_type="analytic"): the optimal reverse variance for every step count, no retraining.

Datasets (as `evaluate`): `--dataset digits` (the bundled digits, `--split`, default the train split) or
`--dataset PATH`, a local image folder (any layout `datasets`' imagefolder reads; center-cropped and resized
to the UNet's size, channels converted). Hub datasets are not supported here."""


def _add_analytic_parser(sub) -> None:
    an = sub.add_parser(
        "analytic",
        help="compute Analytic-DPM's moment table and write a pipeline that samples with the optimal variance",
        description=ANALYTIC_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    an.add_argument("pipeline", metavar="PIPELINE_DIR_OR_REPO_ID")
    an.add_argument("--output_dir", required=True, help="where the pipeline with the analytic scheduler is saved")
    an.add_argument("--dataset", default="digits", help="'digits' (bundled) or a local image folder")
    an.add_argument("--split", default="train", choices=("test", "train", "all"), help="digits split (default train)")
    an.add_argument("--num_images", type=int, default=None, help="use the first M images (default: all)")
    an.add_argument(
        "--num_bins", type=int, default=None, help="snap folder images to this many levels (default: 8 bit)"
    )
    an.add_argument(
        "--num_timesteps",
        type=int,
        default=None,
        metavar="K",
        help="evaluate Γ at K evenly spaced timesteps and interpolate (default: every timestep)",
    )
    an.add_argument(
        "--all_timesteps_below",
        type=int,
        default=0,
        metavar="N",
        help="with --num_timesteps, also evaluate every t < N (Γ of quantised data changes fastest there)",
    )
    an.add_argument("--eta", type=float, default=None, help="set the written scheduler's eta (default: keep it)")
    an.add_argument("--batch_size", type=int, default=256)
    an.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--no_progress", action="store_true", help="hide progress bars")


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
        from .trainer.loop import main as train_main

        train_main(argv[1:], prog="ddpm-plus train")
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "push":
        from .hub import push_command

        return push_command(args)
    if args.command == "evaluate":
        _evaluate_without_leaking_the_token(args)
    if args.command == "analytic":
        analytic(args)
    if args.command == "reference-stats":
        reference_stats(args)
    return 0


def _evaluate_without_leaking_the_token(args) -> None:
    """``evaluate``, with a ``--hub_token`` warned about and never printed in an error."""
    from .hub import TOKEN_ON_COMMAND_LINE, HubPushError
    from .redaction import redact

    if args.hub_token:
        print(f"warning: {TOKEN_ON_COMMAND_LINE}", file=sys.stderr)
    try:
        evaluate(args)
    except HubPushError as err:
        raise SystemExit(f"error: {redact(str(err), args.hub_token)}") from None


def _check_args(args) -> tuple[str, ...]:
    """Checks that need no model; returns the metrics to compute."""
    from .evaluation.sample_evaluation import parse_metrics

    for name in ("num_samples", "inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {getattr(args, name)}")
    for name in ("timesteps_respaced", "max_images", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {value}")
    try:
        metrics = parse_metrics(args.metrics)
    except ValueError as err:
        raise SystemExit(f"error: --metrics: {err}") from None
    needs_two = args.dataset == "digits" or set(metrics) & {"fid", "kid", "fd_dinov2"}
    if needs_two and args.num_samples < 2:
        raise SystemExit("error: --num_samples must be >= 2 (a Frechet distance needs a covariance)")
    if "precision_recall" in metrics and args.num_samples < 4:
        raise SystemExit("error: --num_samples must be >= 4 for precision_recall (3 nearest neighbours)")
    for name in ("inception_weights", "reference_stats"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_file():
            raise SystemExit(f"error: --{name} {value!r} is not a file")
    return metrics


def _respaced_timesteps(num_train: int, k: int) -> torch.Tensor:
    """K timesteps evenly spaced over [0, T-1] (the scheduler module's ``respace``, "linspace" spacing),
    descending, always containing 0 and T-1."""
    from .schedulers.scheduling_ddpm_plus import respace

    if k > num_train:
        raise SystemExit(f"error: --timesteps_respaced {k} exceeds num_train_timesteps={num_train}")
    if k < 2 <= num_train:
        raise SystemExit("error: --timesteps_respaced needs K >= 2 (the bound's steps run from T-1 down to 0)")
    return torch.from_numpy(respace(num_train, k, timestep_spacing="linspace").timesteps)


def _digit_classes(conditioning) -> dict[int, int] | None:
    """Class id -> digit for a conditional pipeline over the digits 0..9 (names '0'..'9', or 10 unnamed
    classes); None for an unconditional one. Any other classes: an error (the evaluation is on digits)."""
    if not conditioning.conditional:
        return None
    n = conditioning.num_classes
    names = conditioning.id2label or ({str(i): str(i) for i in range(n)} if n == 10 else {})
    digits = {int(k): v for k, v in names.items()}
    if n != 10 or sorted(digits.values()) != [str(d) for d in range(10)]:
        raise SystemExit(
            "error: evaluate runs on the digits, so a class-conditional pipeline must have the 10 classes "
            f"'0'..'9' (id2label); this one has {n} classes: {sorted(digits.values())[:12]}"
        )
    return {i: int(name) for i, name in digits.items()}


def _sampling_labels(pipe, args, device):
    """(pipeline keywords for labels and guidance, requested class id per sample or None), checked before
    anything runs: a conditional pipeline samples the classes in turn (class-balanced)."""
    from .pipelines.pipeline_ddpm_plus import conditioning_of, guidance_labels

    conditioning = conditioning_of(pipe)
    if not conditioning.conditional:
        if args.guidance_scale != 1:
            raise SystemExit(f"error: --guidance_scale {args.guidance_scale} needs a class-conditional pipeline")
        return {}, None
    ids = sorted(_digit_classes(conditioning)) if args.dataset == "digits" else list(range(conditioning.num_classes))
    labels = [ids[i % len(ids)] for i in range(args.num_samples)]
    try:
        guidance_labels(conditioning, labels, args.num_samples, args.guidance_scale, device)
    except ValueError as err:
        raise SystemExit(f"error: --guidance_scale: {err}") from None
    return {"class_labels": labels, "guidance_scale": args.guidance_scale}, labels


def _model_geometry(unet, args) -> tuple[int, int]:
    size = unet.config.sample_size
    if not isinstance(size, int) and len(set(size)) != 1:
        raise SystemExit(f"error: only square UNets are supported, sample_size={size}")
    native = size if isinstance(size, int) else int(size[0])
    return args.resolution or native, int(unet.config.in_channels)


def _eval_images(args, resolution: int, channels: int, with_labels: bool):
    """The real images of ``--dataset`` (with class ids for a conditional bound), or a clear error."""
    from .evaluation.sample_evaluation import load_eval_images

    try:
        return load_eval_images(
            args.dataset,
            resolution=resolution,
            channels=channels,
            split=args.split,
            dataset_config=args.dataset_config,
            image_column=args.image_column,
            label_column=(args.label_column if with_labels and args.dataset != "digits" else None),
            max_images=args.max_images,
        )
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: --dataset {args.dataset!r}: {err}") from None


def _bound(args, unet, scheduler, reals, conditioning) -> dict:
    """bits/dim of the exact variational bound on ``reals`` (-log p(x|c) with each image's class for a
    conditional model), on the data's own grid."""
    from .data import load_digits_arrays
    from .evaluation.likelihood import conditional_vlb_terms, vlb_terms

    images = reals.images
    num_train = int(scheduler.config.num_train_timesteps)
    seq = None if args.timesteps_respaced is None else _respaced_timesteps(num_train, args.timesteps_respaced)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    kwargs = dict(
        timesteps=seq, num_bins=reals.num_bins, generator=gen, batch_size=args.batch_size, progress=not args.no_progress
    )
    if not conditioning.conditional:
        terms = vlb_terms(unet, scheduler, images, **kwargs)
    elif reals.is_digits:
        digits = load_digits_arrays(reals.key["split"])[1][: len(images)]  # the same images, in the same order
        id_of_digit = {d: i for i, d in _digit_classes(conditioning).items()}
        terms = conditional_vlb_terms(unet, scheduler, images, np.array([id_of_digit[d] for d in digits]), **kwargs)
    else:
        terms = conditional_vlb_terms(unet, scheduler, images, reals.labels, **kwargs)
    bpd = terms["total_bpd"]
    n = len(bpd)
    stderr = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    out = {
        "bound_timesteps": "all" if seq is None else int(len(seq)),
        "num_train_timesteps": num_train,
        "variance_type": scheduler.config.variance_type,
        "prediction_type": scheduler.config.prediction_type,
        "bits_per_dim": float(bpd.mean()),
        "bits_per_dim_stderr": stderr,
        "prior_bits_per_dim": float(terms["prior_bpd"].mean()),
        "decoder_bits_per_dim": float(terms["terms_bpd"][:, terms["decoder_index"]].mean()),
        "bound_seconds": round(time.perf_counter() - t0, 2),
        # the mean term of the bound per timestep (the decoder L_0 at timestep 0), bits/dim
        "terms_timesteps": terms["timesteps"].tolist(),
        "terms_bpd_mean": [round(v, 8) for v in terms["terms_bpd"].mean(0).tolist()],
    }
    if conditioning.conditional:
        out["bound_conditioning"] = "-log p(x|c), c = each image's own class"
    factor = dims_per_source_pixel(images.shape[-1], images.shape[1]) if reals.is_digits else None
    if factor is not None:
        # Nearest upsampling and channel replication are injective: total nats are the same, spread over
        # C·(8k)² model dims instead of the 64 source pixels, so per source pixel = x C·k².
        out["bits_per_source_pixel"] = out["bits_per_dim"] * factor
        out["bits_per_source_pixel_stderr"] = stderr * factor
    out["comparable_to_8x8_baselines"] = "bits_per_source_pixel" if factor is not None else None
    return out


def _samples_uint8(pipe, args, device, sampling_kwargs) -> torch.Tensor:
    """``--num_samples`` samples quantised to uint8 [N, C, H, W] once; every sample metric uses these."""
    from .evaluation.sample_metrics import quantize_uint8

    sample_gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        # "np" (N, H, W, C in [0, 1]) is what both DDPMPlusPipeline and diffusers' DDPMPipeline return.
        samples = pipe(
            batch_size=args.num_samples,
            generator=sample_gen,
            num_inference_steps=args.inference_steps,
            output_type="np",
            **sampling_kwargs,
        ).images
    return quantize_uint8(torch.from_numpy(np.asarray(samples, dtype=np.float32)).permute(0, 3, 1, 2))


def save_sample_pngs(samples_uint8: torch.Tensor, folder) -> Path:
    """Write each uint8 sample [C, H, W] as ``folder/000000.png`` (grey for one channel)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(samples_uint8.cpu().numpy()):
        Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    return folder


def _digits_figures(args, samples_uint8, reals, requested, digit_of) -> dict:
    """The digits Frechet proxy (and the class accuracy of a conditional model) of the uint8 samples."""
    from .data import digits_heldout_tensor
    from .evaluation.digits_proxy import (
        class_accuracy,
        classifier_features,
        frechet_distance,
        load_or_train_digits_classifier,
    )

    classifier, accuracy = load_or_train_digits_classifier(args.classifier_cache_dir)
    train_feats = classifier_features(classifier, digits_heldout_tensor(8, 1, split="train"))
    samples = samples_uint8.float() / 127.5 - 1
    perm = torch.randperm(len(reals.images), generator=torch.Generator().manual_seed(args.seed))
    floor_images = reals.images[perm[: args.num_samples]]
    out = {
        "classifier_heldout_accuracy": accuracy,
        "frechet_proxy_name": PROXY_NAME,
        "frechet_proxy_samples_vs_train": frechet_distance(classifier_features(classifier, samples), train_feats),
        "frechet_proxy_floor_heldout_vs_train": frechet_distance(
            classifier_features(classifier, floor_images), train_feats
        ),
        "frechet_proxy_floor_num_images": int(len(floor_images)),
    }
    if requested is not None:
        out["sample_class_accuracy"] = class_accuracy(classifier, samples, [digit_of[i] for i in requested])
    return out


def evaluate(args) -> dict:
    """Run the evaluation described by parsed ``args``; returns the results dict (also written as JSON)."""
    from diffusers import DiffusionPipeline

    import ddpm_plus  # noqa: F401  (registers DDPMPlusPipeline/DDPMPlusScheduler with diffusers)

    from .evaluation.sample_evaluation import FeatureExtractors, compute_sample_metrics
    from .evaluation.sample_metrics import MetricsSetupError
    from .pipelines.pipeline_ddpm_plus import conditioning_of

    metrics = _check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local = Path(args.pipeline).is_dir()
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    unet, scheduler = pipe.unet.eval(), pipe.scheduler
    conditioning = conditioning_of(pipe)
    sampling_kwargs, requested = _sampling_labels(pipe, args, device)
    resolution, channels = _model_geometry(unet, args)
    try:
        extractors = FeatureExtractors.from_args(metrics, args, device, progress=not args.no_progress)
    except (MetricsSetupError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    reals = _eval_images(args, resolution, channels, with_labels=conditioning.conditional and "bpd" in metrics)
    out_dir = Path(
        args.output_dir
        or (Path(args.pipeline) / "evaluation" if local else f"evaluation-{args.pipeline.replace('/', '__')}")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "pipeline": str(args.pipeline),
        "dataset": reals.description,
        "dataset_key": reals.key,
        "metrics": list(metrics),
        "num_images": len(reals.images),
        "resolution": resolution,
        "channels": channels,
        "num_bins": reals.num_bins,
    }
    if "bpd" in metrics:
        results.update(_bound(args, unet, scheduler, reals, conditioning))
    samples = _samples_uint8(pipe, args, device, sampling_kwargs)
    grid_path = out_dir / "samples_grid.png"
    image_grid(samples.float() / 255).save(grid_path)
    results.update({"num_samples": args.num_samples, "inference_steps": args.inference_steps})
    results["sample_grid"] = str(grid_path)
    if args.save_samples:
        results["samples_dir"] = str(save_sample_pngs(samples, args.save_samples))
    try:
        results.update(compute_sample_metrics(samples, reals, metrics, extractors))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if reals.is_digits:
        results.update(_digits_figures(args, samples, reals, requested, _digit_classes(conditioning)))
    if requested is not None:
        results.update(
            {
                "class_conditional": True,
                "guidance_scale": args.guidance_scale,
                "sampling": "class-balanced (the classes in turn)",
            }
        )
    json_path = Path(args.json) if args.json else out_dir / "eval_results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    results["json"] = str(json_path)
    print(format_table(results))
    if args.push_to_hub:
        _push(args, results, local)
    return results


def _analytic_images(args, unet_config):
    """(images [N, C, H, W] in [-1, 1], labels [N] or None, description) of ``--dataset``."""
    size = unet_config.sample_size
    resolution, channels = (size if isinstance(size, int) else int(size[0])), int(unet_config.in_channels)
    if args.dataset == "digits":
        from .data import digits_heldout_tensor, load_digits_arrays

        images = digits_heldout_tensor(resolution, channels, split=args.split)
        labels = load_digits_arrays(args.split)[1]
        where = f"bundled scikit-learn digits, split={args.split!r}"
    elif Path(args.dataset).is_dir():
        from .data import ImageTransform, load_image_dataset, prepare_dataset

        transform = ImageTransform(resolution, channels, center_crop=True, num_bins=args.num_bins)
        data = prepare_dataset(load_image_dataset(train_data_dir=args.dataset), transform)
        count = len(data) if args.num_images is None else min(args.num_images, len(data))
        images, labels = torch.stack([data[i]["pixel_values"] for i in range(count)]), None
        where = f"image folder {args.dataset}"
    else:
        raise SystemExit(f"error: --dataset must be 'digits' or a local image folder; got {args.dataset!r}")
    if args.num_images is not None:
        images = images[: args.num_images]
        labels = None if labels is None else labels[: args.num_images]
    return images, (None if labels is None else torch.as_tensor(labels)), where


def analytic(args) -> dict:
    """``ddpm-plus analytic``: the moment table of a pipeline, and a copy of it that samples with it."""
    from diffusers import DiffusionPipeline

    import ddpm_plus  # noqa: F401  (registers DDPMPlusPipeline/DDPMPlusScheduler with diffusers)

    from .evaluation.analytic import _is_class_conditional, estimate_analytic_moments
    from .schedulers.scheduling_ddpm_plus import DDPMPlusScheduler

    for name in ("num_images", "num_timesteps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {value}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.to(device)
    unet = pipe.unet.eval()
    images, labels, where = _analytic_images(args, unet.config)
    if not _is_class_conditional(unet):
        labels = None
    elif labels is None:
        raise SystemExit("error: a class-conditional UNet needs labelled images: use --dataset digits")
    T = int(pipe.scheduler.config.num_train_timesteps)
    timesteps = None
    if args.num_timesteps is not None and args.all_timesteps_below > 0:
        from .schedulers.scheduling_ddpm_plus import respace

        spaced = respace(T, args.num_timesteps, timestep_spacing="linspace").timesteps
        timesteps, args.num_timesteps = np.union1d(spaced, np.arange(min(args.all_timesteps_below, T))), None
    t0 = time.perf_counter()
    gamma, stderr = estimate_analytic_moments(
        unet,
        pipe.scheduler,
        images,
        num_timesteps=args.num_timesteps,
        timesteps=timesteps,
        batch_size=args.batch_size,
        generator=torch.Generator().manual_seed(args.seed),
        progress=not args.no_progress,
        class_labels=labels,
        return_stderr=True,
    )
    overrides = {"variance_type": "analytic", "analytic_moments": gamma.tolist()}
    if args.eta is not None:
        overrides["eta"] = args.eta
    try:
        pipe.scheduler = DDPMPlusScheduler.from_config(pipe.scheduler.config, **overrides)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    out = Path(args.output_dir)
    pipe.save_pretrained(out)
    evaluated = np.flatnonzero(np.isfinite(stderr.numpy()))
    results = {
        "pipeline": str(args.pipeline),
        "dataset": where,
        "num_images": int(images.shape[0]),
        "timesteps_evaluated": int(len(evaluated)),
        "seconds": round(time.perf_counter() - t0, 2),
        "eta": pipe.scheduler.config.eta,
        "gamma_min_max": [float(gamma.min()), float(gamma.max())],
        "max_stderr": float(np.nanmax(stderr.numpy())),
        "analytic_moments": gamma.tolist(),
        "stderr": [None if not math.isfinite(v) else v for v in stderr.tolist()],
    }
    (out / "analytic_moments.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(
        f"Γ over {results['num_images']} images ({where}) at {results['timesteps_evaluated']} timesteps "
        f"(largest standard error {results['max_stderr']:.4f}) in {results['seconds']} s; "
        f"pipeline with variance_type='analytic' written to {out}"
    )
    return results


def reference_stats(args) -> dict:
    """``ddpm-plus reference-stats``: compute (or find) the cached reference statistics and print their paths."""
    from .evaluation.sample_evaluation import FeatureExtractors, load_eval_images, parse_metrics
    from .evaluation.sample_metrics import MetricsSetupError

    try:
        metrics = parse_metrics(args.metrics)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        extractors = FeatureExtractors.from_args(metrics, args, device, progress=not args.no_progress)
        reals = load_eval_images(
            args.dataset,
            resolution=args.resolution,
            channels=args.channels,
            split=args.split,
            dataset_config=args.dataset_config,
            image_column=args.image_column,
            max_images=args.max_images,
        )
    except (MetricsSetupError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    paths = {}
    if extractors.inception is not None:
        paths["inception"] = extractors.reference("inception", reals, need_features=True)[1]
    if extractors.dinov2 is not None:
        paths["dinov2"] = extractors.reference("dinov2", reals, need_features=False)[1]
    for which, path in paths.items():
        print(f"{which} reference statistics of {len(reals.images)} images ({reals.description}): {path}")
    return paths


def dims_per_source_pixel(resolution: int, channels: int) -> int | None:
    """Model dimensions per pixel of a source 8x8 greyscale digit: C·k² when the digits were nearest-upsampled
    by k = resolution / 8 and replicated to C channels, None when resolution is not a multiple of 8."""
    return channels * (resolution // 8) ** 2 if resolution % 8 == 0 else None


def _metric_rows(results: dict) -> list[tuple[str, str]]:
    """(label, value) of each figure in ``results``; Frechet figures carry their sample count (FID@5k)."""
    from .evaluation.sample_evaluation import frechet_label

    n = results.get("num_samples", 0)
    rows = []
    if "bits_per_dim" in results:
        where = f"{results['num_images']} images, {results['num_bins']} levels"
        bpd = f"{results['bits_per_dim']:.4f} ± {results['bits_per_dim_stderr']:.4f}"
        rows.append((f"bits/dim ({where})", bpd))
        if "bits_per_source_pixel" in results:
            rows.append(("bits per source 8x8 pixel (compare to baselines)", f"{results['bits_per_source_pixel']:.4f}"))
        prior, decoder = results["prior_bits_per_dim"], results["decoder_bits_per_dim"]
        rows.append(("  prior L_T / decoder L_0", f"{prior:.5f} / {decoder:.4f}"))
    n_ref = results.get("num_reference")
    if "fid" in results:
        rows.append((frechet_label("FID", n), f"{results['fid']:.3f} (reference: {n_ref} images)"))
    if "kid_mean" in results:
        rows.append((f"KID ({n} samples)", f"{results['kid_mean']:.5f} ± {results['kid_std']:.5f}"))
    if "precision" in results:
        rows.append((f"precision / recall ({n} samples)", f"{results['precision']:.4f} / {results['recall']:.4f}"))
    if "fd_dinov2" in results:
        rows.append((frechet_label("FD_DINOv2", n), f"{results['fd_dinov2']:.3f} (reference: {n_ref} images)"))
    if "frechet_proxy_samples_vs_train" in results:
        rows.append((PROXY_NAME, f"{results['frechet_proxy_samples_vs_train']:.3f} ({n} samples)"))
        floor = results["frechet_proxy_floor_heldout_vs_train"]
        rows.append(
            ("  floor: held-out real vs train", f"{floor:.3f} ({results['frechet_proxy_floor_num_images']} images)")
        )
        rows.append(("classifier held-out accuracy", f"{results['classifier_heldout_accuracy']:.4f}"))
    if "sample_class_accuracy" in results:
        label = f"samples classified as the requested digit (w = {results['guidance_scale']:g})"
        rows.append((label, f"{results['sample_class_accuracy']:.4f}"))
    return rows


def card_metrics(results: dict) -> dict:
    """The figures that go into the model card's Evaluation table."""
    return {"dataset": results["dataset"], **dict(_metric_rows(results))}


def format_table(results: dict) -> str:
    from .evaluation.sample_evaluation import SMALL_N, SMALL_N_WARNING

    rows = [("dataset", results["dataset"]), *_metric_rows(results)]
    rows += [("sample grid", results["sample_grid"]), ("json", results.get("json", ""))]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    if ("fid" in results or "fd_dinov2" in results) and results["num_samples"] < SMALL_N:
        table += f"\nwarning: {SMALL_N_WARNING} (n = {results['num_samples']})"
    return table


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
    from .evaluation.sample_evaluation import model_index_entries

    hub.set_card_evaluation(
        source, card_metrics(results), model_index=model_index_entries(results, results["dataset_key"])
    )
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
