"""The latent cache of ``--vae`` runs: every training image encoded once, the latents kept as safetensors shards.

Directory: ``<root>/<key digest>/`` with ``<root>`` = ``--latent_cache_dir`` or ``$DDPM_PLUS_CACHE/latents``.
The key (:func:`cache_key`, stored in the directory's ``manifest.json``) is everything the latents depend on:
the dataset (its id or folder, config and a fingerprint of its files), the split, the image/label columns, the
resolution, channels, crop, ``--random_flip``, ``--skip_bad_images`` and the VAE's weights hash; change any of
them and a new directory is built, never a stale one read. With ``--random_flip`` each shard holds the latents
of the image and of its mirror image, and the training data picks one per (epoch, image) from the run's seed,
as the pixel pipeline flips (ddpm_plus/trainer/data.py).

Each shard (``shard-00000.safetensors``: ``latents``, ``latents_flipped``, ``class_labels`` as present) and
the manifest are written to a temporary name and renamed into place; the manifest comes last, so a directory
without one is unfinished and is built again. A shard that cannot be read or does not hold what the manifest
says is re-encoded, with a warning naming the file. The first process of each machine builds the cache, the
others then read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..cache import default_cache_dir
from ..data import (
    BadImageError,
    DatasetKind,
    DatasetSource,
    ImageTransform,
    LabelColumnError,
    load_image_dataset,
    prepare_dataset,
)
from .data import EpochSampler, derive_seed
from .latents import encode, scaled, set_scaling_factor, vae_weights_hash

__all__ = [
    "CACHE_FORMAT",
    "SHARD_SIZE",
    "CachedLatents",
    "LatentCache",
    "LatentDataset",
    "build_latent_dataloader",
    "cache_key",
    "cache_root",
]

logger = logging.getLogger("ddpm_plus.train")

CACHE_FORMAT = 1
SHARD_SIZE = 4096  # images per shard
MANIFEST = "manifest.json"
# The vlb/hybrid losses' decoder at t = 0 on latents: the 8-bit grid, as DiT (ADM's code) applies it to latents.
LATENT_NUM_BINS = 256


def cache_root(args) -> Path:
    """``--latent_cache_dir``, else ``$DDPM_PLUS_CACHE/latents`` (``~/.cache/ddpm_plus/latents``)."""
    return Path(args.latent_cache_dir) if args.latent_cache_dir else default_cache_dir() / "latents"


def folder_fingerprint(folder) -> str:
    """A digest of every file's relative path, size and modification time under ``folder``."""
    digest = hashlib.blake2b(digest_size=16)
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(args, source: DatasetSource, vae_hash: str, data_fingerprint: str | None) -> dict:
    """Everything the cached latents depend on (see the module docstring)."""
    location = str(Path(source.location).resolve()) if source.kind is DatasetKind.FOLDER else source.location
    return {
        "format": CACHE_FORMAT,
        "dataset": source.kind.value,
        "location": location,
        "dataset_config": args.dataset_config_name,
        "data_fingerprint": data_fingerprint,
        "split": "train",
        "image_column": args.image_column,
        "label_column": args.label_column if args.class_conditional else None,
        "resolution": args.resolution,
        "channels": args.channels,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "skip_bad_images": args.skip_bad_images,
        "vae": vae_hash,
    }


def key_digest(key: dict) -> str:
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()


@dataclass
class CachedLatents:
    """The unscaled latents of one dataset: ``latents`` [N, C, h, w] float32, ``flipped`` (mirror images' latents,
    with ``--random_flip``), ``labels`` [N] int64 and ``id2label`` (class-conditional), where they live, and how
    many images this run encoded (0: the cache was reused as it was)."""

    latents: torch.Tensor
    flipped: torch.Tensor | None
    labels: torch.Tensor | None
    id2label: dict | None
    directory: Path
    key: str
    encoded: int


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LatentCache:
    """One cache directory: :meth:`load_or_build` returns its :class:`CachedLatents`, encoding what is missing."""

    def __init__(self, args, vae):
        self.args, self.vae = args, vae
        self.source = DatasetSource.from_flags(args.dataset_name, args.train_data_dir)
        self._raw = None
        fingerprint = self._fingerprint()
        self.key = cache_key(args, self.source, vae_weights_hash(vae), fingerprint)
        self.digest = key_digest(self.key)
        self.directory = cache_root(args) / self.digest

    def _fingerprint(self) -> str | None:
        if self.source.kind is DatasetKind.FOLDER:
            return folder_fingerprint(self.source.location)
        if self.source.kind is DatasetKind.HUB:
            return getattr(self.raw(), "_fingerprint", None)  # datasets' own digest of the prepared data
        return "digits"

    def raw(self):
        """The training split as ``datasets`` loads it (read once)."""
        if self._raw is None:
            a = self.args
            self._raw = load_image_dataset(
                dataset_name=a.dataset_name, dataset_config_name=a.dataset_config_name,
                train_data_dir=a.train_data_dir, image_column=a.image_column, split="train", cache_dir=a.cache_dir,
            )  # fmt: skip
        return self._raw

    def shard_path(self, i: int) -> Path:
        return self.directory / f"shard-{i:05d}.safetensors"

    # ------------------------------------------------------------------------------------------ reading

    def read_manifest(self) -> dict | None:
        """The manifest if it is complete and holds this key; None (a warning if it is damaged) otherwise."""
        path = self.directory / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
            if manifest["key"] != self.key or not isinstance(manifest["num_images"], int):
                raise ValueError("it holds another key")
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("latent cache manifest %s is unreadable (%s): building the cache again", path, e)
            return None
        return manifest

    def read_shard(self, i: int, manifest: dict) -> dict | None:
        """Shard ``i`` if it holds what the manifest says; None, with a warning naming the file, otherwise."""
        path = self.shard_path(i)
        count = min(SHARD_SIZE, manifest["num_images"] - i * SHARD_SIZE)
        shape = [count, *manifest["latent_shape"]]
        try:
            tensors = load_file(path)
            for name in self._names():
                if name not in tensors:
                    raise ValueError(f"no tensor {name!r}")
                expected = shape if name != "class_labels" else [count]
                if list(tensors[name].shape) != expected:
                    raise ValueError(f"{name} has shape {list(tensors[name].shape)}, expected {expected}")
        except Exception as e:  # missing, truncated, not safetensors, wrong content
            logger.warning("latent cache shard %s is unusable (%s: %s): encoding it again", path, type(e).__name__, e)
            return None
        return tensors

    def _names(self) -> list[str]:
        names = ["latents"] + (["latents_flipped"] if self.args.random_flip else [])
        return names + (["class_labels"] if self.args.class_conditional else [])

    # ------------------------------------------------------------------------------------------ building

    def prepared(self):
        """The training images decoded and checked (``prepare_dataset``), center-cropped, not flipped."""
        a = self.args
        transform = ImageTransform(a.resolution, a.channels, center_crop=True, num_bins=self.source.num_bins)
        try:
            return prepare_dataset(
                self.raw(), transform, skip_bad_images=a.skip_bad_images,
                label_column=a.label_column if a.class_conditional else None,
            )  # fmt: skip
        except BadImageError:
            raise
        except LabelColumnError as e:
            raise ValueError(f"--class_conditional: {e}") from e

    def encode_shard(self, dataset, i: int) -> int:
        """Encode images ``[i * SHARD_SIZE, ...)`` of ``dataset`` (and their mirror images) into shard ``i``."""
        indices = range(i * SHARD_SIZE, min((i + 1) * SHARD_SIZE, len(dataset)))
        out = {name: [] for name in self._names()}
        batch_size = self.args.train_batch_size
        for start in range(0, len(indices), batch_size):
            items = [dataset[j] for j in indices[start : start + batch_size]]
            pixels = torch.stack([item["pixel_values"] for item in items])
            out["latents"].append(encode(self.vae, pixels))
            if "latents_flipped" in out:
                out["latents_flipped"].append(encode(self.vae, pixels.flip(-1)))  # = PIL's FLIP_LEFT_RIGHT
            if "class_labels" in out:
                out["class_labels"].append(torch.stack([item["class_labels"] for item in items]))
        tensors = {name: torch.cat(parts).contiguous() for name, parts in out.items()}
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.shard_path(i), lambda tmp: save_file(tensors, str(tmp)))
        logger.info("encoded %d images into %s", len(indices), self.shard_path(i))
        return len(indices)

    def build(self, shards: list[int] | None = None) -> int:
        """Encode the given shards (all: a new cache, manifest last); returns the number of images encoded."""
        dataset = self.prepared()
        num_shards = -(-len(dataset) // SHARD_SIZE)
        encoded = sum(self.encode_shard(dataset, i) for i in (range(num_shards) if shards is None else shards))
        if shards is None:
            first = load_file(self.shard_path(0))["latents"]
            manifest = {
                "key": self.key,
                "num_images": len(dataset),
                "latent_shape": list(first.shape[1:]),
                "id2label": {str(k): v for k, v in dataset.id2label.items()} if dataset.id2label else None,
                "skipped": list(dataset.skipped),
            }
            text = json.dumps(manifest, indent=1, sort_keys=True)
            _write_atomically(self.directory / MANIFEST, lambda tmp: tmp.write_text(text))
        return encoded

    def load_or_build(self) -> CachedLatents:
        """The cached latents, encoding the images first if this key has no complete cache, and re-encoding any
        shard that cannot be read."""
        encoded = 0
        manifest = self.read_manifest()
        if manifest is None:
            logger.info("encoding the training images once into the latent cache %s", self.directory)
            encoded = self.build()
            manifest = self.read_manifest()
        num_shards = -(-manifest["num_images"] // SHARD_SIZE)
        shards = [self.read_shard(i, manifest) for i in range(num_shards)]
        bad = [i for i, shard in enumerate(shards) if shard is None]
        if bad:
            encoded += self.build(bad)
            for i in bad:
                shards[i] = self.read_shard(i, manifest)
                if shards[i] is None:
                    raise ValueError(f"latent cache shard {self.shard_path(i)} is still unusable after encoding it")
        if not encoded:
            logger.info("reusing the latent cache %s (%d images)", self.directory, manifest["num_images"])
        if manifest["skipped"]:
            logger.warning("%d unreadable image(s) were skipped when the cache was built", len(manifest["skipped"]))
        return self._assemble(shards, manifest, encoded)

    def _assemble(self, shards: list[dict], manifest: dict, encoded: int) -> CachedLatents:
        def cat(name):
            return torch.cat([s[name] for s in shards]) if name in self._names() else None

        id2label = manifest["id2label"]
        return CachedLatents(
            latents=cat("latents"), flipped=cat("latents_flipped"), labels=cat("class_labels"),
            id2label={int(k): v for k, v in id2label.items()} if id2label else None,
            directory=self.directory, key=self.digest, encoded=encoded,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- training data


class LatentDataset(torch.utils.data.Dataset):
    """Looks up ``(epoch, index)`` keys (``EpochSampler``'s) in the scaled latents: ``{"pixel_values": z}``
    (the name the training step reads), plus ``class_labels``. With mirror-image latents, the flip of image i in
    epoch e is a coin seeded by (seed, e, i), like the pixel pipeline's, so resuming and processes agree."""

    def __init__(self, latents, flipped, labels, seed: int):
        self.latents, self.flipped, self.labels, self.seed = latents, flipped, labels, seed
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key):
        epoch, index = key
        z = self.latents[index]
        if self.flipped is not None:
            self.generator.manual_seed(derive_seed(self.seed, "augment", epoch, index))
            if bool(torch.rand(1, generator=self.generator) < 0.5):
                z = self.flipped[index]
        item = {"pixel_values": z}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        return item


def build_latent_dataloader(args, accelerator, vae):
    """As ``build_dataloader`` (loader, sampler, number of images, grey levels, id2label), on the cached latents
    of ``vae`` (built first by the first process of each machine), plus the layout a checkpoint records: the
    cache key and the scaling factor (resolved into ``vae.config``; see ddpm_plus/trainer/latents.py)."""
    with accelerator.local_main_process_first():
        cached = LatentCache(args, vae).load_or_build()
    factor = set_scaling_factor(args, vae, cached.latents)
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if len(cached.latents) < samples_per_step:
        raise ValueError(
            f"the latent cache {cached.directory} holds {len(cached.latents)} image(s), fewer than one optimizer "
            f"step needs: --train_batch_size {args.train_batch_size} x {accelerator.num_processes} process(es) x "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} = {samples_per_step}"
        )
    flipped = scaled(cached.flipped, vae) if cached.flipped is not None else None
    dataset = LatentDataset(scaled(cached.latents, vae), flipped, cached.labels, args.seed)
    sampler = EpochSampler(len(dataset), samples_per_step, args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=sampler, drop_last=True, num_workers=0,
        pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    layout = {"latents": cached.key, "latent_scaling_factor": factor}
    return loader, sampler, len(dataset), LATENT_NUM_BINS, cached.id2label, layout
