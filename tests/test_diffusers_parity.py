"""Parity with diffusers' DDPMScheduler where it is correct, our correct result for each of its defects
(README, "Differences from diffusers' DDPMScheduler"), and config swaps with other schedulers.

Precision note: diffusers builds β and ᾱ in float32, so 1 − ᾱ_t at small t carries a relative error up
to ~3e-4 (ᾱ_1 ≈ 0.9999 rounded to float32). For a tight check of the step *formulas* the diffusers
scheduler gets the float64 ᾱ of the independent reference (tests/ddpm_reference.py) injected; untouched
diffusers is compared with a tolerance that covers its float32 tables.
"""

import contextlib
import logging
import warnings

import ddpm_reference as R
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.utils import logging as dlogging

from ddpm_plus import DDPMPlusScheduler

T = 1000
ABAR64 = torch.from_numpy(R.Tables(R.betas()).abar)
SHAPE = (2, 3, 8, 8)


def pair(**kw):
    return DDPMScheduler(**kw), DDPMPlusScheduler(**kw)


def with_float64_tables(d):
    d.alphas_cumprod = ABAR64.clone()
    d.one = torch.tensor(1.0, dtype=torch.float64)
    return d


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), 1.5 * torch.randn(SHAPE, generator=g)


def both_steps(d, o, out, t, x, seed):
    a = d.step(out, t, x, generator=torch.Generator().manual_seed(seed))
    b = o.step(out, t, x, generator=torch.Generator().manual_seed(seed))
    return a, b


@contextlib.contextmanager
def captured_diffusers_warnings():
    """Collect diffusers' logger warnings (its root logger does not propagate) and Python warnings."""
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, logger, old = _Keep(level=logging.WARNING), logging.getLogger("diffusers"), dlogging.get_verbosity()
    dlogging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records, caught
    finally:
        logger.removeHandler(handler)
        dlogging.set_verbosity(old)


# ---------------------------------------------------------------- parity where diffusers is correct

STEP_CONFIGS = [
    ("train-chain", None, {}),
    ("linspace-50", 50, dict(timestep_spacing="linspace")),
    ("leading-50", 50, dict(timestep_spacing="leading")),
    ("leading-offset1-50", 50, dict(timestep_spacing="leading", steps_offset=1)),
    ("trailing-50", 50, dict(timestep_spacing="trailing")),
]
CLIPS = {
    "no-clip": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, sample_max_value=2.0),
}


@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("name,steps,spacing", STEP_CONFIGS, ids=[c[0] for c in STEP_CONFIGS])
def test_step_parity(name, steps, spacing, variance_type, prediction_type, clip):
    """Same inputs and generator seed: same prev_sample (noise drawn identically) and x̂_0, float32 in/out."""
    kw = dict(variance_type=variance_type, prediction_type=prediction_type, **CLIPS[clip], **spacing)
    d, o = pair(**kw)
    with_float64_tables(d)
    if steps:
        d.set_timesteps(steps)
        o.set_timesteps(steps)
    ts = o.timesteps.tolist()
    assert d.timesteps.tolist() == ts
    if steps is None:  # a spread of the 1000 training steps, both ends included
        ts = sorted(set(ts[::53]) | {999, 998, 500, 2, 1, 0}, reverse=True)
    if ts[-1] > 0:
        ts = ts[:-1]  # a final step above 0: diffusers adds noise there (defect 5, tested below)
    for i, t in enumerate(ts):
        out, x = inputs(i)
        a, b = both_steps(d, o, out, t, x, seed=1000 + i)
        assert b.prev_sample.dtype == torch.float32 and b.pred_original_sample.dtype == torch.float32
        torch.testing.assert_close(
            b.pred_original_sample, a.pred_original_sample, rtol=5e-5, atol=1e-5, msg=f"x0 t={t}"
        )
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5, msg=f"prev t={t}")


@pytest.mark.parametrize("steps", [None, 50])
def test_step_parity_learned_range_before_the_final_step(steps):
    """learned_range is correct in diffusers except at the final step (defect 11): same σ elsewhere."""
    d, o = pair(variance_type="learned_range", clip_sample=False)
    with_float64_tables(d)
    if steps:
        d.set_timesteps(steps)
        o.set_timesteps(steps)
    ts = o.timesteps.tolist()[:-1]
    for i, t in enumerate(ts[:: max(1, len(ts) // 25)]):
        out, x = inputs(100 + i)
        v = torch.rand(SHAPE, generator=torch.Generator().manual_seed(i)) * 2 - 1
        a, b = both_steps(d, o, torch.cat([out, v], dim=1), t, x, seed=i)
        torch.testing.assert_close(b.prev_sample, a.prev_sample.float(), rtol=1e-5, atol=1e-5, msg=f"t={t}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_step_parity_untouched_diffusers(prediction_type):
    """Against stock diffusers (float32 tables): equal within float32 table rounding (see module note)."""
    d, o = pair(prediction_type=prediction_type, clip_sample=False)
    for i, t in enumerate([999, 700, 400, 100, 10, 1, 0]):
        out, x = inputs(i)
        a, b = both_steps(d, o, out, t, x, seed=i)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_default_tables_keep_diffusers_numbers(schedule, zero_snr):
    d, o = pair(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
    # float32 error in diffusers; its zero-SNR β = 1 − ᾱ_t/ᾱ_{t−1} cancels (~1e-3 relative at small t)
    rtol, b_atol = (5e-5, 1e-6) if zero_snr else (2e-6, 1e-8)
    np.testing.assert_allclose(o.betas.numpy(), d.betas.double().numpy(), rtol=rtol, atol=b_atol)
    np.testing.assert_allclose(o.alphas_cumprod.numpy(), d.alphas_cumprod.double().numpy(), rtol=rtol, atol=1e-9)


def test_add_noise_and_get_velocity_parity_float32():
    d, o = pair()
    ts = torch.tensor([0, 1, 9, 10, 250, 500, 998, 999])
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn((len(ts), 3, 4, 4), generator=g), torch.randn((len(ts), 3, 4, 4), generator=g)
    torch.testing.assert_close(o.add_noise(x0, eps, ts), d.add_noise(x0, eps, ts), rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(o.get_velocity(x0, eps, ts), d.get_velocity(x0, eps, ts), rtol=1e-5, atol=3e-5)
    assert o.add_noise(x0, eps, ts).dtype == torch.float32


@pytest.mark.parametrize(
    "spacing,offset",
    [
        ("leading", 0),
        ("leading", 1),
        ("linspace", 0),
        ("trailing", 0),
    ],
    ids=["leading", "leading-offset1", "linspace", "trailing"],
)
def test_set_timesteps_parity_wherever_diffusers_is_valid(spacing, offset):
    """For every N in 1..T where diffusers returns exactly N timesteps in [0, T−1], ours are identical.

    Exception: linspace with N = 1, where diffusers' single step is t = 0 (sampling from pure noise at
    the least noisy step); ours is t = T−1."""
    d, o = pair(timestep_spacing=spacing, steps_offset=offset)
    differ, checked = [], 0
    for n in range(1, T + 1):
        d.set_timesteps(n)
        o.set_timesteps(n)
        dt = d.timesteps.tolist()
        if len(dt) != n or min(dt) < 0 or max(dt) > T - 1 or (spacing == "linspace" and n == 1):
            continue
        checked += 1
        if o.timesteps.tolist() != dt:
            differ.append(n)
    assert checked > 900
    assert not differ, f"{len(differ)} of {checked} valid N differ from diffusers, e.g. N={differ[:8]}"


# ---------------------------------------------------------------- the 11 defects


def test_defect01_fixed_large_log():
    out, x = inputs(0)
    d = DDPMScheduler(variance_type="fixed_large_log")
    assert torch.isnan(d.step(out, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).any()
    o_log, o_lin = DDPMPlusScheduler(variance_type="fixed_large_log"), DDPMPlusScheduler(variance_type="fixed_large")
    a = o_log.step(out, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = o_lin.step(out, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    pmv = o_log.p_mean_variance(out, x, 500)
    torch.testing.assert_close(pmv.variance, torch.full_like(x, float(o_log.betas[500])), rtol=1e-6, atol=0)


def test_defect02_learned_is_log_variance():
    out, x = inputs(1)
    logvar = torch.full_like(out, -5.0)
    model_output = torch.cat([out, logvar], dim=1)
    d = DDPMScheduler(variance_type="learned")
    assert torch.isnan(d.step(model_output, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).any()
    o = DDPMPlusScheduler(variance_type="learned")
    pmv = o.p_mean_variance(model_output, x, 500)
    torch.testing.assert_close(pmv.variance, torch.exp(logvar), rtol=1e-6, atol=0)
    prev = o.step(model_output, 500, x, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))  # diffusers' noise convention
    torch.testing.assert_close(prev, pmv.mean + torch.exp(0.5 * logvar) * z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_defect03_learned_without_variance_channels(variance_type):
    out, x = inputs(2)
    with pytest.raises(TypeError):
        DDPMScheduler(variance_type=variance_type).step(out, 500, x)
    with pytest.raises(ValueError, match="variance_type") as err:
        DDPMPlusScheduler(variance_type=variance_type).step(out, 500, x)
    assert variance_type in str(err.value) and "6" in str(err.value) and "3" in str(err.value)


def test_defect04_trailing_61_steps():
    d, o = pair(timestep_spacing="trailing")
    d.set_timesteps(61)
    assert len(d.timesteps) == 62 and int(d.timesteps[-1]) == -1
    o.set_timesteps(61)
    ts = o.timesteps.tolist()
    assert len(ts) == 61 and min(ts) >= 0 and ts[0] == T - 1 and len(set(ts)) == 61


def test_defect05_no_noise_at_final_step_with_positive_timestep():
    out, x = inputs(3)
    d, o = pair(timestep_spacing="leading", steps_offset=1)
    d.set_timesteps(50)
    o.set_timesteps(50)
    assert int(d.timesteps[-1]) == 1 == int(o.timesteps[-1])
    a1, a2 = (d.step(out, 1, x, generator=torch.Generator().manual_seed(s)).prev_sample for s in (1, 2))
    assert not torch.equal(a1, a2)  # diffusers adds noise
    b1, b2 = (o.step(out, 1, x, generator=torch.Generator().manual_seed(s)).prev_sample for s in (1, 2))
    assert torch.equal(b1, b2)
    # custom timesteps ending above 0: same
    d.set_timesteps(timesteps=[900, 500, 7])
    o.set_timesteps(timesteps=[900, 500, 7])
    a1, a2 = (d.step(out, 7, x, generator=torch.Generator().manual_seed(s)).prev_sample for s in (1, 2))
    b1, b2 = (o.step(out, 7, x, generator=torch.Generator().manual_seed(s)).prev_sample for s in (1, 2))
    assert not torch.equal(a1, a2) and torch.equal(b1, b2)


def test_defect06_leading_offset_1000_steps():
    """Correct behaviour: exactly N distinct steps, all in [0, T−1], every step runs. (That leading spacing
    with N < T never visits T−1 is the definition of "leading" in Lin et al. Table 2 — use trailing.)"""
    out, x = inputs(4)
    d, o = pair(timestep_spacing="leading", steps_offset=1)
    d.set_timesteps(1000)
    assert int(d.timesteps[0]) == 1000
    with pytest.raises(IndexError):
        d.step(out, d.timesteps[0], x)
    o.set_timesteps(1000)
    assert o.timesteps.tolist() == list(range(999, -1, -1))
    for t in o.timesteps[:3]:
        x = o.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("dtype,last_bad_t", [(torch.bfloat16, 9), (torch.float16, 1)])
def test_defect07_half_precision_add_noise(dtype, last_bad_t):
    half_ulp = R.bf16_half_ulp if dtype == torch.bfloat16 else R.fp16_half_ulp
    d, o = pair()
    g = torch.Generator().manual_seed(8)
    x0 = (torch.rand(256, generator=g) * 2 - 1).to(dtype)
    eps = torch.randn(256, generator=g).to(dtype)
    abar = R.Tables(R.betas()).abar
    for t in range(last_bad_t + 1):
        ts = torch.full((256,), t)
        assert torch.equal(d.add_noise(x0, eps, ts), x0)  # diffusers: no noise at all
        ours = o.add_noise(x0, eps, ts)
        ref = np.sqrt(abar[t]) * x0.double().numpy() + np.sqrt(1 - abar[t]) * eps.double().numpy()
        err = np.abs(ours.double().numpy() - ref)
        assert (err <= half_ulp(ref) * 1.001 + 2.0**-22 * (np.abs(ref) + np.abs(eps.double().numpy()))).all(), t
        assert (ours != x0).float().mean() > 0.5, t


def test_defect08_linear_rescale_for_short_chains():
    d, plain = pair(num_train_timesteps=100)
    assert float(d.alphas_cumprod[-1]) == pytest.approx(0.3636, abs=1e-3)  # x_T far from N(0, I)
    np.testing.assert_allclose(
        plain.alphas_cumprod.numpy(), d.alphas_cumprod.double().numpy(), rtol=2e-6
    )  # default: same
    on = DDPMPlusScheduler(num_train_timesteps=100, rescale_betas_for_num_timesteps=True)
    ref = R.Tables(R.betas(T=100, rescale_for_T=True)).abar[-1]
    assert float(on.alphas_cumprod[-1]) == pytest.approx(ref, rel=1e-10)
    abar_1000 = float(DDPMPlusScheduler().alphas_cumprod[-1])  # 4.04e-5
    assert abar_1000 / 3 < float(on.alphas_cumprod[-1]) < abar_1000 * 3


def test_defect09_zero_snr_with_epsilon():
    out, x = inputs(5)
    d = DDPMScheduler(rescale_betas_zero_snr=True, clip_sample=False)  # (clipping would hide the inf as ±1)
    res = d.step(out, 999, x, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(res.pred_original_sample).all() and not torch.isfinite(res.prev_sample).all()
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        DDPMPlusScheduler(rescale_betas_zero_snr=True, clip_sample=False)  # the non-finite combination
    for kw in (dict(prediction_type="v_prediction"), dict(clip_sample=True)):  # ε with clipping: as diffusers
        o = DDPMPlusScheduler(rescale_betas_zero_snr=True, **kw)
        res = o.step(out, 999, x, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(res.prev_sample).all() and torch.isfinite(res.pred_original_sample).all()
    d = DDPMScheduler(rescale_betas_zero_snr=True, clip_sample=True)
    o = DDPMPlusScheduler(rescale_betas_zero_snr=True, clip_sample=True)
    for t in (999, 998, 500):  # clipped ε-steps agree with diffusers (float32 tables)
        a, b = both_steps(d, o, out, t, x, seed=t)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-3, atol=1e-3)


def test_defect10_invalid_prediction_type_at_construction():
    out, x = inputs(6)
    d = DDPMScheduler(prediction_type="eps")  # accepted by diffusers ...
    with pytest.raises(ValueError):
        d.step(out, 10, x)  # ... and only noticed here
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMPlusScheduler(prediction_type="eps")


def test_defect11_learned_range_last_respaced_step():
    """At the last respaced step (β̃ = 0) the minimum log variance is the clipped log β̃, i.e. log β̃' of the
    step before it in the respaced chain (improved-diffusion's respaced posterior_log_variance_clipped),
    not log(1e-20). The maximum is log β' = log(1 − ᾱ_{t_last})."""
    d, o = pair(variance_type="learned_range", timestep_spacing="leading", steps_offset=1)
    d.set_timesteps(50)
    o.set_timesteps(50)
    ts = o.timesteps.tolist()
    t_last, t_before = ts[-1], ts[-2]
    assert float(d._get_variance(t_last, predicted_variance=torch.tensor(-1.0))) == pytest.approx(np.log(1e-20))
    tab = R.Tables(R.betas())
    clipped = np.log(R.strided(tab, t_before, t_last)["post_var"])
    out, x = inputs(7)
    assert float(o.step_coefficients().posterior_log_variance_clipped[-1]) == pytest.approx(clipped, rel=1e-12)
    for v, want in (
        (-1.0, clipped),
        (1.0, np.log(1 - tab.abar[t_last])),
        (0.0, (clipped + np.log(1 - tab.abar[t_last])) / 2),
    ):
        model_output = torch.cat([out, torch.full_like(out, v)], dim=1).double()
        # the respaced pair, explicitly (p_mean_variance does not read the sampling sequence)
        lv = o.p_mean_variance(model_output, x.double(), t_last, prev_timestep=-1, next_timestep=t_before).log_variance
        np.testing.assert_allclose(lv.numpy(), want, rtol=1e-10)
        # _get_variance reads the sequence, as diffusers' does
        assert float(o._get_variance(t_last, predicted_variance=torch.tensor(v, dtype=torch.float64))) == pytest.approx(
            want, rel=1e-10
        )
    assert clipped > -12  # a real variance (β̃' ≈ 2e-4 here), not 1e-20


# ---------------------------------------------------------------- swapping schedulers

SWAP_CONFIG = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=False,
)
OTHERS = [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDPMScheduler]


def test_capture_sees_diffusers_warnings():
    """The warning capture used below is live: an unknown key does produce a captured warning."""
    with captured_diffusers_warnings() as (records, caught):
        DDIMScheduler.from_config({"not_a_key": 1})
    assert any("not_a_key" in r.getMessage() for r in records)


def test_compatibles():
    names = {c.__name__ for c in DDPMPlusScheduler().compatibles}
    assert {
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DDPMScheduler",
        "DDPMPlusScheduler",
    } <= names
    assert DDPMPlusScheduler.order == 1 and DDPMPlusScheduler().init_noise_sigma == 1.0
    x = torch.randn(SHAPE)
    assert torch.equal(DDPMPlusScheduler().scale_model_input(x, 10), x)  # DDPM needs no input scaling


@pytest.mark.parametrize("config", [{}, SWAP_CONFIG], ids=["defaults", "custom"])
@pytest.mark.parametrize("other_cls", OTHERS, ids=lambda c: c.__name__)
def test_scheduler_swap_both_ways(other_cls, config):
    ours = DDPMPlusScheduler(**config)
    with captured_diffusers_warnings() as (records, caught):
        other = other_cls.from_config(ours.config)
        back = DDPMPlusScheduler.from_config(other.config)
    assert not records, [r.getMessage() for r in records]
    assert not caught, [str(w.message) for w in caught]
    np.testing.assert_allclose(other.alphas_cumprod.double().numpy(), ours.alphas_cumprod.numpy(), rtol=2e-6)
    np.testing.assert_allclose(back.alphas_cumprod.numpy(), ours.alphas_cumprod.numpy(), rtol=1e-12)
    # explicit settings carry over (keys left at their defaults take each class's own default, by design
    # of diffusers' _use_default_values, e.g. Euler's default spacing is linspace)
    for key in config:
        assert other.config[key] == ours.config[key] == back.config[key], key


def test_swap_preserves_rescaled_linear_schedule():
    """rescale_betas_for_num_timesteps=True is part of the schedule: a diffusers scheduler made from our
    config must get the same ᾱ (it cannot know the key), silently or with a warning is not enough."""
    ours = DDPMPlusScheduler(num_train_timesteps=500, rescale_betas_for_num_timesteps=True)
    with captured_diffusers_warnings() as (records, _):
        ddim = DDIMScheduler.from_config(ours.config)
    assert not records, [r.getMessage() for r in records]
    np.testing.assert_allclose(ddim.alphas_cumprod.double().numpy(), ours.alphas_cumprod.numpy(), rtol=2e-6)


def test_extra_config_keys_survive_save_and_load(tmp_path):
    """Our extra key (rescale_betas_for_num_timesteps) and the schedule it made survive save_config /
    from_pretrained, directly and through a diffusers scheduler's saved config (as a hidden entry)."""
    ours = DDPMPlusScheduler(
        num_train_timesteps=200, rescale_betas_for_num_timesteps=True, variance_type="learned_range"
    )
    assert ours.alphas_cumprod[-1] < 1e-3  # the rescaled schedule (unscaled: ᾱ_T ≈ 0.13)
    ours.save_config(tmp_path / "a")
    again = DDPMPlusScheduler.from_pretrained(tmp_path / "a")
    assert "rescale_betas_for_num_timesteps" in again.config and again.config.variance_type == "learned_range"
    np.testing.assert_allclose(again.alphas_cumprod.numpy(), ours.alphas_cumprod.numpy(), rtol=1e-12)
    with captured_diffusers_warnings():
        ddim = DDIMScheduler.from_config(ours.config)
    ddim.save_config(tmp_path / "b")
    back = DDPMPlusScheduler.from_pretrained(tmp_path / "b")
    assert "rescale_betas_for_num_timesteps" in back.config and back.config.num_train_timesteps == 200
    np.testing.assert_allclose(back.alphas_cumprod.numpy(), ours.alphas_cumprod.numpy(), rtol=1e-12)
