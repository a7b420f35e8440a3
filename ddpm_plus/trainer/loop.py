"""Train an unconditional or class-conditional DDPM (``UNet2DModel`` + ``DDPMPlusScheduler``) with accelerate.

    accelerate launch -m ddpm_plus.train --config digits --output_dir digits-ddpm   # any number of processes
    ddpm-plus train --config digits --output_dir digits-ddpm                         # one process

(needs ``pip install "ddpm-plus[train]"``). Without ``--config`` it trains the ``digits`` preset. Writes
``output_dir/``: the final ``DDPMPlusPipeline`` (EMA weights when ``--use_ema``; safetensors),
``checkpoint-N/``, ``logs/`` (TensorBoard), ``samples/step-N.png`` and a ``README.md`` model card.
Flags: ``ddpm-plus train --help`` (see ddpm_plus/trainer/args.py).

Reproducibility: data order and augmentation are seeded per epoch and sample (ddpm_plus/trainer/data.py);
the noise and timesteps of micro-step k are drawn for the GLOBAL batch from a generator seeded by
(seed, k) and sliced per process. So a resumed run continues the same trajectory, and N processes see
exactly what one process with N times the batch sees. Dropout uses torch's global RNG, whose state
accelerate checkpoints per process.

``--class_conditional``: the UNet gets ``num_classes + 1`` class embeddings; id ``num_classes`` is the null
class of classifier-free guidance (Ho & Salimans 2022), which replaces each label with probability
``--class_dropout_prob``. The dropout mask is drawn, like the noise, for the global batch from a generator
seeded by (seed, micro-step) and sliced per process (``drop_labels``), never from the global RNG; the saved
pipeline records the class names, the null id and the dropout (``DDPMPlusPipeline`` config).

The trainer's modules: this one runs the loop (``train``) and the per-step hooks (logging, checkpoints, sample
grids, evaluation, signals) and is the command (``main``); ``step`` holds ``training_step``, the whole
per-micro-step computation (import it to benchmark the real thing); ``components`` builds what a run is made of
(``prepare``); ``meter`` measures it; ``outputs`` writes what it leaves behind; ``collective_errors`` makes a
failure on one process (a checkpoint write, the final pipeline, the evaluation setup) stop every process with
the same ``RankFailedError``. ``main`` prints a user-facing error, and the summary line of a finished run, once:
on the first process of each machine (``LOCAL_RANK`` 0).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path

import torch

from .. import hub
from ..redaction import RedactSecrets
from ..redaction import redact as redact_text
from . import checkpointing as ckpt
from . import run_lock
from .args import build_scheduler, parse_args
from .collective_errors import RankFailedError, all_or_none
from .components import TrainingRun, build_accelerator, build_optimizer, build_unet, prepare
from .data import derive_seed
from .full_weights import main_process_model
from .meter import NonFiniteLossError, TrainingMeter
from .outputs import (
    ema_weights,
    finish,
    grid_class_labels,
    make_pipeline,
    push,
    save_final_pipeline,
    save_sample_grid,
    summary_line,
    write_card,
    write_extra_state,
)
from .preemption import GracefulStop, TrainingInterrupted
from .step import StepOutput, drop_labels, training_step

__all__ = [
    "NonFiniteLossError",
    "TrainingInterrupted",
    "build_accelerator",
    "build_optimizer",
    "build_scheduler",
    "build_unet",
    "drop_labels",
    "grid_class_labels",
    "main",
    "prepare",
    "train",
    "training_step",
    "write_extra_state",
]

logger = logging.getLogger("ddpm_plus.train")

# The errors ``main`` reports as one line (and exit status 1) instead of a traceback.
USER_ERRORS = (
    NonFiniteLossError, ValueError, hub.HubPushError, ckpt.CheckpointWriteError, run_lock.OutputDirLockedError,
    RankFailedError,
)  # fmt: skip


def run_step(run: TrainingRun, batch, micro_step: int) -> StepOutput:
    """``training_step`` on ``batch`` with the run's objects and flags; the noise seeded by (seed, micro-step)."""
    args = run.args
    return training_step(
        batch, run.unet, run.noise_scheduler, run.optimizer, run.lr_scheduler, run.accelerator,
        step_seed=derive_seed(args.seed, "noise", micro_step), loss_type=args.loss, snr_gamma=args.snr_gamma,
        max_grad_norm=args.max_grad_norm, num_bins=run.num_bins, ema=run.ema,
        importance_sampler=run.importance_sampler, class_dropout_prob=args.class_dropout_prob,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- per-step hooks


def write_checkpoint(run: TrainingRun, meter: TrainingMeter, step: int) -> Path:
    """checkpoint-{step} (all processes; raises CheckpointWriteError, keeping the earlier ones, if the write
    fails), then pruning and a log line on the main process."""
    meter.check_finite()
    data_state = run.loader.state_dict() if run.args.streaming else None  # gathered from every process
    path = ckpt.save_checkpoint(
        run.accelerator, run.output_dir, step,
        lambda d: write_extra_state(d, global_step=step, layout=run.layout, lr_scheduler=run.lr_scheduler,
                                    ema=run.ema, importance_sampler=run.importance_sampler, data_state=data_state),
    )  # fmt: skip
    if run.accelerator.is_main_process:
        for old in ckpt.prune_checkpoints(run.output_dir, run.args.checkpoints_total_limit or None):
            logger.info("removed old checkpoint %s", old)
        logger.info("saved %s", path)
    return path


def maybe_checkpoint(run: TrainingRun, meter: TrainingMeter, step: int, done: bool) -> None:
    """Every ``--checkpointing_steps`` and at the end: an atomic checkpoint (all processes), pruning, and
    with ``--push_checkpoints`` a background push of the current EMA pipeline."""
    args = run.args
    if step % args.checkpointing_steps and not done:
        return
    write_checkpoint(run, meter, step)
    if not args.push_checkpoints or done:
        return
    model, ema = main_process_model(run.model, run.ema, run.accelerator)  # FSDP: the full weights, gathered
    # Written by the main process while the others wait; a failure there stops them all with its message.
    with all_or_none(run.accelerator, f"writing the pipeline of step {step}", quiet=(ckpt.CheckpointWriteError,)):
        if run.accelerator.is_main_process:
            start_checkpoint_push(run, meter, step, model, ema)


def start_checkpoint_push(run: TrainingRun, meter: TrainingMeter, step: int, model, ema) -> None:
    """``--push_checkpoints`` (main process): the current EMA pipeline and card written, uploaded in the background."""
    args = run.args
    save_final_pipeline(args, model, ema, run.noise_scheduler, run.conditioning, run.vae)
    write_card(
        args,
        {"global_step": step, "images_per_s": None, "final_loss": meter.last_loss},
        run.accelerator.num_processes,
        run.conditioning,
        run.vae,
    )
    try:
        run.checkpoint_pushes.append(push(args, run_as_future=True))
    except hub.HubPushError as e:
        logger.warning("checkpoint push not started: %s", e)


def stop_on_signal(run: TrainingRun, meter: TrainingMeter, step: int, signum: int) -> None:
    """After optimizer step ``step``, on SIGTERM/SIGINT: a checkpoint at this step (unless the regular one was
    just written), the trackers closed, then :class:`TrainingInterrupted`."""
    path = run.output_dir / f"{ckpt.CHECKPOINT_PREFIX}{step}"
    if step % run.args.checkpointing_steps:  # the same decision on every process (no file-system test)
        with meter.paused():
            path = write_checkpoint(run, meter, step)
    meter.progress.close()
    run.accelerator.end_training()
    raise TrainingInterrupted(signum, step, path)  # main() prints it and exits with 128 + signum


def maybe_save_samples(run: TrainingRun, meter: TrainingMeter, step: int, done: bool) -> None:
    """Every ``--save_images_steps`` (0: never) and at the end: a sample grid, on the main process."""
    every = run.args.save_images_steps
    if not (every and step % every == 0) and not done:
        return
    meter.check_finite()
    model, ema = main_process_model(run.model, run.ema, run.accelerator)  # FSDP: the full weights, gathered
    with all_or_none(run.accelerator, f"writing the sample grid of step {step}"):  # a failure stops every process
        if run.accelerator.is_main_process:
            run.last_grid = save_sample_grid(run.args, model, ema, run.noise_scheduler, step, run.conditioning, run.vae)


def maybe_evaluate(run: TrainingRun, meter: TrainingMeter, step: int, done: bool) -> None:
    """Every ``--eval_steps`` (0: never) and at the end: the EMA weights' metrics, logged as ``eval/...``. Every
    process takes its share of the evaluation (ddpm_plus/trainer/periodic_evaluation.py); the main one logs."""
    every = run.args.eval_steps
    if not every or (step % every and not done):
        return
    meter.check_finite()
    devices = [run.model.device.index or 0] if run.model.device.type == "cuda" else []
    with ema_weights(run.ema, run.model), torch.random.fork_rng(devices=devices), torch.no_grad():
        run.model.eval()
        try:
            logs = run.evaluation.evaluate(
                run.args, make_pipeline(run.model, run.noise_scheduler, run.conditioning, run.vae), step
            )
        finally:
            run.model.train()
    run.accelerator.log(logs, step=step)  # main process only (accelerate's trackers)
    run.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------- the loop


def train(args) -> dict:
    """Prepare, then per optimizer step: batches, loss, optimizer and EMA (``training_step``), then one
    call each for logging, checkpointing and sample grids. Returns a summary dict.

    On SIGTERM/SIGINT it finishes the optimizer step, saves a checkpoint and raises
    :class:`TrainingInterrupted` (ddpm_plus/trainer/preemption.py). The output_dir lock is released on any exit."""
    stop = GracefulStop().install()
    try:
        return _train(args, stop)
    finally:
        stop.restore()
        run_lock.release(args.output_dir)


def _train(args, stop: GracefulStop) -> dict:
    run = prepare(args)
    meter = TrainingMeter(run)
    step, micro_step = run.start_step, run.start_step * args.gradient_accumulation_steps
    run.unet.train()
    for batch in run.batches() if step < run.max_train_steps else ():
        out = run_step(run, batch, micro_step)
        micro_step += 1
        meter.record(out, step + 1)
        if not run.accelerator.sync_gradients:
            continue
        step += 1
        done = step >= run.max_train_steps
        meter.log(step, done)
        with meter.paused():  # throughput excludes checkpoints and grids
            maybe_checkpoint(run, meter, step, done)
            maybe_save_samples(run, meter, step, done)
            maybe_evaluate(run, meter, step, done)
        if not done and (signum := stop.requested(run.accelerator)):
            stop_on_signal(run, meter, step, signum)
        if done:
            break
    return finish(run, meter, step)


def reports_to_user() -> bool:
    """Whether this process prints user-facing errors and the final summary line: the first process of its
    machine (``LOCAL_RANK`` 0, set by ``accelerate launch`` and torchrun; a plain process is one). Decided from
    the environment, so it holds before accelerate is set up (flag errors) and after."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def parse_args_once(argv, prog):
    """``parse_args``: every process parses the same flags, so only the reporting one prints a flag error (or
    ``--help``); the others exit with the same status quietly."""
    if reports_to_user():
        return parse_args(argv, prog)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return parse_args(argv, prog)


def exit_with(message: str, code: int, error: BaseException):
    """Print ``message`` on the reporting process only (every process raises the same error), then exit."""
    if reports_to_user():
        print(message, file=sys.stderr, flush=True)
    raise SystemExit(code) from error


def main(argv=None, prog: str | None = None):
    """``accelerate launch -m ddpm_plus.train [flags]`` / ``ddpm-plus train [flags]``."""
    args = parse_args_once(argv, prog)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    redact = RedactSecrets(args.hub_token)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(redact)
    if args.hub_token and reports_to_user():
        logger.warning(hub.TOKEN_ON_COMMAND_LINE)
    try:
        summary = train(args)
    except TrainingInterrupted as e:
        exit_with(f"stopped: {e}", e.exit_code, e)
    except USER_ERRORS as e:
        exit_with(f"error: {redact_text(str(e), args.hub_token)}", 1, e)
    finally:
        for handler in handlers:
            handler.removeFilter(redact)
    if reports_to_user():
        print(summary_line(summary, args.output_dir), flush=True)
    return summary


if __name__ == "__main__":
    main()
