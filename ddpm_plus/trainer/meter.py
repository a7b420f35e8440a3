"""The training meter: loss and gradient-norm sums kept on the device (no host sync per step), the
non-finite-loss check, the progress bar, the throughput clock and the logged metrics."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .step import StepOutput

if TYPE_CHECKING:
    from .components import TrainingRun

__all__ = ["NonFiniteLossError", "TrainingMeter"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingMeter:
    """Loss and gradient-norm sums kept on the device (no host sync per step), the non-finite-loss check,
    the progress bar and the throughput clock (paused for checkpoints and sample grids)."""

    def __init__(self, run: TrainingRun):
        self.run = run
        device = run.accelerator.device
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_last = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.steps_in_interval = 0
        self.interval_start = time.perf_counter()
        self.train_time = 0.0
        self.last_loss = float("nan")
        self.progress = tqdm(
            total=run.max_train_steps,
            initial=run.start_step,
            desc="steps",
            disable=not run.accelerator.is_local_main_process,
        )

    def record(self, out: StepOutput, step: int) -> None:
        """After every micro-step of optimizer step ``step`` (1-based)."""
        self.loss_sum += out.loss
        bad = (self.first_bad_step < 0) & ~torch.isfinite(out.loss)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        if self.run.accelerator.sync_gradients:
            self.steps_in_interval += 1
            if out.grad_norm is not None:
                self.grad_norm_last = out.grad_norm.detach()
            self.progress.update(1)

    def check_finite(self) -> None:
        """Host sync: stop if any process saw a non-finite loss since the start."""
        bad = self.run.accelerator.gather(self.first_bad_step[None]).max().item()
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {bad}; stopping. "
                f"The last checkpoint before it (if any) in {self.run.output_dir} is intact: resume with "
                "--resume_from_checkpoint latest after lowering --learning_rate or checking the data."
            )

    def log(self, step: int, done: bool) -> None:
        """Every ``--logging_steps`` and at the end: mean loss, lr, grad norm and images/s to the trackers."""
        run, args = self.run, self.run.args
        if step % args.logging_steps and not done:
            return
        self.check_finite()
        elapsed = time.perf_counter() - self.interval_start
        self.train_time += elapsed
        ga = args.gradient_accumulation_steps
        mean_loss = run.accelerator.reduce(self.loss_sum / (self.steps_in_interval * ga), reduction="mean").item()
        logs = {
            "loss": mean_loss,
            "lr": run.lr_scheduler.get_last_lr()[0],
            "images_per_s": self.steps_in_interval * run.layout["samples_per_step"] / elapsed,
        }
        if args.max_grad_norm > 0:
            logs["grad_norm"] = self.grad_norm_last.item()
        self.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
        run.accelerator.log(logs, step=step)
        self.last_loss = mean_loss
        self.loss_sum.zero_()
        self.steps_in_interval = 0
        self.interval_start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time inside does not count towards images/s (checkpoints, sample grids)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.interval_start += time.perf_counter() - start
