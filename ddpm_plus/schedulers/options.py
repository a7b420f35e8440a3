"""The scheduler's typed options and its typed error.

The string values are the public config values (the ones diffusers' ``DDPMScheduler`` writes and reads), so a
config holds plain strings and ``VarianceType("learned_range")`` turns one into a member; members compare
equal to their string (``str`` enums). Which variance types read extra model output channels is said in one
place: :attr:`VarianceType.learned`. The tuples of allowed config values (``VARIANCE_TYPES`` ...) are derived
from the enums. Members are never formatted into messages or configs (``str()`` of a ``str`` enum member
differs between Python versions): ``.value`` is.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "ALL_VARIANCE_TYPES",
    "ANALYTIC_VARIANCE_TYPE",
    "BETA_SCHEDULES",
    "LEARNED_VARIANCE_TYPES",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
    "BetaSchedule",
    "PredictionType",
    "SchedulerConfigError",
    "TimestepSpacing",
    "VarianceType",
]


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

    @property
    def posterior(self) -> bool:
        """Whether it is the fixed posterior variance β̃ (fixed_small, fixed_small_log); else fixed_large's β."""
        return self in (VarianceType.FIXED_SMALL, VarianceType.FIXED_SMALL_LOG)


class PredictionType(str, Enum):
    """What the model predicts (docs/math.md, "Parameterisations")."""

    EPSILON = "epsilon"
    SAMPLE = "sample"  # x_0
    V_PREDICTION = "v_prediction"


class BetaSchedule(str, Enum):
    """The β schedule of the training chain (docs/math.md, "Noise schedules")."""

    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"  # linear in √β
    SQUAREDCOS_CAP_V2 = "squaredcos_cap_v2"  # cosine (Nichol & Dhariwal 2021); beta_start/beta_end unused
    SIGMOID = "sigmoid"  # GeoDiff


class TimestepSpacing(str, Enum):
    """How ``set_timesteps(num_inference_steps)`` spaces the sampling sequence (diffusers' conventions)."""

    LEADING = "leading"
    LINSPACE = "linspace"
    TRAILING = "trailing"


# The allowed config values, in the order messages list them.
VARIANCE_TYPES = tuple(v.value for v in VarianceType if v.trainable)
LEARNED_VARIANCE_TYPES = tuple(v.value for v in VarianceType if v.learned)
# Sampling-only: Analytic-DPM's optimal variance (Bao et al. 2022, Theorem 1) from the ``analytic_moments``
# table; a model is trained with one of VARIANCE_TYPES (the types diffusers' DDPMScheduler knows).
ANALYTIC_VARIANCE_TYPE = VarianceType.ANALYTIC.value
ALL_VARIANCE_TYPES = tuple(v.value for v in VarianceType)
PREDICTION_TYPES = tuple(p.value for p in PredictionType)
BETA_SCHEDULES = tuple(b.value for b in BetaSchedule)
TIMESTEP_SPACINGS = tuple(s.value for s in TimestepSpacing)


class SchedulerConfigError(ValueError):
    """An invalid scheduler config value or argument; ``argument`` names it (a config key or call argument).

    ``arguments`` names every config key or argument the message is about, ``argument`` first (e.g.
    ``("beta_start", "beta_end")`` for a reversed β range). A ``ValueError``: ``except ValueError`` catches it.
    """

    def __init__(self, argument: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.arguments: tuple[str, ...] = (argument,) if isinstance(argument, str) else tuple(argument)
        self.argument: str = self.arguments[0]

    def __reduce__(self):  # picklable (e.g. raised in a DataLoader worker or another process)
        return type(self), (self.arguments, str(self))
