"""Independent float64 NumPy reference for the DDPM formulas in docs/math.md.

Written from the formulas (docs/math.md equation numbers in comments), never from ddpm_plus or diffusers
code, so that the scheduler tests compare the library against something it cannot share a bug with.
Indexing follows diffusers: array index i is code timestep i, i.e. the paper's t = i + 1.
"""

import math

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def betas(
    schedule="linear",
    T=1000,
    beta_start=1e-4,
    beta_end=0.02,
    trained_betas=None,
    zero_snr=False,
    rescale_for_T=False,
):
    """β_1..β_T in float64."""
    if trained_betas is not None:
        b = np.asarray(trained_betas, dtype=np.float64)
    elif schedule == "linear":
        if rescale_for_T:
            # improved-diffusion get_named_beta_schedule("linear"): scale = 1000 / T on both ends.
            beta_start, beta_end = beta_start * 1000.0 / T, beta_end * 1000.0 / T
        b = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif schedule == "scaled_linear":
        b = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        # improved DDPM cosine: ᾱ(u) = cos²((u + s)/(1 + s) · π/2), s = 0.008, β capped at 0.999
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        b = np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    elif schedule == "sigmoid":
        b = sigmoid(np.linspace(-6.0, 6.0, T)) * (beta_end - beta_start) + beta_start
    else:
        raise KeyError(schedule)
    if zero_snr:
        b = zero_terminal_snr(b)
    return b


def zero_terminal_snr(b):
    """Lin et al. 2023, Algorithm 1: shift √ᾱ so √ᾱ_T = 0, scale so √ᾱ_1 is unchanged."""
    s = np.sqrt(np.cumprod(1.0 - b))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    abar = s**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class Tables:
    """All per-timestep quantities of docs/math.md, from β (float64)."""

    def __init__(self, b):
        self.betas = np.asarray(b, dtype=np.float64)
        self.alphas = 1.0 - self.betas  # α_t = 1 − β_t
        self.abar = np.cumprod(self.alphas)  # ᾱ_t = ∏ α
        self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])  # ᾱ_{t−1}, ᾱ_0 = 1
        # (29) β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
        self.post_var = self.betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        # β̃_1 = 0: log clipped with β̃_2 (improved DDPM)
        self.post_logvar_clipped = np.log(np.concatenate([self.post_var[1:2], self.post_var[1:]]))
        # (30) μ̃ = coef_x0 · x_0 + coef_xt · x_t
        self.coef_x0 = np.sqrt(self.abar_prev) * self.betas / (1.0 - self.abar)
        self.coef_xt = np.sqrt(self.alphas) * (1.0 - self.abar_prev) / (1.0 - self.abar)


def abar_at(tab, t):
    """ᾱ at code timestep t, with ᾱ = 1 for t = -1 (before the first step)."""
    return 1.0 if t < 0 else float(tab.abar[t])


def strided(tab, t, t_prev):
    """Quantities of the step t → t_prev with the respaced β' = 1 − ᾱ_t/ᾱ_prev (docs/math.md, Respacing)."""
    a_t, a_p = abar_at(tab, t), abar_at(tab, t_prev)
    beta = 1.0 - a_t / a_p
    return dict(
        abar=a_t,
        abar_prev=a_p,
        beta=beta,
        alpha=a_t / a_p,
        post_var=beta * (1.0 - a_p) / (1.0 - a_t),
        coef_x0=math.sqrt(a_p) * beta / (1.0 - a_t),
        coef_xt=math.sqrt(a_t / a_p) * (1.0 - a_p) / (1.0 - a_t),
    )


def x0_from(prediction_type, model_output, x_t, abar):
    """(32) and its x0/v equivalents."""
    if prediction_type == "epsilon":
        return (x_t - np.sqrt(1.0 - abar) * model_output) / np.sqrt(abar)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return np.sqrt(abar) * x_t - np.sqrt(1.0 - abar) * model_output
    raise KeyError(prediction_type)


def bf16_half_ulp(x):
    """Half a unit in the last place of bfloat16 (8 significant bits) at |x|."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    e = np.floor(np.log2(np.maximum(x, 2.0**-126)))
    return 2.0 ** (e - 8)


def fp16_half_ulp(x):
    """Half a unit in the last place of float16 (11 significant bits) at |x| (normal range)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    e = np.floor(np.log2(np.maximum(x, 2.0**-14)))
    return 2.0 ** (e - 11)


def gaussian_chain_moments(tab, timesteps, mu, s, variance_type="fixed_small"):
    """(m, v) of the ancestral sampler's output for N(mu, s²) data driven by the optimal predictor, iterated
    in float64 from x_T ~ N(0, 1): x̂_0 = mu + k (x − √ᾱ mu), so each step is x' = A x + B + σ z."""
    m, v = 0.0, 1.0
    ts = [int(t) for t in timesteps]
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        st = strided(tab, t, prev)
        ab = st["abar"]
        k = math.sqrt(ab) * s**2 / (ab * s**2 + 1 - ab)
        a = st["coef_x0"] * k + st["coef_xt"]
        b = st["coef_x0"] * mu * (1 - k * math.sqrt(ab))
        var = 0.0 if prev < 0 else (st["post_var"] if variance_type == "fixed_small" else st["beta"])
        m, v = a * m + b, a * a * v + var
    return m, v
