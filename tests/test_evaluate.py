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
from ddpm_plus.evaluation import (
    classifier_features,
    frechet_distance,
    load_or_train_digits_classifier,
    to_digits_frame,
)

ROOT = Path(__file__).resolve().parents[1]


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
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    feats = classifier_features(model, torch.zeros(5, 1, 16, 16))
    assert feats.shape == (5, model.feature_dim) and feats.dtype == np.float64


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers import UNet2DModel

    from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    sched = DDPMPlusScheduler(num_train_timesteps=20, beta_start=0.005, beta_end=0.5, variance_type="learned_range")
    path = tmp_path_factory.mktemp("pipe")
    DDPMPlusPipeline(unet, sched).save_pretrained(path)
    return path


def test_evaluate_end_to_end_and_push(tiny_pipeline, classifier_cache, tmp_path, hub_server, hf_token, hub_repo_id):
    from diffusers import DiffusionPipeline

    from ddpm_plus.data import digits_heldout_tensor
    from ddpm_plus.likelihood import bits_per_dim

    cache = classifier_cache[0]
    json_path = tmp_path / "r.json"
    argv = ["evaluate", str(tiny_pipeline), "--max_images", "6", "--num_samples", "4", "--inference_steps", "3",
            "--timesteps_respaced", "5", "--classifier_cache_dir", str(cache), "--json", str(json_path),
            "--output_dir", str(tmp_path / "out"), "--no_progress", "--push_to_hub", "--hub_model_id", hub_repo_id]
    assert cli.main(argv) == 0
    res = json.loads(json_path.read_text())
    # the same figure from the library call (same seed, same respaced timesteps)
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline)
    images = digits_heldout_tensor(16, 1)[:6]
    seq = cli._respaced_timesteps(20, 5)
    assert seq.tolist() == [19, 14, 10, 5, 0]
    direct = bits_per_dim(pipe.unet, pipe.scheduler, images, num_bins=17, timesteps=seq,
                          generator=torch.Generator().manual_seed(0), progress=False)
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
    "extra,match",
    [
        (["--inception_weights", "/nonexistent/pt_inception.pth"], "is not a file"),
        (["--num_samples", "1"], "num_samples"),
        (["--timesteps_respaced", "0"], "timesteps_respaced"),
    ],
)
def test_evaluate_argument_errors(tiny_pipeline, extra, match, capsys):
    with pytest.raises(SystemExit, match=match):
        cli.main(["evaluate", str(tiny_pipeline), "--no_progress", *extra])


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
