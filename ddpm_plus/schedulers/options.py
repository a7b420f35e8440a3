"""The scheduler's typed options and its typed error.

The string values are the public config values (the ones diffusers' ``DDPMScheduler`` writes and reads), so a
config holds plain strings and ``VarianceType("learned_range")`` turns one into a member; members compare
equal to their string (``str`` enums). Which variance types read extra model output channels is said in one
place: :attr:`VarianceType.learned`.
"""

from __future__ import annotations

from enum import Enum


class VarianceType(str, Enum):
    """The reverse-process variance σ_t² (docs/math.md, "Variances")."""

    FIXED_SMALL = "fixed_small"  # β̃_t, the posterior variance
    FIXED_SMALL_LOG = "fixed_small_log"  # β̃_t, through its log (same values)
    FIXED_LARGE = "fixed_large"  # β_t
    FIXED_LARGE_LOG = "fixed_large_log"  # β_t, through its log
    LEARNED = "learned"  # the model outputs log σ_t²
    LEARNED_RANGE = "learned_range"  # the model outputs v: log σ_t² = v log β_t + (1 − v) log β̃_t
    ANALYTIC = "analytic"  # Analytic-DPM's optimal variance from the config's ``analytic_moments`` (sampling only)

    @property
    def learned(self) -> bool:
        """Whether the model predicts this variance (extra output channels)."""
        return self in (VarianceType.LEARNED, VarianceType.LEARNED_RANGE)

    @property
    def trainable(self) -> bool:
        """Whether a model can be trained with it (every type diffusers' DDPMScheduler knows; not ``analytic``)."""
        return self is not VarianceType.ANALYTIC


class PredictionType(str, Enum):
    """What the model predicts (docs/math.md, "Parameterisations")."""

    EPSILON = "epsilon"
    SAMPLE = "sample"  # x_0
    V_PREDICTION = "v_prediction"


class SchedulerConfigError(ValueError):
    """An invalid scheduler config value or argument; ``argument`` names it (a config key or call argument)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument
