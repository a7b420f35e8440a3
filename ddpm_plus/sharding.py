"""``ddpm-plus shard DIR --output_dir SHARDS``: convert a local image folder, once, into parquet shards that the
trainer streams (``--streaming --train_data_files 'SHARDS/*.parquet'``, see ddpm_plus/trainer/streaming.py).

The folder is read with datasets' ``imagefolder`` (the same reader as ``--train_data_dir``: a ``label`` ClassLabel
column when the images sit in one sub-folder per class, metadata files honoured), and written with datasets'
``to_parquet`` in shards of ``rows_per_shard`` rows, ``train-00000-of-000NN.parquet`` (the Hub's naming). Each
row holds the image file's bytes as they are (no re-encoding, nothing decoded here: an unreadable image is found,
named by shard and row, when training reads it) and its path relative to the folder. datasets' own
``to_parquet`` alone would store only the absolute paths, so the shards would not travel.

Nothing here imports datasets at module level: the CLI imports this module for its parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SHARD_PATTERN = "train-{index:05d}-of-{count:05d}.parquet"


def shard_image_folder(folder, output_dir, rows_per_shard: int = 1000, *, cache_dir=None) -> list[Path]:
    """Write the images of ``folder`` (and their labels, when it has class sub-folders) as parquet shards of at
    most ``rows_per_shard`` rows into ``output_dir``; returns the shard paths in order. A ValueError when
    ``rows_per_shard`` < 1, the folder holds no images, or ``output_dir`` already holds parquet files."""
    import datasets

    from .data import load_image_dataset

    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be an integer >= 1, got {rows_per_shard!r}")
    out = Path(output_dir)
    if out.is_dir() and any(out.glob("*.parquet")):
        raise ValueError(f"output_dir {out} already holds parquet files: choose a new or empty directory")
    root = os.path.abspath(folder)
    dataset = load_image_dataset(train_data_dir=str(folder), split="train", cache_dir=cache_dir)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    count = -(-len(dataset) // rows_per_shard)
    out.mkdir(parents=True, exist_ok=True)

    def embed(batch):
        images = []
        for value in batch["image"]:
            path = value["path"]
            data = value["bytes"]
            if data is None:
                with open(path, "rb") as f:
                    data = f.read()
            images.append({"bytes": data, "path": os.path.relpath(path, root) if path else None})
        return {"image": images}

    paths = []
    for index in range(count):
        rows = range(index * rows_per_shard, min(len(dataset), (index + 1) * rows_per_shard))
        part = dataset.select(rows).map(embed, batched=True, batch_size=64, keep_in_memory=True)
        part = part.cast_column("image", datasets.Image())  # readers decode it (the schema records decode=True)
        path = out / SHARD_PATTERN.format(index=index, count=count)
        tmp = path.with_name(f".tmp-{path.name}")
        part.to_parquet(str(tmp))
        os.replace(tmp, path)  # a shard is either complete or absent
        paths.append(path)
    return paths


def add_shard_parser(subparsers) -> argparse.ArgumentParser:
    """The ``shard`` subcommand of ``ddpm-plus`` (into the CLI's subparsers)."""
    p = subparsers.add_parser(
        "shard",
        help="convert a local image folder into parquet shards for `ddpm-plus train --streaming`",
        description="Convert an image folder (datasets' imagefolder: class sub-folders give a 'label' column) into "
        "parquet shards of the original image bytes, for `ddpm-plus train --streaming --train_data_files "
        "'SHARDS/*.parquet'`.",
    )
    p.add_argument("folder", metavar="DIR", help="the image folder")
    p.add_argument("--output_dir", required=True, metavar="SHARDS", help="new or empty directory for the shards")
    p.add_argument("--rows_per_shard", type=int, default=1000, help="images per shard (make at least as many "
                   "shards as training processes x dataloader workers)")  # fmt: skip
    p.add_argument("--cache_dir", default=None, help="datasets' cache directory")
    return p


def shard_command(args) -> int:
    """``ddpm-plus shard``: write the shards, print what was written; 1 with an error message on bad input."""
    if not os.path.isdir(args.folder):
        print(f"error: DIR {args.folder} is not a directory", file=sys.stderr)
        return 1
    try:
        paths = shard_image_folder(args.folder, args.output_dir, args.rows_per_shard, cache_dir=args.cache_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(paths)} shard(s) to {args.output_dir}; train with: ddpm-plus train --streaming "
        f"--train_data_files '{os.path.join(args.output_dir, '*.parquet')}' --max_train_steps N ..."
    )
    return 0
