"""ADMUNetModel: the UNet of improved DDPM (Nichol & Dhariwal 2021) and of ADM (Dhariwal & Nichol 2021) as a
diffusers model (``ModelMixin`` + ``ConfigMixin``, safetensors weights).

Called as diffusers' ``UNet2DModel``: ``unet(sample, timestep, class_labels=None).sample``, with raw timesteps
0 … T−1; a model trained with improved DDPM's ``rescale_timesteps`` (the network saw t·1000/T) rescales
them itself (config ``rescale_timesteps``, ``num_train_timesteps``). Its config names the sample
(``sample_size``, ``in_channels``, ``out_channels``, ``num_class_embeds``) as ``UNet2DModel`` does, so
``DDPMPlusPipeline``, guidance, ``FastSampler``, the likelihood and Analytic-DPM code use it unchanged.
``ddpm-plus convert`` turns the published checkpoints into it (``ddpm_plus.conversion.adm``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .adm_blocks import (
    ADMGroupNorm,
    ADMResBlock,
    ADMUpsample,
    EmbeddingSequential,
    attention_block,
    batch_timesteps,
    build_encoder,
    check_architecture,
    timestep_embedding,
)

__all__ = ["ADMUNetModel"]


class ADMUNetModel(ModelMixin, ConfigMixin):
    """The ADM UNet (Dhariwal & Nichol 2021, Sec. 3; improved DDPM's UNet is the case without
    ``resblock_updown``, ``num_head_channels`` and the new attention order).

    Config (the flags of openai/guided-diffusion's ``script_util.py`` by their meaning):
        sample_size: image side (``--image_size``); in_channels; out_channels (default 2x in_channels with
            ``learn_sigma``, else in_channels: the ε prediction, then the variance interpolation v).
        model_channels (``--num_channels``), channel_mult (per level), num_res_blocks (per level),
        attention_resolutions: feature-map sides with attention (``--attention_resolutions 32,16,8``).
        num_heads / num_head_channels (channels per head; wins when set) / num_heads_upsample (decoder heads,
            default num_heads); use_new_attention_order: split q|k|v before the heads (ADM ImageNet 64).
        use_scale_shift_norm: AdaGN conditioning; resblock_updown: residual blocks resample (BigGAN);
        conv_resample: resample with convolutions otherwise; dropout.
        num_class_embeds: the number of classes of a class-conditional model (``--class_cond``: 1000).
        rescale_timesteps, num_train_timesteps: feed t·1000/T to the network (improved DDPM's default).
        class_embed_type: always None (read by the pipeline like ``UNet2DModel``'s).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: tuple[float, ...] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16, 8),
        num_heads: int = 4,
        num_head_channels: int | None = None,
        num_heads_upsample: int | None = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        conv_resample: bool = True,
        dropout: float = 0.0,
        num_class_embeds: int | None = None,
        learn_sigma: bool = False,
        rescale_timesteps: bool = False,
        num_train_timesteps: int = 1000,
        class_embed_type: str | None = None,
    ):
        super().__init__()
        if out_channels is None:
            out_channels = in_channels * (2 if learn_sigma else 1)
            self.register_to_config(out_channels=out_channels)
        self.register_to_config(channel_mult=list(channel_mult), attention_resolutions=list(attention_resolutions))
        attention_ds = self._check_config()
        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.label_emb = nn.Embedding(num_class_embeds, emb_channels) if num_class_embeds is not None else None
        encoder = build_encoder(self.config, emb_channels, attention_ds)
        self.input_blocks, self.middle_block = encoder.input_blocks, encoder.middle_block
        self.output_blocks, ch = self._decoder(encoder.skip_channels, encoder.channels, encoder.ds, attention_ds)
        first = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(ADMGroupNorm(ch), nn.SiLU(), nn.Conv2d(first, out_channels, 3, padding=1))
        self.gradient_checkpointing = False

    def _check_config(self) -> set[int]:
        c = self.config
        attention_ds = check_architecture(c)
        if c.class_embed_type is not None:
            raise ValueError(
                f"ADMUNetModel embeds class ids only: `class_embed_type` must be None; got {c.class_embed_type!r}."
            )
        if c.num_class_embeds is not None and (isinstance(c.num_class_embeds, bool) or c.num_class_embeds < 1):
            raise ValueError(f"`num_class_embeds` must be None or a positive integer; got {c.num_class_embeds!r}.")
        if c.learn_sigma and c.out_channels != 2 * c.in_channels:
            raise ValueError(
                f"`learn_sigma` needs out_channels = 2 x in_channels = {2 * c.in_channels}; got {c.out_channels}."
            )
        return attention_ds

    def _decoder(self, skip: list[int], ch: int, ds: int, attention_ds: set[int]) -> tuple[nn.ModuleList, int]:
        """The upsampling half: per level (top-down) num_res_blocks + 1 residual blocks on the concatenated
        skip, attention where ds is in ``attention_ds``, and an upsampling block closing every level but the
        first."""
        c = self.config
        skip, blocks = list(skip), []
        heads = c.num_heads_upsample if c.num_heads_upsample is not None else c.num_heads
        res = dict(emb_channels=4 * c.model_channels, dropout=c.dropout, use_scale_shift_norm=c.use_scale_shift_norm)
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                out = int(mult * c.model_channels)
                layers = [ADMResBlock(ch + skip.pop(), out_channels=out, **res)]
                ch = out
                if ds in attention_ds:
                    layers.append(attention_block(c, ch, heads))
                if level and i == c.num_res_blocks:
                    up = ADMResBlock(ch, up=True, **res) if c.resblock_updown else ADMUpsample(ch, c.conv_resample)
                    layers.append(up)
                    ds //= 2
                blocks.append(EmbeddingSequential(*layers))
        return nn.ModuleList(blocks), ch

    def _block(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, h, emb)
        return block(h, emb)

    def embedding(self, sample: torch.Tensor, timestep, class_labels=None) -> torch.Tensor:
        """The timestep embedding (plus the class embedding) every residual block is conditioned on."""
        c = self.config
        t = batch_timesteps(timestep, sample, c.num_train_timesteps if c.rescale_timesteps else None)
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(self.time_embed[0].weight.dtype))
        if self.label_emb is None:
            if class_labels is not None:
                raise ValueError("`class_labels` were given but this ADMUNetModel is unconditional.")
            return emb
        if class_labels is None:
            raise ValueError("this ADMUNetModel is class-conditional: pass `class_labels` (one id per image).")
        labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1)
        return emb + self.label_emb(labels.expand(sample.shape[0]))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """sample: (batch, in_channels, H, W) noisy images x_t; timestep: raw t in 0 … T−1 (a number or one
        per image); class_labels: class ids of a class-conditional model. Returns the prediction (and, with
        ``learn_sigma``, the variance channels) as ``UNet2DOutput(sample=...)``."""
        emb = self.embedding(sample, timestep, class_labels)
        h = sample.to(emb.dtype)
        skips = []
        for block in self.input_blocks:
            h = self._block(block, h, emb)
            skips.append(h)
        h = self._block(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h)
        return UNet2DOutput(sample=out) if return_dict else (out,)
