"""Respacing: the sampling sequence (a subset of the T training timesteps) and every timestep's neighbours in it.

Used by the scheduler's ``set_timesteps``, by ``ddpm_plus.evaluation.likelihood`` and by the CLI; the
coefficients of a strided step t -> prev use the exact β' = 1 − ᾱ_t/ᾱ_prev of the pair (docs/math.md,
"Respacing").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .options import SchedulerConfigError, TimestepSpacing
from .validation import check_spacing

__all__ = ["Respacing", "respace"]


class Respacing(NamedTuple):
    """A sampling sequence and its neighbours (from :func:`respace`).

    timesteps: the sequence, strictly descending int64. prev_timestep / next_timestep: int64 arrays of
    length T; entry t is the next lower / higher timestep of the sequence (-1: none), for every t.
    """

    timesteps: np.ndarray
    prev_timestep: np.ndarray
    next_timestep: np.ndarray


def _spaced(T: int, n: int, spacing: TimestepSpacing, steps_offset: int) -> np.ndarray:
    """Exactly ``n`` distinct descending timesteps in [0, T-1] (diffusers' conventions, defects removed)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
        raise SchedulerConfigError(
            "num_inference_steps",
            f"`num_inference_steps` must be an integer in [1, {T}] (num_train_timesteps={T}); got {n!r}.",
        )
    n = int(n)
    if spacing is TimestepSpacing.LINSPACE:
        if n == 1:  # diffusers gives t = 0: one step from pure noise at the least noisy timestep
            return np.array([T - 1], dtype=np.int64)
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing is TimestepSpacing.LEADING:
        seq = np.arange(n, dtype=np.int64) * (T // n) + steps_offset
        # With steps_offset > 0 and n = T the top step would be T: lower the offset to stay in range.
        return (seq - max(0, int(seq[-1]) - (T - 1)))[::-1].copy()
    # TimestepSpacing.TRAILING: T-1, T-1-T/n, ...; diffusers' float arange can produce n+1 steps ending at -1: keep n.
    return (np.round(np.arange(T, 0, -T / n)[:n]) - 1).astype(np.int64)


def _custom(timesteps, T: int, allow_increasing: bool) -> np.ndarray:
    """A user sequence, validated (1-D integers in [0, T-1], strictly monotone), as descending int64."""
    raw = timesteps.detach().cpu().numpy() if isinstance(timesteps, torch.Tensor) else timesteps
    seq = np.asarray(raw, dtype=np.float64) if np.ndim(raw) else np.asarray([raw], dtype=np.float64)
    if seq.ndim != 1 or seq.size == 0:
        raise SchedulerConfigError(
            "timesteps", f"`timesteps` must be a non-empty 1-D sequence of integers; got shape {seq.shape}."
        )
    if np.any(seq != np.round(seq)):
        raise SchedulerConfigError("timesteps", f"`timesteps` must be integers; got {timesteps!r}.")
    d = np.diff(seq)
    if not (np.all(d < 0) or (allow_increasing and np.all(d > 0))):
        order = "strictly increasing or strictly decreasing" if allow_increasing else "strictly descending"
        raise SchedulerConfigError("timesteps", f"`timesteps` must be {order}; got {timesteps!r}.")
    if seq.max() > T - 1 or seq.min() < 0:
        raise SchedulerConfigError(
            "timesteps", f"`timesteps` must lie in [0, {T - 1}] (num_train_timesteps={T}); got {timesteps!r}."
        )
    return np.sort(seq.astype(np.int64))[::-1].copy()


def respace(
    num_train_timesteps: int,
    num_inference_steps: int | None = None,
    *,
    timesteps=None,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    allow_increasing: bool = False,
) -> Respacing:
    """The one respacing function: ``num_inference_steps`` spaced by ``timestep_spacing`` (exactly that many
    distinct timesteps in [0, T-1]) or custom ``timesteps`` (strictly descending; either order with
    ``allow_increasing``), with every timestep's neighbours in the sequence. Used by the scheduler's
    ``set_timesteps``, by ``ddpm_plus.likelihood`` and by the CLI."""
    T = int(num_train_timesteps)
    if (num_inference_steps is None) == (timesteps is None):
        raise SchedulerConfigError(
            ("num_inference_steps", "timesteps"), "Pass exactly one of `num_inference_steps` or `timesteps`."
        )
    if timesteps is not None:
        seq = _custom(timesteps, T, allow_increasing)
    else:
        check_spacing(timestep_spacing, steps_offset)
        seq = _spaced(T, num_inference_steps, TimestepSpacing(timestep_spacing), int(steps_offset))
    ascending = seq[::-1]
    t = np.arange(T)
    below = np.searchsorted(ascending, t, side="left") - 1
    above = np.searchsorted(ascending, t, side="right")
    prev = np.where(below >= 0, ascending[np.maximum(below, 0)], -1)
    nxt = np.where(above < len(seq), ascending[np.minimum(above, len(seq) - 1)], -1)
    return Respacing(seq, prev.astype(np.int64), nxt.astype(np.int64))
