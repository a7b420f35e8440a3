"""Bad training data through the trainer: an empty folder, truncated images, non-image files, mixed modes
(L/RGB/RGBA/P), tiny images and a dataset smaller than one batch. Without --skip_bad_images the first
unreadable file is named; with it the run trains on the rest and reports the counts."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image
from test_training import TINY, expect_exit, run_train

ARGS = [*TINY, "--max_train_steps", 1, "--train_batch_size", 4]


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """Eight readable images in four modes and odd sizes (down to 1x1), a truncated PNG, a text file with an
    image extension, and a file imagefolder ignores (notes.txt)."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(8, 8), (1, 1), (3, 2), (2, 5), (16, 9), (8, 8), (4, 4), (12, 12)]
    modes = ["L", "RGB", "RGBA", "P"]
    for i, size in enumerate(sizes):
        mode = modes[i % 4]
        image = Image.new("RGB", size, (40 * i % 255, 90, 200)).convert(mode)
        image.save(folder / f"ok-{i}-{mode}.png")
    good = png_bytes(Image.new("L", (8, 8), 128))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "not-an-image.jpg").write_text("this is not a JPEG")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder


def test_bad_files_are_named_without_skip_bad_images(messy_folder, tmp_path, capsys):
    err = expect_exit([*ARGS, "--train_data_dir", messy_folder, "--output_dir", tmp_path / "out"], capsys)
    assert "cannot read image" in err and ("truncated.png" in err or "not-an-image.jpg" in err)
    assert "--skip_bad_images" in err and "Traceback" not in err


def test_skip_bad_images_trains_on_the_rest_and_reports_the_counts(messy_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        summary = run_train(
            [*ARGS, "--train_data_dir", messy_folder, "--output_dir", tmp_path / "out", "--skip_bad_images"]
        )
    assert summary["global_step"] == 1
    assert "skipped 2 unreadable image(s) of 10" in caplog.text
    assert "truncated.png" in caplog.text and "not-an-image.jpg" in caplog.text
    assert "8 images" in caplog.text  # the trainer's summary line counts the readable ones


def test_empty_folder_says_so(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    err = expect_exit([*ARGS, "--train_data_dir", empty, "--output_dir", tmp_path / "out"], capsys)
    assert f"no image files found in train_data_dir={str(empty)!r}" in err


def test_only_bad_images_with_skip_says_nothing_to_train_on(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("not a png")
    (folder / "b.png").write_bytes(b"")
    err = expect_exit(
        [*ARGS, "--train_data_dir", folder, "--output_dir", tmp_path / "out", "--skip_bad_images"], capsys
    )
    assert "0 readable image(s) (2 skipped as unreadable)" in err and "nothing to train on" in err


def test_dataset_smaller_than_one_batch_says_so(tmp_path, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 30 * i).save(folder / f"{i}.png")
    argv = [*ARGS, "--train_data_dir", folder, "--output_dir", tmp_path / "out", "--gradient_accumulation_steps", 2]
    err = expect_exit(argv, capsys)
    assert "3 readable image(s)" in err and "fewer than min_size=8 (one global batch)" in err
    assert "--train_batch_size 4 x 1 process(es) x --gradient_accumulation_steps 2 = 8 images" in err
