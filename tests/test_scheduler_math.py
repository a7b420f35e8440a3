"""Every formula of docs/math.md against an independent float64 reference (ddpm_reference).

Equation numbers are docs/math.md's. Code timestep i is the paper's t = i + 1; "t = 500" in the erratum
pins below is code timestep 500 (√ᾱ = 0.2789, √α = 0.9950 on the linear schedule).
"""

import math

import ddpm_reference as R
import numpy as np
import pytest
import torch

from ddpm_plus import DDPMPlusScheduler

T = 1000
trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def np64(x, shape=None):
    """A tensor (or number) as a float64 array, broadcast to `shape` if given."""
    a = x.detach().to(torch.float64).cpu().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64)
    return np.broadcast_to(a, shape) if shape is not None else a


def bcast(v, ndim):
    """Per-batch values (B,) → (B, 1, ..., 1)."""
    return np.asarray(v, np.float64).reshape((-1,) + (1,) * (ndim - 1))


def assert_close(actual, expected, rtol=1e-10, atol=1e-12, what=""):
    np.testing.assert_allclose(np64(actual, np.shape(expected)), expected, rtol=rtol, atol=atol, err_msg=what)


TS = torch.tensor([0, 1, 2, 9, 100, 499, 500, 998, 999])


def rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- β schedules and tables


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_beta_schedule_and_tables_match_reference(schedule, zero_snr):
    # zero-SNR forbids epsilon prediction (x̂_0 divides by √ᾱ_T = 0), so use v-prediction here.
    s = DDPMPlusScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
    ref = R.Tables(R.betas(schedule, zero_snr=zero_snr))
    for name in ["betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev"]:
        assert getattr(s, name).dtype == torch.float64, name
        assert getattr(s, name).shape == (T,), name
    assert_close(s.betas, ref.betas, what="betas")
    assert_close(s.alphas, ref.alphas, what="alphas")
    assert_close(s.alphas_cumprod, ref.abar, atol=1e-15, what="alphas_cumprod")
    assert_close(s.alphas_cumprod_prev, ref.abar_prev, atol=1e-15, what="alphas_cumprod_prev")
    assert float(s.alphas_cumprod_prev[0]) == 1.0  # ᾱ_0 := 1
    # 0 < β_1 < ... < β_T < 1 (the zero-SNR rescale sets β_T = 1 exactly)
    b = ref.betas
    assert np.all(np.diff(b) > 0) and b[0] > 0 and b[-1] <= 1


def test_squaredcos_cap_v2_is_improved_ddpm_cosine_capped_at_0999():
    s = DDPMPlusScheduler(beta_schedule="squaredcos_cap_v2")
    b = np64(s.betas)
    # ᾱ(1) = cos²(π/2) ≈ 0 makes the last raw β ≈ 1: the cap 0.999 must be what is used there.
    assert b[-1] == pytest.approx(0.999, abs=1e-15)
    assert np.all(b[:-1] < 0.999)
    # the uncapped steps reproduce ᾱ_t = f(t)/f(0), f(u) = cos²((u/T + s)/(1 + s)·π/2), s = 0.008
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(np64(s.alphas_cumprod)[:-1], (f[1:] / f[0])[:-1], rtol=1e-10)


def test_trained_betas_are_used_verbatim():
    b = np.linspace(2e-4, 0.03, 50) ** 1.1
    s = DDPMPlusScheduler(num_train_timesteps=50, trained_betas=b.tolist())
    assert_close(s.betas, b, rtol=0, atol=0, what="betas")
    assert_close(s.alphas_cumprod, np.cumprod(1 - b), what="alphas_cumprod")
    s2 = DDPMPlusScheduler(num_train_timesteps=50, trained_betas=b)  # numpy input accepted too
    assert_close(s2.betas, b, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_zero_terminal_snr_rescale_lin_et_al(schedule):
    """Lin et al. 2023 Alg. 1: ᾱ_T = 0 exactly, √ᾱ_1 kept, √ᾱ shifted then scaled (affine map)."""
    plain = DDPMPlusScheduler(beta_schedule=schedule, prediction_type="v_prediction")
    z = DDPMPlusScheduler(beta_schedule=schedule, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    s_old, s_new = np.sqrt(np64(plain.alphas_cumprod)), np.sqrt(np64(z.alphas_cumprod))
    assert float(z.alphas_cumprod[-1]) == 0.0
    assert float(z.betas[-1]) == pytest.approx(1.0, abs=1e-15)
    assert s_new[0] == pytest.approx(s_old[0], rel=1e-12)
    np.testing.assert_allclose(s_new, (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1]), rtol=1e-9, atol=1e-15)
    for name in [
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ]:
        assert torch.isfinite(getattr(z, name)).all(), name


def test_linear_rescale_for_num_timesteps_is_opt_in():
    """rescale_betas_for_num_timesteps=True: β from β_start·1000/T to β_end·1000/T (improved-diffusion)."""
    on = DDPMPlusScheduler(num_train_timesteps=100, rescale_betas_for_num_timesteps=True)
    assert_close(on.betas, np.linspace(1e-3, 0.2, 100), what="rescaled betas")
    assert_close(on.betas, R.betas(T=100, rescale_for_T=True))
    off = DDPMPlusScheduler(num_train_timesteps=100)  # default: diffusers' unscaled linspace
    assert_close(off.betas, np.linspace(1e-4, 0.02, 100))
    # at T = 1000 the rescale is the identity
    assert_close(DDPMPlusScheduler(rescale_betas_for_num_timesteps=True).betas, np.linspace(1e-4, 0.02, 1000))
    # custom ends are scaled too
    c = DDPMPlusScheduler(num_train_timesteps=250, beta_start=2e-4, beta_end=0.01, rescale_betas_for_num_timesteps=True)
    assert_close(c.betas, np.linspace(8e-4, 0.04, 250))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_posterior_tables_match_reference(schedule):
    s = DDPMPlusScheduler(beta_schedule=schedule)
    ref = R.Tables(R.betas(schedule))
    assert_close(s.posterior_variance, ref.post_var, atol=1e-18, what="posterior_variance (29)")
    assert_close(s.posterior_log_variance_clipped, ref.post_logvar_clipped, what="posterior_log_variance_clipped")
    # (30), improved-diffusion naming: coef1 multiplies x_0, coef2 multiplies x_t
    assert_close(s.posterior_mean_coef1, ref.coef_x0, what="posterior_mean_coef1 (x_0)")
    assert_close(s.posterior_mean_coef2, ref.coef_xt, what="posterior_mean_coef2 (x_t)")
    for name in [
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ]:
        t = getattr(s, name)
        assert t.dtype == torch.float64 and torch.isfinite(t).all(), name


def test_clipped_log_posterior_variance_at_first_step():
    """β̃_1 = 0 (code step 0): its log is clipped to log β̃_2 (code step 1), never -inf/NaN."""
    s = DDPMPlusScheduler()
    assert float(s.posterior_variance[0]) == 0.0
    assert float(s.posterior_log_variance_clipped[0]) == float(torch.log(s.posterior_variance[1]))
    assert math.isfinite(float(s.posterior_log_variance_clipped[0]))


# ---------------------------------------------------------------- forward process


def test_add_noise_eq23_float64():
    s = DDPMPlusScheduler()
    ref = R.Tables(R.betas())
    x0, eps = rand((len(TS), 3, 4, 4), 0), rand((len(TS), 3, 4, 4), 1)
    out = s.add_noise(x0, eps, TS)
    assert out.dtype == torch.float64
    ab = bcast(ref.abar[TS.numpy()], 4)
    expected = np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * eps.numpy()
    assert_close(out, expected, what="(23)")


def test_closed_form_eq16_equals_iterating_eq5_pathwise():
    """Iterate (5) x_t = √(1−α_t)·ε_t + √α_t·x_{t−1} with our own ε_t stream.

    The result is linear in (x_0, ε_1..ε_t): x_t = c·x_0 + Σ_k d_k ε_k. With ε̄ := Σ d_k ε_k / √(Σ d_k²)
    (a standard normal), the closed form (16) claims x_t = add_noise(x_0, ε̄, t) exactly, which needs
    c = √ᾱ_t and Σ d_k² = 1 − ᾱ_t. Checked path by path in float64 at every t.
    """
    s = DDPMPlusScheduler()
    b = R.betas()
    n = 64
    x0 = rand((n,), 2)
    g = torch.Generator().manual_seed(3)
    x = x0.clone()
    c = 1.0
    noise_sum = torch.zeros(n, dtype=torch.float64)  # Σ d_k ε_k
    d2 = 0.0  # Σ d_k²
    check = {0, 1, 9, 250, 500, 998, 999}
    for t in range(T):
        eps_t = torch.randn(n, generator=g, dtype=torch.float64)
        a = 1.0 - b[t]
        x = math.sqrt(1 - a) * eps_t + math.sqrt(a) * x  # (5)
        c *= math.sqrt(a)
        noise_sum = math.sqrt(a) * noise_sum + math.sqrt(1 - a) * eps_t
        d2 = a * d2 + (1 - a)
        if t in check:
            eps_bar = noise_sum / math.sqrt(d2)
            closed = s.add_noise(x0, eps_bar, torch.full((n,), t))
            assert_close(closed, x.numpy(), rtol=1e-10, atol=1e-12, what=f"t={t}")
            np.testing.assert_allclose(float(s.alphas_cumprod[t]), c * c, rtol=1e-10)


def test_closed_form_eq16_equals_iterating_eq5_in_distribution():
    """Large-sample moments of the iterated chain (5) match q(x_t|x_0) = N(√ᾱ_t x_0, 1 − ᾱ_t) of add_noise."""
    s = DDPMPlusScheduler()
    b = R.betas()
    n = 16_384
    x0_val = 0.7
    g = torch.Generator().manual_seed(4)
    x = torch.full((n,), x0_val, dtype=torch.float64)
    for t in range(T):
        x = math.sqrt(b[t]) * torch.randn(n, generator=g, dtype=torch.float64) + math.sqrt(1 - b[t]) * x
        if t in (0, 99, 499, 999):
            one = torch.ones(1, dtype=torch.float64)
            tt = torch.tensor([t])
            mean = float(s.add_noise(x0_val * one, 0 * one, tt))  # √ᾱ x_0
            sd = float(s.add_noise(0 * one, one, tt))  # √(1−ᾱ)
            m, v = float(x.mean()), float(x.var())
            se_m, se_v = sd / math.sqrt(n), sd**2 * math.sqrt(2 / (n - 1))
            assert abs(m - mean) < 5 * se_m, (t, m, mean)
            assert abs(v - sd**2) < 5 * se_v, (t, v, sd**2)


# ---------------------------------------------------------------- posterior (25)-(30)


def test_q_posterior_matches_reference():
    s = DDPMPlusScheduler()
    ref = R.Tables(R.betas())
    shape = (len(TS), 2, 3, 3)
    x0, xt = rand(shape, 5), rand(shape, 6)
    mean, var, logvar = s.q_posterior(x0, xt, TS)
    idx = TS.numpy()
    exp_mean = bcast(ref.coef_x0[idx], 4) * x0.numpy() + bcast(ref.coef_xt[idx], 4) * xt.numpy()
    assert_close(mean, exp_mean, what="mu~ (30)")
    assert_close(var, np.broadcast_to(bcast(ref.post_var[idx], 4), shape), atol=1e-18, what="beta~ (29)")
    assert_close(logvar, np.broadcast_to(bcast(ref.post_logvar_clipped[idx], 4), shape), what="clipped log beta~")
    # an int timestep gives the same as a one-element-per-batch tensor
    m5, _, _ = s.q_posterior(x0[6:7], xt[6:7], 500)
    assert_close(m5, exp_mean[6:7], what="int timestep")


def test_q_posterior_is_the_bayes_product_erratum_26():
    """ERRATUM (26): q(x_t|x_{t−1}) has mean √α_t·x_{t−1}, not √ᾱ_t·x_{t−1}.

    At code timestep 500 of the linear schedule, compute q(x_{t−1}|x_t, x_0) ∝ N(x_t; √α_t x_{t−1}, β_t)
    · N(x_{t−1}; √ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}) numerically on a fine grid in float64; its mean and
    variance must equal q_posterior's. The typo'd likelihood (√ᾱ_t ≈ 0.279 instead of √α_t ≈ 0.995)
    gives a different posterior, which this test shows q_posterior is not.
    """
    s = DDPMPlusScheduler()
    t = 500
    beta, abar_t, abar_p = float(s.betas[t]), float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t - 1])
    sa, sab = math.sqrt(1 - beta), math.sqrt(abar_t)
    assert round(sa, 3) == 0.995 and round(sab, 3) == 0.279  # the two coefficients of the erratum
    x0, xt = 0.4, -0.3
    mean, var, _ = s.q_posterior(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), t
    )
    mean, var = float(mean), float(np64(var).ravel()[0])

    def grid_moments(coef):
        # log density of the product in x = x_{t−1}, integrated on a grid of ±15 sd around its mode
        prec = coef**2 / beta + 1 / (1 - abar_p)
        centre = (coef * xt / beta + math.sqrt(abar_p) * x0 / (1 - abar_p)) / prec
        x = np.linspace(centre - 15 / math.sqrt(prec), centre + 15 / math.sqrt(prec), 200_001)
        logp = -((xt - coef * x) ** 2) / (2 * beta) - (x - math.sqrt(abar_p) * x0) ** 2 / (2 * (1 - abar_p))
        p = np.exp(logp - logp.max())
        z = trapezoid(p, x)
        m = trapezoid(x * p, x) / z
        return m, trapezoid((x - m) ** 2 * p, x) / z

    m_true, v_true = grid_moments(sa)
    assert mean == pytest.approx(m_true, rel=1e-9, abs=1e-12)
    assert var == pytest.approx(v_true, rel=1e-8)
    m_typo, v_typo = grid_moments(sab)
    assert abs(m_typo - mean) > 1e-3 and abs(v_typo - var) / var > 1e-2, (m_typo, v_typo, mean, var)


# ---------------------------------------------------------------- eliminating x_0 (31)-(36)


def test_erratum_33_round_trip():
    """ERRATUM (33): ε = (x_t − √ᾱ_t·x_0)/√(1−ᾱ_t). add_noise then (32) with the true ε returns x_0
    to float64 precision; the typo'd ε (x_t in place of x_0) does not."""
    s = DDPMPlusScheduler()
    shape = (len(TS), 2, 3, 3)
    x0, eps = rand(shape, 7), rand(shape, 8)
    xt = s.add_noise(x0, eps, TS)
    ab = bcast(np64(s.alphas_cumprod)[TS.numpy()], 4)
    eps_33 = (xt.numpy() - np.sqrt(ab) * x0.numpy()) / np.sqrt(1 - ab)
    np.testing.assert_allclose(eps_33, eps.numpy(), rtol=1e-7, atol=1e-9)
    assert_close(s.predict_original_sample(torch.from_numpy(eps_33), xt, TS), x0.numpy(), rtol=1e-8, atol=1e-10)
    eps_typo = (xt.numpy() - np.sqrt(ab) * xt.numpy()) / np.sqrt(1 - ab)
    x0_typo = np64(s.predict_original_sample(torch.from_numpy(eps_typo), xt, TS))
    assert np.abs(x0_typo - x0.numpy()).max() > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_predict_original_sample_eq32(prediction_type):
    s = DDPMPlusScheduler(prediction_type=prediction_type)
    ref = R.Tables(R.betas())
    shape = (len(TS), 2, 3, 3)
    out, xt = rand(shape, 9), rand(shape, 10)
    got = s.predict_original_sample(out, xt, TS)
    assert got.dtype == torch.float64
    expected = R.x0_from(prediction_type, out.numpy(), xt.numpy(), bcast(ref.abar[TS.numpy()], 4))
    assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_get_velocity_and_v_round_trip():
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0; x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v recovers x_0."""
    s = DDPMPlusScheduler(prediction_type="v_prediction")
    ref = R.Tables(R.betas())
    shape = (len(TS), 2, 3, 3)
    x0, eps = rand(shape, 11), rand(shape, 12)
    ab = bcast(ref.abar[TS.numpy()], 4)
    v = s.get_velocity(x0, eps, TS)
    assert_close(v, np.sqrt(ab) * eps.numpy() - np.sqrt(1 - ab) * x0.numpy())
    xt = s.add_noise(x0, eps, TS)
    assert_close(s.predict_original_sample(v, xt, TS), x0.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_p_mean_variance_mean_is_eq36(prediction_type):
    """(35)/(36): μ_θ = (1/√α_t)(x_t − β_t/√(1−ᾱ_t)·ε̂) = μ̃(x̂_0, x_t), unclipped (clip_denoised=False)."""
    s = DDPMPlusScheduler(prediction_type=prediction_type, clip_sample=True)
    ref = R.Tables(R.betas())
    shape = (len(TS), 2, 3, 3)
    out, xt = 3 * rand(shape, 13), 2 * rand(shape, 14)  # large values: clipping would show
    idx = TS.numpy()
    ab, a, b = bcast(ref.abar[idx], 4), bcast(ref.alphas[idx], 4), bcast(ref.betas[idx], 4)
    x0_hat = R.x0_from(prediction_type, out.numpy(), xt.numpy(), ab)
    eps_hat = (xt.numpy() - np.sqrt(ab) * x0_hat) / np.sqrt(1 - ab)  # (33)
    mu_36 = (xt.numpy() - b / np.sqrt(1 - ab) * eps_hat) / np.sqrt(a)
    pmv = s.p_mean_variance(out, xt, TS, clip_denoised=False)
    assert_close(pmv.mean, mu_36, rtol=1e-8, atol=1e-10, what="mu_theta (36)")
    assert_close(pmv.pred_original_sample, x0_hat, rtol=1e-9, atol=1e-11)
    # with the config's clipping the mean uses the clipped x̂_0 instead
    clipped = s.p_mean_variance(out, xt, TS)
    x0_c = np.clip(x0_hat, -1, 1)
    assert_close(clipped.pred_original_sample, x0_c, rtol=1e-9, atol=1e-11)
    assert_close(
        clipped.mean, bcast(ref.coef_x0[idx], 4) * x0_c + bcast(ref.coef_xt[idx], 4) * xt.numpy(), rtol=1e-8, atol=1e-10
    )


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"])
def test_p_mean_variance_fixed_variances(variance_type):
    """σ_t² = β̃_t (fixed_small*) or β_t (fixed_large*), for t ≥ 1; log variance = log σ².

    The _log variants are the same distributions computed via the log. At code step 0 the fixed_small
    log variance is the clipped log β̃_2 (β̃_1 = 0); so is fixed_large's (improved DDPM's decoder).
    """
    s = DDPMPlusScheduler(variance_type=variance_type)
    ref = R.Tables(R.betas())
    shape = (len(TS), 2, 2, 2)
    pmv = s.p_mean_variance(rand(shape, 15), rand(shape, 16), TS, clip_denoised=False)
    idx = TS.numpy()
    want = ref.post_var if variance_type.startswith("fixed_small") else ref.betas
    var, logvar = np64(pmv.variance, shape), np64(pmv.log_variance, shape)
    assert np.isfinite(var).all() and np.isfinite(logvar).all()
    np.testing.assert_allclose(var[1:], np.broadcast_to(bcast(want[idx][1:], 4), var[1:].shape), rtol=1e-10)
    np.testing.assert_allclose(logvar[0], ref.post_logvar_clipped[0], rtol=1e-12)


def test_learned_range_log_variance_interpolation():
    """learned_range: log σ² = f·log β_t + (1−f)·log β̃_t(clipped), f = (v+1)/2, v the last C channels."""
    s = DDPMPlusScheduler(variance_type="learned_range")
    ref = R.Tables(R.betas())
    C = 2
    shape = (len(TS), C, 3, 3)
    v = torch.rand(shape, generator=torch.Generator().manual_seed(17), dtype=torch.float64) * 2 - 1
    v[0, 0, 0, 0], v[0, 0, 0, 1] = -1.0, 1.0  # both ends at code step 0
    out = torch.cat([rand(shape, 18), v], dim=1)
    xt = rand(shape, 19)
    pmv = s.p_mean_variance(out, xt, TS, clip_denoised=False)
    idx = TS.numpy()
    f = (v.numpy() + 1) / 2
    expected = f * bcast(np.log(ref.betas[idx]), 4) + (1 - f) * bcast(ref.post_logvar_clipped[idx], 4)
    assert_close(pmv.log_variance, expected, rtol=1e-10, what="learned_range log variance")
    assert_close(pmv.variance, np.exp(expected), rtol=1e-10)
    assert np.isfinite(np64(pmv.log_variance)).all()
    # the mean uses only the first C channels
    plain = DDPMPlusScheduler().p_mean_variance(out[:, :C], xt, TS, clip_denoised=False)
    assert_close(pmv.mean, np64(plain.mean), rtol=1e-12, atol=1e-14)


def test_learned_variance_is_the_log_variance_output():
    """learned (improved DDPM): the extra channels are log σ², so σ² = exp(output), negative outputs fine."""
    s = DDPMPlusScheduler(variance_type="learned", clip_sample=False)
    C = 3
    shape = (len(TS), C, 4, 4)
    logvar = -8 + 4 * rand(shape, 20)  # typical negative log-variances
    out = torch.cat([rand(shape, 21), logvar], dim=1)
    xt = rand(shape, 22)
    pmv = s.p_mean_variance(out, xt, TS, clip_denoised=False)
    assert_close(pmv.log_variance, logvar.numpy(), rtol=1e-12)
    assert_close(pmv.variance, np.exp(logvar.numpy()), rtol=1e-12)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_step_is_mean_plus_sigma_times_standard_normal(variance_type):
    """step(): prev = μ_θ + σ·z with z ~ N(0, I) (checked on 24k pixels at t = 500, 5 standard errors)."""
    s = DDPMPlusScheduler(variance_type=variance_type, clip_sample=False)
    C, n = 2, 3000
    shape = (n, C, 2, 2)
    pred = rand(shape, 23)
    if variance_type == "learned":
        out = torch.cat([pred, -6 + rand(shape, 24)], dim=1)
    elif variance_type == "learned_range":
        out = torch.cat(
            [pred, torch.rand(shape, generator=torch.Generator().manual_seed(24), dtype=torch.float64) * 2 - 1], dim=1
        )
    else:
        out = pred
    xt = rand(shape, 25)
    res = s.step(out, 500, xt, generator=torch.Generator().manual_seed(26))
    pmv = s.p_mean_variance(out, xt, 500)
    assert_close(res.pred_original_sample, np64(pmv.pred_original_sample), rtol=1e-12, atol=1e-14)
    z = (np64(res.prev_sample) - np64(pmv.mean)) / np.sqrt(np64(pmv.variance, shape))
    N = z.size
    assert abs(z.mean()) < 5 / math.sqrt(N), z.mean()
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / (N - 1)), z.var()


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_add_noise_adds_noise_at_t0(dtype):
    """add_noise on bf16/fp16 computes in ≥ float32: at t = 0 (√(1−ᾱ) = 0.01) the noise is there and the
    result is the float64 reference rounded to the sample's dtype (diffusers adds none, see parity tests)."""
    s = DDPMPlusScheduler()
    half_ulp = R.bf16_half_ulp if dtype == torch.bfloat16 else R.fp16_half_ulp
    n = 4096
    x0 = (torch.rand(n, generator=torch.Generator().manual_seed(27)) * 2 - 1).to(dtype)
    eps = torch.randn(n, generator=torch.Generator().manual_seed(28)).to(dtype)
    for t in [0, 1, 5, 9, 500, 999]:
        got = s.add_noise(x0, eps, torch.full((n,), t))
        assert got.dtype == dtype
        ab = R.Tables(R.betas()).abar[t]
        ref = math.sqrt(ab) * np64(x0) + math.sqrt(1 - ab) * np64(eps)
        err = np.abs(np64(got) - ref)
        f32 = 2.0**-22 * (math.sqrt(ab) * np.abs(np64(x0)) + math.sqrt(1 - ab) * np.abs(np64(eps)))
        assert (err <= half_ulp(ref) * 1.001 + f32).all(), (t, err.max())
    got0 = np64(s.add_noise(x0, eps, torch.zeros(n, dtype=torch.long)))
    moved = np.abs(got0 - np64(x0)) > 0
    ab = R.Tables(R.betas()).abar[0]
    should_move = np.abs(math.sqrt(ab) * np64(x0) + math.sqrt(1 - ab) * np64(eps) - np64(x0)) > 2 * half_ulp(np64(x0))
    assert should_move.sum() > n // 4
    assert moved[should_move].all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_arithmetic_is_done_in_float32(dtype, prediction_type):
    """fp16/bf16 inputs: results in the input dtype, equal to the float64 reference of the (exactly
    representable) half inputs up to the final rounding plus float32 error. Half-precision arithmetic
    would be off by many ulps at large t (1/√ᾱ ≈ 157 amplifies the rounding)."""
    s = DDPMPlusScheduler(prediction_type=prediction_type, clip_sample=False)
    ref = R.Tables(R.betas())
    half_ulp = R.bf16_half_ulp if dtype == torch.bfloat16 else R.fp16_half_ulp
    shape = (len(TS), 2, 8, 8)
    out, xt = rand(shape, 29).to(dtype), rand(shape, 30).to(dtype)
    idx = TS.numpy()
    ab = bcast(ref.abar[idx], 4)
    x0_ref = R.x0_from(prediction_type, np64(out), np64(xt), ab)
    mean_ref = bcast(ref.coef_x0[idx], 4) * x0_ref + bcast(ref.coef_xt[idx], 4) * np64(xt)
    x0 = s.predict_original_sample(out, xt, TS)
    pmv = s.p_mean_variance(out, xt, TS, clip_denoised=False)
    assert x0.dtype == dtype and pmv.mean.dtype == dtype
    # float32 intermediates: relative error ~1e-7 of the largest term (≤ 157·|x|)
    slack = 1e-5 * (1 + np.abs(np64(xt)) / np.sqrt(ab) + np.abs(np64(out)) / np.sqrt(ab))
    assert (np.abs(np64(x0) - x0_ref) <= half_ulp(x0_ref) * 1.001 + slack).all()
    assert (np.abs(np64(pmv.mean) - mean_ref) <= half_ulp(mean_ref) * 1.001 + slack).all()
    # step keeps the dtype too, and its deterministic last step equals the mean
    res = s.step(out[:1], 0, xt[:1], generator=torch.Generator().manual_seed(0))
    assert res.prev_sample.dtype == dtype and res.pred_original_sample.dtype == dtype
    err = np.abs(np64(res.prev_sample) - mean_ref[:1])
    assert (err <= half_ulp(mean_ref[:1]) * 1.001 + slack[:1]).all(), err.max()
