"""``--streaming``: training on an iterable stream of shards (local parquet/arrow/WebDataset ``.tar`` files given by
``--train_data_files``, or a Hub dataset), read through datasets' streaming loaders, with an exact resume.

The order of the stream is a pure function of (seed, epoch, position), so a checkpoint only has to hold positions:

* The stream is read by ``slots``: every dataloader worker of every process is one slot (``num_processes x
  max(1, --dataloader_num_workers)``). In epoch e the shards are permuted with a generator seeded by (seed, e) and
  slot k reads shards ``k, k + slots, k + 2 slots, ...`` of that permutation (:func:`slot_assignments`): within an
  epoch no two slots read the same shard. With fewer shards than slots every slot reads every shard and keeps the
  rows ``row % slots == k`` (correct, but every slot then reads all the bytes: make at least as many shards).
* Inside a shard the rows are read in consecutive windows of ``--shuffle_buffer_size`` rows, each window in an
  order seeded by (seed, epoch, shard, window): at most that many undecoded rows are held per slot. This is a
  *window* shuffle, not datasets' sliding shuffle buffer: a row moves at most one window from where the shard has
  it, and the mixing across shards comes from the per-epoch shard permutation and from the slots being
  interleaved in each batch step.
* A slot's position is (epoch, index into its epoch's shard list, rows of that shard consumed, images skipped).
  Every item carries the position of its slot after it, so the main process knows the exact position of the
  batches it has *consumed* (not those prefetched by workers). A checkpoint writes every slot's position and which
  worker yields the next batch to ``data_state.json`` (JSON, gathered from every process); resuming starts each
  slot there and rotates the workers so the batches continue in the same order. N steps straight and N/2 steps,
  a checkpoint, and a resume give the same batches, hence the same weights (tests/test_streaming.py).
* Each slot runs through epochs on its own and forever (``--max_train_steps`` ends training), so every process
  always has a next batch, whatever the shard sizes.
* Random crops/flips are seeded by (seed, epoch, shard, row), so they do not depend on workers or resuming.
* A sample whose image cannot be decoded or whose image/label is missing is a :class:`BadSampleError` naming the
  shard and row, or with ``--skip_bad_images`` is skipped and counted (the counts are in ``data_state.json``).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import logging
import os

import datasets
import torch

from ..data import BadImageError, ImageTransform, decode_image
from . import checkpointing as ckpt
from .data import derive_seed, ignore_stop_signals

logger = logging.getLogger("ddpm_plus.train")

# File extension -> datasets' packaged loader that streams it.
SHARD_LOADERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
STATE_FORMAT = 1
_READ_BATCH = 64  # rows per read from a shard


class BadSampleError(BadImageError):
    """A sample of the stream that cannot be used (undecodable image, missing image or label); names shard and row."""


def expand_data_files(patterns) -> list[str]:
    """The files of ``--train_data_files`` (paths or globs, ``**`` allowed), sorted and deduplicated; a
    ValueError naming the flag when a pattern matches nothing or the files are not all of one shard format."""
    files = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matched:
            raise ValueError(f"--train_data_files: {pattern!r} matches no file")
        files += [os.path.abspath(p) for p in matched]
    files = sorted(set(files))
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    if len(kinds) != 1 or not kinds <= SHARD_LOADERS.keys():
        raise ValueError(
            f"--train_data_files must all be {' or '.join(SHARD_LOADERS)} shards of one kind, got the extensions "
            f"{sorted(kinds)} (convert an image folder with `ddpm-plus shard DIR --output_dir SHARDS`)"
        )
    return files


def add_streaming_arguments(group) -> None:
    """The flags of streaming data (into the trainer's "data" argument group)."""
    group.add_argument(
        "--streaming", default=False, action=argparse.BooleanOptionalAction,
        help="Stream --train_data_files or --dataset_name shard by shard (no full download or decode pass first); "
        "needs --max_train_steps. Resuming is exact (the position is in the checkpoint's data_state.json).",
    )  # fmt: skip
    group.add_argument(
        "--train_data_files", nargs="+", default=None, metavar="GLOB",
        help="Local .parquet, .arrow or WebDataset .tar shards (paths or globs) to stream (with --streaming); "
        "`ddpm-plus shard DIR --output_dir SHARDS` converts an image folder.",
    )  # fmt: skip
    group.add_argument(
        "--shuffle_buffer_size", type=int, default=1000,
        help="With --streaming: rows of one shard shuffled together (consecutive windows of this many rows, "
        "each in a seeded order; the shard order is reshuffled every epoch). 1: each shard in its stored order.",
    )  # fmt: skip


def check_streaming_flags(args) -> None:
    """ValueErrors naming the flag, before anything is read: what --streaming / --train_data_files combine with."""
    if args.train_data_files and not args.streaming:
        raise ValueError("--train_data_files needs --streaming (shards are read as a stream)")
    if args.shuffle_buffer_size < 1:
        raise ValueError(f"--shuffle_buffer_size must be >= 1, got {args.shuffle_buffer_size}")
    if not args.streaming:
        return
    if args.train_data_files and args.dataset_name:
        raise ValueError("--streaming reads either --train_data_files or --dataset_name, not both")
    if args.train_data_dir is not None:
        raise ValueError(
            "--streaming does not read --train_data_dir: convert the folder once with "
            "`ddpm-plus shard DIR --output_dir SHARDS`, then pass --train_data_files 'SHARDS/*.parquet'"
        )
    if not (args.train_data_files or args.dataset_name):
        raise ValueError("--streaming needs --train_data_files GLOB or --dataset_name")
    if args.train_data_files:
        expand_data_files(args.train_data_files)  # every pattern matches; one shard format
    if args.num_epochs is not None and args.max_train_steps is None:
        raise ValueError("--num_epochs needs a dataset of known length; with --streaming give --max_train_steps")
    if getattr(args, "vae", None) is not None:
        raise ValueError("--streaming does not combine with --vae (latents are cached from a map-style dataset)")
    if args.train_data_files and args.eval_steps:
        raise ValueError("--eval_steps compares with the training images, which --train_data_files does not provide")


def slot_assignments(num_shards: int, num_slots: int, slot: int, seed: int, epoch: int) -> list[tuple[int, int, int]]:
    """What ``slot`` reads in ``epoch``: a list of (shard, stride, phase), i.e. the rows ``phase, phase + stride,
    ...`` of each shard, in this order. The shards are permuted per epoch (seeded by (seed, epoch)); with at least
    as many shards as slots each slot gets whole shards, disjoint from the other slots', else every shard with
    stride ``num_slots``."""
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot must be in 0..{num_slots - 1}, got {slot}")
    g = torch.Generator().manual_seed(derive_seed(seed, "shards", epoch))
    order = torch.randperm(num_shards, generator=g).tolist()
    if num_shards >= num_slots:
        return [(shard, 1, 0) for shard in order[slot::num_slots]]
    return [(shard, num_slots, slot) for shard in order]


def window_order(seed: int, epoch: int, shard: int, phase: int, window: int, length: int) -> list[int]:
    """The order in which the ``length`` rows of one window of a shard are read."""
    g = torch.Generator().manual_seed(derive_seed(seed, "window", epoch, shard, phase, window))
    return torch.randperm(length, generator=g).tolist()


def open_stream(args):
    """(datasets.IterableDataset with the image column undecoded, names of its shards, id2label or None).
    Checked before training: the files exist, the image column (and with ``--class_conditional`` a ClassLabel
    label column) is there, when the stream declares its columns."""
    if args.train_data_files:
        files = expand_data_files(args.train_data_files)
        loader = SHARD_LOADERS[os.path.splitext(files[0])[1].lower()]
        dataset = datasets.load_dataset(loader, data_files={"train": files}, split="train", streaming=True)
        names = files if dataset.num_shards == len(files) else None
    else:
        dataset = datasets.load_dataset(
            args.dataset_name, args.dataset_config_name, split="train", streaming=True, cache_dir=args.cache_dir
        )
        names = None
    if names is None:
        source = args.dataset_name or "--train_data_files"
        names = [f"{source} shard {i} of {dataset.num_shards}" for i in range(dataset.num_shards)]
    features = dataset.features
    if features is not None and args.image_column not in features:
        raise ValueError(
            f"--image_column {args.image_column!r} is not a column of the stream; available columns: {list(features)}"
        )
    if features is not None and isinstance(features[args.image_column], datasets.Image):
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))  # decoded by decode_image
    id2label = None
    if args.class_conditional:
        feature = None if features is None else features.get(args.label_column)
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(
                f"--class_conditional with --streaming needs --label_column {args.label_column!r} to be a "
                f"datasets.ClassLabel column (its class names are known before reading the stream); got {feature}"
            )
        id2label = dict(enumerate(feature.names))
    return dataset, names, id2label


def fresh_position() -> list[int]:
    """A slot's position before reading anything: [epoch, shard index, rows consumed, images skipped]."""
    return [0, 0, 0, 0]


class ShardStream(torch.utils.data.IterableDataset):
    """Items ``{"pixel_values", ["class_labels"], "stream_position"}`` of this process's slots (one per dataloader
    worker), in the order described in the module docstring; ``stream_position`` is [slot, epoch, shard index,
    rows consumed, images skipped] after the item. Set ``positions`` (slot -> position) and ``rotation`` (the worker
    that yields first) before iterating to resume."""

    def __init__(self, dataset, shard_names, transform: ImageTransform, *, seed: int, shuffle_buffer_size: int,
                 rank: int, num_processes: int, workers: int, image_column: str = "image", label_column=None,
                 num_classes: int | None = None, skip_bad_images: bool = False):  # fmt: skip
        self.dataset, self.shard_names, self.transform = dataset, list(shard_names), transform
        self.seed, self.buffer = seed, shuffle_buffer_size
        self.rank, self.workers = rank, workers
        self.num_slots = num_processes * workers
        self.image_column, self.label_column, self.num_classes = image_column, label_column, num_classes
        self.skip_bad_images = skip_bad_images
        self.positions: dict[int, list[int]] = {}
        self.rotation = 0
        transform.generator = torch.Generator()

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.workers:
            raise RuntimeError(f"ShardStream was built for {self.workers} worker(s) but runs in {workers}")
        slot = self.rank * self.workers + (worker + self.rotation) % self.workers
        return self.slot_items(slot, self.positions.get(slot, fresh_position()))

    def slot_items(self, slot: int, position: list[int]):
        """The items of ``slot`` from ``position`` on, through epoch after epoch."""
        epoch, index, offset, skipped = position
        while True:
            plan = slot_assignments(self.num_shards, self.num_slots, slot, self.seed, epoch)
            whole_pass, good = index == 0 and offset == 0, 0
            for j in range(index, len(plan)):
                shard, stride, phase = plan[j]
                for after, row, record in self.shard_records(shard, stride, phase, epoch, offset if j == index else 0):
                    try:
                        item = self.make_item(record, shard, row, epoch)
                    except BadSampleError as e:
                        if not self.skip_bad_images:
                            raise BadSampleError(f"{e} (pass --skip_bad_images to skip and count such samples)") from e
                        skipped += 1
                        logger.warning("skipping a bad sample: %s", e)
                        continue
                    good += 1
                    item["stream_position"] = torch.tensor([slot, epoch, j, after, skipped])
                    yield item
            if whole_pass and not good:
                raise ValueError(
                    f"stream slot {slot} of {self.num_slots} (processes x dataloader workers) got no usable sample in "
                    f"a whole pass over its shards of {self.num_shards}: too few rows, or every one is bad"
                )
            epoch, index, offset = epoch + 1, 0, 0

    def shard_records(self, shard: int, stride: int, phase: int, epoch: int, offset: int):
        """(rows consumed after it, row, record) of the rows ``phase, phase + stride, ...`` of ``shard``, read in
        windows of ``buffer`` rows each in its seeded order, starting ``offset`` rows into that order."""
        window = offset // self.buffer
        rows = itertools.islice(self._shard_rows(shard), phase + window * self.buffer * stride, None, stride)
        while chunk := list(itertools.islice(rows, self.buffer)):
            order = window_order(self.seed, epoch, shard, phase, window, len(chunk))
            for q in range(offset - window * self.buffer, len(chunk)):
                row, record = chunk[order[q]]
                yield window * self.buffer + q + 1, row, record
            window += 1
            offset = window * self.buffer

    def _shard_rows(self, shard: int):
        """(row, record) of one shard, read through datasets (``.iter``: no splitting by dataloader worker)."""
        source = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        row = 0
        for batch in source.iter(batch_size=_READ_BATCH):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                yield row, dict(zip(columns, values, strict=True))
                row += 1

    def make_item(self, record: dict, shard: int, row: int, epoch: int) -> dict:
        """The training item of one record; :class:`BadSampleError` naming shard and row when it is unusable."""
        where = f"in shard {self.shard_names[shard]} at row {row}"
        if record.get(self.image_column) is None:
            raise BadSampleError(f"sample {where} has no {self.image_column!r} image (--image_column)")
        try:
            image = decode_image(record[self.image_column], where)
        except BadImageError as e:
            raise BadSampleError(str(e)) from e
        self.transform.generator.manual_seed(derive_seed(self.seed, "augment", epoch, shard, row))
        item = {"pixel_values": self.transform(image)}
        if self.label_column is not None:
            label = record.get(self.label_column)
            if not isinstance(label, int) or not 0 <= label < self.num_classes:
                raise BadSampleError(
                    f"sample {where} has label {label!r}, not one of the {self.num_classes} classes (--label_column)"
                )
            item["class_labels"] = torch.tensor(label, dtype=torch.long)
        return item


def worker_errors_in_one_line(loader):
    """The batches of a DataLoader; a ValueError (e.g. :class:`BadSampleError`) raised in a worker, which the
    DataLoader re-raises with the worker's traceback in its message, re-raised with the worker's message only.
    The workers are shut down on the way out, even while the error (and with it this frame) is still referenced:
    they ignore SIGTERM (``ignore_stop_signals``), and a worker left waiting would block the interpreter's exit."""
    iterator = iter(loader)
    try:
        yield from iterator
    except ValueError as e:
        text = str(e).strip()
        if not text.startswith("Caught "):
            raise
        last = text.splitlines()[-1]
        raise type(e)(last.split(f"{type(e).__name__}: ", 1)[-1]) from e
    finally:  # what the iterator's __del__ does, now: the error keeps this frame (and the iterator) alive
        shutdown = getattr(iterator, "_shutdown_workers", None)  # only multi-worker iterators have workers
        if shutdown is not None:
            shutdown()


class StreamingLoader:
    """This process's batches of a :class:`ShardStream` (a torch DataLoader over it, not prepared by accelerate:
    each process reads its own slots) and the position of the batches consumed so far, saved with each
    checkpoint (:meth:`state_dict`, ``data_state.json``) and restored on resume (:meth:`load_checkpoint`)."""

    def __init__(self, stream: ShardStream, args, accelerator):
        self.stream, self.args, self.accelerator = stream, args, accelerator
        self.positions = {}  # slot -> position after the last consumed batch it yielded
        self.next_worker = 0  # the worker (of this process) whose batch comes next

    @property
    def layout(self) -> dict:
        """What a resume must keep (checked with the rest of the data layout in ``training_state.json``)."""
        return {"stream_shards": self.stream.num_shards, "stream_slots": self.stream.num_slots,
                "shuffle_buffer_size": self.stream.buffer}  # fmt: skip

    def batches(self, device):
        """Batches on ``device``, forever (``stream_position`` taken out and recorded)."""
        workers = self.args.dataloader_num_workers
        self.stream.positions, self.stream.rotation = dict(self.positions), self.next_worker
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=self.args.train_batch_size, num_workers=workers,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(self.args.seed),
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )  # fmt: skip
        for batch in worker_errors_in_one_line(loader):
            slot, *position = batch.pop("stream_position")[-1].tolist()
            expected = self.stream.rank * self.stream.workers + self.next_worker
            if slot != expected:  # DataLoader takes the workers' batches in turn; resuming relies on it
                raise RuntimeError(f"stream batch from slot {slot}, expected slot {expected}")
            self.positions[slot] = position
            self.next_worker = (self.next_worker + 1) % self.stream.workers
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def state_dict(self) -> dict:
        """Every process's slot positions (a collective: call on every process), as one JSON-ready dict."""
        local = {"rank": self.stream.rank, "next_worker": self.next_worker,
                 "positions": {str(k): v for k, v in self.positions.items()}}  # fmt: skip
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([local])
        else:
            parts = [local]
        positions = {int(k): v for part in parts for k, v in part["positions"].items()}
        slots = [positions.get(slot, fresh_position()) for slot in range(self.stream.num_slots)]
        keys = ("epoch", "shard_index", "offset", "skipped")
        state = {
            "format": STATE_FORMAT, "seed": self.stream.seed, **self.layout,
            "next_worker": [part["next_worker"] for part in sorted(parts, key=lambda p: p["rank"])],
            "slots": [dict(zip(keys, position, strict=True)) for position in slots],
            "skipped": sum(position[3] for position in slots),
        }  # fmt: skip
        if state["skipped"]:
            logger.info("stream: %d bad sample(s) skipped so far (--skip_bad_images)", state["skipped"])
        return state

    def load_checkpoint(self, directory) -> None:
        """Start from the positions in ``directory/data_state.json``; CorruptCheckpointError if it is unusable."""
        path = os.path.join(directory, ckpt.DATA_STATE_FILE)
        state = ckpt.read_json(path)
        keys = ("epoch", "shard_index", "offset", "skipped")
        try:
            expected = {"format": STATE_FORMAT, "seed": self.stream.seed, **self.layout}
            wrong = {k: state.get(k) for k, v in expected.items() if state.get(k) != v}
            slots = [[int(s[k]) for k in keys] for s in state["slots"]]
            next_worker = int(state["next_worker"][self.stream.rank])
            valid = len(slots) == self.stream.num_slots and 0 <= next_worker < self.stream.workers
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ckpt.CorruptCheckpointError(f"checkpoint file {path} is not a stream position: {e!r}") from None
        if wrong or not valid or any(v < 0 for s in slots for v in s):
            raise ckpt.CorruptCheckpointError(
                f"checkpoint file {path} does not fit this run's stream (expected {expected}; differs: {wrong})"
            )
        self.positions = dict(enumerate(slots))
        self.next_worker = next_worker


def build_streaming_loader(args, accelerator):
    """``--streaming``: (StreamingLoader, id2label or None) for this process; errors before training."""
    with accelerator.main_process_first():
        dataset, names, id2label = open_stream(args)
    transform = ImageTransform(args.resolution, args.channels, center_crop=args.center_crop,
                               random_flip=args.random_flip)  # fmt: skip
    stream = ShardStream(
        dataset, names, transform, seed=args.seed, shuffle_buffer_size=args.shuffle_buffer_size,
        rank=accelerator.process_index, num_processes=accelerator.num_processes,
        workers=max(1, args.dataloader_num_workers), image_column=args.image_column,
        label_column=args.label_column if id2label else None, num_classes=len(id2label) if id2label else None,
        skip_bad_images=args.skip_bad_images,
    )  # fmt: skip
    logger.info(
        "streaming %d shard(s) in %d slot(s) (%d process(es) x %d worker(s)), window shuffle of %d rows",
        stream.num_shards, stream.num_slots, accelerator.num_processes, stream.workers, args.shuffle_buffer_size,
    )  # fmt: skip
    if stream.num_shards < stream.num_slots:
        logger.warning(
            "%d shard(s) for %d slots: every slot reads every shard and keeps 1 row in %d; write at least %d shards",
            stream.num_shards, stream.num_slots, stream.num_slots, stream.num_slots,
        )  # fmt: skip
    return StreamingLoader(stream, args, accelerator), id2label
