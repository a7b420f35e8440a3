"""Property-based tests (hypothesis) of DDPMPlusScheduler's configs and of set_timesteps/step/add_noise inputs.

Properties: (1) every config either builds or raises ValueError naming the offending argument, and never
emits a numpy overflow/invalid-value warning; (2) every set_timesteps call either works or raises a
ValueError naming its argument; (3) for a valid config and finite inputs of any float dtype (large
values, per-sample mixed timesteps), step() and add_noise() return finite tensors; (4) invalid step/
add_noise inputs (out-of-range, negative or fractional timesteps, mismatched shapes, non-float samples)
raise ValueError naming the argument.

Example counts are small by default so the suite stays fast; ``HYPOTHESIS_PROFILE=nightly`` runs many
more (``HYPOTHESIS_PROFILE=nightly pytest tests/test_fuzz_scheduler.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ddpm_plus import DDPMPlusScheduler

settings.register_profile(
    "ddpm_plus-default", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("nightly", max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ddpm_plus-default"))

PARAMS = set(inspect.signature(DDPMPlusScheduler.__init__).parameters) - {"self"}
BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
SPACINGS = ["leading", "linspace", "trailing"]
ARG_NAMES = sorted(PARAMS | {"num_inference_steps", "timesteps", "timestep", "sample", "model_output", "noise"})


@contextlib.contextmanager
def strict_numpy():
    """Numpy floating-point warnings (RuntimeWarning) are errors inside."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def names_an_argument(err: ValueError, *expected: str) -> bool:
    msg = str(err)
    return any(name in msg for name in (expected or ARG_NAMES))


def _valid_betas(draw, T):
    lo = draw(st.floats(1e-6, 0.5))
    hi = draw(st.floats(lo, 0.9999, exclude_min=True))
    return lo, hi


@st.composite
def valid_configs(draw, max_T=2000):
    T = draw(st.one_of(st.integers(2, 50), st.integers(2, max_T)))
    cfg = {"num_train_timesteps": T, "beta_schedule": draw(st.sampled_from(BETA_SCHEDULES))}
    cfg["beta_start"], cfg["beta_end"] = _valid_betas(draw, T)
    if draw(st.integers(0, 9)) == 0:  # trained betas: any values in (0, 1)
        cfg["trained_betas"] = draw(st.lists(st.floats(1e-6, 0.999), min_size=T, max_size=T))
    cfg["prediction_type"] = draw(st.sampled_from(PREDICTION_TYPES))
    cfg["variance_type"] = draw(st.sampled_from(VARIANCE_TYPES))
    cfg["timestep_spacing"] = draw(st.sampled_from(SPACINGS))
    cfg["steps_offset"] = draw(st.integers(0, 3))
    cfg["clip_sample"] = draw(st.booleans())
    cfg["thresholding"] = draw(st.booleans())
    cfg["rescale_betas_zero_snr"] = draw(st.booleans())
    if cfg["beta_schedule"] == "linear" and "trained_betas" not in cfg:
        cfg["rescale_betas_for_num_timesteps"] = draw(st.booleans())
    if "eta" in PARAMS:
        cfg["eta"] = draw(st.sampled_from([1.0, 0.0, 0.5]))
    return cfg


BAD_VALUES = {
    "num_train_timesteps": [0, -3, 1.5, 1e9, 10**9, True, "1000", None],
    "beta_start": [0.0, -1e-4, 1.0, float("nan"), float("inf"), "0.1", None],
    "beta_end": [1.0, 1.5, float("nan"), float("-inf"), None, "x"],
    "beta_schedule": ["cosine", "", None, 3],
    "trained_betas": [[0.5], [float("nan")] * 10, "abc", [[0.1, 0.2]]],
    "prediction_type": ["eps", None, 1],
    "variance_type": ["small", None, 0],
    "timestep_spacing": ["middle", None],
    "steps_offset": [-1, 1.5, "1", True, None],
    "clip_sample_range": [0.0, -1.0, float("nan"), float("inf"), "1", None],
    "sample_max_value": [0.0, -2.0, float("nan"), None],
    "dynamic_thresholding_ratio": [0.0, 1.5, float("nan"), None],
    "clip_sample": ["yes", 2, None],
    "thresholding": ["no", None],
    "rescale_betas_zero_snr": ["true", None],
    "rescale_betas_for_num_timesteps": ["true", 2],
}
if "eta" in PARAMS:
    BAD_VALUES["eta"] = [-0.1, 1.5, float("nan"), "0", None]


@given(cfg=valid_configs(), data=st.data())
def test_any_config_builds_or_raises_value_error_naming_the_argument(cfg, data):
    """Valid configs with one key (maybe) replaced by an invalid value."""
    key = None
    if data.draw(st.booleans()):
        with strict_numpy():
            try:
                DDPMPlusScheduler(**cfg)
            except ValueError:
                assume(False)  # only break configs that were valid, so the error must be about `key`
        key = data.draw(st.sampled_from(sorted(BAD_VALUES)))
        cfg = {**cfg, key: data.draw(st.sampled_from(BAD_VALUES[key]))}
    with strict_numpy():
        try:
            scheduler = DDPMPlusScheduler(**cfg)
        except ValueError as err:
            assert names_an_argument(err, *([key] if key else cfg)), (cfg, str(err))
            return
    ab = scheduler.alphas_cumprod.numpy()
    assert np.all(np.isfinite(ab)) and np.all(ab >= 0) and np.all(ab <= 1), cfg
    assert np.all(np.isfinite(scheduler.betas.numpy())), cfg


@given(cfg=valid_configs(), data=st.data())
def test_set_timesteps_works_or_raises_value_error(cfg, data):
    with strict_numpy():
        try:
            scheduler = DDPMPlusScheduler(**cfg)
        except ValueError:
            assume(False)
        T = cfg["num_train_timesteps"]
        if data.draw(st.booleans()):
            n = data.draw(st.one_of(st.integers(-2, T + 3), st.sampled_from([0, 1, T, T + 1, 2.5, None])))
            kwargs = {"num_inference_steps": n}
        else:
            kwargs = {
                "timesteps": data.draw(
                    st.lists(st.integers(-2, T + 2), min_size=0, max_size=12).map(
                        lambda xs: sorted(set(xs), reverse=True) if xs and xs[0] % 2 else xs
                    )
                )
            }
        try:
            scheduler.set_timesteps(**kwargs)
        except ValueError as err:
            assert names_an_argument(err, *kwargs), (kwargs, str(err))
            return
    ts = scheduler.timesteps.numpy()
    assert ts.ndim == 1 and ts.size >= 1 and np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() < T


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def step_inputs(draw, cfg):
    B = draw(st.integers(1, 3))
    C = 2
    shape = (B, C, 2, 2)
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 10.0, 1e3, 1e4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sample = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    out_channels = 2 * C if cfg["variance_type"] in ("learned", "learned_range") else C
    model_output = (torch.randn((B, out_channels, 2, 2), generator=g, dtype=torch.float64) * scale).to(dtype)
    if cfg["variance_type"] == "learned":  # the model's log σ²: a sane range
        model_output[:, C:] = model_output[:, C:].clamp(-20, 2)
    elif cfg["variance_type"] == "learned_range":
        model_output[:, C:] = model_output[:, C:].clamp(-1, 1)
    return sample, model_output, g


def _finite_result_expected(cfg, dtype, sample, model_output) -> bool:
    """Without clipping, x̂_0 = x_t/√ᾱ_t may legitimately exceed a half-precision range."""
    return (
        cfg["clip_sample"]
        or cfg["thresholding"]
        or cfg["prediction_type"] == "sample"
        or dtype
        in (
            torch.float32,
            torch.float64,
        )
    )


@given(cfg=valid_configs(max_T=300), data=st.data())
def test_step_and_add_noise_are_finite_for_finite_input(cfg, data):
    with strict_numpy():
        try:
            scheduler = DDPMPlusScheduler(**cfg)
        except ValueError:
            assume(False)
        T = cfg["num_train_timesteps"]
        n = data.draw(st.integers(1, min(T, 20)))
        scheduler.set_timesteps(n)
        sample, model_output, g = data.draw(step_inputs(cfg))
        dtype = sample.dtype
        ts = scheduler.timesteps
        # a scalar step of the sequence, and per-sample mixed timesteps
        t = ts[data.draw(st.integers(0, len(ts) - 1))]
        per_sample = ts[torch.randint(len(ts), (sample.shape[0],), generator=g)]
        for timestep in (t, int(t), per_sample):
            res = scheduler.step(model_output, timestep, sample, generator=g)
            assert res.prev_sample.dtype == dtype and res.prev_sample.shape == sample.shape
            x0_ok = torch.isfinite(res.pred_original_sample).all()
            prev_ok = torch.isfinite(res.prev_sample).all()
            # zero terminal SNR with ε-prediction: x̂_0 = ±inf before clipping, at t = T-1 only
            if _finite_result_expected(cfg, dtype, sample, model_output) and not (
                cfg["rescale_betas_zero_snr"]
                and cfg["prediction_type"] == "epsilon"
                and bool((torch.as_tensor(timestep) == T - 1).any())
            ):
                assert x0_ok and prev_ok, (cfg, timestep, dtype)
        noise = torch.randn(sample.shape, generator=g, dtype=torch.float64).to(dtype)
        full_t = torch.randint(0, T, (sample.shape[0],), generator=g)
        noisy = scheduler.add_noise(sample, noise, full_t)
        assert noisy.dtype == dtype and torch.isfinite(noisy).all(), cfg
        vel = scheduler.get_velocity(sample, noise, full_t)
        assert torch.isfinite(vel).all(), cfg


def _bad_timesteps(T, B):
    return st.sampled_from(
        [
            torch.full((B,), T),  # one past the end
            torch.full((B,), -1),  # negative (torch indexing would wrap it silently)
            torch.full((B,), 2.5),  # fractional
            torch.arange(B + 1) % T,  # wrong length
            torch.zeros((B, 2), dtype=torch.long),  # wrong rank
            [T + 5] * B,
            T,
            -3,
            1.5,
        ]
    )


@given(cfg=valid_configs(max_T=200), data=st.data())
def test_invalid_add_noise_inputs_raise_value_error(cfg, data):
    try:
        scheduler = DDPMPlusScheduler(**cfg)
    except ValueError:
        assume(False)
    T, B = cfg["num_train_timesteps"], data.draw(st.integers(1, 3))
    x = torch.randn(B, 2, 2, 2)
    kind = data.draw(st.sampled_from(["timesteps", "noise", "original_samples"]))
    t, noise = torch.zeros(B, dtype=torch.long), torch.randn(B, 2, 2, 2)
    if kind == "timesteps":
        t = data.draw(_bad_timesteps(T, B))
        if isinstance(t, torch.Tensor) and t.ndim == 1 and t.numel() == B + 1 and B + 1 == 1:
            assume(False)
    elif kind == "noise":
        noise = torch.randn(B, 2, 3, 2)
    else:
        x = torch.randint(0, 5, (B, 2, 2, 2))
    for method in (scheduler.add_noise, scheduler.get_velocity):
        with pytest.raises(ValueError) as err:
            method(x, noise, t)
        assert names_an_argument(err.value, kind, "sample", "timesteps"), str(err.value)


@given(cfg=valid_configs(max_T=200), data=st.data())
def test_invalid_step_inputs_raise_value_error(cfg, data):
    try:
        scheduler = DDPMPlusScheduler(**cfg)
    except ValueError:
        assume(False)
    T, B = cfg["num_train_timesteps"], data.draw(st.integers(1, 3))
    C = 2
    x = torch.randn(B, C, 2, 2)
    out_c = 2 * C if cfg["variance_type"] in ("learned", "learned_range") else C
    out = torch.randn(B, out_c, 2, 2)
    t = int(scheduler.timesteps[0])
    kind = data.draw(st.sampled_from(["timestep", "model_output", "sample"]))
    if kind == "timestep":
        t = data.draw(_bad_timesteps(T, B))
    elif kind == "model_output":
        out = data.draw(
            st.sampled_from([torch.randn(B + 1, out_c, 2, 2), torch.randn(B, out_c, 3, 2), torch.randn(B, out_c)])
        )
    else:
        x = data.draw(st.sampled_from([torch.randint(0, 3, (B, C, 2, 2)), torch.randn(B, C, 3, 2)]))
    with pytest.raises(ValueError) as err:
        scheduler.step(out, t, x)
    assert names_an_argument(err.value, kind, "timestep", "sample", "model_output"), str(err.value)


@pytest.mark.parametrize(
    "cfg",
    [
        # ᾱ underflows: 'overflow encountered in divide' in the coefficient table before
        dict(num_train_timesteps=2000, beta_schedule="linear", beta_start=0.5, beta_end=0.9),
        # ... and 'invalid value encountered in divide' in the zero-SNR rescale (0/0)
        dict(num_train_timesteps=754, beta_schedule="scaled_linear", beta_start=0.5, beta_end=0.75,
             rescale_betas_zero_snr=True, prediction_type="sample"),
        dict(num_train_timesteps=10, trained_betas=[1e-17] * 10),  # 1 - β == 1: ᾱ does not decrease
    ],
)  # fmt: skip
def test_found_by_fuzzing_degenerate_schedules_are_value_errors(cfg):
    with strict_numpy(), pytest.raises(ValueError, match="beta_end|trained_betas|beta_start"):
        DDPMPlusScheduler(**cfg)


def test_found_by_fuzzing_bad_timesteps_are_value_errors():
    s = DDPMPlusScheduler(num_train_timesteps=10)
    x = torch.randn(2, 1, 2, 2)
    for bad in (torch.tensor([-1, 0]), torch.tensor([10, 0]), torch.tensor([1.5, 2.0]), torch.tensor([1, 2, 3])):
        with pytest.raises(ValueError, match="timesteps"):
            s.add_noise(x, x, bad)  # -1 used to wrap to t = T-1 silently; 1.5 was truncated to 1
    with pytest.raises(ValueError, match="timestep"):
        s.step(x, 2.5, x)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDPMPlusScheduler(num_train_timesteps=10**9)  # was a MemoryError (7.5 GiB per table column)
