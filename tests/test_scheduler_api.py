"""The scheduler's public coefficient/respacing API and diffusers-compatible helpers: one respacing
function, FastSampler on the public API only (project-wide code rules: tests/test_source_rules.py)."""

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import ddpm_plus.schedulers.scheduling_ddpm_plus as sched_module
from ddpm_plus import DDPMPlusScheduler
from ddpm_plus.schedulers.scheduling_ddpm_plus import VARIANCE_TYPES, respace

ROOT = Path(__file__).resolve().parents[1]
OWN_MODULES = [
    "schedulers/scheduling_ddpm_plus.py",
    "pipelines/fast_sampling.py",
    "evaluation/likelihood.py",
    "trainer/losses.py",
]


# ---------------------------------------------------------------- previous_timestep types (as diffusers)


@pytest.mark.parametrize("steps", [None, 50])
def test_previous_timestep_returns_what_diffusers_returns(steps):
    d, o = DDPMScheduler(), DDPMPlusScheduler()
    if steps:
        d.set_timesteps(steps)
        o.set_timesteps(steps)
    for t in (d.timesteps[3], int(d.timesteps[3]), d.timesteps[-1], int(d.timesteps[-1])):
        a, b = d.previous_timestep(t), o.previous_timestep(t)
        assert type(a) is type(b), (t, type(a), type(b))
        assert int(a) == int(b)
        if torch.is_tensor(a):
            assert a.ndim == b.ndim == 0
    batch = o.timesteps[:4]  # per-example timesteps (diffusers has no batched form): a tensor
    assert torch.is_tensor(o.previous_timestep(batch)) and o.previous_timestep(batch).shape == (4,)


# ---------------------------------------------------------------- _get_variance (diffusers' private helper)


def _float64_diffusers(**kw):
    d = DDPMScheduler(**kw)
    d.alphas_cumprod = DDPMPlusScheduler(**kw).alphas_cumprod.clone()
    d.betas = 1 - d.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), d.alphas_cumprod[:-1]])
    d.one = torch.tensor(1.0, dtype=torch.float64)
    return d


@pytest.mark.parametrize("steps", [None, 50])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_get_variance_has_diffusers_meaning(variance_type, steps):
    """Same quantity per variance_type as diffusers' _get_variance (β̃, its square root, β', log β', the raw
    output, the learned_range log σ²), on the current sequence; float64. Diffusers differs only where it
    clamps β̃ = 0 to 1e-20 (the final step)."""
    d, o = _float64_diffusers(variance_type=variance_type), DDPMPlusScheduler(variance_type=variance_type)
    if steps:
        d.set_timesteps(steps)
        o.set_timesteps(steps)
    pv = torch.tensor(0.3, dtype=torch.float64)
    for t in o.timesteps.tolist()[:-1][::7]:
        a, b = d._get_variance(t, predicted_variance=pv), o._get_variance(t, predicted_variance=pv)
        assert torch.is_tensor(b) and b.dtype == torch.float64
        np.testing.assert_allclose(float(b), float(a), rtol=1e-10, err_msg=f"{variance_type} t={t}")
    t_last = int(o.timesteps[-1])
    if variance_type in ("fixed_small", "fixed_small_log"):
        assert float(o._get_variance(t_last)) == 0.0  # exact β̃' = 0 (diffusers: 1e-20 / 1e-10)
    if variance_type == "learned_range":  # the minimum is the clipped log β̃', not log 1e-20
        assert float(o._get_variance(t_last, predicted_variance=-pv / pv)) > -15
    # the variance_type argument overrides the config, and is validated
    want = float(d._get_variance(500, variance_type="fixed_large"))
    np.testing.assert_allclose(float(o._get_variance(500, variance_type="fixed_large")), want, rtol=1e-10)
    with pytest.raises(ValueError, match="variance_type"):
        o._get_variance(500, variance_type="other")


def test_get_variance_learned_needs_the_model_output():
    with pytest.raises(ValueError, match="predicted_variance"):
        DDPMPlusScheduler(variance_type="learned_range")._get_variance(10)


# ---------------------------------------------------------------- one respacing function


def test_respace_is_the_one_respacing_function(monkeypatch):
    """set_timesteps, vlb_terms and the evaluation's respaced bound timesteps all go through respace()."""
    from ddpm_plus.evaluation.likelihood import vlb_terms
    from ddpm_plus.evaluation.options import bound_timesteps

    calls = []
    real = sched_module.respace

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(sched_module, "respace", spy)
    s = DDPMPlusScheduler()
    calls.clear()
    s.set_timesteps(10)
    assert len(calls) == 1
    s = DDPMPlusScheduler(num_train_timesteps=20, beta_start=0.005, beta_end=0.5)
    calls.clear()
    vlb_terms(lambda x, t: 0 * x, s, torch.zeros(1, 1, 2, 2), timesteps=[0, 7, 19], num_bins=17, progress=False)
    assert any(kw.get("timesteps") is not None for _, kw in calls)
    calls.clear()
    seq = bound_timesteps(20, 5)
    assert calls and seq.tolist() == [19, 14, 10, 5, 0]
    assert seq.tolist() == real(20, 5, timestep_spacing="linspace").timesteps.tolist()
    with pytest.raises(ValueError, match="K >= 2"):
        bound_timesteps(20, 1)


def test_respace_neighbours_and_validation():
    r = respace(10, timesteps=[9, 5, 2])
    assert r.timesteps.tolist() == [9, 5, 2]
    assert r.prev_timestep.tolist() == [-1, -1, -1, 2, 2, 2, 5, 5, 5, 5]
    assert r.next_timestep.tolist() == [2, 2, 5, 5, 5, 9, 9, 9, 9, -1]
    assert respace(10, timesteps=[2, 5, 9], allow_increasing=True).timesteps.tolist() == [9, 5, 2]
    for bad, match in (
        ([2, 5, 9], "strictly descending"),
        ([9, 9], "strictly"),
        ([10], r"\[0, 9\]"),
        ([], "non-empty"),
    ):
        with pytest.raises(ValueError, match=match):
            respace(10, timesteps=bad)
    with pytest.raises(ValueError, match="num_inference_steps"):
        respace(10, 11)
    with pytest.raises(ValueError, match="timestep_spacing"):
        respace(10, 3, timestep_spacing="uniform")


def test_beta_range_and_num_bins_are_validated_in_one_place():
    likelihood = (ROOT / "ddpm_plus" / "evaluation" / "likelihood.py").read_text()
    assert likelihood.count("num_bins must be an integer") == 1
    for name in ("evaluation/likelihood.py", "trainer/losses.py", "pipelines/fast_sampling.py", "cli.py"):
        text = (ROOT / "ddpm_plus" / name).read_text()
        assert "beta_start" not in text and "beta_end" not in text, name


# ---------------------------------------------------------------- FastSampler uses the public API only


def test_fast_sampler_reads_no_private_scheduler_members():
    src = (ROOT / "ddpm_plus" / "pipelines" / "fast_sampling.py").read_text()
    private = re.findall(r"\b(?:s|sched|scheduler|self\.scheduler)\._[a-z]\w*", src)
    assert not private, private
    assert "step_coefficients" in src and "ancestral_step" in src


def test_step_coefficients_are_documented_and_float64():
    s = DDPMPlusScheduler()
    s.set_timesteps(5)
    c = s.step_coefficients()
    assert c.timestep.tolist() == s.timesteps.tolist()
    assert c.prev_timestep.tolist() == s.timesteps.tolist()[1:] + [-1]
    assert all(v.dtype == torch.float64 for k, v in zip(c._fields, c, strict=True) if "timestep" not in k)
    for name in ("coefficients", "step_coefficients", "ancestral_step", "reverse_moments"):
        assert inspect.getdoc(getattr(DDPMPlusScheduler, name)), name
