"""Train an unconditional DDPM (``UNet2DModel`` + ``DDPMPlusScheduler``) with accelerate.

    accelerate launch training/train.py --config training/configs/digits.yaml --output_dir digits-ddpm

Writes ``output_dir/``: the final ``DDPMPlusPipeline`` (EMA weights when ``--use_ema``; safetensors),
``checkpoint-N/``, ``logs/`` (TensorBoard), ``samples/step-N.png`` and a ``README.md`` model card.
Flags: ``python training/train.py --help`` (see training/args.py).

Reproducibility: the data order of epoch e is a permutation seeded by (seed, e); random augmentation
of sample i in epoch e is seeded by (seed, e, i); the noise and timesteps of micro-step k are drawn
for the GLOBAL batch from a generator seeded by (seed, k) and sliced per process. So a resumed run
continues the same trajectory, and N processes see exactly what one process with N times the batch
sees. Dropout uses torch's global RNG, whose state accelerate checkpoints per process.

``training_step`` is the whole per-micro-step computation (noising, forward, loss, backward, clip,
optimizer/LR/EMA updates); import it to benchmark the real thing.

Test-only hook: ``DDPM_PLUS_TEST_NAN_AT_STEP=N`` turns the inputs of optimizer step N into NaN (to
test the non-finite-loss stop). Unset, it does nothing. (See also training/checkpointing.py.)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make `training.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler  # noqa: E402
from ddpm_plus import hub  # noqa: E402
from ddpm_plus.data import (  # noqa: E402
    DIGITS_NUM_BINS,
    BadImageError,
    ImageTransform,
    load_image_dataset,
    prepare_dataset,
)
from ddpm_plus.losses import ImportanceSampler, compute_loss  # noqa: E402
from training import checkpointing as ckpt  # noqa: E402
from training.args import LEARNED_VARIANCE_TYPES, parse_args  # noqa: E402

logger = logging.getLogger("ddpm_plus.train")
_NAN_ENV = "DDPM_PLUS_TEST_NAN_AT_STEP"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs and processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys: a permutation seeded by (seed, epoch), cut to whole optimizer
    steps (``samples_per_step`` = per-process batch x processes x accumulation), so every epoch has
    the same number of steps and a checkpoint's step fixes the epoch and the batches to skip."""

    def __init__(self, num_samples: int, samples_per_step: int, seed: int):
        self.num_samples = num_samples
        self.length = num_samples // samples_per_step * samples_per_step
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.num_samples, generator=g)[: self.length].tolist()
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return self.length


class SeededAugmentation(torch.utils.data.Dataset):
    """Looks up ``(epoch, index)`` keys; seeds the transform's generator with (seed, epoch, index)
    first, so random crops/flips do not depend on process count, workers or resuming."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.generator = torch.Generator()
        dataset.transform.generator = self.generator

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.generator.manual_seed(derive_seed(self.seed, "augment", epoch, index))
        return self.dataset[index]


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
) -> StepOutput:
    """One micro-step on ``batch["pixel_values"]`` (images in [-1, 1]).

    Noising x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (seed eq. 4) and the loss are computed in
    float32 outside the model's autocast; under gradient accumulation the optimizer, LR scheduler
    (counted in optimizer steps) and EMA advance only when ``accelerator.sync_gradients``. No host
    synchronisation unless ``importance_sampler`` (vlb) must record the gathered losses.
    """
    x0 = batch["pixel_values"].to(torch.float32)
    noise, timesteps, weights = draw_noise_and_timesteps(
        x0, noise_scheduler.config.num_train_timesteps, step_seed, accelerator, importance_sampler
    )
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    grad_norm = None
    with accelerator.accumulate(unet):
        model_output = unet(x_t, timesteps).sample.float()
        losses = compute_loss(
            noise_scheduler, model_output, x0, x_t, noise, timesteps,
            loss_type=loss_type, snr_gamma=snr_gamma, num_bins=num_bins,
        )
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
    # each train alone (see shared/notes/accelerate.md); with it they form a gloo group.
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


def build_scheduler(args):
    return DDPMPlusScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        beta_start=args.beta_start,
        beta_end=args.beta_end,
        variance_type=args.variance_type,
        prediction_type=args.prediction_type,
        clip_sample=args.clip_sample,
        rescale_betas_for_num_timesteps=args.rescale_betas_for_num_timesteps,
    )


def build_unet(args):
    """A UNet2DModel from the shape flags or a local config; 2x output channels for learned variances."""
    out_channels = args.channels * (2 if args.variance_type in LEARNED_VARIANCE_TYPES else 1)
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
    return UNet2DModel.from_config(config)


def build_dataloader(args, accelerator):
    digits = args.dataset_name is None and args.train_data_dir is None
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    with accelerator.main_process_first():
        raw = load_image_dataset(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_data_dir=args.train_data_dir,
            image_column=args.image_column,
            split="train",
            cache_dir=args.cache_dir,
        )
    transform = ImageTransform(
        args.resolution, args.channels, center_crop=args.center_crop, random_flip=args.random_flip,
        num_bins=DIGITS_NUM_BINS if digits else None,
    )
    try:
        dataset = prepare_dataset(raw, transform, skip_bad_images=args.skip_bad_images, min_size=samples_per_step)
    except BadImageError:
        raise  # names the unreadable file; the batch-size note below does not apply
    except ValueError as e:
        raise ValueError(
            f"{e}; one optimizer step needs --train_batch_size {args.train_batch_size} x "
            f"{accelerator.num_processes} process(es) x --gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps} = {samples_per_step} images"
        ) from e
    sampler = EpochSampler(len(dataset), samples_per_step, args.seed)
    loader = torch.utils.data.DataLoader(
        SeededAugmentation(dataset, args.seed),
        batch_size=args.train_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
        # Own generator: DataLoader draws its base seed from it instead of the global RNG.
        generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, sampler, len(dataset), (DIGITS_NUM_BINS if digits else 256)


def build_ema(args, unet):
    if args.ema_decay is not None:  # fixed decay from the first update on (DDPM)
        return EMAModel(unet.parameters(), decay=args.ema_decay, min_decay=args.ema_decay, foreach=True)
    return EMAModel(
        unet.parameters(), decay=args.ema_max_decay, min_decay=args.ema_min_decay, use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma, power=args.ema_power, foreach=True,
    )


# ----------------------------------------------------------------------------------------- outputs


def make_pipeline(unet, noise_scheduler):
    """A DDPMPlusPipeline around ``unet`` with a fresh scheduler copy (never the training object)."""
    pipe = DDPMPlusPipeline(unet=unet, scheduler=DDPMPlusScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def image_grid(images, gap: int = 8):
    """Images (PIL) in a near-square grid, each upscaled (nearest) to at least 64 pixels, with a grey
    ``gap`` between tiles (diffusers' make_image_grid butts tiles together: digits on black then run
    into each other)."""
    n = len(images)
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    cols = n // rows
    size = images[0].width
    tile = size * max(1, math.ceil(64 / size))
    grid = Image.new("RGB", (cols * (tile + gap) + gap, rows * (tile + gap) + gap), (128, 128, 128))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((tile, tile), resample=Image.Resampling.NEAREST),
                   (gap + (i % cols) * (tile + gap), gap + (i // cols) * (tile + gap)))
    return grid


def save_sample_grid(args, model, ema, noise_scheduler, step) -> Path:
    """Sample ``--eval_batch_size`` images with EMA weights and a respaced scheduler copy; main process only.
    ``model`` is the unwrapped UNet2DModel (not DDP, not compiled)."""
    path = Path(args.output_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with ema_weights(ema, model), torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            generator = torch.Generator(device=model.device).manual_seed(args.seed)
            images = make_pipeline(model, noise_scheduler)(
                batch_size=args.eval_batch_size, generator=generator,
                num_inference_steps=args.eval_inference_steps, output_type="pil",
            ).images
        finally:
            model.train()
    image_grid(images).save(path)
    return path


def save_final_pipeline(args, model, ema, noise_scheduler) -> None:
    with ema_weights(ema, model):
        make_pipeline(model, noise_scheduler).save_pretrained(args.output_dir, safe_serialization=True)


def write_card(args, summary, num_processes) -> Path:
    digits = args.dataset_name is None and args.train_data_dir is None
    return hub.write_model_card(
        args.output_dir,
        repo_id=args.hub_model_id,
        training_config=vars(args),
        dataset_name=args.dataset_name,
        dataset_description=(
            "scikit-learn's digits (bundled with ddpm_plus: train split, 1,437 images of 8x8 with 17 grey levels)"
            if digits else f"image folder {args.train_data_dir}" if args.train_data_dir else None
        ),
        hardware=hub.describe_hardware(num_processes),
        train_steps=summary["global_step"],
        images_per_second=summary["images_per_s"],
        final_loss=summary["final_loss"],
    )


def push(args, *, run_as_future=False):
    return hub.push_output_dir(
        args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
        run_as_future=run_as_future,
    )


def write_extra_state(directory, *, global_step, layout, lr_scheduler, ema, importance_sampler):
    if ema is not None:
        ckpt.save_ema(directory, ema)
    if importance_sampler is not None:
        ckpt.save_importance_sampler(directory, importance_sampler)
    ckpt.save_lr_scheduler(directory, lr_scheduler)
    ckpt.write_json(directory / ckpt.STATE_FILE, {"global_step": global_step, **layout})  # marks it complete


# ----------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        return train(args)
    except (NonFiniteLossError, ValueError, hub.HubPushError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from e


def train(args) -> dict:
    accelerator = build_accelerator(args)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)  # the same initial weights on every process
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_tmp(output_dir):
            logger.info("removed incomplete checkpoint %s", stale)
    accelerator.wait_for_everyone()

    loader, sampler, num_images, num_bins = build_dataloader(args, accelerator)
    noise_scheduler = build_scheduler(args)
    unet = build_unet(args)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=accelerator.device.type == "cuda",
    )
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ga = args.gradient_accumulation_steps
    steps_per_epoch = len(loader) // ga  # exact: EpochSampler keeps whole optimizer steps
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # Not passed to accelerator.prepare: its wrapper steps the schedule once per process per call
    # (diffusers' example scales by num_processes instead). Stepped on optimizer steps only, so warmup
    # and decay are counted in optimizer steps under gradient accumulation.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )
    model = accelerator.unwrap_model(unet)  # the UNet2DModel itself: EMA, sample grids, saving
    if args.compile:  # after prepare, so accelerate's wrappers (DDP, autocast) are compiled with it
        unet = torch.compile(unet, dynamic=False)
    ema = build_ema(args, model) if args.use_ema else None
    importance_sampler = None
    if args.loss == "vlb":
        importance_sampler = ImportanceSampler(args.num_train_timesteps)
    layout = {
        "samples_per_step": args.train_batch_size * accelerator.num_processes * ga,
        "steps_per_epoch": steps_per_epoch,
        "seed": args.seed,
    }

    global_step = 0
    if args.resume_from_checkpoint is not None:
        path = ckpt.latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest" else Path(
            args.resume_from_checkpoint
        )
        if path is None:
            logger.info("no complete checkpoint in %s: starting a new run", output_dir)
        else:
            global_step = ckpt.load_training_state(path, layout)
            accelerator.load_state(str(path))
            ckpt.load_lr_scheduler(path, lr_scheduler)
            if ema is not None:
                ckpt.load_ema(path, ema)
            if importance_sampler is not None:
                ckpt.load_importance_sampler(path, importance_sampler)
            logger.info("resumed from %s at step %d", path, global_step)
    else:
        set_seed(args.seed, device_specific=True)  # dropout masks differ between processes

    if args.logger != "none":
        accelerator.init_trackers("train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                   for k, v in vars(args).items()})
    unet_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "%d images, %d processes, %d images per optimizer step, %d steps per epoch, %d steps, UNet %.2fM parameters",
        num_images, accelerator.num_processes, layout["samples_per_step"], steps_per_epoch, max_train_steps,
        unet_params / 1e6,
    )

    nan_step = int(os.environ.get(_NAN_ENV, "0"))
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    grad_norm_last = torch.zeros((), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def check_finite():
        """Host sync: stop if any process saw a non-finite loss since the start."""
        bad = accelerator.gather(first_bad_step[None]).max().item()
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {bad}; stopping. "
                f"The last checkpoint before it (if any) in {output_dir} is intact: resume with "
                "--resume_from_checkpoint latest after lowering --learning_rate or checking the data."
            )

    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="steps")
    start_step, micro_step = global_step, global_step * ga
    interval_start, steps_in_interval = time.perf_counter(), 0
    train_time, last_loss, last_grid, checkpoint_pushes = 0.0, float("nan"), None, []
    first_epoch = global_step // steps_per_epoch
    skip = (global_step % steps_per_epoch) * ga
    unet.train()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:  # resumed from the last step
            break
        sampler.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if epoch == first_epoch and skip else loader
        epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            if nan_step and global_step + 1 == nan_step:
                batch["pixel_values"] = batch["pixel_values"] * float("nan")
            out = training_step(
                batch, unet, noise_scheduler, optimizer, lr_scheduler, accelerator,
                step_seed=derive_seed(args.seed, "noise", micro_step), loss_type=args.loss,
                snr_gamma=args.snr_gamma, max_grad_norm=args.max_grad_norm, num_bins=num_bins, ema=ema,
                importance_sampler=importance_sampler,
            )
            micro_step += 1
            loss_sum += out.loss
            first_bad_step = torch.where(
                (first_bad_step < 0) & ~torch.isfinite(out.loss), global_step + 1, first_bad_step
            )
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            steps_in_interval += 1
            if out.grad_norm is not None:
                grad_norm_last = out.grad_norm.detach()
            progress.update(1)

            done = global_step >= max_train_steps
            if global_step % args.logging_steps == 0 or done:
                check_finite()
                elapsed = time.perf_counter() - interval_start
                train_time += elapsed
                mean_loss = accelerator.reduce(loss_sum / (steps_in_interval * ga), reduction="mean").item()
                images_per_s = steps_in_interval * layout["samples_per_step"] / elapsed
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_per_s}
                if args.max_grad_norm > 0:
                    logs["grad_norm"] = grad_norm_last.item()
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
                last_loss = mean_loss
                loss_sum.zero_()
                steps_in_interval = 0
                interval_start = time.perf_counter()

            pause_start = time.perf_counter()
            if global_step % args.checkpointing_steps == 0 or done:
                check_finite()
                path = ckpt.save_checkpoint(
                    accelerator, output_dir, global_step,
                    lambda d: write_extra_state(d, global_step=global_step, layout=layout, lr_scheduler=lr_scheduler,
                                                ema=ema, importance_sampler=importance_sampler),
                )
                if accelerator.is_main_process:
                    for old in ckpt.prune_checkpoints(output_dir, args.checkpoints_total_limit):
                        logger.info("removed old checkpoint %s", old)
                    logger.info("saved %s", path)
                    if args.push_checkpoints and not done:  # current EMA pipeline, uploaded in the background
                        save_final_pipeline(args, model, ema, noise_scheduler)
                        write_card(args, {"global_step": global_step, "images_per_s": None, "final_loss": last_loss},
                                   accelerator.num_processes)
                        try:
                            checkpoint_pushes.append(push(args, run_as_future=True))
                        except hub.HubPushError as e:
                            logger.warning("checkpoint push not started: %s", e)
            if (args.save_images_steps and global_step % args.save_images_steps == 0) or done:
                check_finite()
                if accelerator.is_main_process:
                    last_grid = save_sample_grid(args, model, ema, noise_scheduler, global_step)
                accelerator.wait_for_everyone()
            interval_start += time.perf_counter() - pause_start  # throughput excludes checkpoints and grids
            if done:
                break
        if global_step >= max_train_steps:
            break
    progress.close()

    check_finite()
    accelerator.wait_for_everyone()
    trained_steps = global_step - start_step
    summary = {
        "global_step": global_step,
        "final_loss": last_loss,
        "images_per_s": trained_steps * layout["samples_per_step"] / train_time if train_time > 0 else None,
        "unet_parameters": unet_params,
        "num_processes": accelerator.num_processes,
        "last_grid": str(last_grid) if last_grid else None,
    }
    if accelerator.is_main_process:
        save_final_pipeline(args, model, ema, noise_scheduler)
        write_card(args, summary, accelerator.num_processes)
        logger.info("saved the pipeline and model card to %s: %s", output_dir, summary)
    accelerator.end_training()
    if accelerator.is_main_process and args.push_to_hub:
        for future in checkpoint_pushes:
            if future.exception() is not None:
                logger.warning("a checkpoint push failed (the final push follows): %s", future.exception())
        commit = push(args)
        logger.info("pushed %s to %s", output_dir, commit.commit_url)
    return summary


if __name__ == "__main__":
    main()
