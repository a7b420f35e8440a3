"""The evaluation's typed errors: one ``EvaluationError`` (a ``ValueError``) for anything the user can fix,
raised before the expensive part runs; front ends (``ddpm-plus evaluate``, the trainer) turn it into a message."""

from __future__ import annotations

__all__ = [
    "METRICS_EXTRA_HINT",
    "EvaluationError",
    "EvaluationOptionsError",
    "DatasetError",
    "PipelineLoadError",
    "MetricsSetupError",
    "MissingExtraError",
]

METRICS_EXTRA_HINT = 'pip install "ddpm-plus[metrics]"'


class EvaluationError(ValueError):
    """Bad evaluation input: options, dataset, pipeline or metric setup; the message says what to change."""


class EvaluationOptionsError(EvaluationError):
    """An invalid :class:`~ddpm_plus.evaluation.options.EvaluationOptions` field; ``option`` names it (a field
    name, which each front end maps to its own flag) and ``message`` says what is allowed."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message

    def __reduce__(self):  # picklable
        return type(self), (self.option, self.message)


class DatasetError(EvaluationError):
    """The evaluation dataset cannot be read (missing folder, no images, a bad column)."""


class PipelineLoadError(EvaluationError):
    """The pipeline to evaluate cannot be loaded (no such directory, no model_index.json, not on the Hub)."""


class MetricsSetupError(EvaluationError):
    """A feature extractor cannot be set up (missing weights offline, a bad file); the message says what to do."""


class MissingExtraError(MetricsSetupError):
    """A metric needs a package of the ``[metrics]`` extra (torch-fidelity, transformers) that is not installed."""

    def __init__(self, module: str, metrics: str):
        super().__init__(f"{metrics} needs {module}, which is not installed: {METRICS_EXTRA_HINT}")
        self.module, self.metrics = module, metrics

    def __reduce__(self):  # picklable
        return type(self), (self.module, self.metrics)
