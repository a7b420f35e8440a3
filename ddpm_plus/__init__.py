"""ddpm_plus: an exact DDPM scheduler and pipeline for Hugging Face Diffusers.

Importing this package registers its classes where diffusers 0.42 looks plugin classes up, so that a
plain ``DiffusionPipeline.from_pretrained(path_or_repo_id)`` returns a ``DDPMPlusPipeline``:

- ``diffusers.<ClassName>``: ``from_pretrained`` resolves ``model_index.json``'s ``_class_name`` only
  as ``getattr(diffusers, name)``;
- ``diffusers.pipelines.<module path>``: for a Hub repo id, the download step accepts a component
  whose library (the full dotted module path written by ``save_pretrained``) is an attribute of
  ``diffusers.pipelines``.

A different class already registered under one of our names is never overwritten. Folders saved before the
package had subpackages name the old module paths (``ddpm_plus.scheduling_ddpm_plus``,
``ddpm_plus.pipeline_ddpm_plus``); those are registered on ``diffusers.pipelines`` too (:data:`LEGACY_MODULES`),
so such folders still load.
"""

import sys

import diffusers
import diffusers.pipelines

from .evaluation.analytic import estimate_analytic_moments
from .evaluation.likelihood import bits_per_dim, vlb_terms
from .models.adm_classifier import ADMClassifierModel
from .models.adm_unet import ADMUNetModel
from .pipelines.fast_sampling import FastSampler, fast_sample
from .pipelines.pipeline_ddpm_plus import DDPMPlusPipeline
from .pipelines.pipeline_latent_ddpm_plus import LatentDDPMPlusPipeline
from .schedulers.coefficients import gaussian_analytic_moments
from .schedulers.scheduling_ddpm_plus import DDPMPlusScheduler, DDPMPlusSchedulerOutput, StepCoefficients, respace

__version__ = "0.1.0"

__all__ = [
    "ADMClassifierModel",
    "ADMUNetModel",
    "DDPMPlusPipeline",
    "DDPMPlusScheduler",
    "DDPMPlusSchedulerOutput",
    "FastSampler",
    "LatentDDPMPlusPipeline",
    "StepCoefficients",
    "bits_per_dim",
    "estimate_analytic_moments",
    "fast_sample",
    "gaussian_analytic_moments",
    "respace",
    "vlb_terms",
    "__version__",
]


def _register(target, name, obj):
    existing = target.__dict__.get(name)
    if existing is not None and existing is not obj:
        raise ImportError(
            f"ddpm_plus cannot register {name!r} on {target.__name__}: a different object "
            f"({existing!r}) is already registered under that name."
        )
    setattr(target, name, obj)


# module path recorded in model_index.json by ddpm_plus <= 1eb70aa -> the class now defined elsewhere
LEGACY_MODULES = {
    "ddpm_plus.scheduling_ddpm_plus": DDPMPlusScheduler,
    "ddpm_plus.pipeline_ddpm_plus": DDPMPlusPipeline,
}

for _cls in (DDPMPlusPipeline, DDPMPlusScheduler, LatentDDPMPlusPipeline, ADMUNetModel, ADMClassifierModel):
    _register(diffusers, _cls.__name__, _cls)
    _register(diffusers.pipelines, _cls.__module__, sys.modules[_cls.__module__])
for _path, _cls in LEGACY_MODULES.items():
    _register(diffusers.pipelines, _path, sys.modules[_cls.__module__])
del _cls, _path
