"""Denoising networks beyond diffusers' own (none yet: diffusers' UNet2DModel is used as is)."""
