"""Images/s of the training data pipeline alone (decode + convert + augment, one worker = one process, one thread),
ddpm_plus against the torchvision pipeline of diffusers' ``train_unconditional.py``, on the same files.

    python -m benchmarks.data_throughput                       # 32 and 256 px, JPEG and PNG, 256 images each
    python -m benchmarks.data_throughput --tiny                # seconds on a CPU: 32 images, 3 rounds

Cases (each image: decode, convert to RGB, resize the shorter side to the resolution, random crop, random flip,
to a float tensor in [-1, 1]):

* ``ours/files``: ``ddpm_plus.data.decode_image`` + ``ImageTransform`` (what the map-style trainer does per item).
* ``diffusers/files``: ``PIL.Image.open(...).convert("RGB")`` + the example's ``transforms.Compose([Resize(res,
  BILINEAR), RandomCrop(res), RandomHorizontalFlip(), ToTensor(), Normalize([0.5], [0.5])])``.
* ``ours/shards``: the ``--streaming`` reader (``ShardStream``: datasets' parquet streaming, window shuffle, decode,
  transform) over parquet shards written by ``ddpm-plus shard`` from the same files.
* ``diffusers/shards``: datasets' parquet streaming of the same shards (images decoded by datasets) + the Compose.

The source images are smooth random pictures (JPEG quality 90 or PNG) of 1.25 x the resolution on the short side
(5:4), so every case resizes and crops. Figures: median over rounds of images/s of one worker, and the ratio
ours/diffusers; at 32 px the last column divides the training rates of the 35.7M-parameter UNet on one H200
(1,447 images/s: stock diffusers with fp16 autocast, benchmarks/README.md; 3,667 images/s: the fastest setting
quoted in the "Scale out" issue) by the case's rate: the dataloader workers needed to keep up.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .timing import interleaved

GPU_ANCHORS = (1447, 3667)  # images/s of the 35.7M UNet at 32 px on one H200 (slowest and fastest setting)


def make_images(folder: Path, resolution: int, count: int, fmt: str, seed: int = 0) -> list[Path]:
    """``count`` smooth random RGB pictures of (1.25 res) x (1.5625 res) pixels as JPEG (quality 90) or PNG files."""
    rng = np.random.default_rng(seed)
    height = round(resolution * 1.25)
    width = round(height * 1.25)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (height, width, 3))
        image = PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        path = folder / f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        image.save(path, **({"quality": 90} if fmt == "jpeg" else {}))
        paths.append(path)
    return paths


def diffusers_transform(resolution: int):
    """The training transform of diffusers' examples/unconditional_image_generation/train_unconditional.py."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def cases_for(paths: list[Path], shard_dir: Path, resolution: int) -> dict:
    """name -> callable that runs the whole set of images through one pipeline."""
    import datasets

    from ddpm_plus.data import ImageTransform, decode_image
    from ddpm_plus.trainer.streaming import ShardStream, expand_data_files, fresh_position

    ours = ImageTransform(resolution, 3, random_flip=True, generator=torch.Generator().manual_seed(0))
    theirs = diffusers_transform(resolution)
    files = expand_data_files([str(shard_dir / "*.parquet")])

    def load():
        return datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)

    stream = load()  # decoded by datasets
    raw = load().cast_column("image", datasets.Image(decode=False))  # (a cast shares the features with its source)
    shard_stream = ShardStream(
        raw, files, ImageTransform(resolution, 3, random_flip=True), seed=0, shuffle_buffer_size=1000, rank=0,
        num_processes=1, workers=1,
    )  # fmt: skip

    def ours_files():
        for path in paths:
            ours(decode_image(str(path), path))

    def theirs_files():
        for path in paths:
            with PIL.Image.open(path) as image:
                theirs(image.convert("RGB"))

    def ours_shards():
        items = shard_stream.slot_items(0, fresh_position())
        for _ in range(len(paths)):
            next(items)

    def theirs_shards():
        for row in stream:
            theirs(row["image"].convert("RGB"))

    return {"ours/files": ours_files, "diffusers/files": theirs_files,
            "ours/shards": ours_shards, "diffusers/shards": theirs_shards}  # fmt: skip


def measure(resolution: int, fmt: str, count: int, rounds: int, root: Path) -> dict:
    """images/s of every case for one resolution and file format."""
    from ddpm_plus.sharding import shard_image_folder

    folder = root / f"{fmt}-{resolution}"
    paths = make_images(folder, resolution, count, fmt)
    shard_dir = root / f"shards-{fmt}-{resolution}"
    shard_image_folder(folder, shard_dir, rows_per_shard=max(1, count // 4))
    times = interleaved(cases_for(paths, shard_dir, resolution), rounds=rounds, warmup=1)
    return {name: count / statistics.median(t) for name, t in times.items()}


def report(results: dict) -> list[str]:
    lines = [
        "| px | format | source | ours img/s | diffusers img/s | ours/diffusers | workers for 1,447 / 3,667 img/s (ours) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (resolution, fmt), rates in results.items():
        for source in ("files", "shards"):
            a, b = rates[f"ours/{source}"], rates[f"diffusers/{source}"]
            need = " / ".join(str(math.ceil(rate / a)) for rate in GPU_ANCHORS) if resolution == 32 else "n/a (32 px)"
            lines.append(f"| {resolution} | {fmt} | {source} | {a:,.0f} | {b:,.0f} | **{a / b:.2f}** | {need} |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--formats", nargs="+", default=["jpeg", "png"], choices=("jpeg", "png"))
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="32 images, 3 rounds (a smoke run on a CPU)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_images, args.rounds = 32, 3
    torch.set_num_threads(1)  # one dataloader worker = one process with one thread
    results = {}
    with tempfile.TemporaryDirectory(prefix="ddpm_plus_data_bench_") as tmp:
        for resolution in args.resolutions:
            for fmt in args.formats:
                results[(resolution, fmt)] = measure(resolution, fmt, args.num_images, args.rounds, Path(tmp))
    print("\n".join(report(results)))
    flat = {f"{r}px/{f}/{case}": rate for (r, f), rates in results.items() for case, rate in rates.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(flat, indent=2))
    return flat


if __name__ == "__main__":
    main()
