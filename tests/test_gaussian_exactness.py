"""Exactness of the ancestral sampler on Gaussian data, where everything is known in closed form.

For x_0 ~ N(μ, s²) per pixel, x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε has D_t = Var x_t = ᾱ_t s² + 1 − ᾱ_t and the
optimal (MMSE) predictions are linear in x_t:
    E[ε|x_t]   = √(1−ᾱ_t)(x_t − √ᾱ_t μ)/D_t
    E[x_0|x_t] = μ + √ᾱ_t s² (x_t − √ᾱ_t μ)/D_t
    E[v|x_t]   = √ᾱ_t E[ε|x_t] − √(1−ᾱ_t) E[x_0|x_t]
All three give the same x̂_0 = μ + k_t (x_t − √ᾱ_t μ), k_t = √ᾱ_t s²/D_t, so a sampler step
t → t' (β' = 1 − ᾱ_t/ᾱ_t', posterior mean (30) with primes) is x_t' = a x_t + b + σ z with
    a = c0 k_t + c1,  b = c0 μ (1 − k_t √ᾱ_t),  c0 = √ᾱ_t' β'/(1−ᾱ_t),  c1 = √(ᾱ_t/ᾱ_t')(1−ᾱ_t')/(1−ᾱ_t),
    σ² = β'(1−ᾱ_t')/(1−ᾱ_t) (fixed_small) or β' (fixed_large), and σ = 0 at the final step.
From x_T ~ N(0, 1) the output is exactly N(m, v) with m ← a m + b, v ← a² v + σ², iterated in float64.
(m, v) is not (μ, s²): x_T ~ N(0, 1) is not q(x_T), and the step's variance omits Var(x̂_0|x_t); both
are printed. The timesteps are the scheduler's own (test_respacing checks them); everything else in the
expected values comes from ddpm_reference.
"""

import math
import zlib

import ddpm_reference as R
import pytest
import torch

from ddpm_plus import DDPMPlusScheduler

MU, S = 0.3, 0.5
# independent pixels per case: 16384 for the 1000-step chain (the costly one), 32000 for 50 steps
# (kept under torch's 32768-element parallel grain: single-threaded ops stay fast on a busy machine)
SHAPES = {1000: (64, 1, 16, 16), 50: (125, 1, 16, 16)}
TAB = R.Tables(R.betas())


def optimal_output(prediction_type, x, t):
    """E[ε|x_t], E[x_0|x_t] or E[v|x_t] for N(MU, S²) data (float64 in, float64 out)."""
    ab = TAB.abar[t]
    d = ab * S**2 + 1 - ab
    r = x - math.sqrt(ab) * MU
    eps = math.sqrt(1 - ab) * r / d
    x0 = MU + math.sqrt(ab) * S**2 * r / d
    return {"epsilon": eps, "sample": x0, "v_prediction": math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0}[prediction_type]


def exact_chain(timesteps, variance_type):
    """(m, v) of the sampler's output, iterating the linear Gaussian chain in float64."""
    return R.gaussian_chain_moments(TAB, timesteps, MU, S, variance_type)


def run_sampler(scheduler, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    for t in scheduler.timesteps:
        out = optimal_output(scheduler.config.prediction_type, x.double(), int(t)).float()
        x = scheduler.step(out, t, x, generator=g).prev_sample
    return x.double().numpy()


CASES = [(1000, "leading")] + [(50, sp) for sp in ("leading", "linspace", "trailing")]


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps,spacing", CASES)
def test_sampler_matches_exact_gaussian_chain(steps, spacing, prediction_type, variance_type):
    s = DDPMPlusScheduler(
        prediction_type=prediction_type, variance_type=variance_type, clip_sample=False, timestep_spacing=spacing
    )
    s.set_timesteps(steps)
    ts = s.timesteps.tolist()
    assert len(ts) == steps and all(a > b for a, b in zip(ts, ts[1:], strict=False)) and 0 <= ts[-1] and ts[0] < 1000
    m, v = exact_chain(ts, variance_type)
    case = f"{steps} {spacing} {prediction_type} {variance_type}"
    x = run_sampler(s, SHAPES[steps], seed=zlib.crc32(case.encode()))
    N = x.size
    mean, var = float(x.mean()), float(x.var(ddof=1))
    se_m, se_v = math.sqrt(v / N), v * math.sqrt(2.0 / (N - 1))
    figures = (
        f"[gaussian] steps={case} N={N}: "
        f"exact chain m={m:.5f} v={v:.5f} | measured mean={mean:.5f} var={var:.5f} "
        f"| z_mean={(mean - m) / se_m:+.2f} z_var={(var - v) / se_v:+.2f} | data mu={MU} s^2={S * S}"
    )
    print(figures)
    assert abs(mean - m) < 5 * se_m, figures
    assert abs(var - v) < 5 * se_v, figures
    # the test can tell the two variance types apart wherever their exact outputs differ by > 10 SE
    other = exact_chain(ts, "fixed_large" if variance_type == "fixed_small" else "fixed_small")
    if abs(other[1] - v) > 10 * se_v:
        assert abs(var - other[1]) > 5 * se_v, figures
