"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
Sec. 3) and of its ancestor in improved DDPM (Nichol & Dhariwal 2021, Sec. 2 and App. A).

Written from the papers' descriptions; the module tree (and so the state-dict keys) follows the published
checkpoints of openai/improved-diffusion and openai/guided-diffusion, so that their weights load one to one:
a residual block is ``in_layers`` (GroupNorm, SiLU, conv), ``emb_layers`` (SiLU, linear), ``out_layers``
(GroupNorm, SiLU, dropout, conv) and ``skip_connection``; an attention block is ``norm``, ``qkv`` and
``proj_out`` (1x1 Conv1d weights). Attention runs on a (batch, tokens, channels) view of the feature map
(a free view of a channels-last tensor) through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADMAttentionBlock",
    "ADMAttentionPool",
    "ADMDownsample",
    "ADMGroupNorm",
    "ADMResBlock",
    "ADMUpsample",
    "EmbeddingSequential",
    "Encoder",
    "attention_block",
    "attention_heads",
    "build_encoder",
    "timestep_embedding",
]

GROUPS = 32


class ADMGroupNorm(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 for half-precision inputs (as the fp16 ADM models ran)."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            w, b = self.weight.float(), self.bias.float()
            return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/(dim/2)) (Vaswani et al. 2017;
    the cos-first order of the ADM checkpoints). The frequencies are the float32 table the checkpoints were
    trained with; t·f_i is computed in float32, or in float64 for float64 timesteps. Odd ``dim``: a zero
    column is appended."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * -math.log(max_period)
    freqs = torch.exp(exponent / half)
    dtype = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    args = timesteps.to(dtype)[:, None] * freqs.to(dtype)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def attention_heads(channels: int, num_heads: int, num_head_channels: int | None) -> int:
    """Heads of an attention layer of ``channels``: ``channels // num_head_channels`` when that is set
    (ADM's 64 channels per head), else ``num_heads``; either must divide ``channels``."""
    if num_head_channels is not None:
        if num_head_channels < 1 or channels % num_head_channels:
            raise ValueError(f"num_head_channels={num_head_channels} does not divide {channels} channels.")
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide {channels} channels.")
    return num_heads


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads·ch) -> (B, heads, L, ch); head h holds channels h·ch ... (h+1)·ch − 1."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _heads_merged(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, ch) -> (B, L, heads·ch)."""
    return x.transpose(1, 2).flatten(2)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C): a view for channels-last tensors."""
    return x.flatten(2).transpose(1, 2)


class EmbeddingSequential(nn.Sequential):
    """``nn.Sequential`` whose residual blocks also get the timestep (and class) embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ADMResBlock) else layer(x)
        return x


class ADMUpsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (``conv``) if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ADMDownsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv (``op``) if ``use_conv``, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ADMResBlock(nn.Module):
    """Residual block conditioned on the embedding: added to the features (improved DDPM), or, with
    ``use_scale_shift_norm``, as AdaGN(h, y) = y_s·GroupNorm(h) + y_b with y_s = 1 + scale (Dhariwal &
    Nichol 2021, Sec. 3). ``up``/``down``: BigGAN-style resampling inside the block (their Sec. 3), applied
    to both branches after the first normalisation; a 1x1 conv on the skip when the width changes."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            ADMGroupNorm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = ADMUpsample(channels, False), ADMUpsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = ADMDownsample(channels, False), ADMDownsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            ADMGroupNorm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        same = out_channels == channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = out_rest(out_norm(h + emb_out))
        return self.skip_connection(x) + h


class ADMAttentionBlock(nn.Module):
    """Self-attention over all positions with a residual connection (Ho et al. 2020; several heads in
    Nichol & Dhariwal 2021 and Dhariwal & Nichol 2021). ``qkv`` is one 1x1 projection to 3C channels, read
    as (head, q|k|v, ch) in the "legacy" order of improved DDPM and the ADM 128/256/512 checkpoints, or as
    (q|k|v, head, ch) with ``new_order`` (ADM ImageNet 64)."""

    def __init__(self, channels: int, heads: int, new_order: bool = False):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = ADMGroupNorm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = F.linear(_tokens(self.norm(x)), self.qkv.weight[..., 0], self.qkv.bias)
        layout = (3, self.heads, -1) if self.new_order else (self.heads, 3, -1)
        qkv = qkv.unflatten(-1, layout)  # (B, L, 3, heads, ch) or (B, L, heads, 3, ch)
        q, k, v = qkv.permute(2, 0, 3, 1, 4) if self.new_order else qkv.permute(3, 0, 2, 1, 4)
        h = _heads_merged(F.scaled_dot_product_attention(q, k, v))
        h = F.linear(h, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(b, c, height, width)


class ADMAttentionPool(nn.Module):
    """The noisy classifier's attention pooling (CLIP's, Radford et al. 2021; Dhariwal & Nichol 2021, Sec. 4):
    the mean feature is prepended as a token, a learned positional embedding is added, and that token's
    multi-head attention output (q|k|v split before the heads), projected by ``c_proj``, is the output.
    Only the first token's query is computed: the other tokens' outputs are discarded."""

    def __init__(self, spatial_size: int, channels: int, head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial_size**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.heads = attention_heads(channels, 1, head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        tokens = x.flatten(2)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = (tokens + self.positional_embedding.to(x.dtype)).transpose(1, 2)  # (B, L + 1, C)
        weight, bias = self.qkv_proj.weight[..., 0], self.qkv_proj.bias
        q = F.linear(tokens[:, :1], weight[:c], bias[:c])
        kv = F.linear(tokens, weight[c:], bias[c:]).unflatten(-1, (2, c))
        k, v = (_heads_first(kv[:, :, i], self.heads) for i in (0, 1))
        h = _heads_merged(F.scaled_dot_product_attention(_heads_first(q, self.heads), k, v))[:, 0]
        return F.linear(h, self.c_proj.weight[..., 0], self.c_proj.bias)


class Encoder(NamedTuple):
    """What :func:`build_encoder` builds: the modules, each input block's output width (the UNet's skips),
    and the width and downsampling factor at the bottom."""

    input_blocks: nn.ModuleList
    middle_block: EmbeddingSequential
    skip_channels: list[int]
    channels: int
    ds: int


def attention_block(cfg, channels: int, num_heads: int) -> ADMAttentionBlock:
    """An attention block of ``channels`` with the heads ``cfg`` sets (``num_head_channels`` wins)."""
    heads = attention_heads(channels, num_heads, cfg.num_head_channels)
    return ADMAttentionBlock(channels, heads, cfg.use_new_attention_order)


def build_encoder(cfg, emb_channels: int, attention_ds: set[int]) -> Encoder:
    """The downsampling half and middle of the ADM UNet, shared by the denoiser and the noisy classifier:
    ``input_blocks`` (a 3x3 stem conv, then per level ``num_res_blocks`` residual blocks, each followed by
    attention where the downsampling factor ds is in ``attention_ds``, and a downsampling block between
    levels) and ``middle_block`` (residual, attention, residual)."""
    ch = int(cfg.channel_mult[0] * cfg.model_channels)
    blocks = [EmbeddingSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
    skip, ds = [ch], 1
    res = dict(emb_channels=emb_channels, dropout=cfg.dropout, use_scale_shift_norm=cfg.use_scale_shift_norm)
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            out = int(mult * cfg.model_channels)
            layers = [ADMResBlock(ch, out_channels=out, **res)]
            ch = out
            if ds in attention_ds:
                layers.append(attention_block(cfg, ch, cfg.num_heads))
            blocks.append(EmbeddingSequential(*layers))
            skip.append(ch)
        if level != len(cfg.channel_mult) - 1:
            down = ADMResBlock(ch, down=True, **res) if cfg.resblock_updown else ADMDownsample(ch, cfg.conv_resample)
            blocks.append(EmbeddingSequential(down))
            skip.append(ch)
            ds *= 2
    middle = EmbeddingSequential(
        ADMResBlock(ch, **res), attention_block(cfg, ch, cfg.num_heads), ADMResBlock(ch, **res)
    )
    return Encoder(nn.ModuleList(blocks), middle, skip, ch, ds)


def batch_timesteps(timestep, sample: torch.Tensor, rescale_to: int | None) -> torch.Tensor:
    """``timestep`` (a number, a 0-d tensor, or one per image) as one float per image: float64 for a float64
    ``sample``, else float32; times 1000/T when ``rescale_to`` = T is given (improved DDPM's
    ``rescale_timesteps``: the network saw t·1000/T)."""
    dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.reshape(1) if t.ndim == 0 else t
    batch = sample.shape[0]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(
            f"`timestep` must be a number or hold one value per image ({batch}); got shape {tuple(t.shape)}."
        )
    t = t.to(dtype).expand(batch)
    return t * (1000.0 / rescale_to) if rescale_to else t


def check_architecture(config) -> set[int]:
    """Validate the architecture entries shared by the ADM UNet and classifier configs; returns the set of
    downsampling factors ds = sample_size // resolution at which attention runs."""
    for name in ("sample_size", "in_channels", "model_channels", "num_res_blocks"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    mults = list(config.channel_mult)
    if not mults or any(not isinstance(m, (int, float)) or int(m * config.model_channels) < 1 for m in mults):
        raise ValueError(f"`channel_mult` must be a non-empty list of positive multipliers; got {mults!r}.")
    resolutions = list(config.attention_resolutions)
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in resolutions):
        raise ValueError(f"`attention_resolutions` must be positive feature-map sizes; got {resolutions!r}.")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1); got {config.dropout!r}.")
    for m in mults:
        width = int(m * config.model_channels)
        if width % GROUPS:
            raise ValueError(f"every level's width must be a multiple of {GROUPS} (GroupNorm); got {width}.")
    if config.rescale_timesteps and (not isinstance(config.num_train_timesteps, int) or config.num_train_timesteps < 1):
        raise ValueError(f"`num_train_timesteps` must be a positive integer; got {config.num_train_timesteps!r}.")
    return {config.sample_size // r for r in resolutions}
