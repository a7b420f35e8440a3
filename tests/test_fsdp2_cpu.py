"""FSDP2 on this CPU machine. accelerate enables FSDP only for GPU backends (on CPU, `accelerate launch --use_fsdp`
silently runs DDP), so this drives torch's own FSDP2 (``fully_shard`` over a 2-process gloo CPU device mesh) directly:
two hybrid-loss steps of a learned-variance UNet with diffusers' EMAModel over the sharded parameters gives, once the
full state dicts are gathered, the same weights and EMA as one unsharded process with the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp2_step import tiny_unet
from safetensors.torch import load_file
from test_training_distributed import free_port

WORKER = Path(__file__).resolve().parent / "fsdp2_step.py"


@pytest.mark.slow
def test_fsdp2_sharded_step_with_ema_equals_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sharded, single = tmp_path / "fsdp2.safetensors", tmp_path / "single.safetensors"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), "fsdp2", str(sharded),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, str(WORKER), "plain", str(single)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = load_file(sharded), load_file(single)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = tiny_unet().state_dict()
    assert max((a[f"model.{k}"] - v).abs().max().item() for k, v in initial.items()) > 1e-3  # it trained
    assert max((a[f"model.{k}"] - a[f"ema.{k}"]).abs().max().item() for k in initial) > 1e-4  # EMA is its own
