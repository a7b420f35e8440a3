"""What a run is made of, built before its first step (``prepare``): the accelerator, the data, the UNet, the
noise scheduler, the optimizer and LR schedule, the EMA, the output directory's lock, and the state of a
resumed checkpoint. ``TrainingRun`` holds them."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..models.adm_unet import ADMUNetModel
from ..redaction import without_secrets
from ..schedulers.options import VarianceType
from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler
from . import checkpointing as ckpt
from . import run_lock
from .args import build_scheduler
from .collective_errors import all_or_none
from .data import build_dataloader
from .latent_cache import build_latent_dataloader
from .latents import denoiser_shape, load_vae
from .loss_types import LossType
from .losses import ImportanceSampler
from .periodic_evaluation import PeriodicEvaluation
from .streaming import build_streaming_loader

__all__ = ["TrainingRun", "build_accelerator", "build_ema", "build_optimizer", "build_unet", "prepare", "resume"]

logger = logging.getLogger("ddpm_plus.train")


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
    """A UNet2DModel (or with ``--model_type adm`` an ADMUNetModel) from the shape flags or a local config;
    2x output channels for learned variances; with ``num_classes``, a class embedding of ``num_classes + 1``
    ids (the last: the null class)."""
    channels, size = denoiser_shape(args)  # the images', or with --vae their latents'
    out_channels = channels * (2 if VarianceType(args.variance_type).learned else 1)
    if args.model_type == "adm":
        return build_adm_unet(args, channels, size, out_channels, num_classes)
    classes = {} if num_classes is None else {"num_class_embeds": num_classes + 1, "class_embed_type": None}
    if args.model_config_name_or_path is None:
        return UNet2DModel(
            sample_size=size,
            in_channels=channels,
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
    if config.get("in_channels") != channels or config.get("out_channels") != out_channels:
        given = f"--vae {args.vae} ({channels} latent channels)" if args.vae else f"--channels {channels}"
        raise ValueError(
            f"--model_config_name_or_path {path}: in_channels/out_channels are {config.get('in_channels')}/"
            f"{config.get('out_channels')}, but {given} with --variance_type "
            f"{args.variance_type} needs {channels}/{out_channels}"
        )
    config["sample_size"] = size
    return UNet2DModel.from_config({**config, **classes})


def build_adm_unet(args, channels: int, size: int, out_channels: int, num_classes: int | None) -> ADMUNetModel:
    """The improved-DDPM/ADM UNet (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021) from the trainer's shape flags."""
    first = args.block_out_channels[0]
    return ADMUNetModel(
        sample_size=size,
        in_channels=channels,
        out_channels=out_channels,
        model_channels=first,
        channel_mult=[c / first for c in args.block_out_channels],
        num_res_blocks=args.layers_per_block,
        attention_resolutions=args.attention_resolutions,
        num_heads=args.num_heads,
        num_head_channels=args.attention_head_dim,
        use_scale_shift_norm=args.use_scale_shift_norm,
        resblock_updown=args.resblock_updown,
        use_new_attention_order=args.use_new_attention_order,
        dropout=args.dropout,
        num_class_embeds=None if num_classes is None else num_classes + 1,
        rescale_timesteps=args.rescale_timesteps,
        num_train_timesteps=args.num_train_timesteps,
    )


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


def pipeline_conditioning(args, id2label) -> dict:
    """DDPMPlusPipeline's class keywords for a conditional run (class names, null id, dropout); {} otherwise."""
    if id2label is None:
        return {}
    return {"id2label": id2label, "null_class_id": len(id2label), "class_dropout_prob": args.class_dropout_prob}


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
    steps_per_epoch: int | None  # None with --streaming (no fixed epoch length)
    layout: dict
    conditioning: dict = field(default_factory=dict)  # DDPMPlusPipeline's class keywords; {} unconditional
    start_step: int = 0
    last_grid: Path | None = None
    checkpoint_pushes: list = field(default_factory=list)
    evaluation: PeriodicEvaluation | None = None  # --eval_steps, on every process (each takes its share)
    vae: object | None = None  # --vae: the frozen AutoencoderKL/VQModel the denoiser's latents decode with

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def batches(self):
        """The batches from ``start_step`` to the end: each epoch in its seeded order, the batches a
        resumed run already consumed in its first epoch skipped."""
        if self.args.streaming:  # one endless stream per process, started where the checkpoint left it
            yield from self.loader.batches(self.accelerator.device)
            return
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


def _prepare_output_dir(accelerator, output_dir: Path) -> None:
    """Before any training: create ``output_dir``, check that it is writable, take its run lock
    (ddpm_plus/trainer/run_lock.py; released when ``train`` returns or raises) and delete what a killed run left.
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


def build_data(args, accelerator, vae=None):
    """``build_dataloader``'s (loader, sampler, number of images, grey levels, id2label), on ``vae``'s cached
    latents when given, plus what a checkpoint's data layout adds (with ``vae``: the cache key and scale)."""
    if vae is not None:
        return build_latent_dataloader(args, accelerator, vae)
    if args.streaming:  # --streaming: unknown length and no sampler; 8-bit images; the stream's layout
        loader, id2label = build_streaming_loader(args, accelerator)
        return loader, None, None, 256, id2label, loader.layout
    return (*build_dataloader(args, accelerator), {})


def setup_evaluation(args, accelerator) -> PeriodicEvaluation | None:
    """``--eval_steps``: ``PeriodicEvaluation.setup`` (options, extractors, real images) on every process. An
    error on any one of them (a bad dataset split, a missing extra) stops them all with its message."""
    with all_or_none(accelerator, "setting up the evaluation", quiet=(ValueError,)):
        return PeriodicEvaluation.setup(args, accelerator.device)


def prepare(args) -> TrainingRun:
    """Accelerator, data, model, optimizer, schedules and EMA; resumed from a checkpoint when asked."""
    accelerator = build_accelerator(args)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)  # the same initial weights on every process
    _prepare_output_dir(accelerator, Path(args.output_dir))
    vae = load_vae(args, accelerator.device) if args.vae else None  # --vae: train on its cached latents
    loader, sampler, num_images, num_bins, id2label, data_layout = build_data(args, accelerator, vae)
    noise_scheduler = build_scheduler(args)
    conditioning = pipeline_conditioning(args, id2label)
    unet = build_unet(args, None if id2label is None else len(id2label))
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args, unet, accelerator.device)
    if args.streaming:  # not through accelerate's loader wrapper: each process reads its own slots of the stream
        unet, optimizer = accelerator.prepare(unet, optimizer)
    else:
        unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ga = args.gradient_accumulation_steps
    steps_per_epoch = None if args.streaming else len(loader) // ga  # exact: EpochSampler keeps whole steps
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
        importance_sampler=ImportanceSampler(args.num_train_timesteps) if args.loss == LossType.VLB else None,
        num_bins=num_bins, max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch,
        layout={"samples_per_step": args.train_batch_size * accelerator.num_processes * ga,
                "steps_per_epoch": steps_per_epoch, "seed": args.seed,
                **({"num_classes": len(id2label), "class_dropout_prob": args.class_dropout_prob} if id2label else {}),
                **data_layout},
        conditioning=conditioning, vae=vae,
        evaluation=setup_evaluation(args, accelerator),
    )  # fmt: skip
    with all_or_none(accelerator, "resuming", quiet=(ValueError,)):  # a failure on one process stops all
        resume(run)
    if args.logger != "none":
        accelerator.init_trackers("train", config=tracker_config(args))
    logger.info(
        "%s images, %d processes, %d images per optimizer step, %s steps per epoch, %d steps, UNet %.2fM parameters",
        num_images, accelerator.num_processes, run.layout["samples_per_step"], steps_per_epoch, max_train_steps,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )  # fmt: skip
    return run


def resume(run: TrainingRun) -> None:
    """Load ``--resume_from_checkpoint`` into ``run`` (sets ``start_step``), or seed a new run."""
    args = run.args
    path = None
    if args.resume_from_checkpoint == "latest":
        path = ckpt.latest_checkpoint(run.output_dir)
        if path is None:
            logger.info("no complete checkpoint in %s: starting a new run", run.output_dir)
    elif args.resume_from_checkpoint is not None:
        path = Path(args.resume_from_checkpoint)
    if path is None:  # a new run, also under `--resume_from_checkpoint latest` before its first checkpoint
        set_seed(args.seed, device_specific=True)  # dropout masks differ between processes
        return
    # Every file checked (present, JSON/safetensors intact) before anything is loaded: a bad checkpoint is a
    # CorruptCheckpointError naming the file, not a traceback from inside accelerate.
    ckpt.check_checkpoint(
        path, num_processes=run.accelerator.num_processes, ema=run.ema is not None,
        importance_sampler=run.importance_sampler is not None,
    )  # fmt: skip
    run.start_step = ckpt.load_training_state(path, run.layout)
    if args.streaming:  # the stream's position (data_state.json), checked before anything is loaded
        run.loader.load_checkpoint(path)
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
