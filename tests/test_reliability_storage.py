"""Disk full / file-size limit / read-only output_dir: a failing checkpoint or final-pipeline write leaves
nothing half-written that looks valid, keeps the previous checkpoint and ends with an error naming what
failed and where; a read-only output_dir is refused before training. The write failures are real: the
runner script lowers RLIMIT_FSIZE (``ulimit -f``) once a chosen checkpoint is written, so the next larger
file fails with EFBIG exactly as on a full disk; the read-only directory is a read-only tmpfs in a user
namespace (or chmod when not root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_training import TINY, expect_exit, run_train

from ddpm_plus.trainer import run_lock

resource = pytest.importorskip("resource")

LIMITING_RUNNER = textwrap.dedent("""
    import resource, sys
    from ddpm_plus.trainer import loop as train

    after, limit = int(sys.argv[1]), int(sys.argv[2])
    real_write = train.write_extra_state

    def write(directory, **state):
        real_write(directory, **state)
        if state["global_step"] == after:  # from now on no file may exceed `limit` bytes
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    train.write_extra_state = write
    train.main(sys.argv[3:])
""")


def run_limited(tmp_path, argv, after: int, limit: int = 16_000):
    script = tmp_path / "limiting_runner.py"
    script.write_text(LIMITING_RUNNER)
    return subprocess.run(
        [sys.executable, str(script), str(after), str(limit), *map(str, argv)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def names(out):
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(("logs", "samples")))


@pytest.mark.slow
def test_failing_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--output_dir", out, "--max_train_steps", 6, "--checkpointing_steps", 2]
    proc = run_limited(tmp_path, argv, after=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert f"error: could not write checkpoint checkpoint-4 (into {out / '.tmp-checkpoint-4'})" in err
    assert "file size limit" in err and f"The previous checkpoint {out / 'checkpoint-2'} is intact" in err
    assert "Traceback" not in err
    assert names(out) == ["checkpoint-2"]  # no .tmp-checkpoint-4, no pipeline, no lock file
    # What the user does next: fix the cause and resume.
    summary = run_train(argv + ["--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 6


@pytest.mark.slow
def test_failing_final_pipeline_write_leaves_nothing_that_looks_loadable(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--output_dir", out, "--max_train_steps", 2, "--checkpointing_steps", 2]
    proc = run_limited(tmp_path, argv, after=2)  # checkpoint-2 is the last one; then the pipeline fails
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert f"error: could not write the final pipeline to {out}" in err and "file size limit" in err
    assert "--resume_from_checkpoint latest" in err and "Traceback" not in err
    assert names(out) == ["checkpoint-2"]  # no model_index.json, unet/, scheduler/ or .tmp-pipeline
    # Resuming at the last step writes only the pipeline.
    summary = run_train(argv + ["--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 2
    from ddpm_plus import DDPMPlusPipeline

    DDPMPlusPipeline.from_pretrained(out)


def test_save_pipeline_replaces_an_existing_pipeline_atomically(tmp_path, monkeypatch):
    """A failure while the new pipeline is being written leaves the old one loadable and untouched."""
    from diffusers import UNet2DModel

    from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler
    from ddpm_plus.trainer import checkpointing as ckpt

    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    pipe = DDPMPlusPipeline(unet=unet, scheduler=DDPMPlusScheduler())
    ckpt.save_pipeline(pipe, tmp_path)
    before = (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(UNet2DModel, "save_pretrained", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="disk is full") as err:
        ckpt.save_pipeline(pipe, tmp_path)
    assert str(tmp_path) in str(err.value)
    assert not (tmp_path / ckpt.TMP_PIPELINE).exists()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    monkeypatch.undo()
    DDPMPlusPipeline.from_pretrained(tmp_path)


def _read_only_dir_command(tmp_path):
    """A command prefix that runs its arguments with tmp_path/ro read-only, or None where impossible."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro, []
    if shutil.which("unshare"):
        probe = subprocess.run(
            ["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True
        )
        if probe.returncode == 0:
            return ro, ["unshare", "-Urm", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{ro}" && exec "$@"', "sh"]
    return ro, None


@pytest.mark.slow
def test_read_only_output_dir_is_refused_before_training(tmp_path):
    ro, prefix = _read_only_dir_command(tmp_path)
    if prefix is None:
        pytest.skip("running as root without user namespaces: no way to make a read-only directory")
    out = ro / "run" if os.geteuid() != 0 else ro
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "ddpm_plus.train",
        *map(str, TINY),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: output_dir {out} is not a writable directory" in proc.stderr
    assert "nothing was trained" in proc.stderr and "Traceback" not in proc.stderr
    assert "steps:" not in proc.stderr  # refused before the data was loaded and the loop started


def test_unwritable_output_dir_in_process(tmp_path, capsys):
    """The same check in-process: output_dir is an existing file."""
    out = tmp_path / "file"
    out.write_text("not a directory")
    err = expect_exit([*TINY, "--output_dir", out, "--max_train_steps", 1], capsys)
    assert f"output_dir {out} is not a writable directory" in err
    assert not run_lock._HELD
