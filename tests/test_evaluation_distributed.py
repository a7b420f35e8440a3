"""Evaluation over processes (evaluation/distributed.py): blocks of work dealt to processes, one noise generator
per sample, and with two real gloo processes (`accelerate launch --multi_gpu --num_processes 2` on the CPU) the
same figures, samples and Analytic-DPM moments as one process; the trainer's periodic evaluation on both ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluate import _save_tiny_pipeline
from test_guidance_evaluate import _save
from test_training import TINY, run_train
from test_training_distributed import ONE_STEP, free_port, launch_two_processes

from ddpm_plus import DDPMPlusPipeline, cli
from ddpm_plus.evaluation import engine
from ddpm_plus.evaluation.distributed import Shard, sample_generators, sample_seed
from ddpm_plus.evaluation.options import EvaluationOptions

pytestmark = pytest.mark.usefixtures("one_thread")

# Figures that may differ between runs: timings, where the files went, and the process count itself.
RUN_KEYS = {"bound_seconds", "num_processes", "sample_grid", "json", "samples_dir", "inception_reference_stats"}


def test_blocks_are_dealt_in_turn_and_cover_every_index_once():
    assert [list(b) for b in Shard(0, 2).blocks(7, 3)] == [[0, 1, 2], [6]]
    assert [list(b) for b in Shard(1, 2).blocks(7, 3)] == [[3, 4, 5]]
    assert [list(b) for b in Shard(0, 1).blocks(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert Shard(1, 3, offset=2).blocks(10, 2) == [range(4, 6)]  # block 2 ((2 + 2) mod 3 = 1); block 5: none
    for world in (1, 2, 3, 5):
        covered = sorted(i for r in range(world) for b in Shard(r, world).blocks(11, 2) for i in b)
        assert covered == list(range(11))
    assert Shard(0, 2).shifted(1).blocks(4, 2) == [range(2, 4)]
    with pytest.raises(ValueError, match="block size"):
        Shard().blocks(3, 0)


def test_each_sample_has_its_own_seed():
    assert sample_seed(0, 5) == sample_seed(0, 5) and sample_seed(0, 5) != sample_seed(0, 6) != sample_seed(1, 5)
    a = [g.initial_seed() for g in sample_generators(3, range(2, 5))]
    assert a == [sample_seed(3, i) for i in (2, 3, 4)]


def test_a_sample_does_not_depend_on_the_batch_it_is_drawn_in(tmp_path):
    """Per-sample generators: sample 3 drawn alone equals sample 3 of a batch of 4 (within one uint8 level: the
    UNet's arithmetic may round differently in another batch size), and the seed changes it."""
    pipe = DDPMPlusPipeline.from_pretrained(_save_tiny_pipeline(tmp_path / "p", size=8))
    pipe.set_progress_bar_config(disable=True)
    options = EvaluationOptions(metrics="bpd", num_samples=4, num_inference_steps=3, batch_size=4)
    batch = engine.sample_uint8(pipe, options, None)
    alone = engine.sample_block(pipe, options, None, range(3, 4))
    assert (batch[3:4].int() - alone.int()).abs().max() <= 1
    reseeded = EvaluationOptions(metrics="bpd", num_samples=4, num_inference_steps=3, batch_size=4, seed=1)
    other = engine.sample_block(pipe, reseeded, None, range(3, 4))
    assert (other.int() - alone.int()).abs().max() > 1


# ---------------------------------------------------------------- two gloo processes


def launch(module_args, timeout=600) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m <module_args>`` on the CPU (gloo)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", *[str(a) for a in module_args],
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_give_the_figures_and_samples_of_one(tmp_path, random_inception_weights):
    """A class-conditional digits pipeline, bound (conditional, respaced) + FID + the digits proxy: 7 samples in
    blocks of 3 (rank 0: samples 0-2 and 6, rank 1: 3-5), the reference statistics computed by both processes
    (a fresh cache), the bound's 6 images split likewise. Every figure and every sample PNG is the same."""
    pipe = _save(tmp_path / "pipe")
    common = ["--metrics", "bpd,fid", "--num_samples", 7, "--batch_size", 3, "--inference_steps", 2,
              "--max_images", 6, "--timesteps_respaced", 3, "--guidance_scale", 2, "--num_threads", 1,
              "--inception_weights", random_inception_weights, "--classifier_cache_dir", tmp_path / "clf",
              "--no_progress"]  # fmt: skip
    runs = {}
    for n in (2, 1):
        out = tmp_path / f"n{n}"
        argv = ["evaluate", pipe, *common, "--stats_cache_dir", out / "cache", "--output_dir", out]
        argv += ["--json", out / "r.json", "--save_samples", out / "png"]
        if n == 2:
            result = launch(["ddpm_plus.evaluate", *argv[1:]])
            assert result.returncode == 0, result.stderr[-4000:]
            assert result.stdout.count("FID@7") == 1  # the table, printed once
        else:
            assert cli.main([str(a) for a in argv]) == 0
        runs[n] = json.loads((out / "r.json").read_text())
    assert runs[2]["num_processes"] == 2 and runs[1]["num_processes"] == 1
    # The bound's model calls are the same (same images, noise and batches), but a one-image oneDNN convolution
    # was seen to round differently (1 ulp of float32) in a launched process: its figures agree to 1e-7.
    # The Fréchet distance is a difference of traces (float64 eigh): here it is ~1e-13, i.e. zero, and its last
    # digits follow the BLAS thread count (the launched processes run with OMP_NUM_THREADS=1): compared to 1e-9.
    bound = {k for k in runs[1] if "bits_per" in k or k == "terms_bpd_mean"} | {"fid"}
    assert {k: v for k, v in runs[2].items() if k not in RUN_KEYS | bound} == {
        k: v for k, v in runs[1].items() if k not in RUN_KEYS | bound
    }
    for key in bound:
        assert runs[2][key] == pytest.approx(runs[1][key], rel=1e-7, abs=1e-9 if key == "fid" else 1e-7), key
    for key in ("bits_per_dim", "fid", "frechet_proxy_samples_vs_train", "sample_class_accuracy"):
        assert isinstance(runs[1][key], float), key
    pngs = {n: sorted((tmp_path / f"n{n}" / "png").iterdir()) for n in (1, 2)}
    assert [p.name for p in pngs[2]] == [p.name for p in pngs[1]] == [f"{i:06d}.png" for i in range(7)]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(pngs[1], pngs[2], strict=True))
    # the reference statistics of the two-process run were computed there, split over both processes
    assert list((tmp_path / "n2" / "cache" / "reference_stats").glob("*.npz"))


@pytest.mark.slow
def test_analytic_moments_over_two_processes_equal_one(tmp_path):
    pipe = _save_tiny_pipeline(tmp_path / "pipe", size=8)
    flags = ["--num_images", 10, "--batch_size", 3, "--num_timesteps", 4, "--num_threads", 1, "--no_progress"]
    result = launch(["ddpm_plus.cli", "analytic", pipe, "--output_dir", tmp_path / "n2", *flags])
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("written to") == 1
    assert cli.main([str(a) for a in ["analytic", pipe, "--output_dir", tmp_path / "n1", *flags]]) == 0
    two, one = (json.loads((tmp_path / n / "analytic_moments.json").read_text()) for n in ("n2", "n1"))
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    # The last block holds one image: one-image oneDNN convolutions were seen to round differently (1 ulp of
    # float32) in a launched process, so Γ agrees to 1e-7 rather than bit for bit.
    assert two["analytic_moments"] == pytest.approx(one["analytic_moments"], rel=1e-7)
    assert [v is None for v in two["stderr"]] == [v is None for v in one["stderr"]]  # None: interpolated
    assert [v for v in two["stderr"] if v is not None] == pytest.approx(
        [v for v in one["stderr"] if v is not None], rel=1e-6
    )
    assert two["max_stderr"] > 0


def _card_evaluation(run: Path) -> tuple[str, list[float]]:
    """The Evaluation section of a training run's model card: (its text without numbers, its numbers)."""
    text = (run / "README.md").read_text()
    section = text[text.index("\n## Evaluation\n") :].split("\n## ")[1]
    number = r"-?\d+\.\d+"
    return re.sub(number, "#", section), [float(x) for x in re.findall(number, section)]


@pytest.mark.slow
def test_the_trainers_evaluation_runs_on_both_processes_and_gives_one_process_figures(tmp_path):
    """One optimizer step (the global batch of 8 as 2 x 4 or 1 x 8), then the periodic evaluation with the
    samples and the bound's images split over both ranks: the model card shows the one-process figures."""
    flags = TINY + ONE_STEP + ["--eval_steps", 1, "--eval_metrics", "bpd", "--eval_num_samples", 4,
                                         "--eval_batch_size", 2, "--eval_max_images", 4, "--eval_bound_timesteps",
                                         3, "--eval_inference_steps", 2, "--stats_cache_dir", tmp_path / "cache"]  # fmt: skip
    result = launch_two_processes(flags + ["--train_batch_size", 4, "--output_dir", tmp_path / "dist"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("evaluation at step 1") == 1  # logged by the main process
    single = run_train(flags + ["--train_batch_size", 8, "--output_dir", tmp_path / "single"])
    assert single["evaluation"]["num_processes"] == 1
    rows = {n: _card_evaluation(tmp_path / n) for n in ("dist", "single")}
    # one process and two give the same update to 1e-6 (test_training_distributed.py), so the same figures to 1e-5
    assert rows["dist"][0] == rows["single"][0] and "| `bits/dim` |" in rows["single"][0]
    assert rows["dist"][1] == pytest.approx(rows["single"][1], rel=1e-5)
    assert torch.isfinite(torch.tensor(single["evaluation"]["bits_per_dim"]))
