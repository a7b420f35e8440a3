"""The float64 coefficient tables of one scheduler config, and their lookup.

:class:`CoefficientTables` binds :func:`~.coefficients.coefficient_table` to one ᾱ table, η, Γ table and
data range, and holds the rows of the training chain (t -> t − 1), of the current sampling sequence (t -> the
next lower timestep of the sequence) and the forward-process columns. Lookups give numpy columns, python
floats (one timestep: the same numbers, cached) or tensors shaped to broadcast against a sample.
"""

from __future__ import annotations

import numpy as np
import torch

from .arithmetic import compute_dtype, is_scalar
from .coefficients import StepCoefficients, coefficient_table, rows
from .respacing import Respacing
from .validation import as_numpy, check_neighbours, integral, timestep_values

__all__ = ["CoefficientTables"]


class CoefficientTables:
    """The coefficient tables of the ᾱ table ``alphas_cumprod`` (index i: the paper's t = i + 1) with the
    reverse family's ``eta``, Analytic-DPM's ``moments`` (Γ or None) and Var(x_0|x_t) ≤ ``x0_var_max``."""

    def __init__(self, alphas_cumprod: np.ndarray, eta: float, moments, x0_var_max: float):
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = T = len(alphas_cumprod)
        self._options = (eta, moments, x0_var_max)
        t = np.arange(T)
        self.full = self.table(t, t - 1, np.where(t + 1 < T, t + 1, -1))
        self.sequence = self.full
        self._rows: dict = {False: {}, True: {}}  # sequence? -> timestep -> python-float row (a cache)
        self._forward: dict = {}  # (device, dtype) -> (√ᾱ, √(1−ᾱ)) of the full chain

    def table(self, t, prev, nxt) -> StepCoefficients:
        """The numpy columns of the steps ``t -> prev`` (``nxt``: the step above t; -1 for none)."""
        return coefficient_table(self.alphas_cumprod, t, prev, nxt, *self._options)

    def set_sequence(self, r: Respacing) -> None:
        """Rows for every t (visited or not) of the sequence ``r``: the step t -> the next lower visited one."""
        self.sequence = self.table(np.arange(self.num_train_timesteps), r.prev_timestep, r.next_timestep)
        self._rows[True] = {}

    def lookup(self, timestep, prev_timestep=None, next_timestep=None, sequence=False) -> StepCoefficients:
        """numpy columns for 1-D ``timestep``: rows of a table, or the formula for explicit neighbours."""
        T = self.num_train_timesteps
        t = timestep_values("timestep", timestep, T)
        if prev_timestep is None and next_timestep is None:
            return rows(self.sequence if sequence else self.full, t)

        def neighbour(value, default):
            if value is None:
                return default
            return np.broadcast_to(torch.as_tensor(value).reshape(-1).long().cpu().numpy(), t.shape)

        prev = neighbour(prev_timestep, t - 1)
        nxt = neighbour(next_timestep, np.where(t + 1 < T, t + 1, -1))
        check_neighbours(t, prev, nxt, T)
        return self.table(t, prev, nxt)

    def for_sample(self, timestep, like: torch.Tensor, prev_timestep=None, next_timestep=None, sequence=False):
        """Coefficients to apply to ``like``: python floats for scalar arguments (rows cached), else tensors
        of shape (B, 1, ..., 1) in the compute dtype on its device. Same numbers either way."""
        scalar = all(is_scalar(v) for v in (timestep, prev_timestep, next_timestep))
        if scalar and prev_timestep is None and next_timestep is None:
            cache = self._rows[sequence]
            t = timestep if type(timestep) is int else int(integral("timestep", as_numpy("timestep", timestep))[0])
            row = cache.get(t)
            if row is None:
                row = cache[t] = StepCoefficients(*(float(v[0]) for v in self.lookup(t, sequence=sequence)))
            return row
        c = self.lookup(timestep, prev_timestep, next_timestep, sequence)
        if scalar:
            return StepCoefficients(*(float(v[0]) for v in c))
        dtype, shape = compute_dtype(like), (-1,) + (1,) * (like.ndim - 1)
        return StepCoefficients(
            *(torch.from_numpy(np.asarray(v, np.float64)).to(like.device, dtype).reshape(shape) for v in c)
        )

    def forward(self, sample: torch.Tensor, timesteps):
        """(√ᾱ_t, √(1−ᾱ_t)) of the full chain, gathered per element in the compute dtype on the device."""
        dtype = compute_dtype(sample)
        key = (sample.device, dtype)
        if key not in self._forward:
            self._forward[key] = tuple(
                torch.from_numpy(col).to(sample.device, dtype)
                for col in (self.full.sqrt_alpha_prod, self.full.sqrt_one_minus_alpha_prod)
            )
        sqrt_ab, sqrt_1m_ab = self._forward[key]
        t = torch.as_tensor(timesteps, device=sample.device).long().reshape(-1)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return sqrt_ab[t].reshape(shape), sqrt_1m_ab[t].reshape(shape)
