"""`--model_type adm`: the trainer trains ddpm_plus.ADMUNetModel with its existing features (class conditioning,
learned variances with the hybrid loss, EMA, exact resume), saves a pipeline that plain
DiffusionPipeline.from_pretrained loads and samples, and refuses UNet2DModel-only flags."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from test_training import TINY, expect_exit, run_train

import ddpm_plus
from ddpm_plus.trainer.args import parse_args, preset_names

ADM = [
    *TINY[: TINY.index("--block_out_channels")],
    *TINY[TINY.index("--layers_per_block") :],
    "--model_type", "adm", "--block_out_channels", 32, 64, "--num_heads", 2, "--resblock_updown",
    "--use_new_attention_order", "--variance_type", "learned_range", "--loss", "hybrid",
    "--class_conditional", "--class_dropout_prob", 0.2, "--use_ema", "--dropout", 0.1,
    "--num_train_timesteps", 50, "--rescale_timesteps", "--checkpointing_steps", 1,
]  # fmt: skip


@pytest.mark.slow
def test_adm_trains_resumes_saves_and_samples(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(ADM + ["--max_train_steps", 2, "--output_dir", straight])
    run_train(ADM + ["--max_train_steps", 1, "--output_dir", resumed])
    run_train(ADM + ["--max_train_steps", 2, "--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    a, b = (load_file(d / "checkpoint-2" / "model.safetensors") for d in (straight, resumed))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)

    pipe = DiffusionPipeline.from_pretrained(straight)
    assert isinstance(pipe.unet, ddpm_plus.ADMUNetModel) and pipe.unet.config.num_class_embeds == 11
    assert pipe.unet.config.out_channels == 2 and pipe.unet.config.rescale_timesteps
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=["3", "7"], guidance_scale=2.0, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--block_out_channels", 16, 32], "multiples of 32"),
        (["--down_block_types", "DownBlock2D", "DownBlock2D"], "drop --down_block_types"),
    ],
)
def test_adm_flag_errors(extra, match, capsys):
    err = expect_exit([*ADM, "--max_train_steps", 1, *extra], capsys)
    assert match in err


def test_adm_cifar10_preset_is_improved_diffusions_cifar10_net():
    assert "adm_cifar10" in preset_names()
    args = parse_args(["--config", "adm_cifar10"])  # validated as parsed
    assert args.model_type == "adm" and args.block_out_channels == [128, 256, 256, 256]
    assert (args.layers_per_block, args.num_train_timesteps, args.variance_type) == (3, 4000, "learned_range")
