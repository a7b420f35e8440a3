"""The trainer (ddpm_plus.train) end to end on the bundled digits, flags/config files/presets/validation, the
LR schedule under gradient accumulation, float32 noising under bf16 autocast, its entry points
(`ddpm-plus train`, `accelerate launch -m ddpm_plus.train`), Hub pushes and the Hub token's secrecy.

Helpers here (TINY, run_train, expect_exit) are imported by test_resume.py and test_training_distributed.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

# A 0.03M-parameter UNet at the digits' native 8x8, with attention at 4x4 so attention layers are covered;
# no EMA and every checkpoint kept unless a test asks.
TINY = [
    "--resolution",
    "8",
    "--channels",
    "1",
    "--block_out_channels",
    "16",
    "32",
    "--layers_per_block",
    "1",
    "--attention_resolutions",
    "4",
    "--norm_num_groups",
    "8",
    "--train_batch_size",
    "8",
    "--learning_rate",
    "1e-3",
    "--lr_warmup_steps",
    "2",
    "--logging_steps",
    "1",
    "--eval_batch_size",
    "4",
    "--eval_inference_steps",
    "4",
    "--save_images_steps",
    "0",
    "--logger",
    "none",
    "--no-use_ema",
    "--checkpoints_total_limit",
    "0",
]


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state so the next Accelerator may use other settings."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_train(argv) -> dict:
    """ddpm_plus.train's main, in this process; returns its summary. One intra-op thread: these tiny
    models are dominated by thread synchronisation, which a busy 2-core machine makes very slow."""
    from ddpm_plus.trainer import loop as train

    reset_accelerate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()


def expect_exit(argv, capsys) -> str:
    """Run main expecting a non-zero exit; returns stderr."""
    with pytest.raises(SystemExit) as info:
        run_train(argv)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err


def unet_weights(directory) -> dict:
    return load_file(Path(directory) / "unet" / "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------------------ end to end


def test_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    summary = run_train(
        TINY
        + [
            "--output_dir",
            out,
            "--max_train_steps",
            4,
            "--checkpointing_steps",
            2,
            "--save_images_steps",
            2,
            "--use_ema",
            "--ema_max_decay",
            "0.9",
            "--logger",
            "tensorboard",
        ]
    )
    assert summary["global_step"] == 4 and math.isfinite(summary["final_loss"]) and summary["images_per_s"] > 0
    # One summary line at the end, on stdout: steps, the final loss, where the pipeline is.
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"finished: 4 steps, final loss {summary['final_loss']:.4g}, saved to {out}"
    assert sum(line.startswith("finished:") for line in lines) == 1

    # The pipeline at the root, safetensors only; checkpoints, logs, samples, card beside it.
    assert (out / "model_index.json").is_file()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPlusPipeline"
    pipeline_files = [p for d in ("unet", "scheduler") for p in (out / d).iterdir()]
    weights = [p.name for p in pipeline_files if p.suffix not in (".json",)]
    assert weights == ["diffusion_pytorch_model.safetensors"]
    assert not [
        p
        for p in out.rglob("*")
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt") and not p.parent.name.startswith("checkpoint-")
    ]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    card = (out / "README.md").read_text()
    assert "import ddpm_plus" in card and "unconditional-image-generation" in card
    assert "samples/step-4.png" in card

    # EMA weights went into the pipeline; its config carries no EMA keys.
    config = json.loads((out / "unet" / "config.json").read_text())
    assert not {"decay", "min_decay", "optimization_step", "inv_gamma", "power", "use_ema_warmup"} & set(config)
    saved = unet_weights(out)
    ema = load_file(out / "checkpoint-4" / "ema.safetensors")
    raw = load_file(out / "checkpoint-4" / "model.safetensors")
    from diffusers import UNet2DModel

    names = [n for n, _ in UNet2DModel.from_config(config).named_parameters()]  # shadow.i follows parameters()
    assert len(ema) == len(names) == len(raw)
    for i, name in enumerate(names):
        torch.testing.assert_close(saved[name], ema[f"shadow.{i}"], rtol=0, atol=0)
    assert any(not torch.equal(saved[n], raw[n]) for n in names)

    # A plain DiffusionPipeline.from_pretrained (after `import ddpm_plus`) loads it and samples.
    from diffusers import DiffusionPipeline

    import ddpm_plus

    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, ddpm_plus.DDPMPlusPipeline)
    assert isinstance(pipe.scheduler, ddpm_plus.DDPMPlusScheduler)
    images = pipe(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


# ------------------------------------------------------------------------------------------ flags


def test_config_file_then_command_line_override(tmp_path):
    from ddpm_plus.trainer.args import parse_args

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "resolution: 16\nlearning_rate: 0.01\nrandom_flip: true\nuse_ema: true\n"
        "block_out_channels: [32, 64]\nattention_resolutions: []\nsnr_gamma: null\n"
    )
    args = parse_args(["--config", str(yaml_file), "--learning_rate", "0.02", "--no-random_flip"])
    assert (args.resolution, args.learning_rate, args.random_flip, args.use_ema) == (16, 0.02, False, True)
    assert args.block_out_channels == [32, 64] and args.down_block_types == ["DownBlock2D", "DownBlock2D"]
    assert args.snr_gamma is None

    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"resolution": 8, "block_out_channels": [32, 64], "attention_resolutions": [4]}))
    args = parse_args(["--config", str(json_file), "--resolution", "16", "--attention_resolutions", "16"])
    assert args.resolution == 16 and args.down_block_types == ["AttnDownBlock2D", "DownBlock2D"]
    args = parse_args(["--config", str(json_file)])
    assert args.down_block_types == ["DownBlock2D", "AttnDownBlock2D"]
    assert args.up_block_types == ["AttnUpBlock2D", "UpBlock2D"]


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("resolution: 8\nlearning_rat: 0.1\nbogus: 1\n", "unknown key(s) bogus, learning_rat"),
        ("resolution: eight\n", "argument --resolution: invalid int value: 'eight'"),
        ("prediction_type: eps\n", "argument --prediction_type: "),
        ("use_ema: 1\n", "use_ema must be true or false"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_config_file_errors(tmp_path, capsys, config_text, message):
    from ddpm_plus.trainer.args import parse_args

    file = tmp_path / "c.yaml"
    file.write_text(config_text)
    with pytest.raises(SystemExit):
        parse_args(["--config", str(file)])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resolution", "0"], "--resolution must be >= 1"),
        (
            ["--loss", "hybrid"],
            "argument --loss/--variance_type: loss_type='hybrid' trains the variance and needs variance_type "
            "'learned' or 'learned_range', got variance_type='fixed_small'",
        ),
        (
            ["--variance_type", "learned_range"],
            "argument --loss/--variance_type: variance_type='learned_range' is learned and needs loss_type 'hybrid' "
            "or 'vlb' to train it, got loss_type='simple'",
        ),
        (["--variance_type", "fixed_tiny"], "argument --variance_type: "),
        (["--beta_schedule", "cubic"], "argument --beta_schedule: "),
        (["--beta_start", "0.03", "--beta_end", "0.02"], "argument --beta_start/--beta_end: "),
        (["--resolution", "8", "--attention_resolutions", "3"], "--attention_resolutions [3] not among"),
        (["--block_out_channels", "30", "64"], "multiples of --norm_num_groups (8)"),
        (["--resolution", "10"], "--resolution 10 must be divisible by"),
        (["--eval_inference_steps", "2000"], "argument --eval_inference_steps: "),
        (
            ["--dataset_name", "x", "--train_data_dir", "."],
            "argument --dataset_name/--train_data_dir: give at most one of dataset_name and train_data_dir",
        ),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--ema_decay", "1.5"], "--ema_decay must be in [0, 1)"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
        (["--down_block_types", "DownBlock2D"], "must be given together"),
        (["--resume_from_checkpoint", "/nonexistent"], "'latest' or a checkpoint directory"),
        (["--model_config_name_or_path", "/nonexistent"], "not a local directory or JSON file"),
        (
            ["--num_train_timesteps", "100", "--rescale_betas_for_num_timesteps", "--beta_end", "0.2"],
            "argument --rescale_betas_for_num_timesteps: ",
        ),
        (
            ["--config", "no_such_preset"],
            "neither a file nor a preset (presets: adm_cifar10, ddpm_cifar10, digits, digits_cond, iddpm_cifar10",
        ),
    ],
)
def test_validation_errors(capsys, argv, message):
    from ddpm_plus.trainer.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_iddpm_preset_is_the_improved_ddpm_recipe(capsys):
    from ddpm_plus.trainer.args import parse_args

    args = parse_args(["--config", "iddpm_cifar10"])
    assert (args.loss, args.variance_type, args.num_train_timesteps, args.beta_schedule, args.dropout) == (
        "hybrid",
        "learned_range",
        4000,
        "squaredcos_cap_v2",
        0.3,
    )
    assert (args.learning_rate, args.train_batch_size, args.max_train_steps) == (1e-4, 128, 500000)
    with pytest.raises(SystemExit):  # the objectives need the variance channels
        parse_args(["--config", "iddpm_cifar10", "--variance_type", "fixed_small"])
    assert "--variance_type" in capsys.readouterr().err


def test_defaults_are_the_digits_preset(tmp_path, monkeypatch):
    """Without --config the trainer trains exactly the digits preset, found by name or by path."""
    from ddpm_plus.trainer.args import parse_args, preset_names, resolve_config

    assert {"digits", "ddpm_cifar10", "iddpm_cifar10"} <= set(preset_names())
    defaults = vars(parse_args([]))
    for config in ("digits", "digits.yaml", str(resolve_config("digits"))):
        preset = vars(parse_args(["--config", config]))
        assert {k: v for k, v in preset.items() if k != "config"} == {
            k: v for k, v in defaults.items() if k != "config"
        }
    assert (defaults["resolution"], defaults["channels"], defaults["block_out_channels"]) == (8, 1, [32, 64, 64])
    assert defaults["dataset_name"] is None and defaults["train_data_dir"] is None  # the bundled digits
    (tmp_path / "digits.yaml").write_text("resolution: 16\n")  # a file path wins over the preset name
    monkeypatch.chdir(tmp_path)
    assert parse_args(["--config", "digits.yaml"]).resolution == 16


def test_ddpm_cifar10_preset_is_the_paper_recipe():
    from ddpm_plus.trainer.args import parse_args
    from ddpm_plus.trainer.loop import build_scheduler, build_unet

    args = parse_args(["--config", "ddpm_cifar10"])
    unet = build_unet(args)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307  # 35.7M, as in the paper
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert (unet.config.dropout, unet.config.in_channels, unet.config.out_channels) == (0.1, 3, 3)
    scheduler = build_scheduler(args)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"
    assert float(scheduler.betas[0]) == pytest.approx(1e-4) and float(scheduler.betas[-1]) == pytest.approx(0.02)
    assert (scheduler.config.prediction_type, scheduler.config.variance_type) == ("epsilon", "fixed_large")
    expected = {
        "dataset_name": "cifar10",
        "image_column": "img",
        "resolution": 32,
        "random_flip": True,
        "learning_rate": 2e-4,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 5000,
        "adam_weight_decay": 0.0,
        "train_batch_size": 128,
        "use_ema": True,
        "ema_decay": 0.9999,
        "max_grad_norm": 1.0,
        "max_train_steps": 800_000,
        "loss": "simple",
        "allow_tf32": True,
        "channels_last": True,
        "compile": True,
    }
    assert {k: getattr(args, k) for k in expected} == expected


def test_learned_variance_unet_has_twice_the_channels(tmp_path):
    from ddpm_plus.trainer.args import parse_args
    from ddpm_plus.trainer.loop import build_unet

    args = parse_args(
        [
            "--resolution",
            "8",
            "--block_out_channels",
            "32",
            "32",
            "--variance_type",
            "learned_range",
            "--loss",
            "hybrid",
            "--attention_resolutions",
        ]
    )
    assert (args.channels, build_unet(args).config.out_channels) == (1, 2)
    # --model_config_name_or_path: a local config whose channels must fit.
    unet = build_unet(args)
    unet.save_config(tmp_path)
    args2 = parse_args(
        [
            "--resolution",
            "16",
            "--variance_type",
            "learned_range",
            "--loss",
            "hybrid",
            "--model_config_name_or_path",
            str(tmp_path),
        ]
    )
    loaded = build_unet(args2)
    assert (loaded.config.out_channels, loaded.config.sample_size) == (2, 16)
    args3 = parse_args(["--resolution", "8", "--model_config_name_or_path", str(tmp_path)])
    with pytest.raises(ValueError, match="in_channels/out_channels are 1/2"):
        build_unet(args3)


def test_too_small_dataset_is_refused_before_training(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    err = expect_exit(TINY + ["--output_dir", out, "--train_data_dir", folder, "--max_train_steps", 1], capsys)
    assert "3 readable image(s)" in err and "= 8 images" in err
    assert not (out / "model_index.json").exists() and not list(out.glob("checkpoint-*"))


def test_corrupt_image_is_named_before_training(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8), 20 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "run"
    err = expect_exit(TINY + ["--output_dir", out, "--train_data_dir", folder, "--max_train_steps", 1], capsys)
    assert "broken.png" in err and "one optimizer step needs" not in err
    assert not (out / "model_index.json").exists()


def test_summary_line_of_a_run_that_trained_nothing():
    from ddpm_plus.trainer.outputs import summary_line

    trained = {"global_step": 1500, "final_loss": 0.031249}
    assert summary_line(trained, "out/dir") == "finished: 1500 steps, final loss 0.03125, saved to out/dir"
    assert summary_line({"global_step": 1, "final_loss": 2.0}, "d") == "finished: 1 step, final loss 2, saved to d"
    resumed_at_the_end = {"global_step": 1500, "final_loss": float("nan")}
    assert summary_line(resumed_at_the_end, "d") == "finished: 1500 steps, no step trained in this run, saved to d"


@pytest.mark.parametrize("local_rank, shown", [(None, True), ("0", True), ("1", False)])
def test_errors_are_printed_by_the_first_process_of_each_machine_only(tmp_path, capsys, monkeypatch, local_rank, shown):
    """Under `accelerate launch` every process hits the same flag or setup error: LOCAL_RANK 0 prints it, the
    others exit with the same status quietly (the launch itself: test_training_distributed.py)."""
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SystemExit) as info:
        run_train(TINY + ["--output_dir", tmp_path / "run", "--learning_rate", "-1"])
    assert info.value.code == 2
    flag_error = capsys.readouterr()
    assert ("--learning_rate must be a positive number" in flag_error.err) == shown
    assert shown or flag_error.err == flag_error.out == ""

    # An error train() raises on every process (here without forming a process group, which LOCAL_RANK asks for).
    from ddpm_plus.trainer import loop, run_lock

    def locked(args):
        raise run_lock.OutputDirLockedError(f"output_dir {args.output_dir} is locked by another run")

    monkeypatch.setattr(loop, "train", locked)
    with pytest.raises(SystemExit) as info:
        run_train(TINY + ["--output_dir", tmp_path / "run"])
    assert info.value.code == 1
    setup_error = capsys.readouterr()
    assert (f"error: output_dir {tmp_path / 'run'} is locked by another run" in setup_error.err) == shown
    assert shown or setup_error.err == setup_error.out == ""


def test_world_size_without_process_group_is_refused(monkeypatch):
    from ddpm_plus.trainer import components
    from ddpm_plus.trainer.args import parse_args

    class SingleProcessAccelerator:
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(components, "Accelerator", SingleProcessAccelerator)
    with pytest.raises(SystemExit, match="WORLD_SIZE=2 but accelerate formed a single process"):
        components.build_accelerator(parse_args(["--output_dir", "unused"]))


# ------------------------------------------------------------------------------------------ schedule, precision


def test_lr_schedule_counts_optimizer_steps_under_accumulation(tmp_path):
    """GA=4: warmup of 3 optimizer steps (12 micro-batches) reaches the peak lr exactly at optimizer step 3,
    and linear decay reaches 0 at --max_train_steps (optimizer steps)."""
    out = tmp_path / "run"
    lr = 1e-3
    run_train(
        TINY
        + [
            "--output_dir",
            out,
            "--train_batch_size",
            2,
            "--gradient_accumulation_steps",
            4,
            "--lr_scheduler",
            "linear",
            "--lr_warmup_steps",
            3,
            "--learning_rate",
            lr,
            "--max_train_steps",
            5,
            "--checkpointing_steps",
            1,
        ]
    )
    last_lr = {}
    for step in range(1, 6):
        state = json.loads((out / f"checkpoint-{step}" / "lr_scheduler.json").read_text())
        assert state["last_epoch"] == step  # one scheduler step per optimizer step
        last_lr[step] = state["_last_lr"][0]
    assert last_lr[1] == pytest.approx(lr / 3) and last_lr[2] == pytest.approx(2 * lr / 3)
    assert last_lr[3] == lr
    assert last_lr[4] == pytest.approx(lr / 2) and last_lr[5] == 0.0


def test_noising_and_loss_are_float32_under_bf16_autocast(monkeypatch):
    """Under bf16 mixed precision the UNet runs in bf16 but sees x_t computed in float32: at t = 0,
    x_t - sqrt(abar_0) x_0 = sqrt(1 - abar_0) eps to float32 precision (bf16 noising would lose it)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from ddpm_plus.trainer import loop as train
    from ddpm_plus.trainer import step as step_module
    from ddpm_plus.trainer.args import parse_args

    args = parse_args(TINY + ["--output_dir", "unused"])
    reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        unet = train.build_unet(args)
        scheduler = train.build_scheduler(args)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        lr_scheduler = get_scheduler("constant", optimizer)
        unet, optimizer = accelerator.prepare(unet, optimizer)

        real_draw = step_module.draw_noise_and_timesteps
        drawn = {}

        def draw_with_t0(*a, **k):
            noise, timesteps, weights = real_draw(*a, **k)
            timesteps = timesteps.clone()
            timesteps[::2] = 0
            drawn.update(noise=noise, timesteps=timesteps)
            return noise, timesteps, weights

        seen = {}
        unet.register_forward_pre_hook(lambda m, inp: seen.update(x_t=inp[0], t=inp[1]))
        accelerator.unwrap_model(unet).conv_in.register_forward_hook(lambda m, i, out: seen.update(out_dtype=out.dtype))
        monkeypatch.setattr(step_module, "draw_noise_and_timesteps", draw_with_t0)
        x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
        result = train.training_step(
            {"pixel_values": x0}, unet, scheduler, optimizer, lr_scheduler, accelerator, step_seed=123
        )
    finally:
        reset_accelerate()

    assert seen["out_dtype"] == torch.bfloat16  # autocast was on inside the model
    assert seen["x_t"].dtype == torch.float32 and result.loss.dtype == torch.float32
    abar = scheduler.alphas_cumprod.to(torch.float64)[drawn["timesteps"]].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * drawn["noise"].double()
    torch.testing.assert_close(seen["x_t"].double(), expected, rtol=0, atol=2e-6)
    at_t0 = drawn["timesteps"] == 0
    diff = seen["x_t"][at_t0].double() - math.sqrt(float(scheduler.alphas_cumprod[0])) * x0[at_t0].double()
    torch.testing.assert_close(
        diff, math.sqrt(1 - float(scheduler.alphas_cumprod[0])) * drawn["noise"][at_t0].double(), rtol=0, atol=2e-6
    )
    # The same noising in bf16 is off by far more than that tolerance at t = 0 (why it must be float32).
    bf16 = (
        math.sqrt(float(scheduler.alphas_cumprod[0])) * x0[at_t0].bfloat16()
        + math.sqrt(1 - float(scheduler.alphas_cumprod[0])) * drawn["noise"][at_t0].bfloat16()
    )
    assert (bf16.double() - expected[at_t0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ Hub


def test_failed_push_exits_nonzero_and_keeps_local_files(tmp_path, capsys, hub_server, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "run"
    err = expect_exit(
        TINY
        + ["--output_dir", out, "--max_train_steps", 1, "--push_to_hub", "--hub_model_id", f"{hub_server.user}/nope"],
        capsys,
    )
    assert "no Hugging Face token" in err and "intact" in err
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "checkpoint-1"):
        assert (out / name).exists(), name


@pytest.mark.parametrize("loss", ["hybrid", "vlb"])
def test_learned_variance_objectives_train_and_checkpoint(tmp_path, loss):
    out = tmp_path / loss
    summary = run_train(
        TINY
        + [
            "--output_dir",
            out,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            1,
            "--variance_type",
            "learned_range",
            "--loss",
            loss,
        ]
    )
    assert summary["global_step"] == 2 and math.isfinite(summary["final_loss"])
    assert json.loads((out / "unet" / "config.json").read_text())["out_channels"] == 2
    sampler_state = out / "checkpoint-2" / "importance_sampler.safetensors"
    assert sampler_state.is_file() == (loss == "vlb")
    if loss == "vlb":  # the loss-aware sampler's history (8 samples per step) is checkpointed and restored
        assert int(load_file(sampler_state)["counts"].sum()) == 16
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
        run_train(
            TINY
            + [
                "--output_dir",
                resumed,
                "--max_train_steps",
                2,
                "--checkpointing_steps",
                1,
                "--variance_type",
                "learned_range",
                "--loss",
                loss,
                "--resume_from_checkpoint",
                "latest",
            ]
        )
        for name in ("importance_sampler.safetensors", "model.safetensors"):
            a, b = load_file(out / "checkpoint-2" / name), load_file(resumed / "checkpoint-2" / name)
            assert all(torch.equal(a[k], b[k]) for k in a)
    from diffusers import DiffusionPipeline

    import ddpm_plus  # noqa: F401

    images = DiffusionPipeline.from_pretrained(out)(
        batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert np.isfinite(images).all()


def test_push_at_checkpoints_and_at_the_end(tmp_path, hub_server, hf_token, hub_repo_id):
    out = tmp_path / "run"
    run_train(
        TINY
        + [
            "--output_dir",
            out,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            1,
            "--push_to_hub",
            "--push_checkpoints",
            "--hub_model_id",
            hub_repo_id,
            "--hub_private_repo",
        ]
    )
    files = hub_server.files(hub_repo_id)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "samples/step-2.png"} <= set(
        files
    )
    assert not [p for p in files if "checkpoint" in p or p.startswith("logs/") or p.endswith((".bin", ".pkl"))]
    assert (
        files["unet/diffusion_pytorch_model.safetensors"]
        == (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert len(hub_server.repos[hub_repo_id].commits) >= 2  # the step-1 checkpoint push, then the final one


def test_train_push_then_load_repo_id_in_fresh_cache(tmp_path, hub_server, hf_token, hub_repo_id):
    """The issue's end to end: train on the bundled digits -> push -> DiffusionPipeline.from_pretrained("user/repo")
    in an empty cache -> the same images as the local pipeline for a fixed generator."""
    from diffusers import DiffusionPipeline

    import ddpm_plus

    out = tmp_path / "run"
    run_train(
        TINY
        + ["--output_dir", out, "--max_train_steps", 2, "--use_ema", "--push_to_hub", "--hub_model_id", hub_repo_id]
    )
    local = DiffusionPipeline.from_pretrained(out)
    remote = DiffusionPipeline.from_pretrained(hub_repo_id, cache_dir=tmp_path / "fresh-cache")
    assert type(remote) is ddpm_plus.DDPMPlusPipeline and type(remote.scheduler) is ddpm_plus.DDPMPlusScheduler
    images = []
    for pipe in (local, remote):
        pipe.set_progress_bar_config(disable=True)
        images.append(
            pipe(
                batch_size=2, num_inference_steps=5, output_type="pt", generator=torch.Generator().manual_seed(0)
            ).images
        )
    assert torch.equal(images[0], images[1])
    assert any((tmp_path / "fresh-cache").rglob("diffusion_pytorch_model.safetensors"))


def test_hub_token_never_reaches_a_file_a_log_or_the_hub(
    tmp_path, capsys, caplog, hub_server, hub_repo_id, monkeypatch
):
    """Regression: `--hub_token` used to be written in plain text into the tracker config (TensorBoard's
    logs/train/hparams.yml; wandb would upload it). Now no file under output_dir, no log line, no output
    and no pushed file holds it, the push still uses it, and a warning says command lines are visible."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token = hub_server.token
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    run_train(
        TINY
        + [
            "--output_dir",
            out,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            1,
            "--use_ema",
            "--save_images_steps",
            1,
            "--logger",
            "tensorboard",
            "--push_to_hub",
            "--push_checkpoints",
            "--hub_model_id",
            hub_repo_id,
            "--hub_token",
            token,
        ]
    )
    assert list((out / "logs").rglob("hparams.yml")) and list((out / "logs").rglob("events.out.tfevents.*"))
    assert [p for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()] == []
    captured = capsys.readouterr()
    assert token not in caplog.text and token not in captured.out and token not in captured.err
    assert "visible to other users of this machine" in caplog.text
    pushed = hub_server.files(hub_repo_id)
    assert "unet/diffusion_pytorch_model.safetensors" in pushed  # the push used the token
    assert not [name for name, data in pushed.items() if token.encode() in data]


def test_ddpm_plus_train_subcommand(tmp_path, capsys):
    from ddpm_plus import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    flat = " ".join(help_text.split())  # argparse wraps the preset list anywhere
    assert help_text.startswith("usage: ddpm-plus train")
    assert "adm_cifar10, ddpm_cifar10, digits, digits_cond, iddpm_cifar10" in flat

    out = tmp_path / "run"
    reset_accelerate()
    try:
        assert cli.main(["train", *map(str, TINY), "--output_dir", str(out), "--max_train_steps", "1"]) == 0
    finally:
        reset_accelerate()
    assert (out / "model_index.json").is_file() and (out / "checkpoint-1").is_dir()


def test_missing_train_extras_name_the_extra(monkeypatch):
    from ddpm_plus import cli

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if `pip install ddpm-plus` without [train]
    for name in [m for m in sys.modules if m == "ddpm_plus.train" or m.startswith("ddpm_plus.trainer")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--max_train_steps", "1"])
    message = str(info.value.code)
    assert 'pip install "ddpm-plus[train]"' in message and "accelerate" in message


@pytest.mark.slow
def test_accelerate_launch_module_from_outside_the_checkout(tmp_path):
    """`accelerate launch -m ddpm_plus.train --config digits` from a directory that is not the checkout: the
    installed package and its packaged presets, nothing from the repository's folders."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ddpm_plus.train",
        "--config",
        "digits",
        "--max_train_steps",
        "2",
        "--output_dir",
        "X",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1437 images, 1 processes, 64 images per optimizer step" in result.stderr
    out = tmp_path / "X"
    assert (out / "model_index.json").is_file() and (out / "samples" / "step-2.png").is_file()
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [32, 64, 64]
