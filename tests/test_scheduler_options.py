"""The scheduler's typed options and typed errors: the config holds plain strings, the code branches on
``VarianceType``/``PredictionType`` members, ``VarianceType.learned`` is the one list of learned variance types,
and every invalid config value or argument raises a ``SchedulerConfigError`` naming it."""

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import ddpm_plus.schedulers.scheduling_ddpm_plus as sched_module
from ddpm_plus import DDPMPlusScheduler, respace
from ddpm_plus.schedulers import options
from ddpm_plus.schedulers.options import (
    BetaSchedule,
    PredictionType,
    SchedulerConfigError,
    TimestepSpacing,
    VarianceType,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = ROOT / "ddpm_plus" / "schedulers"


# ---------------------------------------------------------------- the enums and the tuples derived from them


def test_tuples_are_the_enum_values_in_order():
    assert options.ALL_VARIANCE_TYPES == tuple(v.value for v in VarianceType)
    assert options.VARIANCE_TYPES == (
        "fixed_small",
        "fixed_small_log",
        "fixed_large",
        "fixed_large_log",
        "learned",
        "learned_range",
    )
    assert options.ALL_VARIANCE_TYPES == options.VARIANCE_TYPES + ("analytic",)
    assert options.ANALYTIC_VARIANCE_TYPE == VarianceType.ANALYTIC.value == "analytic"
    assert options.PREDICTION_TYPES == tuple(p.value for p in PredictionType) == ("epsilon", "sample", "v_prediction")
    assert options.BETA_SCHEDULES == tuple(b.value for b in BetaSchedule)
    assert options.BETA_SCHEDULES == ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
    assert options.TIMESTEP_SPACINGS == tuple(s.value for s in TimestepSpacing) == ("leading", "linspace", "trailing")
    for name in (
        "ALL_VARIANCE_TYPES",
        "VARIANCE_TYPES",
        "LEARNED_VARIANCE_TYPES",
        "PREDICTION_TYPES",
        "BETA_SCHEDULES",
        "TIMESTEP_SPACINGS",
        "ANALYTIC_VARIANCE_TYPE",
    ):  # still importable from the adapter module, the same objects
        assert getattr(sched_module, name) is getattr(options, name), name


def test_learned_is_the_single_source_of_learned_variance_types():
    assert (
        options.LEARNED_VARIANCE_TYPES
        == tuple(v.value for v in VarianceType if v.learned)
        == ("learned", "learned_range")
    )
    assert [v for v in VarianceType if not v.trainable] == [VarianceType.ANALYTIC]
    # the scheduler reads variance channels exactly for the learned types
    sample = torch.zeros(2, 3, 4, 4)
    for kind in VarianceType:
        kw = {"analytic_moments": [0.5] * 1000} if kind is VarianceType.ANALYTIC else {}
        s = DDPMPlusScheduler(variance_type=kind.value, **kw)
        assert s.variance_kind is kind
        prediction, variance = s.split_model_output(torch.ones(2, 6, 4, 4), sample)
        assert prediction.shape == sample.shape
        assert (variance is not None) == kind.learned, kind
        if kind.learned:
            with pytest.raises(SchedulerConfigError, match="needs a model output with 2 x 3 = 6") as err:
                s.split_model_output(torch.ones(2, 3, 4, 4), sample)
            assert err.value.argument == "model_output"
        else:
            assert s.split_model_output(torch.ones(2, 3, 4, 4), sample)[1] is None


def _literal_comparisons(path: Path) -> list[str]:
    """`x == "learned"`, `x in ("epsilon", ...)`, `x.startswith("fixed_small")` on option values in a module."""
    values = set(options.ALL_VARIANCE_TYPES + options.PREDICTION_TYPES + options.BETA_SCHEDULES)
    values |= set(options.TIMESTEP_SPACINGS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        constants = []
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                constants += [e.value for e in elements if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
            found.append(f"{path.name}:{node.lineno} startswith")
        found += [f"{path.name}:{node.lineno} {c!r}" for c in constants if c in values]
    return found


def test_code_branches_on_members_not_strings():
    modules = sorted(SCHEDULERS.glob("*.py")) + [
        ROOT / "ddpm_plus" / "evaluation" / "analytic.py",
        ROOT / "ddpm_plus" / "trainer" / "losses.py",
    ]
    offenders = [hit for path in modules for hit in _literal_comparisons(path)]
    assert not offenders, offenders


def test_config_holds_plain_strings_and_swaps_with_diffusers():
    s = DDPMPlusScheduler(variance_type="learned_range", prediction_type="v_prediction", timestep_spacing="trailing")
    saved = json.loads(s.to_json_string())
    for key in ("variance_type", "prediction_type", "beta_schedule", "timestep_spacing"):
        assert type(saved[key]) is str and type(s.config[key]) is str, key
    assert (s.variance_kind, s.prediction_kind) == (VarianceType.LEARNED_RANGE, PredictionType.V_PREDICTION)
    d = DDPMScheduler.from_config(s.config)
    assert (d.config.variance_type, d.config.prediction_type) == ("learned_range", "v_prediction")
    back = DDPMPlusScheduler.from_config(d.config)
    assert json.loads(back.to_json_string()) | {"_diffusers_version": None} == saved | {"_diffusers_version": None}
    # members are accepted as values (they are strings) and stored as the plain string
    t = DDPMPlusScheduler(variance_type=VarianceType.FIXED_LARGE)
    assert t.variance_kind is VarianceType.FIXED_LARGE
    assert json.loads(t.to_json_string())["variance_type"] == "fixed_large"


def test_adapter_class_keeps_its_module_path():
    # model_index.json records the class's module: saved pipelines name this path
    assert DDPMPlusScheduler.__module__ == "ddpm_plus.schedulers.scheduling_ddpm_plus"


# ---------------------------------------------------------------- typed errors


def test_error_is_a_value_error_with_its_arguments_and_pickles():
    e = SchedulerConfigError(("beta_start", "beta_end"), "bad range")
    assert isinstance(e, ValueError) and str(e) == "bad range"
    assert e.argument == "beta_start" and e.arguments == ("beta_start", "beta_end")
    f = pickle.loads(pickle.dumps(e))
    assert type(f) is SchedulerConfigError and (f.argument, f.arguments, str(f)) == (e.argument, e.arguments, str(e))
    assert SchedulerConfigError("eta", "x").arguments == ("eta",)


INVALID_CONFIGS = [
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 2.0}, "num_train_timesteps"),
    ({"clip_sample": 1}, "clip_sample"),
    ({"thresholding": "no"}, "thresholding"),
    ({"rescale_betas_zero_snr": None}, "rescale_betas_zero_snr"),
    ({"rescale_betas_for_num_timesteps": 0}, "rescale_betas_for_num_timesteps"),
    ({"variance_type": "fixed_tiny"}, "variance_type"),
    ({"prediction_type": "eps"}, "prediction_type"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"steps_offset": -1}, "steps_offset"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"beta_start": 0.03, "beta_end": 0.02}, ("beta_start", "beta_end")),
    ({"beta_end": float("nan")}, ("beta_start", "beta_end")),
    ({"rescale_betas_for_num_timesteps": True, "beta_schedule": "sigmoid"}, "rescale_betas_for_num_timesteps"),
    (
        {"rescale_betas_for_num_timesteps": True, "num_train_timesteps": 100, "beta_end": 0.2},
        "rescale_betas_for_num_timesteps",
    ),
    ({"rescale_betas_zero_snr": True, "num_train_timesteps": 1}, "rescale_betas_zero_snr"),
    ({"rescale_betas_zero_snr": True, "clip_sample": False}, "rescale_betas_zero_snr"),
    ({"eta": 1.5}, "eta"),
    ({"eta": True}, "eta"),
    ({"variance_type": "analytic"}, ("variance_type", "analytic_moments")),
    ({"analytic_moments": [0.5, 0.5]}, "analytic_moments"),
    ({"analytic_moments": "abc"}, "analytic_moments"),
    ({"analytic_moments": [float("nan")] * 1000}, "analytic_moments"),
    ({"clip_sample_range": 0.0}, "clip_sample_range"),
    ({"sample_max_value": float("inf")}, "sample_max_value"),
    ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({"trained_betas": [0.1] * 3}, "trained_betas"),
    ({"trained_betas": [0.9] * 1000}, "trained_betas"),
    ({"trained_betas": [1e-20] * 1000}, "trained_betas"),
    ({"beta_start": 0.5, "beta_end": 0.9}, ("beta_end", "num_train_timesteps")),
    ({"beta_start": 1e-20, "beta_end": 2e-20}, "beta_start"),
]


@pytest.mark.parametrize("kwargs, arguments", INVALID_CONFIGS, ids=[str(kw) for kw, _ in INVALID_CONFIGS])
def test_every_invalid_config_value_names_its_key(kwargs, arguments):
    arguments = (arguments,) if isinstance(arguments, str) else arguments
    with pytest.raises(SchedulerConfigError) as err:
        DDPMPlusScheduler(**kwargs)
    assert err.value.arguments == arguments and err.value.argument == arguments[0]
    assert arguments[0] in str(err.value)  # the message names it too


def _scheduler():
    s = DDPMPlusScheduler(num_train_timesteps=20, beta_start=0.001, beta_end=0.2)
    s.set_timesteps(5)
    return s


x = torch.zeros(2, 1, 4)
INVALID_CALLS = [
    (lambda s: s.set_timesteps(0), "num_inference_steps"),
    (lambda s: s.set_timesteps(21), "num_inference_steps"),
    (lambda s: s.set_timesteps(5, timesteps=[5, 1]), "num_inference_steps"),
    (lambda s: s.set_timesteps(timesteps=[1, 5]), "timesteps"),
    (lambda s: s.set_timesteps(timesteps=[20]), "timesteps"),
    (lambda s: respace(20, 5, timestep_spacing="uniform"), "timestep_spacing"),
    (lambda s: respace(20, 5, steps_offset=-1), "steps_offset"),
    (lambda s: s.add_noise([0.0, 0.0], x, 3), "original_samples"),
    (lambda s: s.add_noise(x, torch.zeros(3, 1, 4), 3), "noise"),
    (lambda s: s.add_noise(x, x, torch.tensor([1, 2, 3])), "timesteps"),
    (lambda s: s.add_noise(x, x, torch.tensor([1, 20])), "timesteps"),
    (lambda s: s.add_noise(x, x, "3"), "timesteps"),
    (lambda s: s.get_velocity(x.long(), x, 3), "sample"),
    (lambda s: s.step(x, 3, x.long()), "sample"),
    (lambda s: s.step(x.reshape(2, 4), 3, x), "model_output"),
    (lambda s: s.step(torch.zeros(2, 1, 5), 3, x), "model_output"),
    (lambda s: s.step(torch.zeros(2, 3, 4), 3, x), "model_output"),
    (lambda s: s.step(x, torch.tensor([1, 2, 3]), x), "timestep"),
    (lambda s: s.step(x, 2.5, x), "timestep"),
    (lambda s: s.step(x, 20, x), "timestep"),
    (lambda s: s.coefficients(5, prev_timestep=5), "prev_timestep"),
    (lambda s: s.coefficients(5, next_timestep=3), "next_timestep"),
    (lambda s: s.q_posterior(x, x, np.array([1.5, 2.0])), "timestep"),
    (lambda s: s._get_variance(4, variance_type="other"), "variance_type"),
    (lambda s: s._get_variance(4, variance_type="analytic"), "variance_type"),
    (lambda s: s._get_variance(4, variance_type="learned_range"), "predicted_variance"),
]


@pytest.mark.parametrize("call, argument", INVALID_CALLS, ids=[a + str(i) for i, (_, a) in enumerate(INVALID_CALLS)])
def test_every_invalid_argument_names_it(call, argument):
    with pytest.raises(SchedulerConfigError) as err:
        call(_scheduler())
    assert err.value.argument == argument
    assert argument in str(err.value) or argument.replace("_", " ") in str(err.value)  # wording kept as it was
