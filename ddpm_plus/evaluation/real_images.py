"""The real images an evaluation compares with, converted exactly as the trainer converts them: the bundled
digits, a local image folder or a Hub dataset (:class:`~ddpm_plus.data.DatasetSource` decides which), on the
data's own grid (17 levels for the digits, 256 for 8-bit images)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import (
    DIGITS_NUM_BINS,
    DatasetKind,
    DatasetSource,
    ImageTransform,
    digits_heldout_tensor,
    load_digits_arrays,
    load_image_dataset,
    prepare_dataset,
)
from .errors import DatasetError
from .sample_metrics import quantize_uint8

__all__ = ["IMAGE_BINS", "EvalImages", "load_eval_images", "load_analytic_images"]

IMAGE_BINS = 256


@dataclass
class EvalImages:
    """Real images of an evaluation dataset at the model's resolution and channels."""

    images: torch.Tensor  # [N, C, H, W] float32 in [-1, 1], on the data's grid
    num_bins: int  # the data's grid: 17 for the digits, 256 for 8-bit images
    description: str
    key: dict  # what identifies these images in the reference-statistics cache
    labels: np.ndarray | None = None  # class ids (dataset order), when a label column was asked for
    is_digits: bool = False

    def uint8(self) -> torch.Tensor:
        """The images as uint8 [N, C, H, W] (the digits' 17 levels map to round(k·255/16), as their PNGs)."""
        return quantize_uint8((self.images + 1) / 2)


def _raw_dataset(source: DatasetSource, split: str, dataset_config, image_column):
    if source.is_digits:
        if dataset_config is not None or image_column != "image":
            raise DatasetError(
                "dataset_config and image_column apply to image folders and Hub datasets, not the digits"
            )
        return load_image_dataset(split=split)
    if source.kind is DatasetKind.FOLDER:
        return load_image_dataset(train_data_dir=source.location, split=split, image_column=image_column)
    return load_image_dataset(
        dataset_name=source.location, dataset_config_name=dataset_config, split=split, image_column=image_column
    )


def load_eval_images(
    dataset: str = "digits",
    *,
    resolution: int,
    channels: int,
    split: str | None = None,
    dataset_config: str | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    max_images: int | None = None,
) -> EvalImages:
    """``dataset``: ``"digits"`` (bundled; default split ``test``), a local image folder (``imagefolder``,
    default split ``train``) or a Hub dataset id (default split ``train``). Images go through the trainer's
    own :func:`~ddpm_plus.data.load_image_dataset`, :class:`~ddpm_plus.data.ImageTransform` (center crop, no
    flip) and :func:`~ddpm_plus.data.prepare_dataset`. Unreadable input: :class:`DatasetError`."""
    source = DatasetSource.parse(dataset)
    split = split or ("test" if source.is_digits else "train")
    num_bins = DIGITS_NUM_BINS if source.is_digits else IMAGE_BINS
    try:
        raw = _raw_dataset(source, split, dataset_config, image_column)
        if max_images is not None:
            raw = raw.select(range(min(max_images, len(raw))))
        transform = ImageTransform(resolution, channels, center_crop=True, num_bins=num_bins)
        data = prepare_dataset(raw, transform, label_column=label_column)
    except DatasetError:
        raise
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, datasets' DatasetNotFoundError, network
        raise DatasetError(f"dataset {dataset!r}: {err}") from err
    images = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    labels = None
    if label_column is not None:
        labels = np.array([int(data[i]["class_labels"]) for i in range(len(data))])
    folder = source.kind is DatasetKind.FOLDER
    key = {
        "dataset": "digits" if source.is_digits else (str(Path(source.location).resolve()) if folder else dataset),
        "config": dataset_config,
        "split": split,
        "image_column": image_column,
        "resolution": resolution,
        "channels": channels,
        "num_images": len(images),
    }
    description = source.describe() + f", split={split!r}" + (f", config={dataset_config!r}" if dataset_config else "")
    return EvalImages(images, num_bins, description, key, labels, source.is_digits)


def load_analytic_images(
    dataset: str, *, resolution: int, channels: int, split: str, num_images: int | None, num_bins: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(images [N, C, H, W] in [-1, 1], digit labels [N] or None, description) for Analytic-DPM's moments:
    the digits' ``split`` (train, test or all) or a local image folder snapped to ``num_bins`` levels (None:
    8 bit); the first ``num_images``. Hub datasets are not supported (:class:`DatasetError`)."""
    source = DatasetSource.parse(dataset)
    if source.is_digits:
        images = digits_heldout_tensor(resolution, channels, split=split)
        labels = torch.as_tensor(load_digits_arrays(split)[1])
        where = f"bundled scikit-learn digits, split={split!r}"
    elif source.kind is DatasetKind.FOLDER:
        transform = ImageTransform(resolution, channels, center_crop=True, num_bins=num_bins)
        try:
            data = prepare_dataset(load_image_dataset(train_data_dir=source.location), transform)
        except (ValueError, OSError) as err:
            raise DatasetError(f"dataset {dataset!r}: {err}") from err
        count = len(data) if num_images is None else min(num_images, len(data))
        images, labels = torch.stack([data[i]["pixel_values"] for i in range(count)]), None
        where = source.describe()
    else:
        raise DatasetError(f"dataset must be 'digits' or a local image folder; got {dataset!r}")
    if num_images is not None:
        images = images[:num_images]
        labels = None if labels is None else labels[:num_images]
    return images, labels, where
