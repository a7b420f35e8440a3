"""Scheduler math does not depend on sampling state (issue: set_timesteps changed q_posterior, losses, ...).

Only ``step`` and what diffusers defines on the sampling sequence (``timesteps``, ``num_inference_steps``,
``previous_timestep``, ``_get_variance``, ``step_coefficients``) may change after ``set_timesteps``; every
other public method and attribute must be bit-identical before and after, for any number of steps.
"""

import numpy as np
import pytest
import torch

from ddpm_plus import DDPMPlusScheduler
from ddpm_plus.evaluation.likelihood import vb_term_nats, vlb_terms
from ddpm_plus.trainer.losses import LOSS_TYPES, compute_loss

T = 1000
TS = torch.tensor([0, 1, 2, 100, 500, 998, 999])
ATTRIBUTES = [
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "one",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]  # fmt: skip


def _inputs(C=2, learned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (len(TS), C, 4, 4)
    x0 = (torch.randint(0, 256, shape, generator=g) / 127.5 - 1).double()
    noise, xt = (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )
    out = torch.randn(shape, generator=g, dtype=torch.float64)
    if learned:
        out = torch.cat([out, torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1], 1)
    return x0, noise, xt, out


def _snapshot(s: DDPMPlusScheduler) -> dict:
    """Every state-free public quantity, for tensor and scalar timesteps, full chain and explicit pairs."""
    learned = s.config.variance_type in ("learned", "learned_range")
    x0, noise, xt, out = _inputs(learned=learned)
    prev = torch.tensor([-1, 0, -1, 80, 480, 950, 979])
    nxt = torch.tensor([20, 21, 22, 120, 520, 999, -1])
    snap = {name: getattr(s, name).clone() for name in ATTRIBUTES}
    snap["len"] = len(s)
    snap["add_noise"] = s.add_noise(x0, noise, TS)
    snap["get_velocity"] = s.get_velocity(x0, noise, TS)
    snap["scale_model_input"] = s.scale_model_input(xt, 10)
    snap["predict_original_sample"] = s.predict_original_sample(out, xt, TS)
    snap["q_posterior"] = s.q_posterior(x0, xt, TS)
    snap["q_posterior_pair"] = s.q_posterior(x0, xt, TS, prev_timestep=prev, next_timestep=nxt)
    snap["p_mean_variance"] = tuple(s.p_mean_variance(out, xt, TS))
    snap["p_mean_variance_pair"] = tuple(s.p_mean_variance(out, xt, TS, prev_timestep=prev, next_timestep=nxt))
    snap["p_mean_variance_noclip"] = tuple(s.p_mean_variance(out, xt, TS, clip_denoised=False))
    snap["coefficients"] = tuple(s.coefficients(torch.arange(T)))
    snap["coefficients_pair"] = tuple(s.coefficients(TS, prev, nxt))
    for t in (0, 1, 500, 999):  # scalar timesteps: the cached python-float rows
        i = int((TS == t).nonzero()[0, 0])
        snap[f"q_posterior@{t}"] = s.q_posterior(x0[i : i + 1], xt[i : i + 1], t)
        snap[f"p_mean_variance@{t}"] = tuple(s.p_mean_variance(out[i : i + 1], xt[i : i + 1], t))
        snap[f"predict_original_sample@{t}"] = s.predict_original_sample(out[i : i + 1], xt[i : i + 1], t)
        snap[f"coefficients@{t}"] = tuple(s.coefficients(t))
    snap["vb_term_nats"] = vb_term_nats(s, out, x0, xt, TS, TS - 1, num_bins=256)
    if learned:
        # hybrid/vlb train against the eta = 1 posterior and refuse other etas (tests/test_losses.py)
        for loss_type in LOSS_TYPES if s.config.eta == 1.0 else ("simple",):
            snap[f"compute_loss/{loss_type}"] = compute_loss(s, out, x0, xt, noise, TS, loss_type=loss_type)
    else:
        snap["compute_loss/simple"] = compute_loss(s, out, x0, xt, noise, TS)
        snap["compute_loss/simple-snr"] = compute_loss(s, out, x0, xt, noise, TS, snr_gamma=5.0)
    return snap


def _assert_identical(a, b, where):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), (
            where
        )
    else:
        assert a == b, where


def _gaussian_moments(s=0.5, T=T):
    """Γ_t of N(0, s²) data (tests/test_analytic.py): a valid ``analytic_moments`` table."""
    ab = DDPMPlusScheduler(num_train_timesteps=T).alphas_cumprod.numpy()
    return ((1 - ab) / (ab * s**2 + 1 - ab)).tolist()


MOMENTS = _gaussian_moments()

CONFIGS = [
    dict(variance_type="learned_range", clip_sample=False),
    dict(variance_type="learned_range", eta=0.5),
    dict(variance_type="learned", eta=0.0),
    dict(variance_type="fixed_small", eta=0.0),
    dict(variance_type="fixed_large", eta=0.3, prediction_type="v_prediction"),
    dict(variance_type="analytic", analytic_moments=MOMENTS),
    dict(variance_type="analytic", eta=0.0, analytic_moments=MOMENTS, prediction_type="sample"),
    dict(variance_type="learned"),
    dict(variance_type="fixed_small"),
    dict(variance_type="fixed_large", prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(variance_type="fixed_small_log", prediction_type="sample", timestep_spacing="linspace", thresholding=True),
]


def _config_id(c):
    return "-".join("moments" if k == "analytic_moments" else f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_public_math_is_identical_after_set_timesteps(config):
    s = DDPMPlusScheduler(**config)
    before = _snapshot(s)
    for k in (1, 10, 50, T):
        s.set_timesteps(k)
        after = _snapshot(s)
        for key in before:
            _assert_identical(before[key], after[key], f"{key} after set_timesteps({k})")
    s.set_timesteps(timesteps=[900, 333, 7])
    after = _snapshot(s)
    for key in before:
        _assert_identical(before[key], after[key], f"{key} after custom timesteps")


def test_vlb_loss_at_t0_is_not_moved_by_set_timesteps():
    """The issue's example: learned_range, t = 0, fixed random inputs; the vlb loss moved 2968.5 -> 2851.2
    after set_timesteps(50) (the decoder's clipped log-variance followed the sampling sequence)."""
    s = DDPMPlusScheduler(variance_type="learned_range", clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (4, 3, 8, 8), generator=g) / 127.5 - 1).float()
    noise = torch.randn(x0.shape, generator=g)
    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], 1)
    t = torch.zeros(4, dtype=torch.long)
    xt = s.add_noise(x0, noise, t)
    before = compute_loss(s, out, x0, xt, noise, t, loss_type="vlb")
    s.set_timesteps(50)
    torch.testing.assert_close(compute_loss(s, out, x0, xt, noise, t, loss_type="vlb"), before, rtol=0, atol=0)
    _, _, lv = s.q_posterior(x0.double(), xt.double(), 100)  # the full chain's β̃ at t = 100, not the sequence's
    assert float(lv[0, 0, 0, 0]) == float(s.posterior_log_variance_clipped[100])


def test_vlb_terms_identical_after_set_timesteps():
    s = DDPMPlusScheduler(num_train_timesteps=20, beta_start=0.005, beta_end=0.5, variance_type="fixed_large")
    x0 = (torch.randint(0, 17, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0)) / 8 - 1).float()

    def model(x, t):
        return 0.5 * x

    def run():
        out = vlb_terms(model, s, x0, num_bins=17, generator=torch.Generator().manual_seed(1), progress=False)
        resp = vlb_terms(
            model,
            s,
            x0,
            timesteps=[19, 10, 3, 0],
            num_bins=17,
            generator=torch.Generator().manual_seed(1),
            progress=False,
        )
        return out["terms_bpd"], out["total_bpd"], resp["terms_bpd"], resp["total_bpd"]

    before = run()
    for k in (1, 7, 20):
        s.set_timesteps(k)
        _assert_identical(before, run(), f"vlb_terms after set_timesteps({k})")


@pytest.mark.parametrize(
    "config",
    [
        dict(variance_type="learned_range", clip_sample=False),
        dict(variance_type="learned_range", eta=0.4),
        dict(variance_type="analytic", eta=0.3, analytic_moments=MOMENTS),
        dict(variance_type="analytic", analytic_moments=MOMENTS, timestep_spacing="trailing"),
    ],
    ids=_config_id,
)
def test_step_is_the_only_math_that_follows_the_sequence(config):
    """step() uses the sequence's pair t -> previous_timestep(t); the same numbers come from the pure API
    with the pair passed explicitly (prev_timestep, and next_timestep for the final step's clipped log σ²)."""
    s = DDPMPlusScheduler(**config)
    s.set_timesteps(10)
    seq = s.timesteps.tolist()
    x0, noise, xt, out = _inputs(C=2, learned=True)
    out, xt = out[:1], xt[:1]
    c = s.step_coefficients()
    for i, t in enumerate(seq):
        prev = seq[i + 1] if i + 1 < len(seq) else -1
        nxt = seq[i - 1] if i else -1
        pure = s.coefficients(t, prev, nxt)
        for name in c._fields:  # NaN == NaN here (the analytic columns of a scheduler without a table)
            np.testing.assert_array_equal(float(getattr(c, name)[i]), float(getattr(pure, name)), err_msg=f"{t} {name}")
        res = s.step(out, t, xt, generator=torch.Generator().manual_seed(i))
        pmv = s.p_mean_variance(out, xt, t, prev_timestep=prev, next_timestep=nxt)
        if prev < 0:
            torch.testing.assert_close(res.prev_sample, pmv.mean, rtol=0, atol=0)
        else:
            z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
            torch.testing.assert_close(res.prev_sample, pmv.mean + pmv.variance.sqrt() * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_scalar_and_batched_timesteps_give_identical_bits(prediction_type, variance_type, dtype):
    """One coefficient path: the python-float rows of a scalar timestep are a cache of the same float64
    table as the per-example tensors, so step/p_mean_variance/q_posterior agree bit for bit."""
    s = DDPMPlusScheduler(prediction_type=prediction_type, variance_type=variance_type)
    C = 3
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 2 * C if variance_type == "learned_range" else C, 8, 8, generator=g, dtype=dtype).clamp(-1, 1)
    x, x0 = torch.randn(4, C, 8, 8, generator=g, dtype=dtype), torch.randn(4, C, 8, 8, generator=g, dtype=dtype)
    for n in (None, 50):
        if n:
            s.set_timesteps(n)
        for t in s.timesteps.tolist()[::9] + [0]:
            tt = torch.full((4,), t)
            a = s.step(out, t, x, generator=torch.Generator().manual_seed(1))
            b = s.step(out, tt, x, generator=torch.Generator().manual_seed(1))
            _assert_identical(tuple(a.values()), tuple(b.values()), f"step t={t}")
            _assert_identical(tuple(s.p_mean_variance(out, x, t)), tuple(s.p_mean_variance(out, x, tt)), f"pmv t={t}")
            _assert_identical(s.q_posterior(x0, x, t), s.q_posterior(x0, x, tt), f"q_posterior t={t}")


def test_coefficients_full_chain_are_the_posterior_attributes():
    s = DDPMPlusScheduler()
    c = s.coefficients(torch.arange(T))
    assert c.timestep.dtype == torch.int64 and c.posterior_variance.dtype == torch.float64
    assert c.prev_timestep.tolist() == list(range(-1, T - 1))
    for name in (
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ):
        assert torch.equal(getattr(c, name), getattr(s, name)), name
    torch.testing.assert_close(c.sqrt_alpha_prod, s.alphas_cumprod.sqrt(), rtol=1e-15, atol=0)
    np.testing.assert_allclose(c.beta.numpy(), s.betas.numpy(), rtol=1e-12)
    assert s.coefficients(5).posterior_variance.shape == ()
