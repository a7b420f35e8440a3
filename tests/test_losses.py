"""Training objectives (ddpm_plus.trainer.losses) against independent float64 references."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import ddpm_plus  # noqa: F401
from ddpm_plus.schedulers.scheduling_ddpm_plus import DDPMPlusScheduler
from ddpm_plus.trainer.losses import ImportanceSampler, compute_loss, min_snr_weights

T = 50


def _sched(prediction_type="epsilon", variance_type="fixed_small"):
    return DDPMPlusScheduler(
        num_train_timesteps=T,
        beta_start=1e-4 * 1000 / T,
        beta_end=0.02 * 1000 / T,
        prediction_type=prediction_type,
        variance_type=variance_type,
    )


def _abar():  # independent float64 reference, eq. (14)-(16)
    return np.cumprod(1.0 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))


def _batch(channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(6, channels, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 7, 20, 33, T - 1])
    a = torch.from_numpy(_abar())[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return x0.float(), x_t.float(), noise.float(), t, a


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_targets(prediction_type):
    x0, x_t, noise, t, a = _batch()
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    target = {
        "epsilon": noise.double(),
        "sample": x0.double(),
        "v_prediction": a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double(),
    }[prediction_type]
    ref = ((out.double() - target) ** 2).mean(dim=(1, 2, 3))
    got = compute_loss(_sched(prediction_type), out, x0, x_t, noise, t)
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)


def test_simple_loss_in_float32_for_bf16_output():
    x0, x_t, noise, t, _ = _batch()
    out = torch.randn(x0.shape).bfloat16()
    got = compute_loss(_sched(), out, x0.bfloat16(), x_t.bfloat16(), noise.bfloat16(), t)
    ref = ((out.double() - noise.bfloat16().double()) ** 2).mean(dim=(1, 2, 3))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weighting_equals_min_snr_times_x0_error(prediction_type, gamma):
    """Hang et al. 2023: the loss is min(SNR, gamma) * ||x_0 - x0_hat||^2 whatever the parameterisation."""
    x0, x_t, noise, t, a = _batch()
    sched = _sched(prediction_type)
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x_t64 = x_t.double()
    x0_hat = {
        "epsilon": (x_t64 - (1 - a).sqrt() * out) / a.sqrt(),  # eq. (32)
        "sample": out,
        "v_prediction": a.sqrt() * x_t64 - (1 - a).sqrt() * out,
    }[prediction_type]
    snr = (a / (1 - a)).reshape(-1)
    ref = torch.clamp(snr, max=gamma) * ((x0.double() - x0_hat) ** 2).mean(dim=(1, 2, 3))
    got = compute_loss(sched, out.float(), x0, x_t, noise, t, snr_gamma=gamma)
    torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=1e-6)
    w = min_snr_weights(sched, t, gamma).double()
    expected_w = {
        "epsilon": snr.clamp(max=gamma) / snr,
        "sample": snr.clamp(max=gamma),
        "v_prediction": snr.clamp(max=gamma) / (snr + 1),
    }[prediction_type]
    torch.testing.assert_close(w, expected_w, rtol=1e-5, atol=0)


def _reference_vb_bits(x0, x_t, eps, v, t):
    """Independent float64 L_t (bits/dim) for learned_range, eps-prediction, from docs/math.md."""
    abar = _abar()
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    out = []
    for i, ti in enumerate(t.tolist()):
        ab, ab_prev = abar[ti], (abar[ti - 1] if ti > 0 else 1.0)
        beta = betas[ti]
        post_var = beta * (1 - ab_prev) / (1 - ab)
        post_var_clipped = betas[1] * (1 - abar[0]) / (1 - abar[1]) if ti == 0 else post_var
        xt, e, vv, x = x_t[i].double().numpy(), eps[i].double().numpy(), v[i].double().numpy(), x0[i].double().numpy()
        x0_hat = (xt - math.sqrt(1 - ab) * e) / math.sqrt(ab)  # eq. (32)
        c0, ct = math.sqrt(ab_prev) * beta / (1 - ab), math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)  # eq. (30)
        mean = c0 * x0_hat + ct * xt
        frac = (vv + 1) / 2
        logvar = frac * math.log(beta) + (1 - frac) * math.log(post_var_clipped)
        if ti == 0:
            h = 1 / 255
            lo = np.where(x < -0.999, -np.inf, (x - h - mean) / np.exp(logvar / 2))
            hi = np.where(x > 0.999, np.inf, (x + h - mean) / np.exp(logvar / 2))
            nats = -np.log(norm.cdf(hi) - norm.cdf(lo))
        else:
            true_mean = c0 * x + ct * xt
            lv1 = math.log(post_var)
            nats = 0.5 * (-1 + logvar - lv1 + np.exp(lv1 - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
        out.append(nats.mean() / math.log(2))
    return torch.tensor(out, dtype=torch.float64)


def test_hybrid_and_vlb_values_and_gradients():
    x0, x_t, noise, t, _ = _batch(channels=1)
    x0 = ((x0 + 1) * 127.5).round() / 127.5 - 1  # on the 256-level grid for the decoder term
    sched = _sched(variance_type="learned_range")
    g = torch.Generator().manual_seed(2)
    eps_out = noise + 0.3 * torch.randn(noise.shape, generator=g)
    v_out = torch.rand(noise.shape, generator=g) * 2 - 1
    ref_vb = _reference_vb_bits(x0, x_t, eps_out, v_out, t)

    out = torch.cat([eps_out, v_out], 1).requires_grad_(True)
    simple = compute_loss(sched, out, x0, x_t, noise, t)
    hybrid = compute_loss(sched, out, x0, x_t, noise, t, loss_type="hybrid")
    vlb = compute_loss(sched, out, x0, x_t, noise, t, loss_type="vlb")
    torch.testing.assert_close(vlb.double(), T * ref_vb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hybrid.double(), simple.double() + 0.001 * T * ref_vb, rtol=1e-5, atol=1e-6)

    (g_simple,) = torch.autograd.grad(simple.sum(), out)
    (g_hybrid,) = torch.autograd.grad(hybrid.sum(), out)
    (g_vlb,) = torch.autograd.grad(vlb.sum(), out)
    torch.testing.assert_close(g_hybrid[:, :1], g_simple[:, :1])  # mean gradient stopped in L_vlb
    assert g_simple[:, 1:].abs().sum() == 0
    torch.testing.assert_close(g_hybrid[:, 1:], 0.001 * g_vlb[:, 1:], rtol=1e-4, atol=1e-8)
    assert g_vlb[:, :1].abs().sum() > 0 and g_vlb[:, 1:].abs().sum() > 0


def test_simple_ignores_variance_channels():
    x0, x_t, noise, t, _ = _batch(channels=1)
    sched = _sched(variance_type="learned")
    a = compute_loss(sched, torch.cat([noise, torch.zeros_like(noise)], 1), x0, x_t, noise, t)
    b = compute_loss(sched, torch.cat([noise, torch.randn_like(noise)], 1), x0, x_t, noise, t)
    torch.testing.assert_close(a, b)
    assert a.abs().max() == 0


def test_errors():
    x0, x_t, noise, t, _ = _batch(channels=1)
    with pytest.raises(ValueError, match="loss_type='hybrid'.*variance_type='fixed_small'"):
        compute_loss(_sched(), torch.cat([noise, noise], 1), x0, x_t, noise, t, loss_type="hybrid")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        compute_loss(_sched(), noise, x0, x_t, noise, t, loss_type="l1")
    with pytest.raises(ValueError, match="2 channels"):
        compute_loss(_sched(variance_type="learned_range"), noise, x0, x_t, noise, t, loss_type="vlb")
    with pytest.raises(ValueError, match="snr_gamma"):
        compute_loss(_sched(), noise, x0, x_t, noise, t, snr_gamma=0)


# ----------------------------------------------------------------------------------- importance sampling
def _warm_sampler(losses_per_t, history=3, uniform_prob=0.1):
    s = ImportanceSampler(len(losses_per_t), history_per_term=history, uniform_prob=uniform_prob)
    for _ in range(history):
        s.update(torch.arange(len(losses_per_t)), torch.tensor(losses_per_t))
    return s


def test_importance_sampler_uniform_until_warm_then_second_moment():
    s = ImportanceSampler(4, history_per_term=2, uniform_prob=0.1)
    s.update([0, 1, 2, 3, 0, 1, 2], [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0])
    torch.testing.assert_close(s.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    s.update([3], [2.0])  # t=3 history is now (4, 2): sqrt(E[L^2]) = sqrt(10)
    rms = np.array([1.0, 2.0, 3.0, math.sqrt(10.0)])
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    torch.testing.assert_close(s.probabilities(), torch.from_numpy(expected))
    s.update([3], [7.0])  # the oldest value (4) drops out: (2, 7)
    rms[3] = math.sqrt((4 + 49) / 2)
    torch.testing.assert_close(s.probabilities(), torch.from_numpy(0.9 * rms / rms.sum() + 0.1 / 4))


def test_importance_weights_make_the_estimator_unbiased():
    losses = [0.5, 3.0, 0.01, 7.0, 1.0]
    s = _warm_sampler(losses)
    p = s.probabilities()
    # exact expectation by enumeration over t: sum_t p_t * w_t * L_t = mean_t L_t
    t_all = torch.arange(5)
    w = 1.0 / (5 * p[t_all])
    assert float((p * w * torch.tensor(losses, dtype=torch.float64)).sum()) == pytest.approx(np.mean(losses), rel=1e-12)
    ts, ws = s.sample(20000, generator=torch.Generator().manual_seed(0))
    assert ts.dtype == torch.long and ws.dtype == torch.float32
    torch.testing.assert_close(ws.double(), w[ts], rtol=1e-6, atol=0)
    freq = torch.bincount(ts, minlength=5).double() / 20000
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)


def test_importance_sampler_state_round_trip():
    s = _warm_sampler([1.0, 2.0, 3.0])
    s2 = ImportanceSampler(3, history_per_term=3, uniform_prob=0.5)
    s2.load_state_dict(s.state_dict())
    a = s.sample(16, generator=torch.Generator().manual_seed(1))
    b = s2.sample(16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="num_timesteps"):
        ImportanceSampler(4, history_per_term=3).load_state_dict(s.state_dict())


@pytest.mark.parametrize("loss_type", ["hybrid", "vlb"])
def test_vlb_losses_refuse_a_sampling_eta(loss_type):
    sched = DDPMPlusScheduler(num_train_timesteps=20, variance_type="learned_range", eta=0.0)
    x0 = torch.zeros(2, 1, 4, 4)
    out = torch.zeros(2, 2, 4, 4)
    t = torch.tensor([3, 7])
    with pytest.raises(ValueError, match="eta=1.0"):
        compute_loss(sched, out, x0, x0, x0, t, loss_type=loss_type)
    assert torch.isfinite(compute_loss(sched, out, x0, x0, x0, t, loss_type="simple")).all()
