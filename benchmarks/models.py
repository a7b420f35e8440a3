"""The UNets the benchmarks run: the DDPM paper's CIFAR-10 network (35.7M parameters, as in the trainer's
ddpm_cifar10 preset) and a tiny one for CPU runs. Random weights: speed does not depend
on them (no pretrained weights are downloaded)."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),  # attention at 16x16
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),  # up block 2 runs at 16x16
    norm_num_groups=32,
    dropout=0.1,
    attention_head_dim=None,  # one head, as in DDPM
)
TINY = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    dropout=0.1,
    attention_head_dim=None,
)
# The same shapes as trainer flags (for the training benchmark, which builds through ddpm_plus.train).
TRAIN_FLAGS = {
    "cifar10": ["--config", "ddpm_cifar10"],
    "tiny": [
        "--resolution",
        "16",
        "--channels",
        "3",
        "--block_out_channels",
        "32",
        "64",
        "--layers_per_block",
        "1",
        "--attention_resolutions",
        "8",
        "--norm_num_groups",
        "8",
        "--dropout",
        "0.1",
    ],
}


def build(tiny: bool, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**(TINY if tiny else DDPM_CIFAR10))


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
