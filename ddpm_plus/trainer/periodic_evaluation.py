"""Evaluation during training (``--eval_steps N``): every N optimizer steps and at the end, the EMA weights
sample ``--eval_num_samples`` images, which are scored with ``--eval_metrics`` against the training dataset's
``--eval_split`` (reference statistics computed once per run and cached on disk); the figures are logged to
the trackers as ``eval/fid@n``, ``eval/kid@n``, ``eval/precision@n``, ``eval/recall@n``,
``eval/fd_dinov2@n`` and ``eval/bpd``, and the final ones go into the model card and its Hub ``model-index``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch

from ..evaluation.likelihood import conditional_vlb_terms
from ..evaluation.sample_evaluation import (
    EvalImages,
    FeatureExtractors,
    compute_sample_metrics,
    load_eval_images,
    model_index_entries,
    parse_metrics,
)
from ..pipelines.pipeline_ddpm_plus import conditioning_of

logger = logging.getLogger(__name__)

__all__ = ["add_eval_arguments", "check_eval_arguments", "PeriodicEvaluation"]


def add_eval_arguments(parser) -> None:
    """The trainer's evaluation flags (the dataset is the training dataset; see ``ddpm-plus evaluate``)."""
    from ..evaluation.sample_evaluation import add_metric_source_arguments

    g = parser.add_argument_group("evaluation during training")
    g.add_argument("--eval_steps", type=int, default=0, help="evaluate the EMA weights every N steps and at the end")
    g.add_argument("--eval_metrics", default="bpd,fid", help="from bpd, fid, kid, precision_recall, fd_dinov2")
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
        help="bits/dim on K respaced timesteps (default: all)",
    )
    add_metric_source_arguments(g)


def check_eval_arguments(args) -> tuple[str, ...]:
    """The metrics of ``--eval_metrics``; a ValueError naming the flag for bad values (before training)."""
    for name in ("eval_steps",):
        if getattr(args, name) < 0:
            raise ValueError(f"argument --{name}: must be >= 0, got {getattr(args, name)}")
    for name in ("eval_num_samples", "eval_max_images", "eval_bound_timesteps"):
        value = getattr(args, name)
        if value is not None and value < 2:
            raise ValueError(f"argument --{name}: must be >= 2, got {value}")
    try:
        return parse_metrics(args.eval_metrics)
    except ValueError as err:
        raise ValueError(f"argument --eval_metrics: {err}") from None


@dataclass
class PeriodicEvaluation:
    """The run's evaluation state, on the main process: metrics, extractors, real images, last results."""

    metrics: tuple[str, ...]
    extractors: FeatureExtractors
    reals: EvalImages
    last: dict = field(default_factory=dict)

    @classmethod
    def setup(cls, args, device) -> PeriodicEvaluation | None:
        """None without ``--eval_steps``; extractor or dataset errors are raised here, before training."""
        if not args.eval_steps:
            return None
        metrics = check_eval_arguments(args)
        extractors = FeatureExtractors.from_args(metrics, args, device, progress=False)
        dataset = args.dataset_name or args.train_data_dir or "digits"
        reals = load_eval_images(
            dataset,
            resolution=args.resolution,
            channels=args.channels,
            split=args.eval_split,
            dataset_config=args.dataset_config_name,
            image_column=args.image_column if dataset != "digits" else "image",
            label_column=args.label_column if args.class_conditional else None,
            max_images=args.eval_max_images,
        )
        return cls(metrics, extractors, reals)

    def evaluate(self, args, pipe, step: int) -> dict:
        """Sample with ``pipe`` (EMA weights), score, and return tracker values ``eval/...``."""
        from ..evaluation.sample_metrics import quantize_uint8

        n = args.eval_num_samples
        gen = torch.Generator(device=pipe.unet.device).manual_seed(args.seed)
        pipe.set_progress_bar_config(disable=True)
        samples = []
        for start in range(0, n, args.eval_batch_size):
            count = min(args.eval_batch_size, n - start)
            extra = _class_keywords(pipe, start, count, args.eval_guidance_scale)
            out = pipe(
                batch_size=count,
                generator=gen,
                num_inference_steps=args.eval_inference_steps,
                output_type="np",
                **extra,
            )
            samples.append(quantize_uint8(torch.from_numpy(out.images).permute(0, 3, 1, 2)))
        results = compute_sample_metrics(torch.cat(samples), self.reals, self.metrics, self.extractors)
        if "bpd" in self.metrics:
            results["bits_per_dim"] = self._bound(args, pipe)
        self.last = {**results, "step": step}
        logged = {f"eval/{_log_name(k, n)}": v for k, v in results.items() if _log_name(k, n)}
        logger.info("evaluation at step %d: %s", step, logged)
        return logged

    def _bound(self, args, pipe) -> float:
        from ..evaluation.likelihood import vlb_terms
        from ..schedulers.scheduling_ddpm_plus import respace

        k, T = args.eval_bound_timesteps, int(pipe.scheduler.config.num_train_timesteps)
        seq = None if k is None else torch.from_numpy(respace(T, min(k, T), timestep_spacing="linspace").timesteps)
        bound = vlb_terms if self.reals.labels is None else partial(conditional_vlb_terms, class_ids=self.reals.labels)
        terms = bound(
            pipe.unet, pipe.scheduler, self.reals.images, timesteps=seq, num_bins=self.reals.num_bins,
            generator=torch.Generator().manual_seed(args.seed), batch_size=args.eval_batch_size, progress=False,
        )  # fmt: skip
        return float(terms["total_bpd"].mean())

    def card(self) -> tuple[dict, list[dict]]:
        """(Evaluation table rows, Hub model-index entries) of the last evaluation."""
        r, n = self.last, self.last.get("num_samples", 0)
        rows = {"dataset": self.reals.description, "training step": r.get("step")}
        rows.update({_log_name(k, n): round(v, 5) for k, v in r.items() if _log_name(k, n) and isinstance(v, float)})
        return rows, model_index_entries(r, self.reals.key)


def _log_name(key: str, n: int) -> str | None:
    names = {"fid": f"fid@{n}", "kid_mean": f"kid@{n}", "precision": f"precision@{n}", "recall": f"recall@{n}"}
    names.update({"fd_dinov2": f"fd_dinov2@{n}", "bits_per_dim": "bpd"})
    return names.get(key)


def _class_keywords(pipe, start: int, count: int, guidance_scale: float) -> dict:
    """A conditional pipeline samples its classes in turn (class-balanced over the whole evaluation)."""
    conditioning = conditioning_of(pipe)
    if not conditioning.conditional:
        return {}
    k = conditioning.num_classes
    return {"class_labels": [(start + i) % k for i in range(count)], "guidance_scale": guidance_scale}
