"""ddpm_plus.data: bundled digits, imagefolder / Hub-layout loading, the image transform, bad images."""

import hashlib

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.datasets import load_digits

from ddpm_plus.data import (
    DIGITS_NUM_BINS,
    BadImageError,
    ImageTransform,
    LabelColumnError,
    digits_heldout_tensor,
    digits_split_indices,
    load_digits_dataset,
    load_image_dataset,
    prepare_dataset,
)

GRID17 = torch.tensor([k / 16 * 2 - 1 for k in range(17)], dtype=torch.float32)


def _pixels(tensor):
    """[-1, 1] float tensor back to 0..255 levels (exact for outputs of p / 127.5 - 1)."""
    return torch.round((tensor.double() + 1) * 127.5).to(torch.int64)


def _on_grid17(tensor):
    return bool(torch.isin(tensor, GRID17).all())


# ---------------------------------------------------------------- bundled digits


def test_digits_split_is_fixed_disjoint_and_covers_everything():
    train, test, all_ = (digits_split_indices(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(all_)) == (1437, 360, 1797)
    assert not set(train) & set(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    assert np.array_equal(test, digits_split_indices("test"))  # deterministic
    # Pinned: the held-out split must never change between versions or machines.
    assert test[:10].tolist() == [9, 12, 15, 27, 34, 39, 52, 59, 62, 63]
    digest = hashlib.sha256(test.astype("<i8").tobytes()).hexdigest()
    assert digest == "4780ae1bc38d641fbdf77c62345da2f3cfd037917f28202e9d0c693419375b2a"
    # Stratified: every digit has 35 to 37 held-out images.
    counts = np.bincount(load_digits().target[test], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_dataset_stores_levels_on_the_8bit_grid():
    digits = load_digits()
    ds = load_digits_dataset("test")
    idx = digits_split_indices("test")
    assert ds.column_names == ["image", "label"] and len(ds) == 360
    assert ds[0]["image"].mode == "L" and ds[0]["image"].size == (8, 8)
    stored = ds.with_format("numpy")["image"]
    assert np.array_equal(stored, np.rint(digits.images[idx] * 255 / 16).astype(np.uint8))
    assert ds["label"] == digits.target[idx].tolist()


def test_digits_tensor_is_exactly_on_the_17_level_grid():
    digits = load_digits()
    reference = torch.from_numpy(digits.images[digits_split_indices("test")] / 16 * 2 - 1).float()
    x8 = digits_heldout_tensor()
    assert x8.shape == (360, 1, 8, 8) and x8.dtype == torch.float32
    assert torch.equal(x8[:, 0], reference)
    x16 = digits_heldout_tensor(resolution=16, channels=3)
    up = reference.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert x16.shape == (360, 3, 16, 16)
    assert all(torch.equal(x16[:, c], up) for c in range(3))
    x12 = digits_heldout_tensor(resolution=12)  # not a multiple of 8: BICUBIC, snapped back to the grid
    assert x12.shape == (360, 1, 12, 12) and _on_grid17(x12)
    # The training path (default source, random crop/flip) stays on the grid too.
    data = prepare_dataset(
        load_image_dataset(), ImageTransform(32, 1, random_flip=True, num_bins=DIGITS_NUM_BINS), min_size=128
    )
    assert len(data) == 1437
    batch = torch.stack([data[i]["pixel_values"] for i in range(0, 1437, 37)])
    assert batch.shape[1:] == (1, 32, 32) and _on_grid17(batch)
    assert len(torch.unique(batch)) == 17


def test_sklearn_digits_are_read_once_for_every_digits_loader(monkeypatch):
    """One digits loader (ddpm_plus.data): the split, the dataset, the tensors and the evaluation classifier's
    arrays all come from a single read of scikit-learn's digits, so they cannot drift apart."""
    import sklearn.datasets

    from ddpm_plus import data
    from ddpm_plus.evaluation import digits_proxy as evaluation

    reads = []

    def counting_load_digits(*args, **kwargs):
        reads.append(1)
        return load_digits(*args, **kwargs)

    monkeypatch.setattr(sklearn.datasets, "load_digits", counting_load_digits)
    data._sklearn_digits.cache_clear()
    try:
        levels, labels = data.load_digits_arrays("test")
        digits_split_indices("train")
        load_digits_dataset("test")
        x, y = evaluation._digits_arrays("test")
        digits_heldout_tensor()
    finally:
        data._sklearn_digits.cache_clear()
    assert len(reads) == 1
    digits = load_digits()
    idx = digits_split_indices("test")
    assert levels.dtype == np.uint8 and np.array_equal(levels, digits.images[idx])
    assert labels.dtype == np.int64 and np.array_equal(labels, digits.target[idx])
    assert torch.equal(x, digits_heldout_tensor()) and y.tolist() == labels.tolist()
    levels[:] = 0  # a copy: the cached arrays stay intact
    assert np.array_equal(data.load_digits_arrays("test")[0], digits.images[idx])


def test_digits_unknown_split_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"split.*'train', 'test', 'all'.*'validation'"):
        load_digits_dataset("validation")


# ---------------------------------------------------------------- the transform


def test_pixel_mapping_is_exact_at_the_ends():
    image = PIL.Image.fromarray(np.array([[0, 255], [51, 128]], dtype=np.uint8))
    x = ImageTransform(2, 1)(image)
    assert x.dtype == torch.float32 and x.shape == (1, 2, 2)
    assert x[0, 0, 0].item() == -1.0 and x[0, 0, 1].item() == 1.0
    assert x[0, 1, 0].item() == pytest.approx(51 / 127.5 - 1, abs=1e-7)
    assert x[0, 1, 1].item() == pytest.approx(128 / 127.5 - 1, abs=1e-7)


def test_grey_to_rgb_replicates_and_rgb_to_grey_uses_luma():
    grey = PIL.Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    x = ImageTransform(4, 3)(grey)
    assert x.shape == (3, 4, 4)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.equal(_pixels(x[0]), torch.arange(16).reshape(4, 4) * 16)

    rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    y = ImageTransform(4, 1)(PIL.Image.fromarray(rgb))
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R 601-2
    assert y.shape == (1, 4, 4)
    assert np.abs(_pixels(y[0]).numpy() - luma).max() <= 1.0
    z = ImageTransform(4, 3)(PIL.Image.fromarray(rgb))
    assert torch.equal(_pixels(z), torch.from_numpy(rgb).permute(2, 0, 1).long())


def test_transparency_is_composited_on_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0]], [[200, 100, 0, 128], [0, 0, 0, 255]]], dtype=np.uint8)
    x = _pixels(ImageTransform(2, 3)(PIL.Image.fromarray(rgba, mode="RGBA")))
    alpha = rgba[..., 3:] / 255
    expected = torch.from_numpy(np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha))).permute(2, 0, 1).long()
    assert (x - expected).abs().max() <= 1
    assert x[:, 0, 1].tolist() == [255, 255, 255] and x[:, 0, 0].tolist() == [10, 20, 30]

    la = np.array([[[40, 255], [40, 0]]], dtype=np.uint8)
    y = _pixels(ImageTransform(1, 1, center_crop=True)(PIL.Image.fromarray(la, mode="LA")))
    assert y.shape == (1, 1, 1) and y.item() == 40  # center crop of 2x1 keeps the left (opaque) pixel
    z = ImageTransform(2, 1, resample="nearest")(PIL.Image.fromarray(la, mode="LA").resize((2, 2), 0))
    assert _pixels(z)[0, :, 1].tolist() == [255, 255]


def test_palette_images_with_and_without_transparency():
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    image = PIL.Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    x = _pixels(ImageTransform(2, 3)(image))
    assert x[:, 0, 0].tolist() == [255, 0, 0] and x[:, 0, 1].tolist() == [0, 255, 0]
    assert x[:, 1, 0].tolist() == [0, 0, 255]
    image.info["transparency"] = 1  # palette entry 1 is transparent -> white
    y = _pixels(ImageTransform(2, 3)(image))
    assert y[:, 0, 1].tolist() == [255, 255, 255] and y[:, 0, 0].tolist() == [255, 0, 0]
    g = _pixels(ImageTransform(2, 1)(image))
    assert g.shape == (1, 2, 2) and g[0, 0, 1].item() == 255


def test_16bit_greyscale_is_scaled_not_clipped():
    image = PIL.Image.fromarray(np.array([[0, 65535], [257 * 100, 257 * 7]], dtype=np.uint16))
    assert image.mode.startswith("I;16")
    assert _pixels(ImageTransform(2, 1)(image))[0].tolist() == [[0, 255], [100, 7]]


def test_center_crop_of_a_non_square_image():
    columns = np.tile(np.arange(6, dtype=np.uint8) * 10, (4, 1))  # 6 wide, 4 high: value = 10 * column
    image = PIL.Image.fromarray(columns)
    x = _pixels(ImageTransform(4, 1, center_crop=True)(image))[0]
    assert torch.equal(x, torch.tensor([10, 20, 30, 40]).expand(4, 4))
    # Integer upscaling (x2) replicates pixels (NEAREST), then the centre 8 of 12 columns.
    y = _pixels(ImageTransform(8, 1, center_crop=True)(image))[0]
    assert torch.equal(y, torch.tensor([10, 10, 20, 20, 30, 30, 40, 40]).expand(8, 8))


def test_random_crop_uses_every_offset_and_the_generator():
    image = PIL.Image.fromarray(np.tile(np.arange(6, dtype=np.uint8) * 10, (4, 1)))
    transform = ImageTransform(4, 1, generator=torch.Generator().manual_seed(0))
    starts = set()
    for _ in range(40):
        row = _pixels(transform(image))[0, 0]
        start = row[0].item() // 10
        assert row.tolist() == [10 * (start + k) for k in range(4)]
        starts.add(start)
    assert starts == {0, 1, 2}
    first = [ImageTransform(4, 1, generator=torch.Generator().manual_seed(3))(image) for _ in range(2)]
    again = [ImageTransform(4, 1, generator=torch.Generator().manual_seed(3))(image) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_random_flip_with_a_seeded_generator():
    image = PIL.Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    plain = ImageTransform(8, 1)(image)
    transform = ImageTransform(8, 1, random_flip=True, generator=torch.Generator().manual_seed(0))
    flipped = 0
    for _ in range(40):
        x = transform(image)
        if torch.equal(x, torch.flip(plain, dims=[-1])):
            flipped += 1
        else:
            assert torch.equal(x, plain)
    assert 5 <= flipped <= 35


def test_resample_default_and_choice():
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8))
    x = ImageTransform(12, 1)(image)  # 12 is not a multiple of 8 -> BICUBIC
    expected = np.array(image.resize((12, 12), PIL.Image.Resampling.BICUBIC))
    assert torch.equal(_pixels(x)[0], torch.from_numpy(expected).long())
    y = ImageTransform(12, 1, resample="bilinear")(image)
    expected = np.array(image.resize((12, 12), PIL.Image.Resampling.BILINEAR))
    assert torch.equal(_pixels(y)[0], torch.from_numpy(expected).long())
    z = ImageTransform(4, 1, resample=PIL.Image.Resampling.BOX)(image)  # downscaling
    expected = np.array(image.resize((4, 4), PIL.Image.Resampling.BOX))
    assert torch.equal(_pixels(z)[0], torch.from_numpy(expected).long())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"resolution": 0, "channels": 1}, "resolution"),
        ({"resolution": 2.5, "channels": 1}, "resolution"),
        ({"resolution": True, "channels": 1}, "resolution"),
        ({"resolution": 8, "channels": 2}, "channels"),
        ({"resolution": 8, "channels": 1, "resample": "sharpest"}, "resample"),
        ({"resolution": 8, "channels": 1, "num_bins": 1}, "num_bins"),
    ],
)
def test_transform_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImageTransform(**kwargs)


# ---------------------------------------------------------------- imagefolder, bad images, sizes


def _write_folder(root, corrupt=False):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "a_grey.png")
    PIL.Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(root / "b_rgb.png")
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), mode="RGBA").save(root / "c_rgba.png")
    PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(root / "d_palette.png")
    if corrupt:
        good = (root / "b_rgb.png").read_bytes()
        (root / "e_truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_imagefolder_loads_and_batches(tmp_path):
    folder = _write_folder(tmp_path / "images")
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    data = prepare_dataset(ds, ImageTransform(8, 3, center_crop=True), min_size=4)
    assert len(data) == 4 and data.num_skipped == 0
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    with pytest.raises(ValueError, match=r"image_column='picture'.*available columns: \['image'\]"):
        load_image_dataset(train_data_dir=str(folder), image_column="picture", cache_dir=str(tmp_path / "cache"))


def test_corrupt_png_is_named_or_skipped_and_counted(tmp_path, caplog):
    folder = _write_folder(tmp_path / "images", corrupt=True)
    (folder / "f_not_an_image.png").write_text("this is text, not a PNG")
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 6
    with pytest.raises(BadImageError, match=r"e_truncated\.png.*skip_bad_images"):
        prepare_dataset(ds, ImageTransform(8, 1))
    with caplog.at_level("WARNING", logger="ddpm_plus.data"):
        data = prepare_dataset(ds, ImageTransform(8, 1), skip_bad_images=True)
    assert len(data) == 4 and data.num_skipped == 2
    assert any("e_truncated.png" in s for s in data.skipped) and any("f_not_an_image.png" in s for s in data.skipped)
    assert "skipped 2 unreadable image(s) of 6" in caplog.text
    assert all(data[i]["pixel_values"].shape == (1, 8, 8) for i in range(len(data)))
    with pytest.raises(ValueError, match=r"4 readable image\(s\) \(2 skipped.*min_size=5"):
        prepare_dataset(ds, ImageTransform(8, 1), skip_bad_images=True, min_size=5)


def test_imagefolder_metadata_problems_name_the_folder_or_file(tmp_path):
    folder = _write_folder(tmp_path / "images")
    (folder / "metadata.csv").write_text("file_name,text\na_grey.png,ok\nmissing.png,gone\n")
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BadImageError, match=r"missing\.png"):
        prepare_dataset(ds, ImageTransform(8, 1))
    (folder / "metadata.csv").write_text('file_name,text\na_grey.png,"unterminated\n')
    with pytest.raises(ValueError, match=r"could not load the imagefolder train_data_dir=.*images"):
        load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache2"))


def test_path_and_bytes_columns_are_decoded_and_named(tmp_path):
    folder = _write_folder(tmp_path / "images", corrupt=True)
    paths = [str(folder / name) for name in ("a_grey.png", "e_truncated.png")]
    ds = datasets.Dataset.from_dict({"image": paths})
    with pytest.raises(BadImageError, match=r"e_truncated\.png.*dataset index 1"):
        prepare_dataset(ds, ImageTransform(8, 1))
    data = prepare_dataset(ds, ImageTransform(8, 1), skip_bad_images=True)
    assert len(data) == 1 and data.num_skipped == 1
    blobs = datasets.Dataset.from_dict({"image": [(folder / "b_rgb.png").read_bytes(), b"not a png"]})
    with pytest.raises(BadImageError, match=r"at dataset index 1"):
        prepare_dataset(blobs, ImageTransform(8, 3))
    assert prepare_dataset(blobs, ImageTransform(8, 3), skip_bad_images=True)[0]["pixel_values"].shape == (3, 8, 8)


def test_missing_image_is_named_by_index():
    image = PIL.Image.fromarray(np.zeros((4, 4), dtype=np.uint8))
    ds = datasets.Dataset.from_dict({"image": [image, None]}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(BadImageError, match=r"dataset index 1.*missing"):
        prepare_dataset(ds, ImageTransform(4, 1))


def test_empty_or_too_small_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no image files found in train_data_dir=.*empty"):
        load_image_dataset(train_data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="train_data_dir"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))
    folder = _write_folder(tmp_path / "images")
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"4 readable image\(s\) \(0 skipped.*min_size=8"):
        prepare_dataset(ds, ImageTransform(8, 1), min_size=8)
    with pytest.raises(ValueError, match="nothing to train on"):
        prepare_dataset(ds.select([]), ImageTransform(8, 1))
    with pytest.raises(ValueError, match="min_size"):
        prepare_dataset(ds, ImageTransform(8, 1), min_size=0)


def test_label_problems_have_their_own_error_type():
    """A label problem is a LabelColumnError (a ValueError); a size problem of labelled data is not one."""
    four = load_digits_dataset("train").select(range(4))
    with pytest.raises(LabelColumnError, match="label_column='y' is not a column"):
        prepare_dataset(four, ImageTransform(8, 1), label_column="y")
    with pytest.raises(ValueError, match="min_size=8") as info:
        prepare_dataset(four, ImageTransform(8, 1), min_size=8, label_column="label")
    assert not isinstance(info.value, LabelColumnError)
    assert issubclass(LabelColumnError, ValueError) and not issubclass(LabelColumnError, BadImageError)


def test_hub_layout_dataset_renames_the_image_column(tmp_path):
    images = [PIL.Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (0, 255)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"img": images, "label": [0, 1]}, features=features).to_parquet(
        str(repo / "data" / "train-00000-of-00001.parquet")
    )
    ds = load_image_dataset(dataset_name=str(repo), image_column="img", cache_dir=str(tmp_path / "cache"))
    assert sorted(ds.column_names) == ["image", "label"]
    x = prepare_dataset(ds, ImageTransform(4, 1))[1]["pixel_values"]
    assert torch.equal(x, torch.ones(1, 4, 4))


def test_source_arguments_are_validated():
    with pytest.raises(ValueError, match="dataset_name and train_data_dir"):
        load_image_dataset(dataset_name="user/data", train_data_dir="/tmp/images")
    with pytest.raises(ValueError, match="dataset_config_name"):
        load_image_dataset(dataset_config_name="plain_text")
    with pytest.raises(ValueError, match="split"):
        load_image_dataset(split="validation")
