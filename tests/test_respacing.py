"""Respacing: any num_inference_steps in 1..T with each spacing, and custom timesteps.

For every sequence: exactly N distinct strictly descending timesteps in [0, T−1], previous_timestep
walks the sequence (−1 after the last), the final step adds no noise, and every strided step uses the
exact β' = 1 − ᾱ_t/ᾱ_prev of its pair (docs/math.md, Respacing) in the posterior mean and variance.
"""

import ddpm_reference as R
import numpy as np
import pytest
import torch

from ddpm_plus import DDPMPlusScheduler

T = 1000
TAB = R.Tables(R.betas())
_rng = np.random.default_rng(20260)
STEPS = [1, 2, 3, 7, 50, 61, 999, 1000] + sorted(int(n) for n in _rng.choice(np.arange(4, 999), 6, replace=False))


def check_sequence(ts, n):
    assert len(ts) == n, (len(ts), n)
    assert len(set(ts)) == n
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False)), ts[:10]
    assert 0 <= ts[-1] and ts[0] <= T - 1, (ts[0], ts[-1])


def check_pairs(s_small, s_large, ts):
    """previous_timestep, the sequence's step_coefficients and the posterior mean/variance (β̃') and
    fixed_large variance (β') of every pair, through the explicit prev_timestep API."""
    tt = torch.tensor(ts)
    prev = s_small.previous_timestep(tt)
    assert prev.tolist() == ts[1:] + [-1]
    assert s_small.previous_timestep(ts[-1]) == -1 and s_small.previous_timestep(ts[0]) == (
        ts[1] if len(ts) > 1 else -1
    )
    exp = [R.strided(TAB, t, p) for t, p in zip(ts, ts[1:] + [-1], strict=True)]
    c = s_small.step_coefficients()
    assert c.timestep.tolist() == ts and c.prev_timestep.tolist() == ts[1:] + [-1]
    np.testing.assert_allclose(c.posterior_mean_coef1.numpy(), [e["coef_x0"] for e in exp], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(c.posterior_variance.numpy(), [e["post_var"] for e in exp], rtol=1e-10, atol=1e-18)
    np.testing.assert_allclose(c.beta.numpy(), [e["beta"] for e in exp], rtol=1e-10)
    shape = (len(ts), 1, 1, 1)
    one, zero = torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    mean_x0, var, _ = s_small.q_posterior(one, zero, tt, prev_timestep=prev)  # coefficient of x_0
    mean_xt, _, _ = s_small.q_posterior(zero, one, tt, prev_timestep=prev)  # coefficient of x_t
    np.testing.assert_allclose(mean_x0.flatten().numpy(), [e["coef_x0"] for e in exp], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(mean_xt.flatten().numpy(), [e["coef_xt"] for e in exp], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(var.flatten().numpy(), [e["post_var"] for e in exp], rtol=1e-10, atol=1e-18)
    # the sampler's own variances at the non-final steps: β̃' (fixed_small) and β' (fixed_large)
    x = torch.zeros(shape, dtype=torch.float64)
    small = s_small.p_mean_variance(x, x, tt, prev_timestep=prev).variance.flatten().numpy()
    large = s_large.p_mean_variance(x, x, tt, prev_timestep=prev).variance.flatten().numpy()
    np.testing.assert_allclose(small[:-1], [e["post_var"] for e in exp[:-1]], rtol=1e-10)
    np.testing.assert_allclose(large[:-1], [e["beta"] for e in exp[:-1]], rtol=1e-10)


def check_last_step_deterministic(s, t_last):
    g = torch.Generator().manual_seed(0)
    out, x = torch.randn((2, 3, 4, 4), generator=g), torch.randn((2, 3, 4, 4), generator=g)
    a = s.step(out, t_last, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = s.step(out, t_last, x, generator=torch.Generator().manual_seed(2)).prev_sample
    c = s.step(out, t_last, x).prev_sample
    assert torch.equal(a, b) and torch.equal(a, c), f"noise added at the final step t={t_last}"
    torch.testing.assert_close(a, s.p_mean_variance(out, x, t_last, prev_timestep=-1).mean, rtol=0, atol=0)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_every_num_inference_steps(spacing, steps_offset):
    kw = dict(timestep_spacing=spacing, steps_offset=steps_offset)
    s_small, s_large = DDPMPlusScheduler(**kw), DDPMPlusScheduler(variance_type="fixed_large", **kw)
    for n in STEPS:
        s_small.set_timesteps(n)
        s_large.set_timesteps(n)
        ts = s_small.timesteps.tolist()
        assert s_small.timesteps.dtype == torch.int64
        assert s_large.timesteps.tolist() == ts
        assert s_small.num_inference_steps == n
        check_sequence(ts, n)
        if n == T:
            assert ts == list(range(T - 1, -1, -1))  # the only N = T sequence
        if spacing in ("linspace", "trailing"):
            assert ts[0] == T - 1  # these spacings start at the last training step
        if spacing == "linspace" and n > 1:
            assert ts[-1] == 0  # (N = 1: the single step must start from T−1, where x_T ~ N(0, I))
        check_pairs(s_small, s_large, ts)
        if n in (1, 7, 61, T):
            check_last_step_deterministic(s_small, ts[-1])


def test_leading_spacing_values():
    """leading: t = k·(T // N) + steps_offset, k = N−1..0 (Lin et al. Table 2); kept in [0, T−1]."""
    s = DDPMPlusScheduler(timestep_spacing="leading")
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(980, -1, -20))
    s = DDPMPlusScheduler(timestep_spacing="leading", steps_offset=1)
    s.set_timesteps(50)
    assert s.timesteps.tolist() == list(range(981, 0, -20))
    check_last_step_deterministic(s, 1)  # the last step is t = 1 > 0 and still adds no noise


def test_custom_timesteps_accepted():
    s_small, s_large = DDPMPlusScheduler(), DDPMPlusScheduler(variance_type="fixed_large")
    for ts in ([999, 500, 3], [0], [999], [5, 4, 3, 2, 1, 0], [998, 17]):
        s_small.set_timesteps(timesteps=ts)
        s_large.set_timesteps(timesteps=ts)
        assert s_small.timesteps.tolist() == ts
        check_pairs(s_small, s_large, ts)
        check_last_step_deterministic(s_small, ts[-1])
    # numpy/tensor inputs work too
    s_small.set_timesteps(timesteps=np.array([900, 100]))
    assert s_small.timesteps.tolist() == [900, 100]
    # back to spaced steps: the custom sequence is forgotten
    s_small.set_timesteps(10)
    assert len(s_small.timesteps) == 10 and s_small.previous_timestep(int(s_small.timesteps[-2])) == int(
        s_small.timesteps[-1]
    )


@pytest.mark.parametrize(
    "bad",
    [[5, 5, 1], [1, 5], [3, 2, 2], [1000, 5], [5, -1], [-1], []],
    ids=["repeat", "ascending", "tail-repeat", "too-large", "negative", "only-negative", "empty"],
)
def test_invalid_custom_timesteps(bad):
    s = DDPMPlusScheduler()
    with pytest.raises(ValueError, match="timesteps"):
        s.set_timesteps(timesteps=bad)


def test_num_inference_steps_and_timesteps_are_exclusive():
    s = DDPMPlusScheduler()
    with pytest.raises(ValueError, match=r"num_inference_steps.*timesteps|timesteps.*num_inference_steps"):
        s.set_timesteps(num_inference_steps=3, timesteps=[9, 5, 1])
    with pytest.raises(ValueError, match=r"num_inference_steps"):
        s.set_timesteps()


def test_respacing_with_other_train_lengths():
    """T = 100 and a zero-SNR cosine schedule: same properties, β' from the scheduler's own ᾱ."""
    for kw in (
        dict(num_train_timesteps=100),
        dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    ):
        s = DDPMPlusScheduler(timestep_spacing="trailing", **kw)
        Tn = s.config.num_train_timesteps
        tab = R.Tables(
            R.betas(kw.get("beta_schedule", "linear"), T=Tn, zero_snr=kw.get("rescale_betas_zero_snr", False))
        )
        for n in (1, 3, 7, Tn):
            s.set_timesteps(n)
            ts = s.timesteps.tolist()
            assert len(ts) == n and ts[0] == Tn - 1 and ts[-1] >= 0
            shape = (n, 1, 1, 1)
            prev = torch.tensor(ts[1:] + [-1])
            _, var, _ = s.q_posterior(
                torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), torch.tensor(ts), prev
            )
            exp = [R.strided(tab, t, p)["post_var"] for t, p in zip(ts, ts[1:] + [-1], strict=True)]
            np.testing.assert_allclose(var.flatten().numpy(), exp, rtol=1e-9, atol=1e-18)


def test_explicit_prev_timestep():
    """q_posterior / p_mean_variance with an explicit prev_timestep use β' of that pair (−1: to x_0)."""
    s = DDPMPlusScheduler(variance_type="fixed_large")
    pairs = [(999, 979), (500, 0), (500, 499), (10, -1), (0, -1), (999, -1)]
    tt = torch.tensor([t for t, _ in pairs])
    pp = torch.tensor([p for _, p in pairs])
    exp = [R.strided(TAB, t, p) for t, p in pairs]
    shape = (len(pairs), 1, 1, 1)
    one, zero = torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    m_x0, var, _ = s.q_posterior(one, zero, tt, prev_timestep=pp)
    m_xt, _, _ = s.q_posterior(zero, one, tt, prev_timestep=pp)
    np.testing.assert_allclose(m_x0.flatten().numpy(), [e["coef_x0"] for e in exp], rtol=1e-10)
    np.testing.assert_allclose(m_xt.flatten().numpy(), [e["coef_xt"] for e in exp], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(var.flatten().numpy(), [e["post_var"] for e in exp], rtol=1e-10, atol=1e-18)
    pmv = s.p_mean_variance(zero, one, tt, prev_timestep=pp, clip_denoised=False)
    # fixed_large: β' wherever the pair does not end at x_0
    got = pmv.variance.flatten().numpy()
    for i, (t, p) in enumerate(pairs):
        if p >= 0:
            assert got[i] == pytest.approx(exp[i]["beta"], rel=1e-10), (t, p)
    # a scalar timestep with a scalar prev_timestep agrees with the batched call
    m, _, _ = s.q_posterior(one[:1], zero[:1], 999, prev_timestep=979)
    assert float(m) == pytest.approx(exp[0]["coef_x0"], rel=1e-10)


@pytest.mark.parametrize("steps", [None, 50])
def test_per_example_timesteps_in_step(steps):
    """step() with one timestep per batch element: each row follows its own pair (t → previous_timestep(t))
    with σ² = β̃', and rows at their final step get no noise."""
    s = DDPMPlusScheduler(clip_sample=False)
    if steps:
        s.set_timesteps(steps)
    seq = s.timesteps.tolist()
    ts = [seq[0], seq[len(seq) // 2], seq[-2], seq[-1]]
    shape = (len(ts), 2, 32, 32)
    g = torch.Generator().manual_seed(3)
    out, x = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    tt = torch.tensor(ts)
    res = s.step(out, tt, x, generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(
        res.pred_original_sample.numpy(), s.predict_original_sample(out, x, tt).numpy(), rtol=1e-12
    )
    noise = res.prev_sample.numpy() - s.p_mean_variance(out, x, tt, prev_timestep=s.previous_timestep(tt)).mean.numpy()
    for i, t in enumerate(ts):
        p = seq[seq.index(t) + 1] if t != seq[-1] else -1
        assert s.previous_timestep(t) == p
        if p < 0:
            assert np.all(noise[i] == 0), "noise added at the final step"
            continue
        z = noise[i].ravel() / np.sqrt(R.strided(TAB, t, p)["post_var"])
        n = z.size
        assert abs(z.mean()) < 5 / np.sqrt(n), (t, z.mean())
        assert abs(z.var() - 1) < 5 * np.sqrt(2 / (n - 1)), (t, z.var())
