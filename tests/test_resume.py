"""Exact resume, a run killed while writing a checkpoint, and the stop on a non-finite loss. The faults are
injected from here (a runner script that pauses the checkpoint writer, a wrapped training step); the trainer
has no test hooks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training import TINY, expect_exit, run_train, unet_weights

# 24 images, 2 per process-batch x GA 2 = 4 per optimizer step: 6 steps per epoch, so 8 steps cross an epoch
# boundary and the checkpoint at step 4 lies mid-epoch (resuming skips 8 micro-batches). Dropout, random
# flips/crops (resolution 8 from 10x10 images) and EMA are on, so the RNG and EMA restores are exercised.
RESUME_ARGS = [
    "--train_batch_size",
    2,
    "--gradient_accumulation_steps",
    2,
    "--max_train_steps",
    8,
    "--checkpointing_steps",
    4,
    "--dropout",
    0.1,
    "--random_flip",
    "--use_ema",
    "--ema_max_decay",
    0.9,
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    2,
    "--channels",
    1,
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    from ddpm_plus.data import load_digits_dataset

    folder = tmp_path_factory.mktemp("digits10")
    for i, item in enumerate(load_digits_dataset("train").select(range(24))):
        item["image"].resize((10, 12), Image.Resampling.BILINEAR).save(folder / f"{i:02d}.png")
    return folder


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


def test_resume_continues_the_same_trajectory(tmp_path, image_folder):
    straight = tmp_path / "straight"
    common = TINY + RESUME_ARGS + ["--train_data_dir", image_folder]
    summary = run_train(common + ["--output_dir", straight])
    assert summary["global_step"] == 8

    # The state after 4 of 8 steps, exactly as an interrupted run leaves it; resume from it to step 8.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    resumed_summary = run_train(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert resumed_summary["global_step"] == 8
    assert resumed_summary["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-6)

    assert_same_tensors(unet_weights(straight), unet_weights(resumed))  # the EMA weights
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(load_file(straight / "checkpoint-8" / name), load_file(resumed / "checkpoint-8" / name))
    # The run really moved after the checkpoint (the comparison above is not trivially true).
    before = load_file(straight / "checkpoint-4" / "model.safetensors")
    after = load_file(straight / "checkpoint-8" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_changed_data_layout(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    common = TINY + RESUME_ARGS + ["--train_data_dir", image_folder, "--output_dir", out]
    run_train(common + ["--max_train_steps", 4])
    err = expect_exit(common + ["--resume_from_checkpoint", "latest", "--gradient_accumulation_steps", 1], capsys)
    assert "data layout changed" in err and "samples_per_step: checkpoint 4, now 2" in err


# Runs the trainer with its checkpoint writer paused once checkpoint PAUSE_AT is completely written to
# .tmp-checkpoint-N but not yet renamed: the worst moment to be killed.
PAUSING_RUNNER = textwrap.dedent("""
    import sys, time
    from ddpm_plus.trainer import loop as train

    pause_at, real_write = int(sys.argv[1]), train.write_extra_state

    def write_then_pause(directory, **state):
        real_write(directory, **state)
        if state["global_step"] == pause_at:
            print(f"PAUSED {directory}", flush=True)
            time.sleep(3600)

    train.write_extra_state = write_then_pause
    train.main(sys.argv[2:])
""")


@pytest.mark.slow
def test_killed_while_checkpointing_resumes_from_previous_checkpoint(tmp_path, image_folder):
    out = tmp_path / "run"
    argv = [
        str(a)
        for a in TINY
        + RESUME_ARGS
        + ["--train_data_dir", image_folder, "--output_dir", out, "--checkpointing_steps", 2, "--max_train_steps", 6]
    ]
    runner = tmp_path / "pausing_runner.py"
    runner.write_text(PAUSING_RUNNER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(runner), "4", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    timer = threading.Timer(240, proc.kill)  # never hang the suite
    timer.start()
    try:
        paused = next((line for line in proc.stdout if line.startswith("PAUSED")), None)
        assert paused is not None, "the run ended without reaching checkpoint 4"
        # .tmp-checkpoint-4 is completely written but not yet renamed: kill -9 now.
        assert (out / ".tmp-checkpoint-4" / "training_state.json").is_file()
        proc.kill()
        proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()
    assert proc.returncode == -9
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [".tmp-checkpoint-4", "checkpoint-2"]

    from ddpm_plus.trainer.checkpointing import latest_checkpoint

    assert latest_checkpoint(out) == out / "checkpoint-2"
    summary = run_train(argv + ["--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 6
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    # The killed-and-resumed run ends exactly where an uninterrupted one does.
    straight = tmp_path / "straight"
    run_train([a if a != str(out) else str(straight) for a in argv])
    assert_same_tensors(unet_weights(straight), unet_weights(out))
    assert_same_tensors(
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(out / "checkpoint-6" / "model.safetensors"),
    )


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from ddpm_plus.trainer import loop as train

    out = tmp_path / "run"
    argv = TINY + [
        "--output_dir",
        out,
        "--max_train_steps",
        6,
        "--checkpointing_steps",
        2,
        "--logging_steps",
        3,
        "--use_ema",
    ]
    real_step, calls = train.training_step, []

    def nan_inputs_at_step_3(batch, *args, **kwargs):  # GA 1: call k is optimizer step k
        calls.append(1)
        if len(calls) == 3:
            batch = {**batch, "pixel_values": batch["pixel_values"] * float("nan")}
        return real_step(batch, *args, **kwargs)

    monkeypatch.setattr(train, "training_step", nan_inputs_at_step_3)
    err = expect_exit(argv, capsys)
    # Detected at the step-3 logging point; no checkpoint, grid or pipeline was written after step 3.
    assert "non-finite loss at optimizer step 3" in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    good = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())

    monkeypatch.setattr(train, "training_step", real_step)
    summary = run_train(argv + ["--resume_from_checkpoint", "latest", "--max_train_steps", 6])
    assert summary["global_step"] == 6 and np.isfinite(summary["final_loss"])
    assert all(torch.isfinite(t).all() for t in unet_weights(out).values())


def test_resume_latest_before_any_checkpoint_is_a_seeded_new_run(tmp_path):
    """`--resume_from_checkpoint latest` on a fresh output_dir (how a Slurm job is started) trains exactly the
    run without the flag: the same seed for dropout and noise (it was left unseeded)."""
    common = [*TINY, "--max_train_steps", 2, "--dropout", 0.3, "--seed", 11]
    plain, latest = tmp_path / "plain", tmp_path / "latest"
    run_train(common + ["--output_dir", plain])
    run_train(common + ["--output_dir", latest, "--resume_from_checkpoint", "latest"])
    assert_same_tensors(unet_weights(plain), unet_weights(latest))
