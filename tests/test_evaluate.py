"""`ddpm-plus evaluate`, the digits Frechet proxy and the likelihood baselines."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import ddpm_plus  # noqa: F401
from ddpm_plus import cli
from ddpm_plus.evaluation.bound import dims_per_source_pixel
from ddpm_plus.evaluation.digits_proxy import (
    classifier_features,
    frechet_distance,
    load_or_train_digits_classifier,
    to_digits_frame,
)
from ddpm_plus.evaluation.options import bound_timesteps

# the bound is recomputed here and compared to 1e-9: the same thread count as the CLI's CPU default (1 here)
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def test_classifier_data_comes_from_the_one_digits_loader(monkeypatch):
    """The classifier trains and is scored on ddpm_plus.data's digits (same split), not a loader of its own."""
    from ddpm_plus import data
    from ddpm_plus.evaluation import digits_proxy as evaluation

    levels = np.array([[[0] * 8] * 8, [[16] * 8] * 8, [[8] * 8] * 8], dtype=np.uint8)
    calls = []

    def fake_load_digits_arrays(split):
        calls.append(split)
        return levels, np.array([3, 1, 4])

    assert evaluation.load_digits_arrays is data.load_digits_arrays  # the one loader, imported
    monkeypatch.setattr(evaluation, "load_digits_arrays", fake_load_digits_arrays)
    x, y = evaluation._digits_arrays("test")
    assert calls == ["test"]
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32 and y.tolist() == [3, 1, 4]
    assert x[:, 0, 0, 0].tolist() == [-1.0, 1.0, 0.0]
    monkeypatch.undo()
    x, y = evaluation._digits_arrays("train")  # the real digits: as prepared for the model, and their labels
    assert torch.equal(x, data.digits_heldout_tensor(8, 1, split="train"))
    assert y.tolist() == data.load_digits_dataset("train")["label"]


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """The digits classifier, trained once for this module into a temporary cache."""
    cache = tmp_path_factory.mktemp("classifier")
    model, accuracy = load_or_train_digits_classifier(cache)
    return cache, model, accuracy


def _reference_frechet(a, b):  # pytorch-fid's formula with scipy's general matrix square root
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)


def test_frechet_distance_matches_reference_and_basic_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(_reference_frechet(a, b), rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(6.0)
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)
    # fewer samples than dimensions (singular covariances) stays finite and non-negative
    assert 0 <= frechet_distance(a[:4], b[:3]) < np.inf
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_to_digits_frame_inverts_nearest_upsampling():
    x = torch.randint(0, 17, (3, 1, 8, 8)).float() / 8 - 1
    up = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest").expand(-1, 3, -1, -1)
    torch.testing.assert_close(to_digits_frame(up), x)


def test_classifier_is_accurate_cached_and_deterministic(classifier_cache):
    cache, model, accuracy = classifier_cache
    assert accuracy > 0.93  # seen: 0.958 on the 360 held-out digits
    files = list(Path(cache).glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again, accuracy2 = load_or_train_digits_classifier(cache)
    assert files[0].stat().st_mtime_ns == mtime and accuracy2 == accuracy  # loaded, not retrained
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    feats = classifier_features(model, torch.zeros(5, 1, 16, 16))
    assert feats.shape == (5, model.feature_dim) and feats.dtype == np.float64


def _save_tiny_pipeline(path, channels=1, size=16):
    """A ``size`` x ``size`` learned_range pipeline with T = 20 (2x output channels), saved to ``path``."""
    from diffusers import UNet2DModel

    from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=2 * channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    sched = DDPMPlusScheduler(num_train_timesteps=20, beta_start=0.005, beta_end=0.5, variance_type="learned_range")
    DDPMPlusPipeline(unet, sched).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return _save_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def test_evaluate_end_to_end_and_push(tiny_pipeline, classifier_cache, tmp_path, hub_server, hf_token, hub_repo_id):
    from diffusers import DiffusionPipeline

    from ddpm_plus.data import digits_heldout_tensor
    from ddpm_plus.evaluation.likelihood import bits_per_dim

    cache = classifier_cache[0]
    json_path = tmp_path / "r.json"
    argv = [
        "evaluate",
        str(tiny_pipeline),
        "--metrics",
        "bpd",
        "--max_images",
        "6",
        "--num_samples",
        "4",
        "--inference_steps",
        "3",
        "--timesteps_respaced",
        "5",
        "--classifier_cache_dir",
        str(cache),
        "--json",
        str(json_path),
        "--output_dir",
        str(tmp_path / "out"),
        "--no_progress",
        "--push_to_hub",
        "--hub_model_id",
        hub_repo_id,
    ]
    assert cli.main(argv) == 0
    res = json.loads(json_path.read_text())
    # the same figure from the library call (same seed, same respaced timesteps)
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline)
    images = digits_heldout_tensor(16, 1)[:6]
    seq = bound_timesteps(20, 5)
    assert seq.tolist() == [19, 14, 10, 5, 0]
    direct = bits_per_dim(
        pipe.unet,
        pipe.scheduler,
        images,
        num_bins=17,
        timesteps=seq,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert res["bits_per_dim"] == pytest.approx(direct.mean().item(), rel=1e-9)
    assert res["bits_per_source_pixel"] == pytest.approx(4 * res["bits_per_dim"], rel=1e-12)  # 16x16 = 2x nearest
    assert res["comparable_to_8x8_baselines"] == "bits_per_source_pixel"
    assert res["num_images"] == 6 and res["bound_timesteps"] == 5
    assert res["frechet_proxy_samples_vs_train"] >= 0 and res["frechet_proxy_floor_heldout_vs_train"] >= 0
    assert res["frechet_proxy_name"] == "digits Frechet distance (proxy, not FID)"
    grid = Image.open(res["sample_grid"])
    assert grid.size == (2 * 68, 2 * 68)  # 4 samples, 2x2, each 16 px upscaled to 64, 2-px frame
    card = hub_server.files(hub_repo_id)["README.md"].decode()
    assert "digits Frechet distance (proxy, not FID)" in card and f"{res['bits_per_dim']:.4f}" in card


@pytest.mark.parametrize(
    "resolution, channels, dims",
    [(8, 1, 1), (16, 1, 4), (32, 1, 16), (8, 3, 3), (16, 3, 12), (32, 3, 48), (12, 1, None), (12, 3, None)],
)
def test_dims_per_source_pixel_counts_channels(resolution, channels, dims):
    """A C-channel model at 8k x 8k has C·k² dimensions per pixel of the 8x8 greyscale source digit."""
    assert dims_per_source_pixel(resolution, channels) == dims


def test_evaluate_rgb_bits_per_source_pixel_counts_the_channels(classifier_cache, tmp_path):
    """3 channels at 16x16: the total nats of a digit are spread over 3·16·16 = 768 model dims, i.e. 12 per
    source pixel (the figure was once scaled by k² = 4 only, understating RGB models 3x)."""
    path = _save_tiny_pipeline(tmp_path / "rgb", channels=3)
    json_path = tmp_path / "r.json"
    argv = [
        "evaluate",
        str(path),
        "--metrics",
        "bpd",
        "--max_images",
        "3",
        "--num_samples",
        "2",
        "--inference_steps",
        "2",
        "--timesteps_respaced",
        "3",
        "--classifier_cache_dir",
        str(classifier_cache[0]),
        "--json",
        str(json_path),
        "--output_dir",
        str(tmp_path / "out"),
        "--no_progress",
    ]
    assert cli.main(argv) == 0
    res = json.loads(json_path.read_text())
    assert res["channels"] == 3 and res["resolution"] == 16
    assert res["bits_per_source_pixel"] == pytest.approx(12 * res["bits_per_dim"], rel=1e-12)
    assert res["bits_per_source_pixel_stderr"] == pytest.approx(12 * res["bits_per_dim_stderr"], rel=1e-12)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--inception_weights", "/nonexistent/pt_inception.pth"], "is not a file"),
        (["--num_samples", "1"], "argument --num_samples: must be an integer >= 2"),
        (["--timesteps_respaced", "0"], "argument --timesteps_respaced: must be an integer >= 2"),
        (["--timesteps_respaced", "21"], "argument --timesteps_respaced: must be None (all timesteps) or an integer K"),
        (["--inference_steps", "21"], "argument --inference_steps: must be <= num_train_timesteps=20, got 21"),
    ],
)
def test_evaluate_argument_errors(tiny_pipeline, extra, match, capsys):
    """Bad input: one line on stderr naming the flag, exit status 2 (as argparse's own errors)."""
    assert cli.main(["evaluate", str(tiny_pipeline), "--no_progress", "--inference_steps", "2", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading bar
    assert err.startswith("error: ") and match in err


def test_console_script_is_declared(capsys):
    text = (ROOT / "pyproject.toml").read_text()
    assert 'ddpm-plus = "ddpm_plus.cli:main"' in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "--inception_weights" in capsys.readouterr().out


def test_likelihood_baselines_script(capsys):
    script = runpy.run_path(str(ROOT / "benchmarks" / "likelihood_baselines.py"))
    figures = script["main"]([])
    assert "categorical_add_one" in capsys.readouterr().out
    assert round(figures["uniform"], 2) == 4.09
    assert round(figures["categorical_add_one"], 2) == 2.42
    assert round(figures["gaussian_full_cov_dequantised"], 2) == 2.93


def test_evaluate_hub_token_is_warned_about_and_never_printed(
    tiny_pipeline, classifier_cache, tmp_path, hub_server, hub_repo_id, capsys
):
    hub_server.fail("commit", status=500, times=10)
    argv = [
        "evaluate",
        str(tiny_pipeline),
        "--metrics",
        "bpd",
        "--max_images",
        "2",
        "--num_samples",
        "2",
        "--inference_steps",
        "2",
        "--timesteps_respaced",
        "3",
        "--classifier_cache_dir",
        str(classifier_cache[0]),
        "--output_dir",
        str(tmp_path / "out"),
        "--no_progress",
        "--push_to_hub",
        "--hub_model_id",
        hub_repo_id,
        "--hub_token",
        hub_server.token,
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "visible to other users" in err and "error: Pushing" in err
    assert hub_server.token not in err
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert hub_server.token.encode() not in path.read_bytes(), path
