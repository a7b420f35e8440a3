"""``--streaming`` (ddpm_plus/trainer/streaming.py) and ``ddpm-plus shard`` (ddpm_plus/sharding.py), on local
parquet shards: the folder -> shards round trip, the per-slot split of the shards (ranks x workers), the seeded
window shuffle and its resumable positions, training from the stream, N steps straight == N/2 + resume, and bad
samples named by shard and row or skipped and counted."""

from __future__ import annotations

import argparse
import io
import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_training import TINY, expect_exit, run_train

from ddpm_plus.data import ImageTransform, load_digits_dataset
from ddpm_plus.sharding import add_shard_parser, shard_command, shard_image_folder
from ddpm_plus.trainer.streaming import (
    BadSampleError,
    ShardStream,
    expand_data_files,
    slot_assignments,
    window_order,
)

NUM_IMAGES, ROWS_PER_SHARD = 24, 6  # 4 shards


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 digits as 10x12 PNGs in one sub-folder per class parity ("even"/"odd": a ClassLabel 'label')."""
    folder = tmp_path_factory.mktemp("digits_folder")
    for i, item in enumerate(load_digits_dataset("train").select(range(NUM_IMAGES))):
        sub = folder / ("even" if item["label"] % 2 == 0 else "odd")
        sub.mkdir(exist_ok=True)
        item["image"].resize((10, 12), Image.Resampling.BILINEAR).save(sub / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "parquet"
    paths = shard_image_folder(image_folder, out, rows_per_shard=ROWS_PER_SHARD)
    assert len(paths) == NUM_IMAGES // ROWS_PER_SHARD
    return out


def stream_of(files, *, rank=0, num_processes=1, workers=1, buffer=4, seed=0, skip=False):
    dataset = datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return ShardStream(
        dataset, files, ImageTransform(8, 1, random_flip=True), seed=seed, shuffle_buffer_size=buffer, rank=rank,
        num_processes=num_processes, workers=workers, skip_bad_images=skip,
    )  # fmt: skip


def slot_rows(stream, slot, epoch):
    """The (shard, row) pairs that ``slot`` reads in ``epoch``, in order."""
    plan = slot_assignments(stream.num_shards, stream.num_slots, slot, stream.seed, epoch)
    return [(s, row) for s, stride, phase in plan for _, row, _ in stream.shard_records(s, stride, phase, epoch, 0)]


# ------------------------------------------------------------------------------------------ ddpm-plus shard


def test_shard_command_round_trip(image_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_shard_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "shards"
    args = parser.parse_args(["shard", str(image_folder), "--output_dir", str(out), "--rows_per_shard", "10"])
    assert shard_command(args) == 0
    assert "wrote 3 shard(s)" in capsys.readouterr().out
    files = sorted(str(p) for p in out.glob("*.parquet"))
    assert [p.rsplit("/", 1)[1] for p in files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    back = datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    assert len(back) == NUM_IMAGES and back.features["label"].names == ["even", "odd"]
    assert back.features["image"] == datasets.Image() and back[0]["image"].size == (10, 12)  # decoded by readers
    back = back.cast_column("image", datasets.Image(decode=False))
    for row in back:  # the original bytes, a path relative to the folder, the label of the sub-folder
        relative = row["image"]["path"]
        assert row["image"]["bytes"] == (image_folder / relative).read_bytes()
        assert relative.split("/")[0] == back.features["label"].names[row["label"]]
    # Shards are never written over, and the arguments are checked.
    assert shard_command(args) == 1 and "already holds parquet files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rows_per_shard"):
        shard_image_folder(image_folder, tmp_path / "other", rows_per_shard=0)
    bad = parser.parse_args(["shard", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")])
    assert shard_command(bad) == 1 and "is not a directory" in capsys.readouterr().err


def test_expand_data_files_checks_patterns(shards, tmp_path):
    files = expand_data_files([f"{shards}/*.parquet", str(sorted(shards.glob("*.parquet"))[0])])
    assert len(files) == 4 and files == sorted(files)  # deduplicated, sorted
    with pytest.raises(ValueError, match="matches no file"):
        expand_data_files([str(tmp_path / "*.parquet")])
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="one kind"):
        expand_data_files([f"{shards}/*.parquet", str(tmp_path / "x.txt")])


# ------------------------------------------------------------------------------------------ order and split


def test_slot_assignments_split_shards_between_ranks():
    for epoch in range(3):
        rank0 = slot_assignments(8, 2, 0, seed=5, epoch=epoch)
        rank1 = slot_assignments(8, 2, 1, seed=5, epoch=epoch)
        shards0, shards1 = {s for s, _, _ in rank0}, {s for s, _, _ in rank1}
        assert not shards0 & shards1 and shards0 | shards1 == set(range(8))
        assert all((stride, phase) == (1, 0) for _, stride, phase in rank0 + rank1)
    orders = {tuple(s for s, _, _ in slot_assignments(8, 1, 0, seed=5, epoch=e)) for e in range(4)}
    assert len(orders) > 1  # reshuffled each epoch
    assert slot_assignments(8, 2, 0, 5, 1) == slot_assignments(8, 2, 0, 5, 1)  # a pure function
    # Fewer shards than slots: every slot reads every shard, 1 row in num_slots.
    assert sorted(slot_assignments(2, 3, 1, seed=0, epoch=0)) == [(0, 3, 1), (1, 3, 1)]
    with pytest.raises(ValueError, match="slot"):
        slot_assignments(4, 2, 2, 0, 0)


def test_two_ranks_read_disjoint_rows_covering_the_data(shards):
    files = expand_data_files([f"{shards}/*.parquet"])
    for num_files in (4, 1):  # whole shards per rank; a single shard split by rows
        ranks = [stream_of(files[:num_files], rank=r, num_processes=2) for r in range(2)]
        rows = [slot_rows(ranks[r], r, epoch=0) for r in range(2)]
        assert not set(rows[0]) & set(rows[1])
        assert len(rows[0]) + len(rows[1]) == num_files * ROWS_PER_SHARD
        assert len(set(rows[0]) | set(rows[1])) == num_files * ROWS_PER_SHARD


def test_window_shuffle_is_seeded_bounded_and_resumable(shards):
    files = expand_data_files([f"{shards}/*.parquet"])
    stream = stream_of(files, buffer=4)
    full = [(after, row) for after, row, _ in stream.shard_records(0, 1, 0, 0, 0)]
    assert [a for a, _ in full] == list(range(1, ROWS_PER_SHARD + 1))
    rows = [row for _, row in full]
    assert sorted(rows[:4]) == [0, 1, 2, 3] and sorted(rows[4:]) == [4, 5]  # windows of 4 rows
    assert rows[:4] == [window_order(0, 0, 0, 0, 0, 4)[q] for q in range(4)]
    for offset in range(ROWS_PER_SHARD + 1):  # a position resumes the same sequence
        assert [(a, r) for a, r, _ in stream.shard_records(0, 1, 0, 0, offset)] == full[offset:]
    epochs = {tuple(row for _, row, _ in stream.shard_records(0, 1, 0, e, 0)) for e in range(6)}
    assert len(epochs) > 1  # reshuffled each epoch
    in_order = stream_of(files, buffer=1)
    assert [row for _, row, _ in in_order.shard_records(0, 1, 0, 0, 0)] == list(range(ROWS_PER_SHARD))


def test_stream_items_resume_from_their_positions(shards):
    files = expand_data_files([f"{shards}/*.parquet"])
    stream = stream_of(files, buffer=4)
    items = stream.slot_items(0, [0, 0, 0, 0])
    first = [next(items) for _ in range(2 * NUM_IMAGES + 3)]  # into the third epoch
    assert [int(i["stream_position"][1]) for i in first][-1] == 2
    for k in (0, 5, NUM_IMAGES - 1, NUM_IMAGES + 7):
        position = first[k]["stream_position"][1:].tolist()
        resumed = stream.slot_items(0, position)
        for expected in first[k + 1 : k + 6]:
            got = next(resumed)
            assert torch.equal(got["pixel_values"], expected["pixel_values"])
            assert torch.equal(got["stream_position"], expected["stream_position"])


# ------------------------------------------------------------------------------------------ bad samples


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """2 shards of 8 rows; shard 1 has an undecodable image at row 3 and a missing one at row 6."""
    out = tmp_path_factory.mktemp("bad_shards")
    features = datasets.Features({"image": datasets.Image()})
    for s in range(2):
        images = [{"bytes": png_bytes(10 * s + i), "path": f"{s}-{i}.png"} for i in range(8)]
        if s == 1:
            images[3] = {"bytes": b"not an image", "path": "broken.png"}
            images[6] = None
        datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(str(out / f"s{s}.parquet"))
    return out


def test_bad_samples_are_named_or_skipped_and_counted(bad_shards):
    files = expand_data_files([f"{bad_shards}/*.parquet"])
    with pytest.raises(BadSampleError, match=r"s1\.parquet at row (3|6).*--skip_bad_images"):
        for _ in zip(range(100), stream_of(files, buffer=3).slot_items(0, [0, 0, 0, 0]), strict=False):
            pass
    items = stream_of(files, buffer=3, skip=True).slot_items(0, [0, 0, 0, 0])
    positions = [next(items)["stream_position"].tolist() for _ in range(15)]
    assert [p[1] for p in positions] == [0] * 14 + [1]  # 16 rows in epoch 0, 14 of them usable
    assert positions[-1][4] >= 2  # both bad rows counted (and the count carries over epochs)


def test_trainer_stops_naming_the_bad_shard_and_row(bad_shards, tmp_path, capsys):
    argv = TINY + ["--streaming", "--train_data_files", f"{bad_shards}/*.parquet", "--train_batch_size", 4,
                   "--max_train_steps", 8, "--output_dir", tmp_path / "run"]  # fmt: skip
    for workers in (0, 1):  # in a worker too, the message is the sample's, without the worker's traceback
        err = expect_exit(argv + ["--dataloader_num_workers", workers], capsys)
        assert "s1.parquet at row" in err and "--skip_bad_images" in err
        assert "Traceback" not in err and err.count("error: ") == 1
    summary = run_train(argv + ["--skip_bad_images", "--checkpointing_steps", 8])
    assert summary["global_step"] == 8
    state = json.loads((tmp_path / "run" / "checkpoint-8" / "data_state.json").read_text())
    assert state["skipped"] >= 2  # 8 steps x 4 = 32 rows read: both bad rows passed at least once


# ------------------------------------------------------------------------------------------ training


STREAM_ARGS = [
    "--streaming", "--shuffle_buffer_size", 4, "--train_batch_size", 4, "--dropout", 0.1, "--random_flip",
    "--use_ema", "--ema_max_decay", 0.9, "--lr_warmup_steps", 2,
]  # fmt: skip


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow
def test_streaming_resume_gives_the_same_weights(shards, tmp_path):
    # 2 workers = 2 slots of 2 shards (12 rows: 3 batches of 4 per epoch each). A checkpoint after 5 batches
    # lies mid-epoch with worker 1 next (slot 0: 3 batches, slot 1: 2); the 10 steps cross both slots' epochs.
    common = TINY + STREAM_ARGS + ["--train_data_files", f"{shards}/*.parquet", "--dataloader_num_workers", 2,
                                   "--max_train_steps", 10, "--checkpointing_steps", 5]  # fmt: skip
    straight = tmp_path / "straight"
    summary = run_train(common + ["--output_dir", straight])
    assert summary["global_step"] == 10
    state = json.loads((straight / "checkpoint-5" / "data_state.json").read_text())
    assert state["next_worker"] == [1] and state["stream_slots"] == 2 and state["skipped"] == 0
    assert state["slots"] == [  # slot 0: 3 batches = its 2 shards; slot 1: 2 batches = 1 shard and 2 rows
        {"epoch": 0, "shard_index": 1, "offset": 6, "skipped": 0},
        {"epoch": 0, "shard_index": 1, "offset": 2, "skipped": 0},
    ]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-5", resumed / "checkpoint-5")
    resumed_summary = run_train(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert resumed_summary["global_step"] == 10
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(load_file(straight / "checkpoint-10" / name), load_file(resumed / "checkpoint-10" / name))
    before = load_file(straight / "checkpoint-5" / "model.safetensors")
    after = load_file(straight / "checkpoint-10" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained after the checkpoint
    assert json.loads((resumed / "checkpoint-10" / "data_state.json").read_text()) == json.loads(
        (straight / "checkpoint-10" / "data_state.json").read_text()
    )


def test_streaming_trains_conditional_and_refuses_a_changed_split(shards, tmp_path, capsys):
    out = tmp_path / "run"
    common = TINY + STREAM_ARGS + ["--train_data_files", f"{shards}/*.parquet", "--class_conditional",
                                   "--output_dir", out]  # fmt: skip
    summary = run_train(common + ["--max_train_steps", 3, "--checkpointing_steps", 3])
    assert summary["global_step"] == 3 and np.isfinite(summary["final_loss"])
    card = (out / "README.md").read_text()
    assert f"streamed shards {shards}/*.parquet" in card and "digits" not in card
    state = json.loads((out / "checkpoint-3" / "data_state.json").read_text())
    assert state["slots"] == [{"epoch": 0, "shard_index": 1, "offset": 6, "skipped": 0}]  # 12 rows read
    err = expect_exit(
        common + ["--max_train_steps", 6, "--resume_from_checkpoint", "latest", "--dataloader_num_workers", 2], capsys
    )
    assert "data layout changed" in err and "stream_slots: checkpoint 1, now 2" in err


def test_a_hub_stream_names_its_shards(shards, monkeypatch):
    """--dataset_name --streaming goes through datasets.load_dataset(..., streaming=True) (here: local shards)."""
    from ddpm_plus.trainer.streaming import open_stream

    files = expand_data_files([f"{shards}/*.parquet"])
    real = datasets.load_dataset
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return real("parquet", data_files={"train": files}, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = argparse.Namespace(train_data_files=None, dataset_name="someone/pictures", dataset_config_name=None,
                              cache_dir=None, image_column="image", class_conditional=True, label_column="label")  # fmt: skip
    dataset, names, id2label = open_stream(args)
    assert calls[0][0] == "someone/pictures" and calls[0][2]["streaming"] is True
    assert names == [f"someone/pictures shard {i} of 4" for i in range(4)] and id2label == {0: "even", 1: "odd"}
    assert dataset.features["image"] == datasets.Image(decode=False)  # decoded by decode_image, named on failure
    args.label_column = "image"
    with pytest.raises(ValueError, match="needs --label_column 'image' to be a datasets.ClassLabel"):
        open_stream(args)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train_data_files", "x.parquet"], "--train_data_files needs --streaming"),
        (["--streaming"], "--streaming needs --train_data_files GLOB or --dataset_name"),
        (["--streaming", "--train_data_dir", "."], "ddpm-plus shard"),
        (["--streaming", "--train_data_files", "/nonexistent/*.parquet"], "matches no file"),
        (["--streaming", "--shuffle_buffer_size", "0", "--dataset_name", "x"], "--shuffle_buffer_size must be >= 1"),
        (["--streaming", "--dataset_name", "x", "--num_epochs", "2"], "with --streaming give --max_train_steps"),
    ],
)
def test_streaming_flags_are_checked(extra, message, tmp_path, capsys):
    err = expect_exit(TINY + ["--output_dir", tmp_path / "run"] + extra, capsys)
    assert message in err


def test_missing_image_column_is_named_before_training(shards, tmp_path, capsys):
    argv = TINY + ["--streaming", "--train_data_files", f"{shards}/*.parquet", "--image_column", "img",
                   "--output_dir", tmp_path / "run"]  # fmt: skip
    err = expect_exit(argv, capsys)
    assert "--image_column 'img' is not a column" in err and "'label'" in err
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.slow
def test_two_processes_stream_disjoint_shards_and_resume_exactly(shards, tmp_path):
    """`accelerate launch --num_processes 2` (gloo): each rank reads its own slot; the checkpoint gathers both
    ranks' positions; a resume of both ranks continues the same trajectory."""
    from test_training_distributed import launch_two_processes

    common = TINY + STREAM_ARGS + ["--train_data_files", f"{shards}/*.parquet", "--max_train_steps", 4,
                                   "--checkpointing_steps", 2]  # fmt: skip
    straight = tmp_path / "straight"
    result = launch_two_processes(common + ["--output_dir", straight])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes, 8 images per optimizer step" in result.stderr
    state = json.loads((straight / "checkpoint-2" / "data_state.json").read_text())
    assert state["stream_slots"] == 2 and state["next_worker"] == [0, 0]
    # 2 steps x 4 images per rank: each slot 8 rows into its 2 shards (of 4 in all: disjoint halves)
    assert [(s["shard_index"], s["offset"]) for s in state["slots"]] == [(1, 2), (1, 2)]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = launch_two_processes(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(load_file(straight / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name))
