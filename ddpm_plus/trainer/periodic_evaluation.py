"""Evaluation during training (``--eval_steps N``): every N optimizer steps and at the end, the EMA weights
are evaluated by the evaluation engine (:func:`~ddpm_plus.evaluation.engine.evaluate_pipeline`, the one
``ddpm-plus evaluate`` uses) with ``--eval_metrics`` on ``--eval_num_samples`` samples against the training
dataset's ``--eval_split`` (reference statistics computed once per run and cached on disk). The figures are
logged to the trackers under the metric table's keys (``eval/fid@n``, ``eval/kid@n``, ``eval/precision@n``,
``eval/recall@n``, ``eval/fd_dinov2@n``, ``eval/bpd``; on the digits also ``eval/digits_frechet_proxy@n``),
and the final ones go into the model card and its Hub ``model-index``.

Every process takes its share of each evaluation (its blocks of samples, features and bound images,
evaluation/distributed.py) and gets the figures, which are the ones a single process computes; the main process
logs them. A latent model (``--vae``) is scored on its decoded images, and its bound is logged as
``eval/latent_bpd`` (latent bits/dim, not comparable with pixel bits/dim).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..data import DatasetSource
from ..evaluation.distributed import current_shard
from ..evaluation.engine import evaluate_pipeline
from ..evaluation.errors import EvaluationOptionsError
from ..evaluation.metrics_table import card_rows, model_index_entries, tracker_values
from ..evaluation.options import ALL_METRICS, EvaluationOptions
from ..evaluation.real_images import EvalImages, load_eval_images
from ..evaluation.sample_quality import FeatureExtractors, add_metric_source_arguments

logger = logging.getLogger(__name__)

__all__ = ["add_eval_arguments", "check_eval_arguments", "eval_options", "PeriodicEvaluation"]

# EvaluationOptions field -> the trainer's flag
FLAGS = {
    "metrics": "eval_metrics",
    "num_samples": "eval_num_samples",
    "num_inference_steps": "eval_inference_steps",
    "guidance_scale": "eval_guidance_scale",
    "batch_size": "eval_batch_size",
    "bound_timesteps": "eval_bound_timesteps",
    "max_images": "eval_max_images",
    "seed": "seed",
}


def add_eval_arguments(parser) -> None:
    """The trainer's evaluation flags (the dataset is the training dataset; see ``ddpm-plus evaluate``)."""
    g = parser.add_argument_group("evaluation during training")
    g.add_argument("--eval_steps", type=int, default=0, help="evaluate the EMA weights every N steps and at the end")
    g.add_argument("--eval_metrics", default="bpd,fid", help=f"from {', '.join(ALL_METRICS)}")
    g.add_argument("--eval_num_samples", type=int, default=1000, help="samples per evaluation")
    g.add_argument(
        "--eval_split",
        default=None,
        help="split of the training dataset to compare with (default: digits 'test', else 'train')",
    )
    g.add_argument("--eval_max_images", type=int, default=None, help="use the first N images of that split")
    g.add_argument(
        "--eval_bound_timesteps",
        type=int,
        default=None,
        metavar="K",
        help="bits/dim on K respaced timesteps, 2 <= K <= --num_train_timesteps (default: all)",
    )
    add_metric_source_arguments(g)


def eval_options(args) -> EvaluationOptions:
    """The :class:`EvaluationOptions` of the trainer's flags, checked against ``--num_train_timesteps`` and the
    training dataset exactly as ``ddpm-plus evaluate`` checks its own; a ValueError naming the flag."""
    try:
        options = EvaluationOptions(
            **{name: getattr(args, flag) for name, flag in FLAGS.items()},
            progress=False,
            classifier_cache_dir=args.stats_cache_dir,
        )
        on_digits = DatasetSource.from_flags(args.dataset_name, args.train_data_dir).is_digits
        options.check_for(on_digits=on_digits, num_train_timesteps=args.num_train_timesteps)
    except EvaluationOptionsError as err:
        raise ValueError(f"argument --{FLAGS[err.option]}: {err.message}") from None
    return options


def check_eval_arguments(args) -> tuple[str, ...]:
    """The metrics of ``--eval_metrics``; a ValueError naming the flag for bad values (before training)."""
    if args.eval_steps < 0:
        raise ValueError(f"argument --eval_steps: must be >= 0, got {args.eval_steps}")
    return eval_options(args).metrics


@dataclass
class PeriodicEvaluation:
    """The run's evaluation state, on every process: options, extractors, real images, last figures."""

    options: EvaluationOptions
    extractors: FeatureExtractors
    reals: EvalImages
    last: dict = field(default_factory=dict)

    @classmethod
    def setup(cls, args, device) -> PeriodicEvaluation | None:
        """None without ``--eval_steps``; extractor or dataset errors are raised here, before training."""
        if not args.eval_steps:
            return None
        options = eval_options(args)
        dataset = args.dataset_name or args.train_data_dir or "digits"
        with current_shard().main_first():  # weights downloaded and dataset files cached once
            extractors = FeatureExtractors.from_args(options.metrics, args, device, progress=False)
            reals = load_eval_images(
                dataset,
                resolution=args.resolution,
                channels=args.channels,
                split=args.eval_split,
                dataset_config=args.dataset_config_name,
                image_column=args.image_column if dataset != "digits" else "image",
                label_column=args.label_column if args.class_conditional else None,
                max_images=options.max_images,
            )
        return cls(options, extractors, reals)

    def evaluate(self, args, pipe, step: int) -> dict:
        """Evaluate ``pipe`` (EMA weights), every process its share, and return the tracker values ``eval/...``
        (the same on every process)."""
        pipe.set_progress_bar_config(disable=True)
        figures = evaluate_pipeline(pipe, self.reals, self.options, self.extractors).figures
        self.last = {**figures, "step": step}
        logged = tracker_values(figures)
        if current_shard().is_main:
            logger.info("evaluation at step %d: %s", step, logged)
        return logged

    def card(self) -> tuple[dict, list[dict]]:
        """(Evaluation table rows, Hub model-index entries) of the last evaluation."""
        rows = {**card_rows(self.last), "training step": self.last.get("step")}
        return rows, model_index_entries(self.last, self.reals.key)
