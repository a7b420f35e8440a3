"""What a run leaves behind: sample grids, the final ``DDPMPlusPipeline`` (EMA weights), the model card, Hub
pushes, the trainer's own files in a checkpoint (``write_extra_state``; accelerate writes the rest), the end of a
run (``finish``) and its summary line."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import hub
from ..data import DatasetKind, DatasetSource
from ..image_grid import image_grid
from ..pipelines.pipeline_ddpm_plus import DDPMPlusPipeline
from ..pipelines.pipeline_latent_ddpm_plus import LatentDDPMPlusPipeline
from ..redaction import without_secrets
from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler
from . import checkpointing as ckpt
from .collective_errors import all_or_none
from .full_weights import main_process_model

if TYPE_CHECKING:
    from .components import TrainingRun
    from .meter import TrainingMeter

logger = logging.getLogger("ddpm_plus.train")


def make_pipeline(unet, noise_scheduler, conditioning=None, vae=None):
    """A DDPMPlusPipeline around ``unet`` with a fresh scheduler copy (never the training object); with ``vae``
    (``--vae``) a LatentDDPMPlusPipeline, whose images are the decoded latents."""
    scheduler = DDPMPlusScheduler.from_config(noise_scheduler.config)
    if vae is not None:
        pipe = LatentDDPMPlusPipeline(vae=vae, unet=unet, scheduler=scheduler, **(conditioning or {}))
    else:
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


def save_sample_grid(args, model, ema, noise_scheduler, step, conditioning=None, vae=None) -> Path:
    """Sample ``--eval_batch_size`` images with EMA weights and a respaced scheduler copy; main process only.
    ``model`` is the unwrapped UNet2DModel (not DDP, not compiled). A conditional model's grid has one row
    per class (:func:`grid_class_labels`), sampled at ``--eval_guidance_scale``. With ``vae`` the latents are
    decoded to images."""
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
            images = make_pipeline(model, noise_scheduler, conditioning, vae)(
                batch_size=len(labels) if labels else args.eval_batch_size, generator=generator,
                num_inference_steps=args.eval_inference_steps, output_type="pil", **extra,
            ).images  # fmt: skip
        finally:
            model.train()
    image_grid(images, rows=rows).save(path)
    return path


def save_final_pipeline(args, model, ema, noise_scheduler, conditioning=None, vae=None) -> None:
    """The pipeline (safetensors) into ``output_dir``, atomically: ``model_index.json`` appears last. With
    ``vae`` a LatentDDPMPlusPipeline (``vae/`` holds the VAE and, in its config, the latent scaling factor)."""
    with ema_weights(ema, model):
        ckpt.save_pipeline(make_pipeline(model, noise_scheduler, conditioning, vae), args.output_dir)


def dataset_description(args) -> str | None:
    """The card's words for the training data: the bundled digits or the image folder (a Hub dataset: its name)."""
    if getattr(args, "train_data_files", None):  # --streaming local shards
        return f"streamed shards {', '.join(args.train_data_files)}"
    source = DatasetSource.from_flags(args.dataset_name, args.train_data_dir)
    if source.is_digits:
        return "scikit-learn's digits (bundled with ddpm_plus: train split, 1,437 images of 8x8 with 17 grey levels)"
    return f"image folder {source.location}" if source.kind is DatasetKind.FOLDER else None


def latent_description(args, vae) -> str | None:
    """The card's words for a latent model: the VAE and the scaling factor (None for a pixel model)."""
    if vae is None:
        return None
    where = f"`{args.vae}`" + (f" (subfolder `{args.vae_subfolder}`)" if args.vae_subfolder else "")
    shape = f"{args.latent_channels}x{args.latent_size}x{args.latent_size}"
    return (
        f"This is a latent diffusion model (Rombach et al. 2022): the UNet denoises the {shape} latents of the "
        f"{type(vae).__name__} {where}, scaled by {vae.config.scaling_factor:.6g}, and the pipeline "
        f"(`LatentDDPMPlusPipeline`, VAE included in `vae/`) decodes them to {args.resolution}x{args.resolution} "
        "images."
    )


def write_card(args, summary, num_processes, conditioning=None, vae=None) -> Path:
    return hub.write_model_card(
        args.output_dir,
        repo_id=args.hub_model_id,
        training_config=without_secrets(vars(args)),
        dataset_name=args.dataset_name,
        dataset_description=dataset_description(args),
        hardware=hub.describe_hardware(num_processes),
        train_steps=summary["global_step"],
        images_per_second=summary["images_per_s"],
        final_loss=summary["final_loss"],
        id2label=(conditioning or {}).get("id2label"),
        class_dropout_prob=(conditioning or {}).get("class_dropout_prob"),
        grid_guidance_scale=args.eval_guidance_scale if conditioning else None,
        latent=latent_description(args, vae),
    )


def push(args, *, run_as_future=False):
    return hub.push_output_dir(
        args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
        run_as_future=run_as_future,
    )  # fmt: skip


def write_extra_state(directory, *, global_step, layout, lr_scheduler, ema, importance_sampler, data_state=None):
    if data_state is not None:  # --streaming: the position of the stream (StreamingLoader.state_dict)
        ckpt.write_json(directory / ckpt.DATA_STATE_FILE, data_state)
    if ema is not None:
        ckpt.save_ema(directory, ema)
    if importance_sampler is not None:
        ckpt.save_importance_sampler(directory, importance_sampler)
    ckpt.save_lr_scheduler(directory, lr_scheduler)
    ckpt.write_json(directory / ckpt.STATE_FILE, {"global_step": global_step, **layout})  # marks it complete


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
    model, ema = main_process_model(run.model, run.ema, accelerator)  # FSDP: the full weights, gathered
    # Written by the main process while the others wait; a failure there stops them all with its message.
    with all_or_none(accelerator, "writing the final pipeline and model card", quiet=(ckpt.CheckpointWriteError,)):
        if accelerator.is_main_process:
            save_final_pipeline(args, model, ema, run.noise_scheduler, run.conditioning, run.vae)
            write_card(args, summary, accelerator.num_processes, run.conditioning, run.vae)
            if run.evaluation is not None and run.evaluation.last:
                rows, model_index = run.evaluation.card()
                hub.set_card_evaluation(args.output_dir, rows, model_index=model_index)
                summary["evaluation"] = run.evaluation.last
            logger.info("saved the pipeline and model card to %s", run.output_dir)
    accelerator.end_training()
    if accelerator.is_main_process and args.push_to_hub:
        for future in run.checkpoint_pushes:
            if future.exception() is not None:
                logger.warning("a checkpoint push failed (the final push follows): %s", future.exception())
        commit = push(args)
        logger.info("pushed %s to %s", run.output_dir, commit.commit_url)
    return summary


def summary_line(summary: dict, output_dir) -> str:
    """The one line a finished run reports: optimizer steps, final loss (the mean of the last logging interval,
    all processes) and where the pipeline is."""
    loss = summary["final_loss"]
    trained = f"final loss {loss:.4g}" if math.isfinite(loss) else "no step trained in this run"
    steps = summary["global_step"]
    return f"finished: {steps} step{'' if steps == 1 else 's'}, {trained}, saved to {output_dir}"
