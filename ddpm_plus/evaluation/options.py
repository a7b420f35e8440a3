"""What one evaluation computes, checked in one place: :class:`EvaluationOptions` (the metrics, sample and
image counts, sampling steps, guidance, the bound's timesteps) and the one rule for the bound's respaced
timesteps. ``ddpm-plus evaluate`` and the trainer's ``--eval_*`` flags build the same options, so they accept
and refuse the same values; errors are :class:`EvaluationOptionsError` naming the field."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..schedulers import scheduling_ddpm_plus
from .errors import EvaluationOptionsError
from .sample_metrics import SAMPLE_METRICS

__all__ = ["ALL_METRICS", "DEFAULT_METRICS", "EvaluationOptions", "parse_metrics", "bound_timesteps"]

ALL_METRICS = ("bpd", *SAMPLE_METRICS)
DEFAULT_METRICS = ("bpd", "fid")
COVARIANCE_METRICS = frozenset({"fid", "kid", "fd_dinov2"})  # a covariance (or an unbiased MMD²): n >= 2
NEIGHBOURHOOD = 3  # precision/recall's k nearest neighbours: n >= k + 1


def parse_metrics(text: str | Iterable[str] | None, *, default: Iterable[str] = DEFAULT_METRICS) -> tuple[str, ...]:
    """``"bpd,fid"`` (or an iterable of names; None: ``default``) -> ("bpd", "fid"), duplicates dropped."""
    names = list(default) if text is None else ([text] if isinstance(text, str) else list(text))
    out: list[str] = []
    for part in ",".join(names).split(","):
        name = part.strip().lower()
        if name and name not in ALL_METRICS:
            raise EvaluationOptionsError("metrics", f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}")
        if name and name not in out:
            out.append(name)
    if not out:
        raise EvaluationOptionsError("metrics", f"no metric given; choose from {', '.join(ALL_METRICS)}")
    return tuple(out)


def minimum_images(metrics: Iterable[str], on_digits: bool) -> tuple[int, str]:
    """(the fewest samples and real images ``metrics`` can use, why): precision/recall needs k + 1 = 4 (k nearest
    neighbours), a Frechet distance or KID 2 (a covariance; the digits proxy is one), the bound alone 1."""
    metrics = set(metrics)
    if "precision_recall" in metrics:
        return NEIGHBOURHOOD + 1, f"precision_recall needs {NEIGHBOURHOOD} nearest neighbours"
    if metrics & COVARIANCE_METRICS or on_digits:
        return 2, "a Frechet distance needs a covariance"
    return 1, "at least one image"


def bound_timesteps(num_train_timesteps: int, k: int | None) -> torch.Tensor | None:
    """The bound's timesteps: None (all T) or K evenly spaced over [0, T-1] (the scheduler's ``respace``,
    "linspace" spacing, docs/math.md Sec. 10: descending, always holding T-1 and 0, which the decoder L_0
    needs), for 2 <= K <= T; anything else is an EvaluationOptionsError."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= num_train_timesteps:
        raise EvaluationOptionsError(
            "bound_timesteps",
            f"must be None (all timesteps) or an integer K with 2 <= K <= num_train_timesteps={num_train_timesteps} "
            f"(the bound's steps run from T-1 down to 0, so K >= 2), got {k!r}",
        )
    respaced = scheduling_ddpm_plus.respace(num_train_timesteps, k, timestep_spacing="linspace")
    return torch.from_numpy(respaced.timesteps)


def _check_int(name: str, value, minimum: int, why: str = "", optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reason = f" ({why})" if why else ""
        raise EvaluationOptionsError(name, f"must be an integer >= {minimum}{reason}, got {value!r}")


@dataclass(frozen=True)
class EvaluationOptions:
    """One evaluation's settings. ``metrics`` from :data:`ALL_METRICS` (a string "bpd,fid" is parsed);
    ``max_images``: the first N real images only; ``bound_timesteps``: K respaced timesteps for the bound
    (None: all); ``batch_size``: images per UNet call, in sampling and in the bound. Checked on creation;
    :meth:`check_for` adds the checks that need the model and the dataset."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    num_samples: int = 64
    num_inference_steps: int = 100
    guidance_scale: float = 1.0
    batch_size: int = 256
    bound_timesteps: int | None = None
    max_images: int | None = None
    seed: int = 0
    progress: bool = False
    classifier_cache_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "metrics", parse_metrics(self.metrics))
        for name in ("num_inference_steps", "batch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("bound_timesteps", self.bound_timesteps, 2, "the bound's steps run from T-1 down to 0", True)
        _check_int("seed", self.seed, 0)
        w = self.guidance_scale
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise EvaluationOptionsError("guidance_scale", f"must be a finite number, got {w!r}")
        self._check_counts(on_digits=False)

    def _check_counts(self, on_digits: bool) -> None:
        minimum, why = minimum_images(self.metrics, on_digits)
        _check_int("num_samples", self.num_samples, minimum, why)
        _check_int("max_images", self.max_images, minimum, why, optional=True)

    def check_for(self, *, on_digits: bool, num_train_timesteps: int | None = None) -> None:
        """The checks that need the dataset (the digits add the Frechet proxy: 2 samples) and the model's T
        (K <= T respaced bound timesteps, at most T sampling steps)."""
        self._check_counts(on_digits)
        if num_train_timesteps is None:
            return
        bound_timesteps(num_train_timesteps, self.bound_timesteps)
        if self.num_inference_steps > num_train_timesteps:
            raise EvaluationOptionsError(
                "num_inference_steps",
                f"must be <= num_train_timesteps={num_train_timesteps}, got {self.num_inference_steps}",
            )
