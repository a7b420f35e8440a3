"""The reverse family q_λ of DDIM (Song et al. 2021, eqs. (7), (12), (16)): ``DDPMPlusScheduler(eta=...)``.

- η = 1 is DDPM's posterior exactly (the default; the η-general formula agrees with it to rounding);
- η-DDIM steps equal diffusers' DDIMScheduler with ``eta`` (float64 tables given to both, the clipped x̂_0
  used for the direction, ``use_clipped_model_output=True``), full loops included;
- q_λ keeps the marginals q(x_prev|x_0) for every η and pair of timesteps;
- every variance type, prediction type and spacing keeps working for η ∈ {0, 0.5}; η = 0 is
  deterministic; the fast sampler reproduces the pipeline with η and the analytic variance.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler
from ddpm_plus.pipelines.fast_sampling import FastSampler
from ddpm_plus.schedulers.coefficients import coefficient_table
from ddpm_plus.schedulers.options import VARIANCE_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")


def _float64_ddim(**kw):
    d = DDIMScheduler(**kw)
    d.alphas_cumprod = DDPMPlusScheduler(**kw).alphas_cumprod.clone()
    d.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return d


def _model(x, t):
    """A deterministic stand-in for a UNet (float64)."""
    return torch.tanh(0.7 * x + 0.001 * float(t)) * 1.3


def test_eta_one_is_the_ddpm_posterior():
    ab = DDPMPlusScheduler().alphas_cumprod.numpy()
    rng = np.random.default_rng(0)
    t = rng.integers(1, 1000, 200)
    prev = np.maximum(t - rng.integers(1, 100, 200), -1)
    nxt = -np.ones_like(t)
    exact = coefficient_table(ab, t, prev, nxt, eta=1.0)
    general = coefficient_table(ab, t, prev, nxt, eta=float(np.nextafter(1.0, 0.0)))
    for name in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance"):
        np.testing.assert_allclose(getattr(general, name), getattr(exact, name), rtol=1e-9, err_msg=name)
    # the default is η = 1 and gives the same numbers as passing it
    a, b = DDPMPlusScheduler(), DDPMPlusScheduler(eta=1.0)
    for x, y in zip(a.coefficients(torch.arange(1000)), b.coefficients(torch.arange(1000)), strict=True):
        assert torch.equal(x, y) or torch.equal(x.isnan(), y.isnan())


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_q_lambda_keeps_the_marginals(eta):
    """x_t ~ q(x_t|x_0), x_prev ~ q_λ(x_prev|x_t, x_0) => x_prev ~ N(√ᾱ_prev x_0, 1 − ᾱ_prev) (eq. (7))."""
    s = DDPMPlusScheduler(eta=eta)
    ab = s.alphas_cumprod.numpy()
    t = torch.tensor([1, 10, 500, 999, 999, 300])
    prev = torch.tensor([0, 3, 100, 0, 998, 299])
    c = s.coefficients(t, prev)
    ab_t, ab_p = ab[t.numpy()], ab[prev.numpy()]
    np.testing.assert_allclose((c.posterior_mean_coef1 + c.posterior_mean_coef2 * np.sqrt(ab_t)).numpy(), np.sqrt(ab_p))
    np.testing.assert_allclose(
        (c.posterior_mean_coef2**2 * (1 - ab_t) + c.posterior_variance).numpy(), 1 - ab_p, rtol=1e-12
    )
    beta_tilde = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
    np.testing.assert_allclose(c.posterior_variance.numpy(), eta**2 * beta_tilde, rtol=1e-12)


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_steps_match_diffusers_ddim(eta, prediction_type, clip_sample):
    kw = dict(prediction_type=prediction_type, clip_sample=clip_sample)
    d, o = _float64_ddim(**kw), DDPMPlusScheduler(eta=eta, **kw)
    d.set_timesteps(20)
    o.set_timesteps(20)
    assert torch.equal(d.timesteps, o.timesteps)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in o.timesteps:
        out = _model(x, t)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)), dtype=torch.float64)
        want = d.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z).prev_sample
        c = o.step_coefficients()
        i = int((o.timesteps == t).nonzero()[0, 0])
        row = type(c)(*(v[i] for v in c))
        got, _ = o.ancestral_step(out, x, row, noise=z if int(row.prev_timestep) >= 0 else None)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        x = want


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_full_loop_matches_diffusers_ddim_with_the_same_generator(eta):
    """Both draw the step noise from the generator in the same shape and dtype (float64)."""
    d, o = _float64_ddim(), DDPMPlusScheduler(eta=eta)
    d.set_timesteps(10)
    o.set_timesteps(10)
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xd, xo = x0.clone(), x0.clone()
    gd, go = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in o.timesteps:
        xd = d.step(_model(xd, t), t, xd, eta=eta, use_clipped_model_output=True, generator=gd).prev_sample
        xo = o.step(_model(xo, t), t, xo, generator=go).prev_sample
    torch.testing.assert_close(xo, xd, rtol=1e-9, atol=1e-9)


CONFIGS = [
    dict(prediction_type=p, timestep_spacing=sp, variance_type=v)
    for v in VARIANCE_TYPES + ("analytic",)
    for p, sp in (("epsilon", "leading"), ("v_prediction", "trailing"), ("sample", "linspace"))
]


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_every_variance_prediction_and_spacing_works_with_eta(config, eta):
    if config["variance_type"] == "analytic":
        ab = DDPMPlusScheduler().alphas_cumprod.numpy()
        config = dict(config, analytic_moments=((1 - ab) / (ab * 0.25 + 1 - ab)).tolist())
    s = DDPMPlusScheduler(eta=eta, **config)
    learned = config["variance_type"] in ("learned", "learned_range")
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for steps in (1, 7, 1000):
        s.set_timesteps(steps)
        results = []
        for seed in (0, 1):
            y = x.clone()
            g = torch.Generator().manual_seed(seed)
            for t in s.timesteps[:3].tolist() + s.timesteps[-2:].tolist():
                out = torch.tanh(y)
                if learned:
                    out = torch.cat(
                        [out, torch.full_like(out, -0.5 if config["variance_type"] == "learned_range" else -6)], 1
                    )
                y = s.step(out, t, y, generator=g).prev_sample
            assert torch.isfinite(y).all()
            results.append(y)
        if eta == 0 and config["variance_type"] != "analytic":
            assert torch.equal(results[0], results[1])  # DDIM: no noise at all
        elif steps > 1:
            assert not torch.equal(results[0], results[1])
    # diffusers' _get_variance helper: η²-scaled, finite (or 0 at η = 0)
    v = s._get_variance(int(s.timesteps[3]), predicted_variance=torch.tensor(-0.5, dtype=torch.float64))
    assert torch.isfinite(v) or (eta == 0 and v == -math.inf)


def tiny_unet(out_channels=1):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


@pytest.mark.parametrize(
    "kwargs",
    [dict(eta=0.5), dict(eta=0.0, variance_type="analytic"), dict(eta=1.0, variance_type="analytic")],
    ids=["eta0.5", "analytic-ddim", "analytic-ddpm"],
)
def test_fast_sampler_reproduces_the_pipeline(kwargs):
    if kwargs.get("variance_type") == "analytic":
        kwargs = dict(kwargs, analytic_moments=np.linspace(0.02, 0.999, 1000).tolist())
    pipe = DDPMPlusPipeline(tiny_unet(), DDPMPlusScheduler(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(3, generator=torch.Generator().manual_seed(3), num_inference_steps=8, output_type="pt").images
    out = FastSampler(pipe, dtype=torch.float32, channels_last=False)(
        3, 8, torch.Generator().manual_seed(3), output_type="pt"
    ).images
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
