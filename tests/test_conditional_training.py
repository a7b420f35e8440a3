"""Class-conditional training (``--class_conditional``): label dropout from the step-seeded generator (rate,
null id, process slicing, no global RNG), label-column validation before training, the digits_cond preset,
an end-to-end run on a class-per-folder imagefolder that saves, loads and samples by name with guidance,
per-class sample grids, the model card, and an exactly resumable conditional run."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_training import TINY, expect_exit, run_train, unet_weights

from ddpm_plus.data import ImageTransform, LabelColumnError, class_labels_of, load_digits_dataset, prepare_dataset
from ddpm_plus.trainer.args import parse_args
from ddpm_plus.trainer.loop import drop_labels, grid_class_labels

SINGLE = SimpleNamespace(process_index=0, num_processes=1)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """16 digits in two class sub-folders, 'seven' and 'three' (imagefolder: ClassLabel ids 0 and 1)."""
    root = tmp_path_factory.mktemp("classes")
    digits = load_digits_dataset("train")
    for name, digit in (("three", 3), ("seven", 7)):
        (root / name).mkdir()
        rows = [i for i, label in enumerate(digits["label"]) if label == digit][:8]
        for k, i in enumerate(rows):
            digits[i]["image"].save(root / name / f"{k}.png")
    return root


# ----------------------------------------------------------------------------- label dropout


def test_label_dropout_rate_is_within_binomial_error_and_the_null_id_in_range():
    labels = torch.arange(10).repeat(2000)  # 20,000 labels of 10 classes; the null id is 10
    dropped = torch.cat([drop_labels(labels, 10, 0.1, seed, SINGLE) for seed in range(5)])
    assert dropped.min() >= 0 and dropped.max() <= 10  # never outside the 11 embeddings
    changed = dropped != labels.repeat(5)
    assert torch.equal(changed, dropped == 10)  # every change is to the null class
    n, p = changed.numel(), 0.1
    assert abs(changed.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(drop_labels(labels, 10, 0.0, 3, SINGLE), labels)  # 0: a purely conditional model


def test_label_dropout_is_step_seeded_sliced_per_process_and_leaves_the_global_rng_alone():
    labels = torch.arange(12) % 4
    state = torch.random.get_rng_state()
    one = drop_labels(labels, 4, 0.5, 123, SINGLE)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(one, drop_labels(labels, 4, 0.5, 123, SINGLE))  # a function of the step seed
    assert not torch.equal(one, drop_labels(labels, 4, 0.5, 124, SINGLE))
    slices = [
        drop_labels(labels[3 * r : 3 * r + 3], 4, 0.5, 123, SimpleNamespace(process_index=r, num_processes=4))
        for r in range(4)
    ]
    assert torch.equal(torch.cat(slices), one)  # 4 processes drop exactly what one process drops


# ----------------------------------------------------------------------------- data and flags


def test_label_columns_are_checked():
    digits = load_digits_dataset("train")
    labels, id2label = class_labels_of(digits)
    assert id2label == {i: str(i) for i in range(10)} and labels.dtype == np.int64 and len(labels) == 1437
    images = digits["image"][:3]
    cases = [
        (datasets.Dataset.from_dict({"image": images}), "label", "not a column"),
        (datasets.Dataset.from_dict({"image": images, "label": ["a", "b", "c"]}), "label", "integer class ids"),
        (datasets.Dataset.from_dict({"image": images, "label": [0.0, 1.0, 2.0]}), "label", "integer class ids"),
        (datasets.Dataset.from_dict({"image": images, "y": [0, -1, 2]}), "y", "label -1 at row 1 is outside"),
        (datasets.Dataset.from_dict({"image": images, "y": [0, None, 2]}), "y", "missing labels"),
        (
            datasets.Dataset.from_dict(
                {"image": images, "label": [0, -1, 1]},
                features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
            ),
            "label",
            "outside the 2 classes",
        ),
    ]
    for dataset, column, match in cases:  # one type for every label problem (the trainer catches it by type)
        with pytest.raises(LabelColumnError, match=f"label_column='{column}'.*{match}"):
            prepare_dataset(dataset, ImageTransform(8, 1), label_column=column)
        with pytest.raises(LabelColumnError, match=match):
            class_labels_of(dataset, column)
    plain = datasets.Dataset.from_dict({"image": images, "y": [2, 0, 2]})
    data = prepare_dataset(plain, ImageTransform(8, 1), label_column="y")
    assert data.id2label == {0: "0", 1: "1", 2: "2"} and data[0]["class_labels"].item() == 2
    assert "class_labels" not in prepare_dataset(plain, ImageTransform(8, 1))[0]


def test_an_imagefolder_without_class_folders_is_refused_before_training(tmp_path, capsys):
    for i, item in enumerate(load_digits_dataset("train").select(range(16))):
        item["image"].save(tmp_path / f"{i}.png")
    err = expect_exit(
        TINY + ["--class_conditional", "--train_data_dir", tmp_path, "--output_dir", tmp_path / "o"], capsys
    )
    assert "--class_conditional: label_column='label' is not a column" in err and "one sub-folder per class" in err
    assert not (tmp_path / "o" / "checkpoint-1").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--class_conditional", "--class_dropout_prob", "1"], "--class_dropout_prob must be in [0, 1)"),
        (["--eval_guidance_scale", "2"], "--eval_guidance_scale 2.0 needs --class_conditional"),
        (
            ["--class_conditional", "--class_dropout_prob", "0", "--eval_guidance_scale", "2"],
            "needs --class_dropout_prob > 0",
        ),
    ],
)
def test_conditioning_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_digits_cond_preset_is_the_digits_preset_made_conditional():
    cond, plain = vars(parse_args(["--config", "digits_cond"])), vars(parse_args(["--config", "digits"]))
    differ = {k for k in cond if cond[k] != plain[k]} - {"config"}
    assert differ == {"class_conditional", "output_dir", "eval_batch_size"}
    assert cond["class_conditional"] and cond["class_dropout_prob"] == 0.1 and cond["label_column"] == "label"
    assert grid_class_labels(10, cond["eval_batch_size"]) == ([d for d in range(10) for _ in range(6)], 10)


def test_grid_labels_one_row_per_class_or_a_fixed_subset():
    assert grid_class_labels(2, 5) == ([0, 0, 1, 1], 2)
    assert grid_class_labels(3, 2) == ([0, 1, 2], 3)  # at least one image per class
    labels, rows = grid_class_labels(1000, 64)
    classes = sorted(set(labels))
    assert rows == 16 and len(classes) == 16 and classes[0] == 0 and classes[-1] == 999 and len(labels) == 64


# ----------------------------------------------------------------------------- end to end


def test_conditional_run_saves_loads_and_samples_by_name(tmp_path, class_folder):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    argv = ["--class_conditional", "--train_data_dir", class_folder, "--output_dir", out, "--max_train_steps", 3]
    argv += ["--checkpointing_steps", 3, "--eval_batch_size", 4, "--eval_guidance_scale", 2, "--channels", 1]
    summary = run_train(TINY + argv)
    assert summary["global_step"] == 3
    index = json.loads((out / "model_index.json").read_text())
    assert index["id2label"] == {"0": "seven", "1": "three"}  # datasets sorts the class folders
    assert (index["null_class_id"], index["class_dropout_prob"]) == (2, 0.1)
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 3
    grid = Image.open(summary["last_grid"])
    tile = 64 + 4  # 8x8 upscaled to 64 plus a 2-pixel frame each side (image_grid)
    assert grid.size == (2 * tile, 2 * tile)  # one row per class, 4 // 2 = 2 images each

    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2, class_labels=["three", "seven"], guidance_scale=3.0, num_inference_steps=3, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="unknown class name 'cat'"):
        pipe(batch_size=1, class_labels="cat", num_inference_steps=2)

    card = (out / "README.md").read_text()
    assert "## Classes" in card and "| 1 | three |" in card and "label dropout 0.1" in card
    assert "uses w = 2" in card and 'class_labels=["seven", "three"]' in card


def test_conditional_learned_variance_run_with_zero_dropout_refuses_guidance(tmp_path, class_folder):
    from ddpm_plus import DDPMPlusPipeline

    out = tmp_path / "run"
    argv = ["--class_conditional", "--class_dropout_prob", 0, "--variance_type", "learned_range", "--loss", "hybrid"]
    argv += ["--prediction_type", "v_prediction", "--train_data_dir", class_folder, "--output_dir", out]
    run_train(TINY + argv + ["--max_train_steps", 2, "--checkpointing_steps", 2, "--channels", 1])
    pipe = DDPMPlusPipeline.from_pretrained(out)
    assert pipe.conditioning.class_dropout_prob == 0.0
    assert "guidance is refused" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        pipe(batch_size=1, class_labels="three", guidance_scale=2.0, num_inference_steps=2)
    assert pipe(batch_size=1, class_labels="three", num_inference_steps=2, output_type="pt").images.shape == (
        1,
        1,
        8,
        8,
    )


def test_conditional_resume_continues_the_same_trajectory(tmp_path, class_folder):
    common = TINY + ["--class_conditional", "--class_dropout_prob", 0.5, "--train_data_dir", class_folder]
    common += ["--train_batch_size", 4, "--max_train_steps", 6, "--checkpointing_steps", 3, "--channels", 1]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = run_train(common + ["--output_dir", straight])
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    again = run_train(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert again["final_loss"] == summary["final_loss"]
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((straight / "checkpoint-3" / "training_state.json").read_text())
    assert (state["num_classes"], state["class_dropout_prob"]) == (2, 0.5)


def test_image_grid_rows():
    from ddpm_plus.image_grid import image_grid

    images = torch.rand(6, 1, 8, 8)
    assert image_grid(images, rows=3).size == (2 * 68, 3 * 68)
    assert image_grid(images).size == (3 * 68, 2 * 68)  # near-square by default
    with pytest.raises(ValueError, match="positive divisor"):
        image_grid(images, rows=4)
