"""The trainer's data pipeline: seeded epoch order and augmentation, cut to whole optimizer steps.

The data order of epoch e is a permutation seeded by (seed, e); random augmentation of sample i in
epoch e is seeded by (seed, e, i). So a resumed run sees the same batches as an uninterrupted one, and
N processes see exactly what one process with N times the batch sees.

With ``--class_conditional`` each batch also holds ``class_labels`` (checked before training: see
``ddpm_plus.data.class_labels_of``). Label dropout is not done here but in the training step, from the
step-seeded generator (``ddpm_plus.trainer.step.drop_labels``), so it is independent of workers and resuming.
"""

from __future__ import annotations

import hashlib
import signal

import torch

from ..data import (
    BadImageError,
    DatasetSource,
    ImageTransform,
    LabelColumnError,
    load_image_dataset,
    prepare_dataset,
)


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


def _load_dataset(args, accelerator, samples_per_step: int):
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
        args.resolution,
        args.channels,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        num_bins=DatasetSource.from_flags(args.dataset_name, args.train_data_dir).num_bins,
    )
    try:
        return prepare_dataset(
            raw,
            transform,
            skip_bad_images=args.skip_bad_images,
            min_size=samples_per_step,
            label_column=args.label_column if args.class_conditional else None,
        )
    except BadImageError:
        raise  # names the unreadable file; the batch-size note below does not apply
    except LabelColumnError as e:
        raise ValueError(f"--class_conditional: {e}") from e  # the batch-size note does not apply
    except ValueError as e:
        raise ValueError(
            f"{e}; one optimizer step needs --train_batch_size {args.train_batch_size} x "
            f"{accelerator.num_processes} process(es) x --gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps} = {samples_per_step} images"
        ) from e


def build_dataloader(args, accelerator):
    """Returns (loader, sampler, number of images, number of grey levels of the data, id2label); id2label
    (class id -> name) is None unless ``--class_conditional``."""
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    dataset = _load_dataset(args, accelerator, samples_per_step)
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
        worker_init_fn=ignore_stop_signals if args.dataloader_num_workers > 0 else None,
    )
    num_bins = DatasetSource.from_flags(args.dataset_name, args.train_data_dir).num_bins or 256  # else 8-bit
    return loader, sampler, len(dataset), num_bins, dataset.id2label


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM (Ctrl-C and Slurm signal the whole process group): the
    main process handles them, finishes its step and checkpoints, then shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
