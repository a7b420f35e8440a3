"""Preemption and concurrent runs, with real processes and real signals: SIGTERM/SIGINT finish the optimizer
step, write a checkpoint and exit 128+signal; a second signal exits at once keeping the last complete
checkpoint; resuming continues the same trajectory; the output_dir lock refuses a second run and is taken
over once its holder is gone. Faults come from a runner script written here (it holds the trainer at a
chosen micro-step or checkpoint until the test writes a line to its stdin); the trainer has no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from safetensors.torch import load_file
from test_resume import RESUME_ARGS, assert_same_tensors, image_folder  # noqa: F401 (fixture)
from test_training import TINY, expect_exit, run_train, unet_weights

from ddpm_plus.trainer import run_lock
from ddpm_plus.trainer.checkpointing import latest_checkpoint

HOLDING_RUNNER = textwrap.dedent("""
    import sys
    from ddpm_plus.trainer import loop as train

    hold_call, hold_checkpoint = int(sys.argv[1]), int(sys.argv[2])
    real_step, real_write, calls = train.training_step, train.write_extra_state, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == hold_call:
            print(f"HOLD micro-step {calls[0]}", flush=True)
            sys.stdin.readline()
        return real_step(*args, **kwargs)

    def write(directory, **state):
        real_write(directory, **state)
        if state["global_step"] == hold_checkpoint:
            print(f"HOLD checkpoint {directory}", flush=True)
            sys.stdin.readline()

    train.training_step, train.write_extra_state = step, write
    train.main(sys.argv[3:])
""")


class Runner:
    """The trainer in a subprocess, held at micro-step ``hold_call`` / checkpoint ``hold_checkpoint``."""

    def __init__(self, tmp_path, argv, hold_call=0, hold_checkpoint=0, own_process_group=False):
        script = tmp_path / "holding_runner.py"
        script.write_text(HOLDING_RUNNER)
        self.stderr_path = tmp_path / f"stderr-{len(list(tmp_path.glob('stderr-*')))}.txt"
        self.stderr = open(self.stderr_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(hold_call), str(hold_checkpoint), *map(str, argv)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            start_new_session=own_process_group,
        )  # fmt: skip
        self.timer = threading.Timer(240, self.proc.kill)  # never hang the suite
        self.timer.start()

    def wait_for(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"the run ended without printing {prefix!r}:\n{self.stderr_text()}")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def signal_group(self, sig) -> None:
        """As Ctrl-C in a terminal or Slurm's scancel: the signal reaches every process of the group."""
        os.killpg(self.proc.pid, sig)

    def resume(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        try:
            self.proc.wait(timeout=240)
        finally:
            self.timer.cancel()
            for f in (self.proc.stdout, self.proc.stdin):
                try:
                    f.close()
                except OSError:  # the pipe's reader is gone
                    pass
            self.stderr.close()
        return self.proc.returncode

    def stderr_text(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return self.stderr_path.read_text()


def checkpoint_names(out):
    return sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, image_folder):  # noqa: F811
    out = tmp_path / "run"
    common = [*TINY, *RESUME_ARGS, "--train_data_dir", image_folder]
    # GA 2: micro-step 5 is the first half of optimizer step 3. SIGTERM arrives in the middle of it.
    runner = Runner(tmp_path, [*common, "--output_dir", out], hold_call=5)
    runner.wait_for("HOLD micro-step 5")
    assert (out / run_lock.LOCK_NAME).is_file()
    runner.signal(signal.SIGTERM)
    runner.resume()
    assert runner.finish() == 128 + signal.SIGTERM
    err = runner.stderr_text()
    assert "received SIGTERM" in err
    assert f"interrupted by SIGTERM after optimizer step 3; saved checkpoint {out / 'checkpoint-3'}" in err
    assert "--resume_from_checkpoint latest" in err
    assert checkpoint_names(out) == ["checkpoint-3"]  # step 3 completed (both micro-steps), nothing after it
    assert not (out / "model_index.json").exists()  # the run is not finished: no final pipeline
    assert not (out / run_lock.LOCK_NAME).exists()  # released on the way out

    summary = run_train([*common, "--output_dir", out, "--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 8
    straight = tmp_path / "straight"
    run_train([*common, "--output_dir", straight])
    assert_same_tensors(unet_weights(straight), unet_weights(out))
    assert_same_tensors(
        load_file(straight / "checkpoint-8" / "model.safetensors"),
        load_file(out / "checkpoint-8" / "model.safetensors"),
    )


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_dataloader_workers_still_checkpoints(tmp_path, image_folder):  # noqa: F811
    out = tmp_path / "run"
    argv = [*TINY, *RESUME_ARGS, "--train_data_dir", image_folder, "--dataloader_num_workers", 2, "--output_dir", out]
    runner = Runner(tmp_path, argv, hold_call=5, own_process_group=True)
    runner.wait_for("HOLD micro-step 5")
    runner.signal_group(signal.SIGINT)  # the workers get it too: they must ignore it
    runner.resume()
    assert runner.finish() == 128 + signal.SIGINT, runner.stderr_text()[-3000:]
    err = runner.stderr_text()
    assert f"interrupted by SIGINT after optimizer step 3; saved checkpoint {out / 'checkpoint-3'}" in err
    assert "DataLoader worker" not in err
    assert err.count("received SIGINT") == 1, err  # the main process only, not each worker
    assert checkpoint_names(out) == ["checkpoint-3"]


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_keeps_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--output_dir", out, "--max_train_steps", 10, "--checkpointing_steps", 2]
    # Ctrl-C during step 3; the checkpoint it triggers (step 3) is held mid-write; Ctrl-C again.
    runner = Runner(tmp_path, argv, hold_call=3, hold_checkpoint=3)
    runner.wait_for("HOLD micro-step 3")
    runner.signal(signal.SIGINT)
    runner.resume()
    runner.wait_for("HOLD checkpoint")
    runner.signal(signal.SIGINT)
    assert runner.finish() == 128 + signal.SIGINT
    err = runner.stderr_text()
    assert "received SIGINT again: exiting now" in err and "Traceback" not in err
    assert checkpoint_names(out) == [".tmp-checkpoint-3", "checkpoint-2"]
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / run_lock.LOCK_NAME).exists()
    # The next run deletes the incomplete one and resumes from checkpoint-2.
    summary = run_train(argv + ["--resume_from_checkpoint", "latest", "--max_train_steps", 4])
    assert summary["global_step"] == 4
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]


HOLDER = textwrap.dedent("""
    import sys, time
    from ddpm_plus.trainer.run_lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("LOCKED", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def lock_holder(tmp_path):
    """A real process holding the lock of tmp_path/run; yields (process, output_dir)."""
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "LOCKED"
        yield proc, out
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_second_run_on_the_same_output_dir_is_refused_until_the_holder_is_gone(lock_holder, capsys, caplog):
    proc, out = lock_holder
    argv = [*TINY, "--output_dir", out, "--max_train_steps", 1]
    err = expect_exit(argv, capsys)
    assert f"output_dir {out} is in use by another training run (pid {proc.pid} on host {socket.gethostname()!r}" in err
    assert not any(p.name.startswith("checkpoint") for p in out.iterdir())
    proc.kill()  # SIGKILL: the lock file stays behind, naming a dead process
    proc.wait()
    assert json.loads((out / run_lock.LOCK_NAME).read_text())["pid"] == proc.pid
    with caplog.at_level("WARNING", logger="ddpm_plus.train"):
        assert run_train(argv)["global_step"] == 1
    assert "took over the lock of a run that is gone" in caplog.text and str(proc.pid) in caplog.text
    assert not (out / run_lock.LOCK_NAME).exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_lock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "other-node-17", "started": 0}))
    with pytest.raises(run_lock.OutputDirLockedError) as err:
        run_lock.RunLock(out).acquire()
    msg = str(err.value)
    assert "pid 1 on host 'other-node-17'" in msg and f"delete {out / run_lock.LOCK_NAME}" in msg


def test_lock_taken_over_from_a_dead_pid_and_released(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / run_lock.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = run_lock.RunLock(out).acquire()
    assert lock.took_over["pid"] == dead.pid
    assert json.loads((out / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(run_lock.OutputDirLockedError, match="in use"):
        run_lock.RunLock(out).acquire()  # held (flock) even against another handle in the same process
    lock.release()
    assert not (out / run_lock.LOCK_NAME).exists()


def test_lock_file_never_holds_a_token_from_the_command_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    secret = "hf_NotWrittenAnywhere123"
    argv = ["train", "--hub_token", secret, f"--hub_token={secret}", "--output_dir", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    lock = run_lock.RunLock(out).acquire()
    try:
        text = (out / run_lock.LOCK_NAME).read_text()
        assert secret not in text
        assert json.loads(text)["argv"] == ["train", "--hub_token", "***", "--hub_token=***", "--output_dir", str(out)]
    finally:
        lock.release()
