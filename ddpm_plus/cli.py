"""The ``ddpm-plus`` command line: each command parses its flags, calls the library and prints the result.

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
On CPU, torch uses ``--num_threads`` threads (default: half the cores, at most 8; 1 on a 2-core machine).
``accelerate launch -m ddpm_plus.evaluate PIPELINE [flags]`` splits the sampling, the features and the bound
over the processes and gives the figures of one process (the JSON records ``num_processes``).

Exit status: 0 on success, 2 for bad input (flags, pipeline, dataset, a missing extra), 1 when a push fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .conversion.adm import add_convert_parser, convert_command
from .evaluation.errors import EvaluationError, EvaluationOptionsError
from .evaluation.metrics_table import format_table
from .evaluation.options import ALL_METRICS, EvaluationOptions, parse_metrics
from .evaluation.sample_quality import add_metric_source_arguments
from .hub import TOKEN_ON_COMMAND_LINE, HubPushError, add_push_arguments, push_command, push_evaluation
from .redaction import redact
from .sharding import add_shard_parser, shard_command

__all__ = ["main", "build_parser", "evaluate", "analytic", "reference_stats"]

TRAIN_EXTRA_MODULES = ("accelerate", "datasets", "sklearn", "tensorboard", "yaml")
TRAIN_EXTRA_HINT = 'pip install "ddpm-plus[train]"'
USAGE_ERROR = 2  # bad input, as argparse exits for a bad flag
FAILURE = 1
# EvaluationOptions field -> its flag, per command (a field not listed is its own flag, e.g. device)
FLAGS = {
    "evaluate": {
        "metrics": "metrics",
        "num_samples": "num_samples",
        "num_inference_steps": "inference_steps",
        "guidance_scale": "guidance_scale",
        "batch_size": "batch_size",
        "bound_timesteps": "timesteps_respaced",
        "max_images": "max_images",
        "seed": "seed",
    },
    "analytic": {"bound_timesteps": "num_timesteps"},
    "reference-stats": {"metrics": "metrics"},
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _add_runtime_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--num_threads",
        type=_positive_int,
        default=None,
        help="torch threads on CPU (default: half the cores, at most 8; 1 on a 2-core machine: threads that "
        "share cores with another job stall each other)",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm-plus", description="ddpm_plus command line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_evaluate_parser(sub)
    _add_train_and_push_parsers(sub)
    _add_analytic_parser(sub)
    _add_reference_stats_parser(sub)
    add_convert_parser(sub)
    add_shard_parser(sub)
    return parser


def _add_evaluate_parser(sub) -> None:
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
        help=f"comma-separated, from {', '.join(ALL_METRICS)} (default: bpd,fid; "
        "the digits Frechet proxy is always added on the digits)",
    )
    ev.add_argument("--resolution", type=_positive_int, default=None, help="default: the UNet's sample_size")
    ev.add_argument(
        "--max_images", type=int, default=None, help="use the first N images of the dataset only (bound, references)"
    )
    ev.add_argument("--num_samples", type=int, default=64, help="images to sample (grid and every sample metric)")
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
        help="bound on K evenly spaced timesteps, 2 <= K <= T (faster, looser) instead of all T",
    )
    ev.add_argument("--batch_size", type=int, default=256, help="images per UNet call (sampling and the bound)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--classifier_cache_dir",
        default=None,
        help="where the digits classifier's safetensors weights are cached (default: ~/.cache/ddpm_plus)",
    )
    add_metric_source_arguments(ev)
    _add_evaluate_output_arguments(ev)
    _add_runtime_arguments(ev)


def _add_evaluate_output_arguments(ev) -> None:
    """Where ``evaluate`` writes (grid, JSON, PNGs) and pushes its results."""
    ev.add_argument(
        "--output_dir",
        default=None,
        help="where the grid and JSON go (default: PIPELINE_DIR/evaluation, or ./evaluation-<repo>)",
    )
    ev.add_argument("--json", default=None, help="JSON path (default: OUTPUT_DIR/eval_results.json)")
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


def _add_reference_stats_parser(sub) -> None:
    rs = sub.add_parser(
        "reference-stats",
        help="precompute (and cache) a dataset's Inception/DINOv2 reference statistics for evaluate and training",
    )
    rs.add_argument("--dataset", default="digits", help="'digits', a local image folder or a Hub dataset id")
    rs.add_argument("--dataset_config", default=None)
    rs.add_argument("--split", default=None, help="default: 'test' for the digits, 'train' otherwise")
    rs.add_argument("--image_column", default="image")
    rs.add_argument("--resolution", type=_positive_int, required=True, help="the model's resolution")
    rs.add_argument("--channels", type=int, default=3, choices=(1, 3), help="the model's channels")
    rs.add_argument("--max_images", type=_positive_int, default=None)
    rs.add_argument("--metrics", default="fid", help="which extractors: fid (Inception) and/or fd_dinov2")
    _add_runtime_arguments(rs)
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
    an.add_argument("--num_images", type=_positive_int, default=None, help="use the first M images (default: all)")
    an.add_argument(
        "--num_bins", type=_positive_int, default=None, help="snap folder images to this many levels (default: 8 bit)"
    )
    an.add_argument(
        "--num_timesteps",
        type=int,
        default=None,
        metavar="K",
        help="evaluate Γ at K evenly spaced timesteps, 2 <= K <= T, and interpolate (default: every timestep)",
    )
    an.add_argument(
        "--all_timesteps_below",
        type=int,
        default=0,
        metavar="N",
        help="with --num_timesteps, also evaluate every t < N (Γ of quantised data changes fastest there)",
    )
    an.add_argument("--eta", type=float, default=None, help="set the written scheduler's eta (default: keep it)")
    an.add_argument("--batch_size", type=_positive_int, default=256)
    an.add_argument("--seed", type=int, default=0)
    _add_runtime_arguments(an)


def _add_train_and_push_parsers(sub) -> None:
    # `train` hands every argument after it to ddpm_plus.train (its own parser, its own --help).
    sub.add_parser(
        "train",
        add_help=False,
        help="train a DDPM in one process (flags: ddpm-plus train --help; "
        "many processes: accelerate launch -m ddpm_plus.train)",
    )
    add_push_arguments(
        sub.add_parser(
            "push",
            help="push a training output directory's pipeline, model card and "
            "last sample grid to the Hub (never checkpoints or logs)",
        )
    )


# Lazy imports below: the trainer and the modules that read datasets need the optional [train] extra
# (accelerate, datasets, scikit-learn), which `push`, `--help` and a bad flag must not need.


def _load_for_evaluation(args, options: EvaluationOptions, shard, device):
    """(pipeline on ``device``, real images, feature extractors) of ``ddpm-plus evaluate``; downloads and cache
    files are done by the main process first."""
    from .evaluation.engine import load_pipeline
    from .evaluation.latent import denoiser_of, pipeline_conditioning, pipeline_geometry
    from .evaluation.real_images import load_eval_images
    from .evaluation.sample_quality import FeatureExtractors

    with shard.main_first():
        pipe = load_pipeline(args.pipeline).to(device)
    options.check_for(on_digits=_on_digits(args), num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps))
    pipe.set_progress_bar_config(disable=args.no_progress)
    denoiser_of(pipe).eval()
    resolution, channels = pipeline_geometry(pipe, args.resolution)
    with shard.main_first():
        extractors = FeatureExtractors.from_args(options.metrics, args, device, progress=options.progress)
        labelled = pipeline_conditioning(pipe).conditional and "bpd" in options.metrics
        reals = load_eval_images(
            args.dataset, resolution=resolution, channels=channels, split=args.split,
            dataset_config=args.dataset_config, image_column=args.image_column,
            label_column=args.label_column if labelled else None, max_images=options.max_images,
        )  # fmt: skip
    return pipe, reals, extractors


def _on_digits(args) -> bool:
    from .data import DatasetSource

    return DatasetSource.parse(args.dataset).is_digits


def evaluate(args) -> dict:
    """``ddpm-plus evaluate``: the figures of the pipeline (printed, written as JSON, pushed if asked). Under
    ``accelerate launch`` the work is split over the processes (docs/evaluation.md, "Evaluation over
    processes"); the main process writes, prints and pushes."""
    from .evaluation.distributed import start_processes
    from .evaluation.engine import cpu_threads, evaluate_pipeline, resolve_device
    from .evaluation.metrics_table import card_rows, model_index_entries
    from .evaluation.outputs import write_evaluation

    options = EvaluationOptions(
        **{name: getattr(args, flag) for name, flag in FLAGS["evaluate"].items()},
        progress=not args.no_progress,
        classifier_cache_dir=args.classifier_cache_dir,
    )
    options.check_for(on_digits=_on_digits(args))  # before the pipeline is loaded, and again with its T
    local = Path(args.pipeline).is_dir()
    if args.push_to_hub and local and not args.hub_model_id:
        raise EvaluationError("--push_to_hub on a local directory needs --hub_model_id")
    shard, process_device = start_processes(args.device)
    device = process_device or resolve_device(args.device)
    with cpu_threads(device, args.num_threads):
        pipe, reals, extractors = _load_for_evaluation(args, options, shard, device)
        result = evaluate_pipeline(pipe, reals, options, extractors, shard)
    if not shard.is_main:
        return result.figures
    out_dir = args.output_dir or (
        Path(args.pipeline) / "evaluation" if local else f"evaluation-{args.pipeline.replace('/', '__')}"
    )
    figures = write_evaluation(
        result, out_dir, json_path=args.json, samples_dir=args.save_samples, header={"pipeline": str(args.pipeline)}
    )
    print(format_table(figures))
    if args.push_to_hub:
        repo_id = args.hub_model_id or args.pipeline
        source = push_evaluation(
            args.pipeline, repo_id, card_rows(figures), model_index_entries(figures, figures["dataset_key"]),
            download_dir=Path(out_dir) / "pipeline", private=args.hub_private_repo, token=args.hub_token,
        )  # fmt: skip
        print(f"pushed {source} with the evaluation in its model card to {repo_id}")
    return figures


def analytic(args) -> dict:
    """``ddpm-plus analytic``: the moment table of a pipeline, and a copy of it that samples with it (under
    ``accelerate launch`` the images are split over the processes; the main process writes)."""
    from .evaluation.analytic_export import apply_analytic_moments, save_analytic_pipeline
    from .evaluation.distributed import start_processes
    from .evaluation.engine import cpu_threads, load_pipeline, model_geometry, resolve_device
    from .evaluation.real_images import load_analytic_images

    shard, process_device = start_processes(args.device)
    device = process_device or resolve_device(args.device)
    with cpu_threads(device, args.num_threads):
        with shard.main_first():
            pipe = load_pipeline(args.pipeline).to(device)
        resolution, channels = model_geometry(pipe.unet.config)
        images, labels, where = load_analytic_images(
            args.dataset, resolution=resolution, channels=channels, split=args.split,
            num_images=args.num_images, num_bins=args.num_bins,
        )  # fmt: skip
        results = apply_analytic_moments(
            pipe, images, labels, num_timesteps=args.num_timesteps, all_timesteps_below=args.all_timesteps_below,
            eta=args.eta, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, shard=shard,
        )  # fmt: skip
    results = {"pipeline": str(args.pipeline), "dataset": where, **results, "num_processes": shard.world}
    if not shard.is_main:
        return results
    out = save_analytic_pipeline(pipe, results, args.output_dir)
    print(
        f"Γ over {results['num_images']} images ({where}) at {results['timesteps_evaluated']} timesteps "
        f"(largest standard error {results['max_stderr']:.4f}) in {results['seconds']} s; "
        f"pipeline with variance_type='analytic' written to {out}"
    )
    return results


def reference_stats(args) -> dict:
    """``ddpm-plus reference-stats``: compute (or find) the cached reference statistics and print their paths."""
    from .evaluation.engine import cpu_threads, resolve_device
    from .evaluation.real_images import load_eval_images
    from .evaluation.sample_quality import FeatureExtractors

    metrics = parse_metrics(args.metrics)
    device = resolve_device(args.device)
    with cpu_threads(device, args.num_threads):
        extractors = FeatureExtractors.from_args(metrics, args, device, progress=not args.no_progress)
        reals = load_eval_images(
            args.dataset, resolution=args.resolution, channels=args.channels, split=args.split,
            dataset_config=args.dataset_config, image_column=args.image_column, max_images=args.max_images,
        )  # fmt: skip
        paths = {}
        if extractors.inception is not None:
            paths["inception"] = extractors.reference("inception", reals, need_features=True)[1]
        if extractors.dinov2 is not None:
            paths["dinov2"] = extractors.reference("dinov2", reals, need_features=False)[1]
    for which, path in paths.items():
        print(f"{which} reference statistics of {len(reals.images)} images ({reals.description}): {path}")
    return paths


COMMANDS = {"evaluate": evaluate, "analytic": analytic, "reference-stats": reference_stats}


def _error_message(err: Exception, args) -> str:
    """``error: ...`` naming the command's own flag for an options error, with a --hub_token never shown."""
    if isinstance(err, EvaluationOptionsError):
        flag = FLAGS.get(args.command, {}).get(err.option, err.option)
        text = f"argument --{flag}: {err.message}"
    else:
        text = str(err)
    return f"error: {redact(text, getattr(args, 'hub_token', None))}"


def _run(args) -> int:
    """One command; its errors become a message on stderr and an exit status."""
    if getattr(args, "hub_token", None):
        print(f"warning: {TOKEN_ON_COMMAND_LINE}", file=sys.stderr)
    try:
        COMMANDS[args.command](args)
    except EvaluationError as err:
        _report(_error_message(err, args))
        return USAGE_ERROR
    except HubPushError as err:
        _report(_error_message(err, args))
        return FAILURE
    return 0


def _report(message: str) -> None:
    """An error on stderr, once under ``accelerate launch``: by the first process of each machine (every
    process raises the same error)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr)


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
        return push_command(args)
    if args.command == "convert":
        return convert_command(args)
    if args.command == "shard":
        return shard_command(args)
    return _run(args)


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
