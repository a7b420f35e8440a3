"""Analytic-DPM (Bao et al. 2022): the moment estimator, the optimal variance, sampling and the bound.

Exactness on Gaussian data x_0 ~ N(0, s²I) with the exact ε model E[ε|x_t] = √(1−ᾱ)x_t/(ᾱs² + 1 − ᾱ):
Γ_t = (1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t) in closed form, and sampling with the analytic variance reproduces s²
at any number of steps, for η = 1 and η = 0, where fixed_small, fixed_large and DDIM miss it (about 0.42,
1.43 and 0.52 × s² at 10 linspace steps for s = 0.5). Expected values come from float64 numpy references
written here, not from the scheduler's tables.
"""

import json
import math

import numpy as np
import pytest
import torch

from ddpm_plus import DDPMPlusScheduler, bits_per_dim, estimate_analytic_moments, gaussian_analytic_moments
from ddpm_plus.evaluation.likelihood import vlb_terms

S = 0.5
T = 1000
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
GAMMA = gaussian_analytic_moments(ABAR, S)


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_eps(s=S, prediction_type="epsilon", extra_channels=False):
    """The exact model for N(0, s²) data, as a callable unet(x, t) (float64)."""
    abar = torch.from_numpy(ABAR)

    def model(x, t):
        ab = abar[t.reshape(-1).long()].reshape(-1, 1, 1, 1).to(x.dtype)
        d = ab * s**2 + 1 - ab
        eps = (1 - ab).sqrt() * x / d
        x0 = ab.sqrt() * s**2 * x / d
        out = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
        return torch.cat([out, torch.zeros_like(out)], 1) if extra_channels else out

    return model


# ---------------------------------------------------------------- the numpy reference of the variance


def reference_sigma2(t, prev, eta, gamma, x0_var_max=1.0):
    """σ*² the issue's way: λ² + (√(β̄_t/α') − √(β̄_prev − λ²))²·(1 − Γ_t), with (β̄_t/ᾱ_t)(1 − Γ_t) clipped
    to [0, x0_var_max]; λ² = η²·β̃' (0 at the step to x_0)."""
    ab_t = ABAR[t]
    ab_p = ABAR[prev] if prev >= 0 else 1.0
    bb_t, bb_p, alpha = 1 - ab_t, 1 - ab_p, ab_t / ab_p
    lam2 = eta**2 * bb_p / bb_t * (1 - alpha)
    x0_var = min(max(bb_t / ab_t * (1 - gamma[t]), 0.0), x0_var_max)
    var = lam2 + (math.sqrt(bb_t / alpha) - math.sqrt(bb_p - lam2)) ** 2 * x0_var * ab_t / bb_t
    return var if prev >= 0 else max(var, 1e-12)  # the decoder's floor


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_analytic_variance_matches_the_numpy_reference(eta):
    rng = np.random.default_rng(0)
    gamma = np.clip(GAMMA + rng.normal(0, 0.2, T), 0, None)  # also exercises both clips
    s = DDPMPlusScheduler(variance_type="analytic", eta=eta, analytic_moments=gamma.tolist())
    t = np.array([0, 1, 5, 99, 100, 500, 998, 999, 999, 300])
    prev = np.array([-1, 0, -1, 0, 10, 250, 997, 0, -1, 299])
    c = s.coefficients(torch.from_numpy(t), torch.from_numpy(prev))
    want = [reference_sigma2(a, b, eta, gamma) for a, b in zip(t, prev, strict=True)]
    np.testing.assert_allclose(c.analytic_log_variance.exp().numpy(), want, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(c.analytic_std.numpy() ** 2, want, rtol=1e-10)
    # _get_variance (diffusers' helper) returns σ*² on the sequence
    s.set_timesteps(10)
    t0, p0 = int(s.timesteps[3]), int(s.timesteps[4])
    np.testing.assert_allclose(float(s._get_variance(t0)), reference_sigma2(t0, p0, eta, gamma), rtol=1e-10)


def test_clipping_uses_clip_sample_range_and_zero_snr_is_finite():
    gamma = np.zeros(T)  # 1 − Γ = 1: Var(x_0|x_t) = β̄/ᾱ, above 1 for large t
    s = DDPMPlusScheduler(variance_type="analytic", analytic_moments=gamma.tolist(), clip_sample_range=0.5)
    c = s.coefficients(torch.tensor([999]), torch.tensor([-1]))
    assert float(c.analytic_log_variance.exp()) == pytest.approx(0.25, rel=1e-12)  # clipped to 0.5²
    z = DDPMPlusScheduler(variance_type="analytic", analytic_moments=np.ones(T).tolist(), rescale_betas_zero_snr=True)
    assert torch.isfinite(z.coefficients(torch.arange(T)).analytic_log_variance).all()


# ---------------------------------------------------------------- the estimator


@pytest.mark.parametrize(
    "prediction_type,extra", [("epsilon", False), ("v_prediction", False), ("sample", True), ("epsilon", True)]
)
def test_estimator_matches_the_closed_form_within_monte_carlo_error(prediction_type, extra):
    images = torch.randn(400, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * S
    scheduler = DDPMPlusScheduler(prediction_type=prediction_type)
    gamma, stderr = estimate_analytic_moments(
        gaussian_eps(prediction_type=prediction_type, extra_channels=extra),
        scheduler,
        images,
        batch_size=128,
        generator=torch.Generator().manual_seed(1),
        progress=False,
        return_stderr=True,
    )
    assert gamma.dtype == torch.float64 and gamma.shape == (T,)
    z = (gamma.numpy() - GAMMA) / stderr.numpy()
    assert np.abs(z).max() < 5.0, np.abs(z).max()  # 1,000 entries: 5 standard errors
    assert abs(z.mean()) < 0.2  # no bias (mean of 1,000 roughly independent z-scores: sd ≈ 0.03)


def test_estimator_draws_do_not_depend_on_batch_size_and_interpolation_is_close():
    images = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * S
    s = DDPMPlusScheduler()

    def run(**kw):
        return estimate_analytic_moments(
            gaussian_eps(), s, images, generator=torch.Generator().manual_seed(2), progress=False, **kw
        )

    torch.testing.assert_close(run(batch_size=64, num_timesteps=20), run(batch_size=7, num_timesteps=20))
    # the interpolation alone (closed form at 100 evenly spaced timesteps, linear in between)
    knots = np.linspace(0, T - 1, 100).round()
    err = np.abs(np.interp(np.arange(T), knots, GAMMA[knots.astype(int)]) - GAMMA).max()
    assert err < 2e-3, err


def test_estimator_class_labels_and_errors():
    seen = []

    class Conditional:
        config = type("C", (), {"num_class_embeds": 3, "class_embed_type": None})()

        def __call__(self, x, t, class_labels=None):
            seen.append(class_labels.clone())
            return torch.zeros_like(x)

    images = torch.zeros(5, 1, 2, 2)
    with pytest.raises(ValueError, match="class_labels"):
        estimate_analytic_moments(Conditional(), DDPMPlusScheduler(num_train_timesteps=4), images, progress=False)
    labels = torch.tensor([0, 1, 2, 0, 1])
    g = estimate_analytic_moments(
        Conditional(),
        DDPMPlusScheduler(num_train_timesteps=4),
        images,
        batch_size=2,
        class_labels=labels,
        progress=False,
    )
    assert torch.equal(g, torch.zeros(4, dtype=torch.float64)) and torch.equal(torch.cat(seen[:3]), labels)
    with pytest.raises(ValueError, match="num_timesteps"):
        estimate_analytic_moments(gaussian_eps(), DDPMPlusScheduler(), images, num_timesteps=1, progress=False)
    with pytest.raises(ValueError, match="4-D"):
        estimate_analytic_moments(gaussian_eps(), DDPMPlusScheduler(), images[0], progress=False)


# ---------------------------------------------------------------- config: errors, save/load


def test_missing_table_says_how_to_make_it():
    with pytest.raises(ValueError, match="analytic_moments") as err:
        DDPMPlusScheduler(variance_type="analytic")
    assert "ddpm-plus analytic" in str(err.value) and "estimate_analytic_moments" in str(err.value)
    with pytest.raises(ValueError, match="estimate_analytic_moments"):
        DDPMPlusScheduler()._get_variance(10, variance_type="analytic")


@pytest.mark.parametrize("bad", [[0.5] * (T - 1), [0.5] * (T - 1) + [float("nan")], [-0.1] + [0.5] * (T - 1), "x"])
def test_bad_tables_are_refused(bad):
    with pytest.raises(ValueError, match="analytic_moments"):
        DDPMPlusScheduler(variance_type="analytic", analytic_moments=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_eta_is_refused(bad):
    with pytest.raises(ValueError, match="eta"):
        DDPMPlusScheduler(eta=bad)


def test_table_and_eta_survive_save_and_load(tmp_path):
    s = DDPMPlusScheduler(variance_type="analytic", eta=0.25, analytic_moments=torch.from_numpy(GAMMA))
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["eta"] == 0.25 and saved["analytic_moments"] == GAMMA.tolist()
    loaded = DDPMPlusScheduler.from_pretrained(tmp_path)
    for a, b in zip(s.coefficients(torch.arange(T)), loaded.coefficients(torch.arange(T)), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- sampling reproduces s² at 10 steps


def reference_output_variance(timesteps, eta, kind, s=S):
    """Var of the sampler's output for N(0, s²) data and the exact model, from x_T ~ N(0, 1), float64:
    each step is x' = a·x + σz with a = coef1·k + coef2 (x̂_0 = k·x_t), no noise at the final step."""
    v = 1.0
    for i, t in enumerate(timesteps):
        p = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab_t, ab_p = ABAR[t], ABAR[p] if p >= 0 else 1.0
        beta = 1 - ab_t / ab_p
        lam2 = eta**2 * beta * (1 - ab_p) / (1 - ab_t)
        c2 = math.sqrt(1 - ab_p - lam2) / math.sqrt(1 - ab_t)
        c1 = math.sqrt(ab_p) - c2 * math.sqrt(ab_t)
        a = c1 * math.sqrt(ab_t) * s**2 / (ab_t * s**2 + 1 - ab_t) + c2
        var = {"fixed_small": lam2, "fixed_large": eta**2 * beta, "analytic": reference_sigma2(t, p, eta, GAMMA)}
        v = a * a * v + (var[kind] if p >= 0 else 0.0)
    return v


CASES = [  # (variance_type, eta, the ratio at 10 linspace steps)
    ("fixed_small", 1.0, 0.42),
    ("fixed_large", 1.0, 1.43),
    ("fixed_small", 0.0, 0.52),  # plain DDIM
    ("analytic", 1.0, 1.0),
    ("analytic", 0.0, 1.0),
]


@pytest.mark.parametrize("kind,eta,ratio", CASES)
def test_sampling_variance_at_10_steps(kind, eta, ratio):
    """Monte Carlo with the scheduler's own step(): 32,000 pixels (standard error of the ratio ≈ 0.8 %)."""
    moments = GAMMA.tolist() if kind == "analytic" else None
    s = DDPMPlusScheduler(
        variance_type=kind, eta=eta, analytic_moments=moments, timestep_spacing="linspace", clip_sample=False
    )
    s.set_timesteps(10)
    ts = [int(t) for t in s.timesteps]
    want = reference_output_variance(ts, eta, kind) / S**2
    assert want == pytest.approx(ratio, abs=0.006)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(125, 1, 16, 16, generator=g, dtype=torch.float64)
    model = gaussian_eps()
    for t in s.timesteps:
        x = s.step(model(x, t.reshape(1)), t, x, generator=g).prev_sample
    got = float(x.var()) / S**2
    assert got == pytest.approx(want, rel=0.035), (got, want)


@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50, 100, 1000])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_analytic_reproduces_the_variance_at_any_number_of_steps(steps, eta):
    """The exact output variance of the chain (scheduler coefficients, float64) is s² to 0.3 % at every
    step count that ends at t = 0; fixed_small misses by more (it omits Var(x_0|x_t))."""
    s = DDPMPlusScheduler(
        variance_type="analytic", eta=eta, analytic_moments=GAMMA.tolist(), timestep_spacing="linspace"
    )
    s.set_timesteps(steps)
    c = s.step_coefficients()
    v = 1.0
    for i in range(steps):
        ab = float(c.sqrt_alpha_prod[i]) ** 2
        a = float(c.posterior_mean_coef1[i]) * math.sqrt(ab) * S**2 / (ab * S**2 + 1 - ab) + float(
            c.posterior_mean_coef2[i]
        )
        v = a * a * v + (float(c.analytic_std[i]) ** 2 if int(c.prev_timestep[i]) >= 0 else 0.0)
    assert v / S**2 == pytest.approx(1.0, abs=3e-3)
    assert v / S**2 == pytest.approx(reference_output_variance(s.timesteps.tolist(), eta, "analytic") / S**2, rel=1e-9)


# ---------------------------------------------------------------- the bound


def _quantised_gaussian(n=256, s=0.3, seed=0):
    x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * s
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@pytest.mark.parametrize("k", [10, 50, pytest.param(T, marks=pytest.mark.slow)])
def test_respaced_analytic_bound_is_no_larger_than_fixed_variances(k):
    """Same model, same images, same x_t draws: the analytic variance minimises every KL term, so its
    respaced bound is at most fixed_small's and fixed_large's (for the exact model of N(0, 0.3²))."""
    s = 0.3
    images = _quantised_gaussian(s=s)
    model = gaussian_eps(s=s)
    gamma = gaussian_analytic_moments(ABAR, s).tolist()
    seq = torch.from_numpy(np.linspace(0, T - 1, k).round()[::-1].copy()).long()

    def bound(**kw):
        sch = DDPMPlusScheduler(**kw)
        out = vlb_terms(model, sch, images, timesteps=seq, generator=torch.Generator().manual_seed(0), progress=False)
        return out

    small, large = bound(variance_type="fixed_small"), bound(variance_type="fixed_large")
    analytic = bound(variance_type="analytic", analytic_moments=gamma)
    a, fs, fl = (float(b["total_bpd"].mean()) for b in (analytic, small, large))
    assert a <= fs and a <= fl, (a, fs, fl)
    # term by term (KL terms; the decoder is not a KL), up to the Monte Carlo noise of the terms
    dec = analytic["decoder_index"]
    kl = [i for i in range(len(seq)) if i != dec]
    for other in (small, large):
        diff = (analytic["terms_bpd"] - other["terms_bpd"])[:, kl]
        assert (diff.mean(0) <= 3 * diff.std(0) / math.sqrt(len(images)) + 1e-12).all()
    # with η = 0.5 (the bound of q_λ): still no larger than fixed_small at the same η
    half_a = bound(variance_type="analytic", analytic_moments=gamma, eta=0.5)
    half_s = bound(variance_type="fixed_small", eta=0.5)
    assert float(half_a["total_bpd"].mean()) <= float(half_s["total_bpd"].mean())


def test_bound_with_eta_zero_is_refused():
    s = DDPMPlusScheduler(num_train_timesteps=10, eta=0.0)
    with pytest.raises(ValueError, match="eta=0"):
        bits_per_dim(lambda x, t: torch.zeros_like(x), s, torch.zeros(1, 1, 2, 2), progress=False)
