"""Training objectives: L_simple (optionally min-SNR weighted), improved DDPM's hybrid and L_vlb, and the
loss-aware importance sampler of timesteps (Nichol & Dhariwal 2021, improved-diffusion).

Units of the vlb terms follow improved-diffusion exactly: one term of the bound per example, mean over
dimensions, in bits (``_vb_terms_bpd``). ``vlb`` returns T * L_t (its ``RESCALED_KL``: an unbiased one-sample
estimate of the whole bound for uniform t) and ``hybrid`` returns L_simple + 0.001 * T * L_t
(its ``RESCALED_MSE``, i.e. L_simple + lambda * L_vlb with lambda = 0.001).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.training_utils import compute_snr

from ..evaluation.likelihood import vb_term_nats
from ..schedulers.options import PredictionType, VarianceType
from .loss_types import LOSS_TYPES, LossType, check_loss_variance

__all__ = ["compute_loss", "ImportanceSampler", "LOSS_TYPES", "HYBRID_LAMBDA"]

HYBRID_LAMBDA = 0.001


def _mean_flat(x):
    return x.flatten(1).mean(1)


def _prediction_type(scheduler) -> PredictionType:
    value = scheduler.config.prediction_type
    try:
        return PredictionType(value)
    except ValueError:
        raise ValueError(
            f"scheduler.config.prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {value!r}"
        ) from None


def _target(scheduler, x_start, noise, timesteps):
    prediction_type = _prediction_type(scheduler)
    if prediction_type is PredictionType.EPSILON:
        return noise
    if prediction_type is PredictionType.SAMPLE:
        return x_start
    # PredictionType.V_PREDICTION: v = sqrt(abar) eps - sqrt(1 - abar) x_0
    return scheduler.get_velocity(x_start, noise, timesteps)


def min_snr_weights(scheduler, timesteps, snr_gamma: float):
    """Min-SNR-gamma weights (Hang et al. 2023) expressed for the scheduler's prediction type.

    The paper weights the x_0 error by min(SNR, gamma). Since ||eps - eps^||^2 = SNR ||x_0 - x_0^||^2 and
    ||v - v^||^2 = (SNR + 1) ||x_0 - x_0^||^2, the weight on the MSE is min(SNR, gamma)/SNR for epsilon,
    min(SNR, gamma)/(SNR + 1) for v_prediction and min(SNR, gamma) for sample. SNR = abar/(1 - abar).
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=float(snr_gamma))
    prediction_type = _prediction_type(scheduler)
    if prediction_type is PredictionType.EPSILON:
        # SNR = 0 only with a zero-terminal-SNR schedule; the weight's limit there is 1.
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type is PredictionType.V_PREDICTION:
        return clipped / (snr + 1.0)
    return clipped  # PredictionType.SAMPLE


def compute_loss(
    scheduler,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    loss_type: str = "simple",
    snr_gamma: float | None = None,
    num_bins: int = 256,
) -> torch.Tensor:
    """Per-example float32 loss, shape [B].

    - ``simple``: MSE between the prediction (first C channels of ``model_output``) and the target of the
      scheduler's prediction type, mean over non-batch dims, in float32 whatever the model dtype;
      ``snr_gamma`` applies min-SNR-gamma weights (``min_snr_weights``).
    - ``hybrid``: simple + 0.001 * T * L_t, where L_t (bits/dim) sees the mean with its gradient stopped,
      so L_vlb trains only the variance channels.
    - ``vlb``: T * L_t (bits/dim), gradients to mean and variance.
    ``hybrid``/``vlb`` need ``variance_type`` learned or learned_range. ``num_bins`` is the decoder's grid
    at t = 0 (256 for 8-bit images, 17 for the bundled digits).
    """
    loss = _checked_loss_type(scheduler, model_output, x_start, loss_type, snr_gamma)
    channels = x_start.shape[1]
    timesteps = torch.as_tensor(timesteps, device=x_start.device).long().reshape(-1)

    prediction = model_output[:, :channels].float()
    target = _target(scheduler, x_start.float(), noise.float(), timesteps).float()
    mse = _mean_flat((prediction - target) ** 2)
    if snr_gamma is not None:
        mse = mse * min_snr_weights(scheduler, timesteps, snr_gamma).to(mse.device, torch.float32)
    if loss is LossType.SIMPLE:
        return mse

    if loss is LossType.HYBRID:  # stop the mean's gradient in L_vlb (improved DDPM, sec. 3.1)
        vlb_input = torch.cat([model_output[:, :channels].detach(), model_output[:, channels:]], dim=1)
    else:
        vlb_input = model_output
    num_train = int(scheduler.config.num_train_timesteps)
    nats = vb_term_nats(
        scheduler,
        vlb_input.to(torch.float64),
        x_start.to(torch.float64),
        x_t.to(torch.float64),
        timesteps,
        timesteps - 1,
        num_bins=num_bins,
    )
    vb = _mean_flat(nats) / math.log(2.0) * num_train  # T * L_t, bits/dim
    if loss is LossType.VLB:
        return vb.float()
    return mse + HYBRID_LAMBDA * vb.float()


def _checked_loss_type(scheduler, model_output, x_start, loss_type: str, snr_gamma) -> LossType:
    """``loss_type`` as a :class:`LossType` after checking it against the scheduler's variance type and η,
    ``snr_gamma``, and the output channels (2C for a learned variance, else C)."""
    variance_type = scheduler.config.variance_type
    check_loss_variance(loss_type, variance_type)
    loss = LossType(loss_type)
    if snr_gamma is not None and not (float(snr_gamma) > 0):
        raise ValueError(f"snr_gamma must be a positive number or None, got {snr_gamma!r}")
    eta = float(scheduler.config.get("eta", 1.0))
    if loss.trains_variance and eta != 1.0:
        # improved DDPM's L_vlb is the bound of the DDPM posterior (η = 1); q_λ with η < 1 is a sampler choice
        raise ValueError(
            f"loss_type={loss_type!r} trains against the DDPM posterior and needs a scheduler with eta=1.0; "
            f"got eta={eta!r}. Train with eta=1.0 and set eta only for sampling."
        )
    channels = x_start.shape[1]
    expected = 2 * channels if VarianceType(variance_type).learned else channels
    if model_output.ndim != x_start.ndim or model_output.shape[1] != expected:
        raise ValueError(
            f"model_output must have {expected} channels for variance_type={variance_type!r} "
            f"(x_start has {channels}); got shape {tuple(model_output.shape)}"
        )
    return loss


class ImportanceSampler:
    """Loss-aware timestep sampler (improved-diffusion's ``LossSecondMomentResampler``).

    Uniform until every timestep has ``history_per_term`` recorded losses; then
    p_t proportional to sqrt(E[L_t^2]) over the history, mixed with ``uniform_prob`` of the uniform law.
    ``sample`` returns weights 1/(T p_t) so that E[w L_t] = mean_t L_t. In distributed training pass the
    gathered timesteps and losses of all processes to ``update`` so every process keeps the same state.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps!r}")
        if int(history_per_term) < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term!r}")
        if not 0.0 <= float(uniform_prob) <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob!r}")
        self.num_timesteps = int(num_timesteps)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self._counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self._counts == self.history_per_term).all())

    def probabilities(self) -> torch.Tensor:
        """The sampling law over timesteps (float64, sums to 1)."""
        uniform = np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        if not self.warmed_up():
            return torch.from_numpy(uniform)
        w = np.sqrt(np.mean(self._history**2, axis=-1))
        if not np.isfinite(w).all() or w.sum() <= 0:
            return torch.from_numpy(uniform)
        p = w / w.sum() * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.from_numpy(p / p.sum())

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """(timesteps LongTensor [batch_size], weights float32 [batch_size] = 1/(T p_t)) on ``device``."""
        p = self.probabilities()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.multinomial(p.to(gen_device), int(batch_size), replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p.to(gen_device)[idx])
        return idx.to(device=device), weights.to(device=device, dtype=torch.float32)

    def update(self, timesteps, losses) -> None:
        """Record per-example losses (keep the newest ``history_per_term`` per timestep)."""
        ts = torch.as_tensor(timesteps).detach().reshape(-1).cpu().long().tolist()
        ls = torch.as_tensor(losses).detach().reshape(-1).cpu().double().tolist()
        if len(ts) != len(ls):
            raise ValueError(f"timesteps and losses must have the same length, got {len(ts)} and {len(ls)}")
        for t, loss in zip(ts, ls, strict=True):
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"timestep {t} outside [0, {self.num_timesteps - 1}]")
            if self._counts[t] == self.history_per_term:
                self._history[t, :-1] = self._history[t, 1:]
                self._history[t, -1] = loss
            else:
                self._history[t, self._counts[t]] = loss
                self._counts[t] += 1

    def state_dict(self) -> dict:
        return {
            "num_timesteps": self.num_timesteps,
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "history": torch.from_numpy(self._history.copy()),
            "counts": torch.from_numpy(self._counts.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_timesteps", "history_per_term"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"state_dict {key}={state[key]} does not match this sampler's {getattr(self, key)}")
        self.uniform_prob = float(state["uniform_prob"])
        self._history = torch.as_tensor(state["history"]).double().numpy().copy()
        self._counts = torch.as_tensor(state["counts"]).long().numpy().copy()
