"""The sample-quality figures of one set of uint8 samples against real images: the feature extractors a set
of metrics needs (built once, before anything is sampled), their cached reference statistics, and FID, KID,
precision/recall (Inception features) and FD_DINOv2 (:mod:`.sample_metrics` holds the formulas).

Used by the evaluation engine (``ddpm-plus evaluate``, the trainer's ``--eval_steps``) and ``ddpm-plus
reference-stats``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import sample_metrics as sm
from .distributed import Shard
from .errors import MetricsSetupError
from .metrics_table import SMALL_N, SMALL_N_WARNING

if TYPE_CHECKING:  # real_images needs `datasets` (the [train] extra); this module and its flags do not
    from .real_images import EvalImages

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_DINOV2", "FeatureExtractors", "compute_sample_metrics", "add_metric_source_arguments"]

DEFAULT_DINOV2 = "facebook/dinov2-large"
INCEPTION_METRICS = frozenset({"fid", "kid", "precision_recall"})


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
        if reference_stats_file is not None:  # a corrupt file is an error now, not after sampling
            try:
                sm.ReferenceStats.load(reference_stats_file)
            except ValueError as err:
                raise MetricsSetupError(f"reference_stats: {err}") from None
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

    def features(self, samples_uint8: torch.Tensor, metrics: Iterable[str]) -> dict[str, np.ndarray]:
        """The features ``metrics`` need of uint8 samples: ``{"inception": [n, 2048], "dinov2": [n, D]}``."""
        return {which: extractor(samples_uint8) for which, extractor in self._needed(metrics).items()}

    def _needed(self, metrics: Iterable[str]) -> dict:
        metrics = set(metrics)
        needed = {"inception": self.inception if metrics & INCEPTION_METRICS else None}
        needed["dinov2"] = self.dinov2 if "fd_dinov2" in metrics else None
        return {which: extractor for which, extractor in needed.items() if extractor is not None}

    def share_references(self, metrics: Iterable[str], reals: EvalImages, shard: Shard) -> None:
        """Called by every process of ``shard`` (nothing to do for one): reference statistics that are not
        cached on disk yet are computed with the real images split over the processes (blocks of the
        extractor's batch size, the batches one process uses) and gathered by the main process, which saves
        them; the main process then holds every reference :meth:`reference` returns."""
        if shard.world == 1:
            return
        metrics = set(metrics)
        for which, extractor in self._needed(metrics).items():
            need_features = which == "inception" and bool(metrics & {"kid", "precision_recall"})
            if which == "inception" and self.reference_stats_file and not need_features:
                continue
            key = {**reals.key, "extractor": extractor.name, "weights": extractor.weights_id}
            memo = repr(sorted(key.items()))
            path = sm.reference_stats_path(key, self.cache_dir)
            if shard.broadcast(shard.is_main and (memo in self._references or _loads(path))):
                continue
            images = reals.uint8()
            pieces = [
                (b.start, extractor(images[b.start : b.stop])) for b in shard.blocks(len(images), extractor.batch_size)
            ]
            gathered = shard.gather(pieces, to_all=False)
            if gathered is not None:
                stats = sm.ReferenceStats.from_features(np.concatenate([f for _, f in gathered]))
                stats.save(path)
                logger.info("%s reference statistics computed by %d processes: %s", which, shard.world, path)
                self._references[memo] = (stats, str(path))

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


def _loads(path) -> bool:
    try:
        sm.ReferenceStats.load(path)
        return True
    except ValueError:
        return False


def compute_sample_metrics(
    samples_uint8: torch.Tensor,
    reals: EvalImages,
    metrics: Iterable[str],
    extractors: FeatureExtractors,
    features: dict[str, np.ndarray] | None = None,
) -> dict:
    """The sample metrics among ``metrics`` of uint8 samples [N, C, H, W] against ``reals``:
    ``fid``, ``kid_mean``/``kid_std``, ``precision``/``recall``, ``fd_dinov2`` with ``num_samples`` and
    ``num_reference`` (and where the reference statistics came from). ``features``: the samples' features
    already extracted (:meth:`FeatureExtractors.features`), else extracted here."""
    features = features or {}
    metrics = [m for m in metrics if m in sm.SAMPLE_METRICS]
    out: dict = {}
    if not metrics:
        return out
    n = int(samples_uint8.shape[0])
    out["num_samples"] = n
    if set(metrics) & INCEPTION_METRICS:
        need_features = bool(set(metrics) & {"kid", "precision_recall"})
        ref, source = extractors.reference("inception", reals, need_features)
        gen = features["inception"] if "inception" in features else extractors.inception(samples_uint8)
        out.update(_inception_metrics(gen, ref, metrics))
        out["num_reference"] = int(ref.num) if ref.num else len(reals.images)
        out["inception_reference_stats"] = source
    if "fd_dinov2" in metrics:
        ref, source = extractors.reference("dinov2", reals, False)
        gen = features["dinov2"] if "dinov2" in features else extractors.dinov2(samples_uint8)
        mu, sigma = sm.gaussian_stats(gen)
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
