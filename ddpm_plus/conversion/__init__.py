"""Conversion of checkpoints from other code bases: openai/improved-diffusion and openai/guided-diffusion
(:mod:`ddpm_plus.conversion.adm`)."""
