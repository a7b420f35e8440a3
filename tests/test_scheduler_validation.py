"""Every validation error of issue 2 §2: raised where the mistake is made (construction or set_timesteps,
never later in step), as a ValueError whose message names the argument and the allowed values."""

import re

import numpy as np
import pytest
import torch

from ddpm_plus import DDPMPlusScheduler

ALLOWED = {
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"],
    "prediction_type": ["epsilon", "sample", "v_prediction"],
    "variance_type": ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"],
    "timestep_spacing": ["leading", "linspace", "trailing"],
}


@pytest.mark.parametrize("bad", ["cosine", "Linear", "", "laplace_typo"])
@pytest.mark.parametrize("key", sorted(ALLOWED))
def test_unknown_names_rejected_at_construction(key, bad):
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        DDPMPlusScheduler(**{key: bad})
    msg = str(err.value)
    for allowed in ALLOWED[key]:
        assert allowed in msg, (key, msg)
    assert repr(bad) in msg or bad in msg  # says what it got


@pytest.mark.parametrize("key", sorted(ALLOWED))
def test_every_allowed_name_is_accepted(key):
    for value in ALLOWED[key]:
        extra = {"prediction_type": "v_prediction"} if key == "variance_type" else {}
        DDPMPlusScheduler(**{key: value, **extra})


@pytest.mark.parametrize(
    "beta_start,beta_end",
    [(0.02, 1e-4), (0.01, 0.01), (0.0, 0.02), (-1e-4, 0.02), (1e-4, 1.0), (1e-4, 1.5), (1.2, 1.5)],
    ids=["reversed", "equal", "start-zero", "start-negative", "end-one", "end-above-one", "both-above-one"],
)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "sigmoid"])
def test_beta_range_rejected(schedule, beta_start, beta_end):
    with pytest.raises(ValueError, match="beta_start") as err:
        DDPMPlusScheduler(beta_schedule=schedule, beta_start=beta_start, beta_end=beta_end)
    msg = str(err.value)
    assert "beta_end" in msg and ("(0, 1)" in msg or "0 <" in msg), msg  # states the allowed range


@pytest.mark.parametrize(
    "betas",
    [
        np.full(999, 0.01),
        np.full(1001, 0.01),
        np.r_[0.0, np.full(999, 0.01)],
        np.r_[np.full(999, 0.01), 1.0],
        np.r_[-0.1, np.full(999, 0.01)],
        np.r_[np.full(999, 0.01), 1.2],
    ],
    ids=["short", "long", "zero", "one", "negative", "above-one"],
)
def test_trained_betas_rejected(betas):
    with pytest.raises(ValueError, match="trained_betas") as err:
        DDPMPlusScheduler(trained_betas=betas.tolist())
    msg = str(err.value)
    assert "1000" in msg and ("(0, 1)" in msg or "0 <" in msg), msg  # expected length and range


def test_zero_terminal_snr_with_epsilon_rejected_only_without_clipping():
    """ᾱ_T = 0 makes the ε-prediction's x̂_0 infinite at t = T-1: refused only where nothing clips it (then
    step() would return inf/NaN); with clip_sample or thresholding the step is finite, as in diffusers."""
    with pytest.raises(ValueError, match="rescale_betas_zero_snr") as err:
        DDPMPlusScheduler(rescale_betas_zero_snr=True, clip_sample=False)  # prediction_type defaults to epsilon
    msg = str(err.value)
    assert all(w in msg for w in ("epsilon", "v_prediction", "sample", "clip_sample", "thresholding", "inf")), msg
    for ok in ("v_prediction", "sample"):
        DDPMPlusScheduler(rescale_betas_zero_snr=True, prediction_type=ok, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    out, x = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for kw in (dict(clip_sample=True), dict(clip_sample=False, thresholding=True)):
        s = DDPMPlusScheduler(rescale_betas_zero_snr=True, **kw)
        assert float(s.alphas_cumprod[-1]) == 0.0
        res = s.step(out, 999, x, generator=g)
        assert torch.isfinite(res.prev_sample).all() and torch.isfinite(res.pred_original_sample).all(), kw


def test_one_step_training_chain_is_supported():
    """num_train_timesteps=1: a one-step chain x_1 -> x_0 (β_1 = beta_start); the clipped log-variance of its
    only step falls back to log β_1 (there is no β̃_2)."""
    s = DDPMPlusScheduler(num_train_timesteps=1)
    assert s.timesteps.tolist() == [0] and s.previous_timestep(0) == -1
    assert float(s.betas[0]) == 1e-4 and float(s.posterior_variance[0]) == 0.0
    assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(np.log(1e-4), rel=1e-12)
    for spacing in ("leading", "linspace", "trailing"):
        s2 = DDPMPlusScheduler(num_train_timesteps=1, timestep_spacing=spacing)
        s2.set_timesteps(1)
        assert s2.timesteps.tolist() == [0]
    out, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    res = s.step(out, 0, x)
    assert torch.equal(res.prev_sample, s.p_mean_variance(out, x, 0).mean)  # deterministic final step
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDPMPlusScheduler(num_train_timesteps=0)
    with pytest.raises(ValueError, match="num_train_timesteps >= 2"):
        DDPMPlusScheduler(num_train_timesteps=1, rescale_betas_zero_snr=True, prediction_type="v_prediction")


@pytest.mark.parametrize("T,n", [(1000, 0), (1000, -3), (1000, 1001), (100, 101), (100, 1000)])
def test_num_inference_steps_out_of_range(T, n):
    s = DDPMPlusScheduler(num_train_timesteps=T)
    with pytest.raises(ValueError, match="num_inference_steps") as err:
        s.set_timesteps(n)
    assert f"[1, {T}]" in str(err.value) or str(T) in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "bad", [[5, 5, 1], [1, 5], [1000, 5], [5, -1], []], ids=["repeat", "ascending", "too-large", "negative", "empty"]
)
def test_custom_timesteps_invalid(bad):
    with pytest.raises(ValueError, match="timesteps"):
        DDPMPlusScheduler().set_timesteps(timesteps=bad)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_without_variance_channels(variance_type):
    """Needs the model output, so raised by step/p_mean_variance: names variance_type and the channel
    counts (expected 2·C = 6, got C = 3)."""
    s = DDPMPlusScheduler(variance_type=variance_type)
    x = torch.randn(2, 3, 4, 4)
    for call in (lambda: s.step(x, 10, x), lambda: s.p_mean_variance(x, x, 10)):
        with pytest.raises(ValueError, match="variance_type") as err:
            call()
        msg = str(err.value)
        assert variance_type in msg and "6" in msg and "3" in msg, msg
    # with the variance channels it works
    s.step(torch.cat([x, torch.zeros_like(x)], dim=1), 10, x)
