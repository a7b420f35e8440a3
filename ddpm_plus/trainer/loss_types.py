"""The training objectives' names and the one rule between an objective and the variance type.

``hybrid`` and ``vlb`` train the variance (improved DDPM), so they need a variance the model predicts
(:attr:`VarianceType.learned <ddpm_plus.schedulers.options.VarianceType.learned>`); the trainer also refuses a
learned variance that its objective does not train. :func:`check_loss_variance` is that rule, for
``compute_loss`` and for the trainer's flags alike.
"""

from __future__ import annotations

from enum import Enum

from ..schedulers.options import ALL_VARIANCE_TYPES, LEARNED_VARIANCE_TYPES, VarianceType

__all__ = ["LOSS_TYPES", "LossType", "check_loss_variance"]


class LossType(str, Enum):
    """A training objective (ddpm_plus/trainer/losses.py)."""

    SIMPLE = "simple"  # L_simple (optionally min-SNR weighted): the mean only
    HYBRID = "hybrid"  # L_simple + λ L_vlb: the variance through L_vlb
    VLB = "vlb"  # L_vlb: mean and variance

    @property
    def trains_variance(self) -> bool:
        """Whether the objective has a gradient for the model's variance channels."""
        return self is not LossType.SIMPLE


LOSS_TYPES = tuple(t.value for t in LossType)


def _alternatives(values) -> str:
    return " or ".join(repr(v) for v in values)


def check_loss_variance(loss_type: str, variance_type: str, *, variance_must_be_trained: bool = False) -> None:
    """ValueError unless ``loss_type`` and ``variance_type`` fit: an objective that trains the variance needs a
    learned one; with ``variance_must_be_trained`` (the trainer) a learned variance also needs such an objective.
    The message names both arguments (``loss_type=...``, ``variance_type=...``) and the allowed values."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if variance_type not in ALL_VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {ALL_VARIANCE_TYPES}, got {variance_type!r}")
    loss, learned = LossType(loss_type), VarianceType(variance_type).learned
    if loss.trains_variance and not learned:
        raise ValueError(
            f"loss_type={loss.value!r} trains the variance and needs variance_type "
            f"{_alternatives(LEARNED_VARIANCE_TYPES)}, got variance_type={variance_type!r}"
        )
    if variance_must_be_trained and learned and not loss.trains_variance:
        trainers = [t.value for t in LossType if t.trains_variance]
        raise ValueError(
            f"variance_type={variance_type!r} is learned and needs loss_type {_alternatives(trainers)} to train it, "
            f"got loss_type={loss.value!r}"
        )
