"""Corrupted or foreign files: each gets an error naming the file and the problem (never a traceback from
inside a library, never a hang), and resuming unpickles with ``weights_only=True`` only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_training import TINY, expect_exit, run_train

from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler

ARGS = [*TINY, "--max_train_steps", 2, "--checkpointing_steps", 2, "--use_ema", "--ema_max_decay", 0.9]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    run_train([*ARGS, "--output_dir", out])
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


CORRUPTIONS = {
    "truncated model.safetensors": ("model.safetensors", truncate, "not a complete safetensors file"),
    "garbage ema.safetensors": ("ema.safetensors", lambda p: p.write_bytes(b"\x00garbage" * 50), "not a complete safetensors file"),
    "malformed training_state.json": ("training_state.json", lambda p: p.write_text('{"global_step": '), "not valid JSON"),
    "foreign training_state.json": ("training_state.json", lambda p: p.write_text('{"step": 2}'), "no valid global_step"),
    "malformed lr_scheduler.json": ("lr_scheduler.json", lambda p: p.write_text("[1, 2"), "not valid JSON"),
    "missing optimizer.bin": ("optimizer.bin", lambda p: p.unlink(), "incomplete: missing optimizer.bin"),
    "missing ema.json": ("ema.json", lambda p: p.unlink(), "incomplete: missing ema.json"),
    "truncated optimizer.bin": ("optimizer.bin", truncate, "is truncated or not a file written by torch.save"),
    "empty random_states_0.pkl": ("random_states_0.pkl", lambda p: p.write_bytes(b""), "random_states_0.pkl"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_names_the_file_and_the_problem(run_copy, capsys, case):
    name, corrupt, problem = CORRUPTIONS[case]
    corrupt(run_copy / "checkpoint-2" / name)
    err = expect_exit(
        [*ARGS, "--output_dir", run_copy, "--resume_from_checkpoint", "latest", "--max_train_steps", 4], capsys
    )
    assert str(run_copy / "checkpoint-2") in err and name in err and problem in err, err
    assert "Traceback" not in err


class Evil:
    def __reduce__(self):
        return (print, ("UNPICKLED ARBITRARY CODE",))


def test_resume_unpickles_with_weights_only(run_copy, capsys, monkeypatch):
    """Every torch.load during a resume runs with weights_only=True; a pickle that needs arbitrary code is
    refused with an error naming the checkpoint instead of being executed."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resume = [*ARGS, "--output_dir", run_copy, "--resume_from_checkpoint", "latest", "--max_train_steps", 2]
    assert run_train(resume)["global_step"] == 2
    assert calls and all(w is True for w in calls), calls

    states = run_copy / "checkpoint-2" / "random_states_0.pkl"
    torch.save({"evil": Evil()}, states)
    err = expect_exit(resume, capsys)
    assert "UNPICKLED ARBITRARY CODE" not in err + capsys.readouterr().out
    assert f"checkpoint file {states} cannot be loaded with weights_only=True" in err, err
    assert "Unsupported global: GLOBAL print" in err


def test_corrupted_pipeline_files_name_the_file(trained, tmp_path):
    """Loading the final pipeline: diffusers' own errors already name the file (OSError), ours the config key."""
    cases = {
        "scheduler/scheduler_config.json": lambda p: p.write_text("{not json"),
        "model_index.json": lambda p: p.write_text('{"_class_name": '),
        "unet/diffusion_pytorch_model.safetensors": truncate,
    }
    for name, corrupt in cases.items():
        d = tmp_path / name.replace("/", "_")
        shutil.copytree(trained, d)
        corrupt(d / name)
        with pytest.raises(OSError) as err:
            DDPMPlusPipeline.from_pretrained(d)
        assert str(d / name) in str(err.value), (name, str(err.value))


@pytest.mark.parametrize("T", [10**9, 1e9, -5, "1000"])
def test_absurd_num_train_timesteps_in_a_saved_config(trained, tmp_path, T):
    d = tmp_path / "sched"
    shutil.copytree(trained / "scheduler", d)
    config = json.loads((d / "scheduler_config.json").read_text())
    (d / "scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": T}))
    with pytest.raises(ValueError, match="num_train_timesteps"):  # not a 7.5 GiB MemoryError
        DDPMPlusScheduler.from_pretrained(d)
