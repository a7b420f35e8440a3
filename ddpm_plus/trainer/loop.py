"""Train an unconditional or class-conditional DDPM (``UNet2DModel`` + ``DDPMPlusScheduler``) with accelerate.

    accelerate launch -m ddpm_plus.train --config digits --output_dir digits-ddpm   # any number of processes
    ddpm-plus train --config digits --output_dir digits-ddpm                         # one process

(needs ``pip install "ddpm-plus[train]"``). Without ``--config`` it trains the ``digits`` preset. Writes
``output_dir/``: the final ``DDPMPlusPipeline`` (EMA weights when ``--use_ema``; safetensors),
``checkpoint-N/``, ``logs/`` (TensorBoard), ``samples/step-N.png`` and a ``README.md`` model card.
Flags: ``ddpm-plus train --help`` (see ddpm_plus/training_args.py).

Reproducibility: data order and augmentation are seeded per epoch and sample (ddpm_plus/training_data.py);
the noise and timesteps of micro-step k are drawn for the GLOBAL batch from a generator seeded by
(seed, k) and sliced per process. So a resumed run continues the same trajectory, and N processes see
exactly what one process with N times the batch sees. Dropout uses torch's global RNG, whose state
accelerate checkpoints per process.

``--class_conditional``: the UNet gets ``num_classes + 1`` class embeddings; id ``num_classes`` is the null
class of classifier-free guidance (Ho & Salimans 2022), which replaces each label with probability
``--class_dropout_prob``. The dropout mask is drawn, like the noise, for the global batch from a generator
seeded by (seed, micro-step) and sliced per process (``drop_labels``), never from the global RNG; the saved
pipeline records the class names, the null id and the dropout (``DDPMPlusPipeline`` config).

``training_step`` is the whole per-micro-step computation (noising, forward, loss, backward, clip,
optimizer/LR/EMA updates); import it to benchmark the real thing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .. import hub
from ..image_grid import image_grid
from ..pipelines.pipeline_ddpm_plus import DDPMPlusPipeline
from ..redaction import RedactSecrets, without_secrets
from ..redaction import redact as redact_text
from ..schedulers.scheduling_ddpm_plus import LEARNED_VARIANCE_TYPES, DDPMPlusScheduler
from . import checkpointing as ckpt
from . import run_lock
from .args import build_scheduler, parse_args
from .data import build_dataloader, derive_seed, uses_digits
from .losses import ImportanceSampler, compute_loss
from .periodic_evaluation import PeriodicEvaluation
from .preemption import GracefulStop, TrainingInterrupted

__all__ = ["main", "train", "training_step", "NonFiniteLossError", "TrainingInterrupted"]

logger = logging.getLogger("ddpm_plus.train")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------- the step


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached mean loss of this process's micro-batch (float32, on device)
    grad_norm: torch.Tensor | None  # pre-clip global grad norm on optimizer steps, else None


def draw_noise_and_timesteps(x0, num_train_timesteps, step_seed, accelerator, importance_sampler=None):
    """Noise and timesteps for this process's slice of the global batch of one micro-step, drawn
    from a generator seeded by ``step_seed``. Returns (noise, timesteps, weights or None)."""
    local = x0.shape[0]
    start = accelerator.process_index * local
    total = local * accelerator.num_processes
    gen = torch.Generator(device=x0.device).manual_seed(step_seed)
    if importance_sampler is None:
        timesteps = torch.randint(0, num_train_timesteps, (total,), generator=gen, device=x0.device)
        weights = None
    else:
        timesteps, weights = importance_sampler.sample(total, device=x0.device, generator=gen)
        weights = weights[start : start + local]
    noise = torch.randn((total, *x0.shape[1:]), generator=gen, device=x0.device, dtype=torch.float32)
    return noise[start : start + local], timesteps[start : start + local], weights


def drop_labels(labels, null_class_id: int, class_dropout_prob: float, step_seed: int, accelerator):
    """This process's labels with each replaced by ``null_class_id`` with probability ``class_dropout_prob``:
    one uniform draw per example of the GLOBAL batch from a generator seeded by (``step_seed``, "labels"),
    sliced like the noise, so resuming and the number of processes do not change which labels drop."""
    if not class_dropout_prob:
        return labels
    local = labels.shape[0]
    start = accelerator.process_index * local
    gen = torch.Generator(device=labels.device).manual_seed(derive_seed(step_seed, "labels"))
    u = torch.rand(local * accelerator.num_processes, generator=gen, device=labels.device)[start : start + local]
    return torch.where(u < class_dropout_prob, torch.full_like(labels, null_class_id), labels)


def training_step(
    batch,
    unet,
    noise_scheduler,
    optimizer,
    lr_scheduler,
    accelerator,
    *,
    step_seed: int,
    loss_type: str = "simple",
    snr_gamma: float | None = None,
    max_grad_norm: float = 1.0,
    num_bins: int = 256,
    ema=None,
    importance_sampler=None,
    class_dropout_prob: float = 0.0,
) -> StepOutput:
    """One micro-step on ``batch["pixel_values"]`` (images in [-1, 1]), conditioned on ``batch["class_labels"]``
    when present (label dropout to the null class, the UNet's last class id: ``drop_labels``).

    Noising x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (docs/math.md eq. 16) and the loss are computed in
    float32 outside the model's autocast; under gradient accumulation the optimizer, LR scheduler
    (counted in optimizer steps) and EMA advance only when ``accelerator.sync_gradients``. No host
    synchronisation unless ``importance_sampler`` (vlb) must record the gathered losses.
    """
    x0 = batch["pixel_values"].to(torch.float32)
    noise, timesteps, weights = draw_noise_and_timesteps(
        x0, noise_scheduler.config.num_train_timesteps, step_seed, accelerator, importance_sampler
    )
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    class_labels = batch.get("class_labels")
    if class_labels is not None:
        null_class_id = accelerator.unwrap_model(unet).config.num_class_embeds - 1
        class_labels = drop_labels(class_labels, null_class_id, class_dropout_prob, step_seed, accelerator)
    grad_norm = None
    with accelerator.accumulate(unet):
        model_output = unet(x_t, timesteps, class_labels=class_labels).sample.float()
        losses = compute_loss(
            noise_scheduler, model_output, x0, x_t, noise, timesteps,
            loss_type=loss_type, snr_gamma=snr_gamma, num_bins=num_bins,
        )  # fmt: skip
        loss = (losses * weights).mean() if weights is not None else losses.mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients and ema is not None:
        ema.step(unet.parameters())
    if importance_sampler is not None:
        all_t, all_losses = accelerator.gather((timesteps, losses.detach()))
        importance_sampler.update(all_t, all_losses)
    return StepOutput(loss=loss.detach(), grad_norm=grad_norm)


# ----------------------------------------------------------------------------------------- setup


def build_accelerator(args):
    # Without cpu=True, `accelerate launch --multi_gpu` on a CPU-only machine starts processes that
    # each train alone (accelerate falls back to one process per launch); with it they form a gloo group.
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    accelerator = Accelerator(
        cpu=not has_accelerator,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise SystemExit(
            f"error: WORLD_SIZE={world_size} but accelerate formed a single process group of 1: every process "
            "would train alone. Launch with `accelerate launch --multi_gpu --num_processes N` or torchrun."
        )
    return accelerator


def build_unet(args, num_classes: int | None = None):
    """A UNet2DModel from the shape flags or a local config; 2x output channels for learned variances;
    with ``num_classes``, a class embedding of ``num_classes + 1`` ids (the last: the null class)."""
    out_channels = args.channels * (2 if args.variance_type in LEARNED_VARIANCE_TYPES else 1)
    classes = {} if num_classes is None else {"num_class_embeds": num_classes + 1, "class_embed_type": None}
    if args.model_config_name_or_path is None:
        return UNet2DModel(
            sample_size=args.resolution,
            in_channels=args.channels,
            out_channels=out_channels,
            block_out_channels=tuple(args.block_out_channels),
            layers_per_block=args.layers_per_block,
            down_block_types=tuple(args.down_block_types),
            up_block_types=tuple(args.up_block_types),
            norm_num_groups=args.norm_num_groups,
            dropout=args.dropout,
            attention_head_dim=args.attention_head_dim,  # None: one head per layer, as in DDPM
            **classes,
        )
    path = Path(args.model_config_name_or_path)
    subfolder = "unet" if (path / "unet" / "config.json").is_file() else None
    config = UNet2DModel.load_config(str(path), subfolder=subfolder, local_files_only=True)
    if config.get("in_channels") != args.channels or config.get("out_channels") != out_channels:
        raise ValueError(
            f"--model_config_name_or_path {path}: in_channels/out_channels are {config.get('in_channels')}/"
            f"{config.get('out_channels')}, but --channels {args.channels} with --variance_type "
            f"{args.variance_type} needs {args.channels}/{out_channels}"
        )
    config["sample_size"] = args.resolution
    return UNet2DModel.from_config({**config, **classes})


def build_ema(args, unet):
    if args.ema_decay is not None:  # fixed decay from the first update on (DDPM)
        return EMAModel(unet.parameters(), decay=args.ema_decay, min_decay=args.ema_decay, foreach=True)
    return EMAModel(
        unet.parameters(), decay=args.ema_max_decay, min_decay=args.ema_min_decay, use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma, power=args.ema_power, foreach=True,
    )  # fmt: skip


def build_optimizer(args, unet, device):
    return torch.optim.AdamW(
        unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=device.type == "cuda",
    )  # fmt: skip


def tracker_config(args) -> dict:
    """The flags as a tracker records them (TensorBoard hparams, wandb config): scalars, no secrets."""
    config = without_secrets(vars(args))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


@dataclass
class TrainingRun:
    """Everything ``prepare`` builds and the loop uses. ``unet`` is what trains (accelerate-wrapped,
    maybe compiled); ``model`` is the UNet2DModel itself (EMA, sample grids, saving)."""

    args: object
    accelerator: Accelerator
    loader: object
    sampler: object
    noise_scheduler: DDPMPlusScheduler
    unet: torch.nn.Module
    model: UNet2DModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMAModel | None
    importance_sampler: ImportanceSampler | None
    num_bins: int
    max_train_steps: int
    steps_per_epoch: int
    layout: dict
    conditioning: dict = field(default_factory=dict)  # DDPMPlusPipeline's class keywords; {} unconditional
    start_step: int = 0
    last_grid: Path | None = None
    checkpoint_pushes: list = field(default_factory=list)
    evaluation: PeriodicEvaluation | None = None  # --eval_steps, main process only

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def batches(self):
        """The batches from ``start_step`` to the end: each epoch in its seeded order, the batches a
        resumed run already consumed in its first epoch skipped."""
        ga = self.args.gradient_accumulation_steps
        first_epoch = self.start_step // self.steps_per_epoch
        skip = (self.start_step % self.steps_per_epoch) * ga
        for epoch in range(first_epoch, math.ceil(self.max_train_steps / self.steps_per_epoch)):
            self.sampler.set_epoch(epoch)
            loader = self.loader
            if epoch == first_epoch and skip:
                loader = self.accelerator.skip_first_batches(self.loader, skip)
            loader.set_epoch(epoch)
            yield from loader

    def step(self, batch, micro_step: int) -> StepOutput:
        args = self.args
        return training_step(
            batch, self.unet, self.noise_scheduler, self.optimizer, self.lr_scheduler, self.accelerator,
            step_seed=derive_seed(args.seed, "noise", micro_step), loss_type=args.loss, snr_gamma=args.snr_gamma,
            max_grad_norm=args.max_grad_norm, num_bins=self.num_bins, ema=self.ema,
            importance_sampler=self.importance_sampler, class_dropout_prob=args.class_dropout_prob,
        )  # fmt: skip


def _prepare_output_dir(accelerator, output_dir: Path) -> None:
    """Before any training: create ``output_dir``, check that it is writable, take its run lock
    (ddpm_plus/run_lock.py; released when ``train`` returns or raises) and delete what a killed run left.
    A failure is raised on every process, as OutputDirLockedError naming the directory."""
    error = None
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            error = (
                f"output_dir {output_dir} is not a writable directory ({ckpt.describe_write_error(e)}); "
                "nothing was trained. Use a writable --output_dir."
            )
        else:
            try:
                lock = run_lock.acquire(output_dir)
            except run_lock.OutputDirLockedError as e:
                error = str(e)
            else:
                if lock.took_over:
                    logger.warning("took over the lock of a run that is gone: %s", lock.took_over)
                for stale in ckpt.remove_stale_tmp(output_dir):
                    logger.info("removed incomplete checkpoint %s", stale)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    accelerator.wait_for_everyone()
    if error is not None:
        raise run_lock.OutputDirLockedError(error)


def prepare(args) -> TrainingRun:
    """Accelerator, data, model, optimizer, schedules and EMA; resumed from a checkpoint when asked."""
    accelerator = build_accelerator(args)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)  # the same initial weights on every process
    _prepare_output_dir(accelerator, Path(args.output_dir))
    loader, sampler, num_images, num_bins, id2label = build_dataloader(args, accelerator)
    noise_scheduler = build_scheduler(args)
    conditioning = pipeline_conditioning(args, id2label)
    unet = build_unet(args, None if id2label is None else len(id2label))
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args, unet, accelerator.device)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ga = args.gradient_accumulation_steps
    steps_per_epoch = len(loader) // ga  # exact: EpochSampler keeps whole optimizer steps
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    # Not passed to accelerator.prepare: its wrapper steps the schedule once per process per call
    # (diffusers' example scales by num_processes instead). Stepped on optimizer steps only, so warmup
    # and decay are counted in optimizer steps under gradient accumulation.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )
    model = accelerator.unwrap_model(unet)
    if args.compile:  # after prepare, so accelerate's wrappers (DDP, autocast) are compiled with it
        unet = torch.compile(unet, dynamic=False)
    run = TrainingRun(
        args=args, accelerator=accelerator, loader=loader, sampler=sampler, noise_scheduler=noise_scheduler,
        unet=unet, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
        ema=build_ema(args, model) if args.use_ema else None,
        importance_sampler=ImportanceSampler(args.num_train_timesteps) if args.loss == "vlb" else None,
        num_bins=num_bins, max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch,
        layout={"samples_per_step": args.train_batch_size * accelerator.num_processes * ga,
                "steps_per_epoch": steps_per_epoch, "seed": args.seed,
                **({"num_classes": len(id2label), "class_dropout_prob": args.class_dropout_prob} if id2label else {})},
        conditioning=conditioning,
        evaluation=PeriodicEvaluation.setup(args, accelerator.device) if accelerator.is_main_process else None,
    )  # fmt: skip
    resume(run)
    if args.logger != "none":
        accelerator.init_trackers("train", config=tracker_config(args))
    logger.info(
        "%d images, %d processes, %d images per optimizer step, %d steps per epoch, %d steps, UNet %.2fM parameters",
        num_images, accelerator.num_processes, run.layout["samples_per_step"], steps_per_epoch, max_train_steps,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )  # fmt: skip
    return run


def resume(run: TrainingRun) -> None:
    """Load ``--resume_from_checkpoint`` into ``run`` (sets ``start_step``), or seed a new run."""
    args = run.args
    if args.resume_from_checkpoint is None:
        set_seed(args.seed, device_specific=True)  # dropout masks differ between processes
        return
    if args.resume_from_checkpoint == "latest":
        path = ckpt.latest_checkpoint(run.output_dir)
    else:
        path = Path(args.resume_from_checkpoint)
    if path is None:
        logger.info("no complete checkpoint in %s: starting a new run", run.output_dir)
        return
    # Every file checked (present, JSON/safetensors intact) before anything is loaded: a bad checkpoint is a
    # CorruptCheckpointError naming the file, not a traceback from inside accelerate.
    ckpt.check_checkpoint(
        path, num_processes=run.accelerator.num_processes, ema=run.ema is not None,
        importance_sampler=run.importance_sampler is not None,
    )  # fmt: skip
    run.start_step = ckpt.load_training_state(path, run.layout)
    try:  # accelerate's pickles (optimizer, RNG states, GradScaler): weights_only, no arbitrary objects
        run.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except Exception as e:
        raise ckpt.CorruptCheckpointError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {e}. Resume from an earlier checkpoint "
            "(--resume_from_checkpoint PATH) or delete this one."
        ) from e
    ckpt.load_lr_scheduler(path, run.lr_scheduler)
    if run.ema is not None:
        ckpt.load_ema(path, run.ema)
    if run.importance_sampler is not None:
        ckpt.load_importance_sampler(path, run.importance_sampler)
    logger.info("resumed from %s at step %d", path, run.start_step)


# ----------------------------------------------------------------------------------------- logging


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


# ----------------------------------------------------------------------------------------- outputs


def pipeline_conditioning(args, id2label) -> dict:
    """DDPMPlusPipeline's class keywords for a conditional run (class names, null id, dropout); {} otherwise."""
    if id2label is None:
        return {}
    return {"id2label": id2label, "null_class_id": len(id2label), "class_dropout_prob": args.class_dropout_prob}


def make_pipeline(unet, noise_scheduler, conditioning=None):
    """A DDPMPlusPipeline around ``unet`` with a fresh scheduler copy (never the training object)."""
    scheduler = DDPMPlusScheduler.from_config(noise_scheduler.config)
    pipe = DDPMPlusPipeline(unet=unet, scheduler=scheduler, **(conditioning or {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


GRID_MAX_CLASSES = 16  # rows of a conditional sample grid: every class, or this many evenly spaced ones


def grid_class_labels(num_classes: int, batch_size: int) -> tuple[list[int], int]:
    """(labels, rows) of a conditional sample grid: one row per class (a fixed, evenly spaced subset of
    ``GRID_MAX_CLASSES`` classes when there are more), ``batch_size // rows`` images per row (at least 1)."""
    if num_classes <= GRID_MAX_CLASSES:
        classes = list(range(num_classes))
    else:
        classes = sorted({round(i * (num_classes - 1) / (GRID_MAX_CLASSES - 1)) for i in range(GRID_MAX_CLASSES)})
    per_row = max(1, batch_size // len(classes))
    return [c for c in classes for _ in range(per_row)], len(classes)


class ema_weights:
    """Context manager: the model holds the EMA weights inside, its own weights again after."""

    def __init__(self, ema, model):
        self.ema, self.model = ema, model

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


def save_sample_grid(args, model, ema, noise_scheduler, step, conditioning=None) -> Path:
    """Sample ``--eval_batch_size`` images with EMA weights and a respaced scheduler copy; main process only.
    ``model`` is the unwrapped UNet2DModel (not DDP, not compiled). A conditional model's grid has one row
    per class (:func:`grid_class_labels`), sampled at ``--eval_guidance_scale``."""
    labels, rows, extra = None, None, {}
    if conditioning:
        labels, rows = grid_class_labels(len(conditioning["id2label"]), args.eval_batch_size)
        extra = {"class_labels": labels, "guidance_scale": args.eval_guidance_scale}
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with ema_weights(ema, model), torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            generator = torch.Generator(device=model.device).manual_seed(args.seed)
            images = make_pipeline(model, noise_scheduler, conditioning)(
                batch_size=len(labels) if labels else args.eval_batch_size, generator=generator,
                num_inference_steps=args.eval_inference_steps, output_type="pil", **extra,
            ).images  # fmt: skip
        finally:
            model.train()
    image_grid(images, rows=rows).save(path)
    return path


def save_final_pipeline(args, model, ema, noise_scheduler, conditioning=None) -> None:
    """The pipeline (safetensors) into ``output_dir``, atomically: ``model_index.json`` appears last."""
    with ema_weights(ema, model):
        ckpt.save_pipeline(make_pipeline(model, noise_scheduler, conditioning), args.output_dir)


def write_card(args, summary, num_processes, conditioning=None) -> Path:
    return hub.write_model_card(
        args.output_dir,
        repo_id=args.hub_model_id,
        training_config=without_secrets(vars(args)),
        dataset_name=args.dataset_name,
        dataset_description=(
            "scikit-learn's digits (bundled with ddpm_plus: train split, 1,437 images of 8x8 with 17 grey levels)"
            if uses_digits(args)
            else f"image folder {args.train_data_dir}"
            if args.train_data_dir
            else None
        ),  # fmt: skip
        hardware=hub.describe_hardware(num_processes),
        train_steps=summary["global_step"],
        images_per_second=summary["images_per_s"],
        final_loss=summary["final_loss"],
        id2label=(conditioning or {}).get("id2label"),
        class_dropout_prob=(conditioning or {}).get("class_dropout_prob"),
        grid_guidance_scale=args.eval_guidance_scale if conditioning else None,
    )


def push(args, *, run_as_future=False):
    return hub.push_output_dir(
        args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
        run_as_future=run_as_future,
    )  # fmt: skip


def write_extra_state(directory, *, global_step, layout, lr_scheduler, ema, importance_sampler):
    if ema is not None:
        ckpt.save_ema(directory, ema)
    if importance_sampler is not None:
        ckpt.save_importance_sampler(directory, importance_sampler)
    ckpt.save_lr_scheduler(directory, lr_scheduler)
    ckpt.write_json(directory / ckpt.STATE_FILE, {"global_step": global_step, **layout})  # marks it complete


def _write_checkpoint(run: TrainingRun, meter: TrainingMeter, step: int) -> Path:
    """checkpoint-{step} (all processes; raises CheckpointWriteError, keeping the earlier ones, if the write
    fails), then pruning and a log line on the main process."""
    meter.check_finite()
    path = ckpt.save_checkpoint(
        run.accelerator, run.output_dir, step,
        lambda d: write_extra_state(d, global_step=step, layout=run.layout, lr_scheduler=run.lr_scheduler,
                                    ema=run.ema, importance_sampler=run.importance_sampler),
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
    _write_checkpoint(run, meter, step)
    if not run.accelerator.is_main_process:
        return
    if args.push_checkpoints and not done:  # the current EMA pipeline, uploaded in the background
        save_final_pipeline(args, run.model, run.ema, run.noise_scheduler, run.conditioning)
        write_card(
            args,
            {"global_step": step, "images_per_s": None, "final_loss": meter.last_loss},
            run.accelerator.num_processes,
            run.conditioning,
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
            path = _write_checkpoint(run, meter, step)
    meter.progress.close()
    run.accelerator.end_training()
    raise TrainingInterrupted(signum, step, path)  # main() prints it and exits with 128 + signum


def maybe_save_samples(run: TrainingRun, meter: TrainingMeter, step: int, done: bool) -> None:
    """Every ``--save_images_steps`` (0: never) and at the end: a sample grid, on the main process."""
    every = run.args.save_images_steps
    if not (every and step % every == 0) and not done:
        return
    meter.check_finite()
    if run.accelerator.is_main_process:
        run.last_grid = save_sample_grid(run.args, run.model, run.ema, run.noise_scheduler, step, run.conditioning)
    run.accelerator.wait_for_everyone()


def maybe_evaluate(run: TrainingRun, meter: TrainingMeter, step: int, done: bool) -> None:
    """Every ``--eval_steps`` (0: never) and at the end: the EMA weights' metrics, logged as ``eval/...``."""
    every = run.args.eval_steps
    if not every or (step % every and not done):
        return
    meter.check_finite()
    if run.accelerator.is_main_process:
        devices = [run.model.device.index or 0] if run.model.device.type == "cuda" else []
        with ema_weights(run.ema, run.model), torch.random.fork_rng(devices=devices), torch.no_grad():
            run.model.eval()
            try:
                logs = run.evaluation.evaluate(
                    run.args, make_pipeline(run.model, run.noise_scheduler, run.conditioning), step
                )
            finally:
                run.model.train()
        run.accelerator.log(logs, step=step)
    run.accelerator.wait_for_everyone()


def finish(run: TrainingRun, meter: TrainingMeter, step: int) -> dict:
    """The final pipeline and model card (main process), the end of tracking, and the push if asked."""
    meter.progress.close()
    meter.check_finite()
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    trained_images = (step - run.start_step) * run.layout["samples_per_step"]
    summary = {
        "global_step": step,
        "final_loss": meter.last_loss,
        "images_per_s": trained_images / meter.train_time if meter.train_time > 0 else None,
        "unet_parameters": sum(p.numel() for p in run.model.parameters()),
        "num_processes": accelerator.num_processes,
        "last_grid": str(run.last_grid) if run.last_grid else None,
    }
    if accelerator.is_main_process:
        save_final_pipeline(args, run.model, run.ema, run.noise_scheduler, run.conditioning)
        write_card(args, summary, accelerator.num_processes, run.conditioning)
        if run.evaluation is not None and run.evaluation.last:
            rows, model_index = run.evaluation.card()
            hub.set_card_evaluation(args.output_dir, rows, model_index=model_index)
            summary["evaluation"] = run.evaluation.last
        logger.info("saved the pipeline and model card to %s: %s", run.output_dir, summary)
    accelerator.end_training()
    if accelerator.is_main_process and args.push_to_hub:
        for future in run.checkpoint_pushes:
            if future.exception() is not None:
                logger.warning("a checkpoint push failed (the final push follows): %s", future.exception())
        commit = push(args)
        logger.info("pushed %s to %s", run.output_dir, commit.commit_url)
    return summary


# ----------------------------------------------------------------------------------------- the loop


def train(args) -> dict:
    """Prepare, then per optimizer step: batches, loss, optimizer and EMA (``training_step``), then one
    call each for logging, checkpointing and sample grids. Returns a summary dict.

    On SIGTERM/SIGINT it finishes the optimizer step, saves a checkpoint and raises
    :class:`TrainingInterrupted` (ddpm_plus/preemption.py). The output_dir lock is released on any exit."""
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
        out = run.step(batch, micro_step)
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


def main(argv=None, prog: str | None = None):
    """``accelerate launch -m ddpm_plus.train [flags]`` / ``ddpm-plus train [flags]``."""
    args = parse_args(argv, prog)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    redact = RedactSecrets(args.hub_token)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(redact)
    if args.hub_token and os.environ.get("RANK", "0") == "0":
        logger.warning(hub.TOKEN_ON_COMMAND_LINE)
    try:
        return train(args)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from e
    except (
        NonFiniteLossError, ValueError, hub.HubPushError, ckpt.CheckpointWriteError, run_lock.OutputDirLockedError,
    ) as e:  # fmt: skip
        print(f"error: {redact_text(str(e), args.hub_token)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from e
    finally:
        for handler in handlers:
            handler.removeFilter(redact)


if __name__ == "__main__":
    main()
