"""Multi-node training through accelerate, on loopback: two "machines" (two `accelerate launch --num_machines 2
--machine_rank {0,1} --main_process_ip 127.0.0.1` commands, one gloo process each) train the same weights as one
process with the global batch, checkpoint, and resume to the weights of an uninterrupted run. Plus the shipped
accelerate config files and the Slurm example are well-formed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from test_training import TINY, run_train
from test_training_distributed import ONE_STEP, free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "training" / "configs" / "accelerate"


def launch_two_machines(argv: list, logs: Path, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """The same command on machine ranks 0 and 1 (one process each) against 127.0.0.1; both must succeed.
    Output goes to files under ``logs`` (a pipe left unread could block a process)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "ddpm_plus.train", *map(str, argv),
        ]  # fmt: skip
        with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):  # one machine failed: the other would wait for it
            break
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    results = [
        subprocess.CompletedProcess(
            p.args, p.wait(), (logs / f"rank{r}.out").read_text(), (logs / f"rank{r}.err").read_text()
        )
        for r, p in enumerate(procs)
    ]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(output_dir / f"checkpoint-{step}" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_loopback_machines_train_checkpoint_and_resume_like_one_process(tmp_path):
    two_steps = list(ONE_STEP)
    two_steps[two_steps.index("--max_train_steps") + 1] = 2
    nodes = tmp_path / "nodes"
    results = launch_two_machines(TINY + two_steps + ["--train_batch_size", 4, "--output_dir", nodes], tmp_path / "l1")
    assert "2 processes, 8 images per optimizer step" in results[0].stderr
    assert sorted(p.name for p in (nodes / "checkpoint-1").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]

    single = tmp_path / "single"  # one process with the global batch
    run_train(TINY + two_steps + ["--train_batch_size", 8, "--output_dir", single])
    for step in (1, 2):
        assert_same_weights(weights(nodes, step), weights(single, step))

    # Kill-free interruption: stop after step 1, then both machines resume from checkpoint-1 to step 2.
    resumed = tmp_path / "resumed"
    launch_two_machines(TINY + ONE_STEP + ["--train_batch_size", 4, "--output_dir", resumed], tmp_path / "l2")
    resume = ["--train_batch_size", 4, "--output_dir", resumed, "--resume_from_checkpoint", "latest"]
    launch_two_machines(TINY + two_steps + resume, tmp_path / "l3")
    assert_same_weights(weights(resumed, 2), weights(nodes, 2))


@pytest.mark.parametrize(
    "name, distributed_type, extra",
    [
        ("multi_gpu.yaml", DistributedType.MULTI_GPU, {}),
        ("multi_node.yaml", DistributedType.MULTI_GPU, {"num_machines": 2}),
        ("fsdp2.yaml", DistributedType.FSDP, {}),
        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED, {}),
    ],
)
def test_shipped_accelerate_configs_load(name, distributed_type, extra):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert config.distributed_type == distributed_type
    for key, value in extra.items():
        assert getattr(config, key) == value
    if distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
    if distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2


def test_slurm_example_is_valid_bash_and_launches_accelerate_per_node():
    script = ROOT / "training" / "slurm" / "multi_node.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "accelerate launch" in text and "--machine_rank \\$SLURM_NODEID" in text
    assert "multi_node.yaml" in text and (ACCELERATE_CONFIGS / "multi_node.yaml").is_file()
