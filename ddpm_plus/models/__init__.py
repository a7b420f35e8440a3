"""Denoising networks beyond diffusers' own: the ADM UNet of improved DDPM / guided-diffusion
(:mod:`ddpm_plus.models.adm_unet`, Nichol & Dhariwal 2021; Dhariwal & Nichol 2021) and guided-diffusion's noisy
classifier (:mod:`ddpm_plus.models.adm_classifier`), built from :mod:`ddpm_plus.models.adm_blocks`."""
