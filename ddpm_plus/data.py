"""Training and evaluation data: a bundled offline default (scikit-learn digits), Hub datasets and
imagefolders through ``datasets``, and the image transform to the model's tensors.

Pixels p in [0, 255] become x = p / 127.5 - 1 in [-1, 1] (Ho et al. 2020, Sec. 3.3). The digits are
stored as 8-bit images with level v in 0..16 at p = round(v * 255 / 16); passing
``num_bins=DIGITS_NUM_BINS`` to :class:`ImageTransform` puts them back exactly on the 17-level grid
x = v / 16 * 2 - 1 that bits/dim with ``num_bins=17`` expects.

Every image is decoded once in :func:`prepare_dataset`, before training starts, so an unreadable
file is reported (by path, else by dataset index) or skipped and counted up front. With a
``label_column`` (class-conditional training) the labels are checked there too: :func:`class_labels_of`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from enum import Enum

import datasets
import numpy as np
import PIL.Image
import torch

logger = logging.getLogger(__name__)

DIGITS_NUM_BINS = 17
DIGITS_SPLITS = ("train", "test", "all")
# The held-out split, stratified by label: take a permutation of the 1,797 indices from NumPy's
# legacy RandomState(0), whose stream NumPy keeps frozen across versions (Generator streams carry no
# such guarantee); sort it stably by label; every 5th entry from the first is "test" (360 images,
# 35 to 37 of each digit), the rest "train" (1,437). Both keep sklearn's order.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_STRIDE = 5
_CHECK_BATCH = 1024  # images per read in prepare_dataset's upfront decode pass
_DECODER = datasets.Image()
_RESAMPLE_NAMES = {m.name.lower(): m for m in PIL.Image.Resampling}


@functools.lru_cache(maxsize=1)
def _sklearn_digits():
    """The one read of scikit-learn's digits: read-only (levels [1797, 8, 8] uint8 in 0..16, labels [1797]
    int64), in sklearn's order."""
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    levels = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    levels.flags.writeable = labels.flags.writeable = False
    return levels, labels


def digits_split_indices(split="train"):
    """Sorted indices into sklearn's ``load_digits`` arrays for ``split`` in {"train", "test", "all"}."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {list(DIGITS_SPLITS)}, got split={split!r}")
    labels = _sklearn_digits()[1]
    if split == "all":
        return np.arange(len(labels))
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    test = np.zeros(len(labels), dtype=bool)
    test[order[::DIGITS_TEST_STRIDE]] = True
    return np.flatnonzero(test if split == "test" else ~test)


def load_digits_arrays(split="train"):
    """scikit-learn's digits of ``split`` as NumPy arrays (copies, in sklearn's order): grey levels
    [N, 8, 8] uint8 in 0..16 and labels [N] int64 in 0..9. Every digits loader of ddpm_plus reads them
    here (the dataset below, the evaluation classifier)."""
    indices = digits_split_indices(split)
    levels, labels = _sklearn_digits()
    return levels[indices], labels[indices]


def load_digits_dataset(split="train"):
    """scikit-learn's digits (8x8, levels 0..16) as a ``datasets.Dataset`` with columns ``image``
    (PIL mode "L", level v at pixel round(v * 255 / 16)) and ``label`` (0..9)."""
    levels, labels = load_digits_arrays(split)
    pixels = np.rint(levels * (255 / 16)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(p, mode="L") for p in pixels], "label": labels.tolist()},
        features=features,
    )


class DatasetKind(str, Enum):
    """Where images come from: the bundled digits, a local image folder, or a Hub dataset id."""

    DIGITS = "digits"
    FOLDER = "folder"
    HUB = "hub"


@dataclass(frozen=True)
class DatasetSource:
    """One image source, decided once: ``kind`` and, for a folder or a Hub dataset, its ``location``."""

    kind: DatasetKind
    location: str | None = None

    @classmethod
    def parse(cls, dataset: str | None) -> DatasetSource:
        """A ``--dataset`` value: ``"digits"`` (or None), an existing directory, else a Hub dataset id."""
        if dataset is None or dataset == DatasetKind.DIGITS.value:
            return cls(DatasetKind.DIGITS)
        return cls(DatasetKind.FOLDER if os.path.isdir(dataset) else DatasetKind.HUB, str(dataset))

    @classmethod
    def from_flags(cls, dataset_name: str | None, train_data_dir: str | None) -> DatasetSource:
        """The trainer's ``--dataset_name`` / ``--train_data_dir`` (neither: the digits)."""
        if dataset_name is not None and train_data_dir is not None:
            raise ValueError(
                f"give at most one of dataset_name and train_data_dir, got dataset_name={dataset_name!r} "
                f"and train_data_dir={train_data_dir!r}"
            )
        if train_data_dir is not None:
            return cls(DatasetKind.FOLDER, str(train_data_dir))
        return cls(DatasetKind.HUB, dataset_name) if dataset_name is not None else cls(DatasetKind.DIGITS)

    @property
    def is_digits(self) -> bool:
        return self.kind is DatasetKind.DIGITS

    @property
    def num_bins(self) -> int | None:
        """The data's own grid when it is not 8-bit: 17 levels for the digits."""
        return DIGITS_NUM_BINS if self.is_digits else None

    def describe(self) -> str:
        if self.is_digits:
            return "bundled scikit-learn digits"
        return f"image folder {self.location}" if self.kind is DatasetKind.FOLDER else f"Hub dataset {self.location}"


def load_image_dataset(
    dataset_name=None,
    dataset_config_name=None,
    train_data_dir=None,
    image_column="image",
    split="train",
    cache_dir=None,
):
    """Load the training images from exactly one source: a Hub dataset (``dataset_name``), a local
    imagefolder (``train_data_dir``), or, when neither is given, the bundled digits
    (:func:`load_digits_dataset`). The image column is renamed to ``image``."""
    source = DatasetSource.from_flags(dataset_name, train_data_dir)
    if source.is_digits:
        if dataset_config_name is not None:
            raise ValueError(f"dataset_config_name={dataset_config_name!r} needs dataset_name")
        return load_digits_dataset(split)
    if source.kind is DatasetKind.HUB:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    else:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"train_data_dir={train_data_dir!r} is not a directory")
        try:
            dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
        except datasets.data_files.EmptyDatasetError as err:
            raise ValueError(f"no image files found in train_data_dir={train_data_dir!r}: {err}") from err
        except Exception as err:  # e.g. a malformed metadata.csv, or no data in `split`
            if not _has_image_files(train_data_dir):  # only non-image files: datasets says "corresponds to no data"
                raise ValueError(
                    f"no image files found in train_data_dir={train_data_dir!r}: none of its files has an image "
                    "extension (.png, .jpg, .jpeg, .bmp, .gif, .webp, ...)"
                ) from err
            raise ValueError(
                f"could not load the imagefolder train_data_dir={train_data_dir!r} (split={split!r}): "
                f"{type(err).__name__}: {err}"
            ) from err
    if image_column not in dataset.column_names:
        raise ValueError(
            f"image_column={image_column!r} is not a column of the dataset; available columns: {dataset.column_names}"
        )
    if image_column != "image":
        if "image" in dataset.column_names:
            logger.warning("dropping the dataset's column 'image' in favour of image_column=%r", image_column)
            dataset = dataset.remove_columns("image")
        dataset = dataset.rename_column(image_column, "image")
    return dataset


_INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


class LabelColumnError(ValueError):
    """The class labels of ``label_column`` cannot be used (missing column, wrong type, a label outside the
    classes); the message names the column and the first offending row."""


def class_labels_of(dataset, label_column="label"):
    """The class labels of ``dataset``'s ``label_column`` as (labels [N] int64 array, id2label dict).

    A ``datasets.ClassLabel`` column (Hub datasets; an imagefolder with one sub-folder per class) gives
    its own names and range; a plain integer column gives classes 0..max with their numbers as names.
    A missing column, any other type, or a label outside the classes (e.g. ClassLabel's -1 for
    "no label") is a :class:`LabelColumnError` (a ValueError) naming the column and the first offending row."""
    if label_column not in dataset.column_names:
        hint = (
            " (an imagefolder gets a 'label' column only when its images sit in one sub-folder per class)"
            if label_column == "label"
            else ""
        )
        raise LabelColumnError(
            f"label_column={label_column!r} is not a column of the dataset{hint}; available columns: "
            f"{dataset.column_names}"
        )
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype in _INTEGER_DTYPES:
        names = None
    else:
        raise LabelColumnError(
            f"label_column={label_column!r} must hold integer class ids or be a datasets.ClassLabel; got {feature}"
        )
    values = dataset[label_column]  # respects a selection/shuffle of the dataset, unlike its raw table
    if any(v is None for v in values):
        raise LabelColumnError(f"label_column={label_column!r} has missing labels (first at row {values.index(None)})")
    labels = np.asarray(values, dtype=np.int64)
    if len(labels) == 0:
        raise LabelColumnError(f"label_column={label_column!r} is empty")
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise LabelColumnError(
            f"label_column={label_column!r}: label {int(labels[bad[0]])} at row {int(bad[0])} is outside the "
            f"{num_classes} classes 0..{num_classes - 1} ({len(bad)} such row(s))"
        )
    if names is None:
        names = [str(i) for i in range(num_classes)]
    return labels, dict(enumerate(names))


def _has_image_files(folder) -> bool:
    """Whether ``folder`` (recursively) holds a file that datasets' imagefolder would read."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    return any(os.path.splitext(name)[1].lower() in extensions for _, _, names in os.walk(folder) for name in names)


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names its file (or dataset index)."""


def decode_image(value, source):
    """Decode one stored image (``{"path", "bytes"}`` dict, path, bytes or PIL image) fully into
    memory with the ``datasets`` Image feature's decoder (EXIF orientation applied).
    ``source`` names the image in the :class:`BadImageError` raised when that fails."""
    if value is None:
        raise BadImageError(f"image {source} is missing (None)")
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    elif isinstance(value, (bytes, bytearray)):
        value = {"path": None, "bytes": bytes(value)}
    try:
        image = _DECODER.decode_example(value)
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise BadImageError(f"cannot read image {source}: {type(err).__name__}: {err}") from err
    return image


def _source(value, index):
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"{path!r} (dataset index {index})" if path else f"at dataset index {index}"


def _to_channels(image, channels):
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3). Transparent images are
    composited on white; 16-bit greyscale ("I;16*", "I") is scaled by 255/65535."""
    if image.mode.startswith("I;16") or image.mode == "I":
        scaled = np.rint(np.asarray(image, dtype=np.float64) * (255 / 65535))
        image = PIL.Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


class ImageTransform:
    """PIL image -> float32 tensor (channels, resolution, resolution) in [-1, 1], as diffusers'
    train_unconditional: channel conversion, resize of the shorter side to ``resolution``, center
    crop (``center_crop``) or random crop, optional random horizontal flip, then p / 127.5 - 1.

    ``resample`` (a ``PIL.Image.Resampling`` or its name) defaults to NEAREST when ``resolution``
    is an integer multiple of the shorter side (pixels are replicated, grey levels kept exactly),
    else BICUBIC. ``num_bins`` snaps the output to the grid {k / (num_bins - 1) * 2 - 1}; use
    ``DIGITS_NUM_BINS`` for the bundled digits. Randomness comes from ``generator`` (a
    ``torch.Generator``) or torch's global RNG.
    """

    def __init__(
        self,
        resolution,
        channels,
        center_crop=False,
        random_flip=False,
        resample=None,
        num_bins=None,
        generator=None,
    ):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be an integer >= 1, got resolution={resolution!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got channels={channels!r}")
        if isinstance(resample, str):
            if resample.lower() not in _RESAMPLE_NAMES:
                raise ValueError(
                    f"resample must be None or one of {sorted(_RESAMPLE_NAMES)}, got resample={resample!r}"
                )
            resample = _RESAMPLE_NAMES[resample.lower()]
        elif resample is not None:
            resample = PIL.Image.Resampling(resample)
        if num_bins is not None and (isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2):
            raise ValueError(f"num_bins must be None or an integer >= 2, got num_bins={num_bins!r}")
        self.resolution = resolution
        self.channels = channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.resample = resample
        self.num_bins = num_bins
        self.generator = generator

    def _randint(self, high):
        return int(torch.randint(high, (1,), generator=self.generator)) if high > 1 else 0

    def __call__(self, image):
        image = _to_channels(image, self.channels)
        res = self.resolution
        width, height = image.size
        short = min(width, height)
        if short != res:
            size = (max(res, round(width * res / short)), max(res, round(height * res / short)))
            resample = self.resample
            if resample is None:
                resample = PIL.Image.Resampling.NEAREST if res % short == 0 else PIL.Image.Resampling.BICUBIC
            image = image.resize(size, resample=resample)
            width, height = size
        if self.center_crop:
            left, top = (width - res) // 2, (height - res) // 2
        else:
            left, top = self._randint(width - res + 1), self._randint(height - res + 1)
        if (width, height) != (res, res):
            image = image.crop((left, top, left + res, top + res))
        if self.random_flip and bool(torch.rand(1, generator=self.generator) < 0.5):
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.uint8).reshape(res, res, self.channels)
        if self.num_bins is not None:
            # level k = round(p / 255 * (num_bins - 1)); x = k / (num_bins - 1) * 2 - 1
            levels = np.rint(pixels * ((self.num_bins - 1) / 255))
            x = (levels * (2 / (self.num_bins - 1)) - 1).astype(np.float32)
        else:
            x = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)  # Ho et al. 2020, Sec. 3.3
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class ImageDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values": transform(image)}`` over the readable images of a ``datasets``
    dataset with an ``image`` column. Built by :func:`prepare_dataset`; ``num_skipped`` and
    ``skipped`` (the names of the unreadable images) report what ``skip_bad_images`` left out.
    With labels, items also hold ``"class_labels"`` (an int64 scalar tensor); ``id2label`` names
    the classes (None without labels) and ``num_classes`` counts them."""

    def __init__(self, raw, indices, transform, skipped, labels=None, id2label=None):
        self._raw = raw
        self._indices = indices
        self.transform = transform
        self.skipped = skipped
        self._labels = labels
        self.id2label = id2label

    @property
    def num_classes(self):
        return None if self.id2label is None else len(self.id2label)

    @property
    def num_skipped(self):
        return len(self.skipped)

    def __len__(self):
        return len(self._indices)

    def __getitem__(self, i):
        index = self._indices[i]
        value = self._raw[index]["image"]
        item = {"pixel_values": self.transform(decode_image(value, _source(value, index)))}
        if self._labels is not None:
            item["class_labels"] = torch.tensor(int(self._labels[index]), dtype=torch.long)
        return item


def prepare_dataset(dataset, transform, *, skip_bad_images=False, min_size=None, label_column=None):
    """Decode every image of ``dataset`` once, up front, and return an :class:`ImageDataset`.

    An unreadable image raises :class:`BadImageError` naming its file, or with
    ``skip_bad_images=True`` is skipped, counted and logged. Fewer than ``min_size`` (e.g. the
    global batch size) or no readable images is a ValueError. With ``label_column`` its labels are
    checked first (:func:`class_labels_of`; bad labels are a :class:`LabelColumnError`) and every item
    carries its ``"class_labels"``."""
    if "image" not in dataset.column_names:
        raise ValueError(f"dataset has no 'image' column; available columns: {dataset.column_names}")
    if not callable(transform):
        raise ValueError(f"transform must be callable, got transform={transform!r}")
    if min_size is not None and (isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1):
        raise ValueError(f"min_size must be None or an integer >= 1, got min_size={min_size!r}")
    labels, id2label = (None, None) if label_column is None else class_labels_of(dataset, label_column)
    raw = dataset.select_columns(["image"])
    if isinstance(raw.features["image"], datasets.Image):
        # Undecoded {"path", "bytes"} records: decode_image reads them and names the file on failure.
        raw = raw.cast_column("image", datasets.Image(decode=False))
    indices, skipped = [], []
    for start, batch in zip(range(0, len(raw), _CHECK_BATCH), raw.iter(batch_size=_CHECK_BATCH), strict=True):
        for index, value in enumerate(batch["image"], start):
            try:
                decode_image(value, _source(value, index))
            except BadImageError as err:
                if not skip_bad_images:
                    raise BadImageError(f"{err} (pass skip_bad_images=True / --skip_bad_images to skip it)") from err
                skipped.append(_source(value, index))
                logger.warning("skipping unreadable image: %s", err)
                continue
            indices.append(index)
    if skipped:
        logger.warning("skipped %d unreadable image(s) of %d", len(skipped), len(raw))
    usable = f"dataset has {len(indices)} readable image(s) ({len(skipped)} skipped as unreadable)"
    if not indices:
        raise ValueError(f"{usable}: nothing to train on")
    if min_size is not None and len(indices) < min_size:
        raise ValueError(f"{usable}, fewer than min_size={min_size} (one global batch)")
    return ImageDataset(raw, indices, transform, skipped, labels, id2label)


def digits_heldout_tensor(resolution=8, channels=1, split="test"):
    """The bundled digits' held-out split as an N x channels x resolution x resolution float32
    tensor on the 17-level grid {k / 16 * 2 - 1}, preprocessed as for training (center crop, no
    flip, ``num_bins=DIGITS_NUM_BINS``)."""
    transform = ImageTransform(resolution, channels, center_crop=True, num_bins=DIGITS_NUM_BINS)
    data = prepare_dataset(load_digits_dataset(split), transform)
    return torch.stack([data[i]["pixel_values"] for i in range(len(data))])
