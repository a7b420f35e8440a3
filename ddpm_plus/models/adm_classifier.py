"""ADMClassifierModel: ADM's noisy classifier p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021,
Sec. 4) as a diffusers model: the downsampling half of the ADM UNet with its middle block, then a pooling head.

``classifier(x_t, t)`` returns the logits (batch, out_channels) for raw timesteps 0 … T−1; with
``rescale_timesteps`` it feeds t·1000/T to the network itself. ``ddpm-plus convert guided-diffusion-classifier``
turns the published classifier checkpoints into it (``ddpm_plus.conversion.adm``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .adm_blocks import (
    ADMAttentionPool,
    ADMGroupNorm,
    batch_timesteps,
    build_encoder,
    check_architecture,
    timestep_embedding,
)

__all__ = ["ADMClassifierModel", "POOLS"]

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
SPATIAL_WIDTH = 2048  # hidden width of the "spatial" heads


class ADMClassifierModel(ModelMixin, ConfigMixin):
    """The noisy ImageNet classifier of guided-diffusion (``EncoderUNetModel`` there).

    Config (guided-diffusion's classifier flags by their meaning): sample_size (``--image_size``),
    in_channels, out_channels (classes, 1000), model_channels (``--classifier_width``), channel_mult,
    num_res_blocks (``--classifier_depth``), attention_resolutions (``--classifier_attention_resolutions``),
    num_heads / num_head_channels (64 in the published ones), use_scale_shift_norm, resblock_updown,
    use_new_attention_order, conv_resample, dropout, pool (``--classifier_pool``: "attention" — CLIP-style
    attention pooling —, "adaptive" — global average —, "spatial"/"spatial_v2" — an MLP on every block's mean
    feature), rescale_timesteps and num_train_timesteps (as ``ADMUNetModel``).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int = 1000,
        model_channels: int = 128,
        channel_mult: tuple[float, ...] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (32, 16, 8),
        num_heads: int = 1,
        num_head_channels: int | None = 64,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        use_new_attention_order: bool = False,
        conv_resample: bool = True,
        dropout: float = 0.0,
        pool: str = "attention",
        rescale_timesteps: bool = False,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        self.register_to_config(channel_mult=list(channel_mult), attention_resolutions=list(attention_resolutions))
        attention_ds = check_architecture(self.config)
        if pool not in POOLS:
            raise ValueError(f"`pool` must be one of {POOLS}; got {pool!r}.")
        if pool == "attention" and num_head_channels is None:
            raise ValueError('pool="attention" needs `num_head_channels`.')
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"`out_channels` must be a positive integer; got {out_channels!r}.")
        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        encoder = build_encoder(self.config, emb_channels, attention_ds)
        self.input_blocks, self.middle_block = encoder.input_blocks, encoder.middle_block
        self.out = self._head(encoder.channels, sum(encoder.skip_channels) + encoder.channels, encoder.ds)
        self.gradient_checkpointing = False

    def _head(self, ch: int, feature_size: int, ds: int) -> nn.Sequential:
        c = self.config
        if c.pool == "adaptive":
            conv = nn.Conv2d(ch, c.out_channels, 1)
            return nn.Sequential(ADMGroupNorm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)), conv, nn.Flatten())
        if c.pool == "attention":
            pool = ADMAttentionPool(c.sample_size // ds, ch, c.num_head_channels, c.out_channels)
            return nn.Sequential(ADMGroupNorm(ch), nn.SiLU(), pool)
        first, last = nn.Linear(feature_size, SPATIAL_WIDTH), nn.Linear(SPATIAL_WIDTH, c.out_channels)
        if c.pool == "spatial":
            return nn.Sequential(first, nn.ReLU(), last)
        return nn.Sequential(first, ADMGroupNorm(SPATIAL_WIDTH), nn.SiLU(), last)

    def _block(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, h, emb)
        return block(h, emb)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """sample: (batch, in_channels, H, W) noisy images x_t; timestep: raw t in 0 … T−1 (a number or one
        per image). Returns the class logits, (batch, out_channels)."""
        c = self.config
        t = batch_timesteps(timestep, sample, c.num_train_timesteps if c.rescale_timesteps else None)
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(self.time_embed[0].weight.dtype))
        h = sample.to(emb.dtype)
        spatial = c.pool.startswith("spatial")
        means = []
        for block in self.input_blocks:
            h = self._block(block, h, emb)
            if spatial:
                means.append(h.mean(dim=(2, 3)))
        h = self._block(self.middle_block, h, emb)
        if spatial:
            return self.out(torch.cat([*means, h.mean(dim=(2, 3))], dim=-1))
        return self.out(h)
