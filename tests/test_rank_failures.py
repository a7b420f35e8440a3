"""A failure on one process of a multi-process run stops every process, with the message printed once
(ddpm_plus/trainer/collective_errors.py). Two gloo processes under `accelerate launch`; the fault is injected
in ONE process by a runner script written here (it monkeypatches that process only, then calls the trainer's
``main``): a checkpoint write fails with ENOSPC on rank 1, then resuming from the previous checkpoint on rank 1;
the final pipeline and a sample grid on rank 0; the evaluation setup on rank 1. Each process records how it
ended in a status file, so the test sees every process's exit, not just the launcher's. The subprocess timeout
(240 s) is far below the process group's (30 minutes): a process left waiting at a collective fails the test
instead of hanging it. The mechanism itself is also tested in this process, with a fake accelerator."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_training import TINY
from test_training_distributed import free_port

from ddpm_plus.trainer import checkpointing as ckpt
from ddpm_plus.trainer.collective_errors import RankFailedError, all_or_none

RUNNER = textwrap.dedent("""
    import errno, os, sys
    from pathlib import Path

    fault, fail_rank, status_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ["RANK"])
    (status_dir / f"pid-{rank}").write_text(str(os.getpid()))  # torchrun starts each worker in its own session
    full = OSError(errno.ENOSPC, "No space left on device")
    if rank == fail_rank and fault == "checkpoint":  # checkpoint-4 fails on this rank only
        from accelerate import Accelerator
        real_save_state = Accelerator.save_state

        def save_state(self, output_dir=None, **kwargs):
            if output_dir.endswith("-4"):
                raise OSError(errno.ENOSPC, "No space left on device", output_dir)
            return real_save_state(self, output_dir, **kwargs)

        Accelerator.save_state = save_state
    elif rank == fail_rank and fault == "pipeline":
        from diffusers import DiffusionPipeline

        def save_pretrained(self, *args, **kwargs):
            raise full

        DiffusionPipeline.save_pretrained = save_pretrained
    elif rank == fail_rank and fault == "samples":
        from ddpm_plus.trainer import loop as patched

        def save_sample_grid(*args, **kwargs):
            raise full

        patched.save_sample_grid = save_sample_grid
    elif rank == fail_rank and fault == "resume":
        from accelerate import Accelerator

        def load_state(self, *args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")

        Accelerator.load_state = load_state
    elif rank == fail_rank and fault == "evaluation":  # inside the real PeriodicEvaluation.setup
        from ddpm_plus.trainer import periodic_evaluation

        def load_eval_images(*args, **kwargs):
            raise ValueError("the evaluation images cannot be read: injected fault")

        periodic_evaluation.load_eval_images = load_eval_images

    from ddpm_plus.trainer import loop
    try:
        loop.main(sys.argv[4:])
    except SystemExit as e:
        (status_dir / f"rank-{rank}").write_text(f"{e.code} {type(e.__cause__).__name__}")
        raise
    (status_dir / f"rank-{rank}").write_text("0 None")
""")

TIMEOUT_S = 240  # a hang is a failure, long before the process group's 30-minute timeout
ARGV = [*TINY, "--train_batch_size", 4, "--max_train_steps", 4, "--checkpointing_steps", 2]


def launch_with_fault(tmp_path, fault: str, fail_rank: int, argv) -> tuple[int, str, dict]:
    """The runner under `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU); returns the
    launcher's exit status, stderr and {rank: 'code cause'} from the status files. The whole process group is
    killed (and the test fails) after TIMEOUT_S."""
    script, status = tmp_path / "fault_runner.py", tmp_path / "status"
    script.write_text(RUNNER)
    status.mkdir()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), fault, str(fail_rank), str(status), *map(str, argv),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid_file in status.glob("pid-*"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the processes were still running after {TIMEOUT_S} s (a rank left waiting?):\n{err[-3000:]}")
    ended = {int(p.name.split("-")[1]): p.read_text() for p in status.glob("rank-*")}
    return proc.returncode, err, ended


def no_traceback_but_the_launchers(err: str) -> bool:
    """torchrun reports a worker that exited non-zero with a traceback of its own (ChildFailedError); no other."""
    return err.count("Traceback") == 1 and "ChildFailedError" in err


def names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(("logs", "samples")))


@pytest.mark.slow
def test_a_checkpoint_write_failing_on_rank_1_stops_both_processes_with_the_message_once(tmp_path):
    out = tmp_path / "run"
    code, err, ended = launch_with_fault(tmp_path, "checkpoint", 1, [*ARGV, "--output_dir", out])
    assert code != 0
    assert ended == {0: "1 RankFailedError", 1: "1 RankFailedError"}, err[-3000:]
    expected = "error: writing checkpoint-4 failed on rank 1 of 2 "
    assert err.count(expected) == 1, err[-3000:]
    line = next(line for line in err.splitlines() if expected in line)
    assert f"could not write checkpoint checkpoint-4 (into {out / '.tmp-checkpoint-4'})" in line
    assert "No space left on device" in line and "the disk is full" in line
    assert f"The previous checkpoint {out / 'checkpoint-2'} is intact" in line
    assert no_traceback_but_the_launchers(err)
    assert names(out) == ["checkpoint-2"]  # no .tmp-checkpoint-4, no checkpoint-4, no pipeline, no lock
    ckpt.check_checkpoint(out / "checkpoint-2", num_processes=2, ema=False, importance_sampler=False)

    # Resuming from it, where rank 1 cannot read its state: both stop, the message names rank 1, once.
    (tmp_path / "status").rename(tmp_path / "status-1")
    argv = [*ARGV, "--output_dir", out, "--resume_from_checkpoint", "latest"]
    code, err, ended = launch_with_fault(tmp_path, "resume", 1, argv)
    assert code != 0
    assert ended == {0: "1 RankFailedError", 1: "1 RankFailedError"}, err[-3000:]
    expected = "error: resuming failed on rank 1 of 2 "
    assert err.count(expected) == 1, err[-3000:]
    assert f"cannot load checkpoint {out / 'checkpoint-2'}: OSError: [Errno 5] Input/output error" in err
    assert no_traceback_but_the_launchers(err)
    assert names(out) == ["checkpoint-2"]


@pytest.mark.slow
def test_a_final_pipeline_write_failing_on_the_main_process_stops_every_process(tmp_path):
    out = tmp_path / "run"
    code, err, ended = launch_with_fault(tmp_path, "pipeline", 0, [*ARGV, "--output_dir", out])
    assert code != 0
    assert ended == {0: "1 RankFailedError", 1: "1 RankFailedError"}, err[-3000:]
    expected = "error: writing the final pipeline and model card failed on rank 0 of 2 "
    assert err.count(expected) == 1, err[-3000:]
    assert "could not write the final pipeline" in err and "the disk is full" in err
    assert no_traceback_but_the_launchers(err)
    assert names(out) == ["checkpoint-2", "checkpoint-4"]  # nothing that looks loadable


@pytest.mark.slow
def test_a_sample_grid_failing_on_the_main_process_stops_every_process(tmp_path):
    out = tmp_path / "run"
    code, err, ended = launch_with_fault(tmp_path, "samples", 0, [*ARGV, "--output_dir", out, "--save_images_steps", 2])
    assert code != 0
    assert ended == {0: "1 RankFailedError", 1: "1 RankFailedError"}, err[-3000:]
    expected = "error: writing the sample grid of step 2 failed on rank 0 of 2 "
    assert err.count(expected) == 1, err[-3000:]
    assert "OSError: [Errno 28] No space left on device" in err
    assert names(out) == ["checkpoint-2"]


@pytest.mark.slow
def test_an_evaluation_setup_error_on_one_process_stops_every_process(tmp_path):
    out = tmp_path / "run"
    argv = [*ARGV, "--output_dir", out, "--eval_steps", 2, "--eval_metrics", "bpd", "--eval_num_samples", 4]
    argv += ["--eval_bound_timesteps", 4]
    code, err, ended = launch_with_fault(tmp_path, "evaluation", 1, argv)
    assert code != 0
    assert ended == {0: "1 RankFailedError", 1: "1 RankFailedError"}, err[-3000:]
    expected = "error: setting up the evaluation failed on rank 1 of 2 "
    assert err.count(expected) == 1, err[-3000:]
    assert "the evaluation images cannot be read: injected fault" in err
    assert no_traceback_but_the_launchers(err)
    assert names(out) == []  # stopped before the first step


# ------------------------------------------------------------------ the mechanism, in this process


class FakeAccelerator:
    """Rank ``process_index`` of ``num_processes``; ``others_failed`` is what the other ranks report."""

    def __init__(self, num_processes=2, process_index=1, others_failed=()):
        self.num_processes, self.process_index, self.device = num_processes, process_index, torch.device("cpu")
        self.others = others_failed  # [(rank, host, message)]
        self.collectives = 0

    def gather(self, flag):
        self.collectives += 1
        return torch.cat([flag, torch.tensor([1 if self.others else 0])])


@pytest.fixture
def gathered(monkeypatch):
    """collective_errors.gather_object of a FakeAccelerator: this rank's report plus the others'."""
    from ddpm_plus.trainer import collective_errors

    def install(accelerator):
        monkeypatch.setattr(collective_errors, "gather_object", lambda mine: [*mine, *accelerator.others])
        return accelerator

    return install


def test_one_process_raises_its_own_error_unchanged_without_a_collective():
    accelerator = FakeAccelerator(num_processes=1, process_index=0)
    with pytest.raises(ckpt.CheckpointWriteError, match="disk full"):
        with all_or_none(accelerator, "writing checkpoint-2"):
            raise ckpt.CheckpointWriteError("disk full")
    with all_or_none(accelerator, "writing checkpoint-2"):
        pass
    assert accelerator.collectives == 0


def test_a_rank_that_succeeded_raises_the_failed_ranks_message(gathered):
    accelerator = gathered(FakeAccelerator(others_failed=[(0, "h0", "could not write: disk full")]))
    with pytest.raises(RankFailedError) as info:
        with all_or_none(accelerator, "writing checkpoint-4"):
            pass
    assert str(info.value) == "writing checkpoint-4 failed on rank 0 of 2 (host h0): could not write: disk full"
    assert info.value.rank == 0 and info.value.__cause__ is None


def test_the_first_failed_rank_is_named_with_the_others(gathered, caplog):
    others = [(3, "h3", "also"), (0, "h0", "first")]
    accelerator = gathered(FakeAccelerator(num_processes=4, process_index=2, others_failed=others))
    with pytest.raises(RankFailedError) as info:
        with all_or_none(accelerator, "resuming", quiet=(ValueError,)):
            raise ValueError("checkpoint file x is missing")
    assert str(info.value) == "resuming failed on rank 0 of 4 (host h0) (also on ranks 2, 3): first"
    assert isinstance(info.value.__cause__, ValueError)  # chained to this rank's own error
    assert [r for r, _, _ in info.value.failures] == [0, 2, 3]
    assert info.value.failures[1][2] == "checkpoint file x is missing"  # a quiet error: its message only
    assert "Traceback" not in caplog.text
    assert pickle.loads(pickle.dumps(info.value)).failures == info.value.failures


def test_an_unexpected_error_is_reported_with_its_type_and_its_traceback_logged(gathered, caplog):
    accelerator = gathered(FakeAccelerator(process_index=1))
    with pytest.raises(RankFailedError, match=r"on rank 1 of 2 \(host .*\): KeyError: 'unet'"):
        with all_or_none(accelerator, "writing checkpoint-4", quiet=(ckpt.CheckpointWriteError,)):
            {}["unet"]
    assert "writing checkpoint-4 failed on rank 1" in caplog.text and "Traceback" in caplog.text


def test_no_failure_is_one_small_collective(gathered):
    accelerator = gathered(FakeAccelerator())
    with all_or_none(accelerator, "writing checkpoint-4"):
        pass
    assert accelerator.collectives == 1
