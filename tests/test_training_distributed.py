"""Two gloo CPU processes through `accelerate launch --multi_gpu --num_processes 2` (the way to get a real
process group on a CPU-only machine, because accelerate picks the gloo backend only with cpu=True; the trainer builds Accelerator(cpu=True)):
one pipeline is written, every rank saves its state, and the first update equals one process with the
same global batch. Launched through the repository's thin entry point training/train.py, which must keep
working (`accelerate launch -m ddpm_plus.train` is tested in test_training.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import TINY, run_train

TRAIN_PY = Path(__file__).resolve().parents[1] / "training" / "train.py"

# Adam's first step is lr * g / (|g| + eps): with eps = lr = 1e4 the update is ~g itself, so the
# comparison sees the gradient's value, not just its sign. Dropout off; one optimizer step.
ONE_STEP = [
    "--max_train_steps",
    1,
    "--checkpointing_steps",
    1,
    "--dropout",
    0.0,
    "--adam_epsilon",
    1e4,
    "--learning_rate",
    1e4,
    "--lr_scheduler",
    "constant",
    "--lr_warmup_steps",
    0,
    "--adam_weight_decay",
    0.0,
    "--seed",
    7,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Conditional: label dropout is drawn for the global batch and sliced per process like the noise.
CONDITIONAL = ["--class_conditional", "--class_dropout_prob", 0.5]


def launch_two_processes(argv) -> subprocess.CompletedProcess:
    """training/train.py with ``argv`` under `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(TRAIN_PY),
        *[str(a) for a in argv],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], CONDITIONAL], ids=["unconditional", "conditional"])
def test_two_processes_match_one_process_with_the_global_batch(tmp_path, extra):
    dist = tmp_path / "dist"
    result = launch_two_processes(TINY + ONE_STEP + extra + ["--train_batch_size", 4, "--output_dir", dist])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes, 8 images per optimizer step" in result.stderr
    assert result.stdout.count("finished: 1 step, final loss ") == 1  # the summary line, once

    # One pipeline, written once; accelerate's state saved by both ranks.
    assert [p.relative_to(dist).as_posix() for p in dist.rglob("model_index.json")] == ["model_index.json"]
    assert sorted(p.name for p in (dist / "checkpoint-1").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert "2 processes" in (dist / "README.md").read_text()

    single = tmp_path / "single"
    run_train(TINY + ONE_STEP + extra + ["--train_batch_size", 8, "--output_dir", single])
    half = tmp_path / "half"  # rank 0's half of the batch alone: must NOT match
    run_train(TINY + ONE_STEP + extra + ["--train_batch_size", 4, "--output_dir", half])

    w_dist = load_file(dist / "checkpoint-1" / "model.safetensors")
    w_single = load_file(single / "checkpoint-1" / "model.safetensors")
    w_half = load_file(half / "checkpoint-1" / "model.safetensors")
    assert w_dist.keys() == w_single.keys()
    for name in w_dist:
        torch.testing.assert_close(w_dist[name], w_single[name], rtol=0, atol=1e-6, msg=name)
    worst = max((w_dist[n] - w_half[n]).abs().max().item() for n in w_dist)
    assert worst > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flag", "setup"])
def test_an_error_is_printed_once_not_by_every_process(tmp_path, kind):
    """Both processes hit the same error (a bad flag before anything starts; an output_dir that cannot be a
    directory once the process group is formed): LOCAL_RANK 0 prints it, the other exits quietly."""
    if kind == "flag":
        argv, message = ["--output_dir", tmp_path / "run", "--learning_rate", "-1"], "--learning_rate must be"
    else:
        (tmp_path / "file").write_text("")
        argv, message = ["--output_dir", tmp_path / "file" / "run"], "is not a writable directory"
    result = launch_two_processes(TINY + argv)
    assert result.returncode != 0
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
