"""Evaluation of a model's samples against a dataset: the real images (converted exactly as the trainer
converts them), the feature extractors, cached reference statistics, and the sample metrics
(FID, KID, precision/recall in Inception features; FD_DINOv2) of one set of uint8 samples.

Used by ``ddpm-plus evaluate``, ``ddpm-plus reference-stats`` and the trainer's ``--eval_steps``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import sample_metrics as sm

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_METRICS",
    "DEFAULT_DINOV2",
    "EvalImages",
    "load_eval_images",
    "parse_metrics",
    "FeatureExtractors",
    "compute_sample_metrics",
    "frechet_label",
    "SMALL_N_WARNING",
]

ALL_METRICS = ("bpd", *sm.SAMPLE_METRICS)
DEFAULT_DINOV2 = "facebook/dinov2-large"
DIGITS_BINS, IMAGE_BINS = 17, 256
SMALL_N = 10_000
SMALL_N_WARNING = (
    "a Frechet distance from fewer than 10,000 samples is biased upward; compare it only with figures at the same n"
)


@dataclass
class EvalImages:
    """Real images of an evaluation dataset at the model's resolution and channels."""

    images: torch.Tensor  # [N, C, H, W] float32 in [-1, 1], on the data's grid
    num_bins: int  # the data's grid: 17 for the digits, 256 for 8-bit images
    description: str
    key: dict  # what identifies these images in the reference-statistics cache
    labels: np.ndarray | None = None  # class ids (dataset order), when a label column was asked for
    is_digits: bool = False

    def uint8(self) -> torch.Tensor:
        """The images as uint8 [N, C, H, W] (the digits' 17 levels map to round(k·255/16), as their PNGs)."""
        return sm.quantize_uint8((self.images + 1) / 2)


def load_eval_images(
    dataset: str = "digits",
    *,
    resolution: int,
    channels: int,
    split: str | None = None,
    dataset_config: str | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    max_images: int | None = None,
) -> EvalImages:
    """``dataset``: ``"digits"`` (bundled; default split ``test``), a local image folder (``imagefolder``,
    default split ``train``) or a Hub dataset id (default split ``train``). Images go through the trainer's
    own :func:`~ddpm_plus.data.load_image_dataset`, :class:`~ddpm_plus.data.ImageTransform` (center crop, no
    flip) and :func:`~ddpm_plus.data.prepare_dataset`; the grid (17 or 256 levels) comes from the data."""
    from ..data import ImageTransform, load_image_dataset, prepare_dataset

    is_digits = dataset == "digits"
    if is_digits and (dataset_config is not None or image_column != "image"):
        raise ValueError("--dataset_config and --image_column apply to image folders and Hub datasets, not digits")
    split = split or ("test" if is_digits else "train")
    folder = not is_digits and Path(dataset).is_dir()
    if is_digits:
        raw = load_image_dataset(split=split)
    elif folder:
        raw = load_image_dataset(train_data_dir=dataset, split=split, image_column=image_column)
    else:
        raw = load_image_dataset(
            dataset_name=dataset, dataset_config_name=dataset_config, split=split, image_column=image_column
        )
    if max_images is not None:
        raw = raw.select(range(min(max_images, len(raw))))
    num_bins = DIGITS_BINS if is_digits else IMAGE_BINS
    transform = ImageTransform(resolution, channels, center_crop=True, num_bins=num_bins)
    data = prepare_dataset(raw, transform, label_column=label_column)
    images = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    labels = None
    if label_column is not None:
        labels = np.array([int(data[i]["class_labels"]) for i in range(len(data))])
    where = "bundled scikit-learn digits" if is_digits else ("image folder" if folder else "Hub dataset")
    name = "digits" if is_digits else (str(Path(dataset).resolve()) if folder else dataset)
    key = {
        "dataset": name,
        "config": dataset_config,
        "split": split,
        "image_column": image_column,
        "resolution": resolution,
        "channels": channels,
        "num_images": len(images),
    }
    description = f"{where} {dataset}" if not is_digits else where
    description += f", split={split!r}" + (f", config={dataset_config!r}" if dataset_config else "")
    return EvalImages(images, num_bins, description, key, labels, is_digits)


def parse_metrics(text: str | Iterable[str] | None, *, default: Iterable[str] = ("bpd", "fid")) -> tuple[str, ...]:
    """``"bpd,fid"`` -> ("bpd", "fid"); unknown names are a ValueError listing the allowed ones."""
    names = list(default) if text is None else ([text] if isinstance(text, str) else list(text))
    out: list[str] = []
    for part in ",".join(names).split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in ALL_METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no metric given; choose from {', '.join(ALL_METRICS)}")
    return tuple(out)


@dataclass
class FeatureExtractors:
    """The feature extractors a set of metrics needs, built once (errors before anything is sampled)."""

    inception: sm.InceptionFeatures | None = None
    dinov2: sm.Dinov2Features | None = None
    cache_dir: str | None = None
    reference_stats_file: str | None = None
    _references: dict = field(default_factory=dict)

    @classmethod
    def for_metrics(
        cls,
        metrics: Iterable[str],
        *,
        inception_weights=None,
        dinov2_model: str = DEFAULT_DINOV2,
        device="cpu",
        progress: bool = False,
        cache_dir=None,
        reference_stats_file=None,
    ) -> FeatureExtractors:
        metrics = set(metrics)
        inception = None
        if metrics & {"fid", "kid", "precision_recall"}:
            inception = sm.InceptionFeatures(inception_weights, device=device, progress=progress, cache_dir=cache_dir)
        dinov2 = sm.Dinov2Features(dinov2_model, device=device, progress=progress) if "fd_dinov2" in metrics else None
        if reference_stats_file is not None:
            sm.ReferenceStats.load(reference_stats_file)  # a corrupt file is an error now, not after sampling
        return cls(inception, dinov2, cache_dir, reference_stats_file)

    @classmethod
    def from_args(cls, metrics: Iterable[str], args, device, progress: bool) -> FeatureExtractors:
        """:meth:`for_metrics` with the flags of :func:`add_metric_source_arguments`."""
        return cls.for_metrics(
            metrics,
            inception_weights=args.inception_weights,
            dinov2_model=args.dinov2_model,
            device=device,
            progress=progress,
            cache_dir=args.stats_cache_dir,
            reference_stats_file=args.reference_stats,
        )

    def reference(self, which: str, reals: EvalImages, need_features: bool) -> tuple[sm.ReferenceStats, str]:
        """Reference statistics of ``reals`` in ``which`` ("inception" | "dinov2") features, cached on disk
        per (dataset, config, split, resolution, channels, extractor, weights hash) and in memory per run."""
        extractor = self.inception if which == "inception" else self.dinov2
        if which == "inception" and self.reference_stats_file and not need_features:
            return sm.ReferenceStats.load(self.reference_stats_file), str(self.reference_stats_file)
        key = {**reals.key, "extractor": extractor.name, "weights": extractor.weights_id}
        memo = repr(sorted(key.items()))
        if memo not in self._references:
            stats, path, reused = sm.cached_reference_stats(key, extractor, reals.uint8, cache_dir=self.cache_dir)
            logger.info("%s reference statistics %s: %s", which, "reused" if reused else "computed", path)
            self._references[memo] = (stats, str(path))
        return self._references[memo]


def frechet_label(name: str, n: int) -> str:
    """``FID@5k`` style label: the metric with its sample count."""
    count = f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)
    return f"{name}@{count}"


def compute_sample_metrics(
    samples_uint8: torch.Tensor, reals: EvalImages, metrics: Iterable[str], extractors: FeatureExtractors
) -> dict:
    """The sample metrics among ``metrics`` of uint8 samples [N, C, H, W] against ``reals``:
    ``fid``, ``kid_mean``/``kid_std``, ``precision``/``recall``, ``fd_dinov2`` with ``num_samples`` and
    ``num_reference`` (and where the reference statistics came from)."""
    metrics = [m for m in metrics if m in sm.SAMPLE_METRICS]
    out: dict = {}
    if not metrics:
        return out
    n = int(samples_uint8.shape[0])
    out["num_samples"] = n
    if set(metrics) & {"fid", "kid", "precision_recall"}:
        need_features = bool(set(metrics) & {"kid", "precision_recall"})
        ref, source = extractors.reference("inception", reals, need_features)
        gen = extractors.inception(samples_uint8)
        out.update(_inception_metrics(gen, ref, metrics))
        out["num_reference"] = int(ref.num) if ref.num else len(reals.images)
        out["inception_reference_stats"] = source
    if "fd_dinov2" in metrics:
        ref, source = extractors.reference("dinov2", reals, False)
        mu, sigma = sm.gaussian_stats(extractors.dinov2(samples_uint8))
        out["fd_dinov2"] = sm.frechet_distance_from_stats(mu, sigma, ref.mu, ref.sigma)
        out["dinov2_model"] = extractors.dinov2.name
        out["dinov2_reference_stats"] = source
        out.setdefault("num_reference", int(ref.num))
    if ("fid" in metrics or "fd_dinov2" in metrics) and n < SMALL_N:
        logger.warning("%s (n = %d)", SMALL_N_WARNING, n)
    return out


def _inception_metrics(gen: np.ndarray, ref: sm.ReferenceStats, metrics) -> dict:
    out: dict = {}
    if "fid" in metrics:
        mu, sigma = sm.gaussian_stats(gen)
        out["fid"] = sm.frechet_distance_from_stats(mu, sigma, ref.mu, ref.sigma)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = sm.kernel_inception_distance(gen, ref.features)
    if "precision_recall" in metrics:
        out["precision"], out["recall"] = sm.precision_recall(gen, ref.features)
    return {k: (float(v) if isinstance(v, float | np.floating) and math.isfinite(v) else v) for k, v in out.items()}


def model_index_entries(results: Mapping, reals_key: Mapping) -> list[dict]:
    """The Hub ``model-index`` entries (see :func:`ddpm_plus.hub.set_card_evaluation`) of a results dict."""
    n, n_ref = results.get("num_samples"), results.get("num_reference")
    base = {
        "dataset_name": str(reals_key.get("dataset")),
        "dataset_type": str(reals_key.get("dataset")),
        "dataset_split": reals_key.get("split"),
        "dataset_config": reals_key.get("config"),
    }
    rows = []
    specs = [
        ("bits_per_dim", "bits_per_dim", "bits/dim", {}),
        ("fid", "fid", frechet_label("FID", n or 0), {"feature_extractor": sm.InceptionFeatures.name}),
        ("kid_mean", "kid", f"KID@{n}", {"feature_extractor": sm.InceptionFeatures.name}),
        ("precision", "precision", f"precision@{n}", {"feature_extractor": sm.InceptionFeatures.name}),
        ("recall", "recall", f"recall@{n}", {"feature_extractor": sm.InceptionFeatures.name}),
        (
            "fd_dinov2",
            "fd_dinov2",
            frechet_label("FD_DINOv2", n or 0),
            {"feature_extractor": results.get("dinov2_model")},
        ),
    ]
    for key, mtype, name, args in specs:
        if key in results and isinstance(results[key], float) and math.isfinite(results[key]):
            extra = {} if key == "bits_per_dim" else {"num_samples": n, "num_reference": n_ref}
            rows.append({"type": mtype, "name": name, "value": results[key], **base, "args": {**extra, **args}})
    return rows


def add_metric_source_arguments(parser) -> None:
    """The flags that say where the feature extractors and reference statistics come from
    (``ddpm-plus evaluate``, ``ddpm-plus reference-stats`` and the trainer)."""
    parser.add_argument(
        "--inception_weights",
        default=None,
        metavar="FILE",
        help="torch-fidelity's inception-v3-compat weights (.pth or .safetensors) for FID/KID/precision-recall; "
        "default: torch-fidelity's standard file, downloaded once into the cache (never with HF_HUB_OFFLINE=1)",
    )
    parser.add_argument(
        "--dinov2_model",
        default=DEFAULT_DINOV2,
        metavar="DIR_OR_ID",
        help=f"transformers Dinov2Model for FD_DINOv2 (default {DEFAULT_DINOV2}, ViT-L/14)",
    )
    parser.add_argument(
        "--reference_stats",
        default=None,
        metavar="FILE",
        help="precomputed Inception statistics (.npz with mu and sigma, pytorch-fid/ADM convention) for FID",
    )
    parser.add_argument(
        "--stats_cache_dir",
        default=None,
        help="where reference statistics and downloaded weights are cached (default: $DDPM_PLUS_CACHE or "
        "~/.cache/ddpm_plus)",
    )
