"""``ddpm-plus analytic``: the moment table of a saved pipeline, written into a copy that samples with it;
``ddpm-plus evaluate --timesteps_respaced K`` on that copy gives the bound with the analytic variance."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import _save_tiny_pipeline

from ddpm_plus import DDPMPlusPipeline, bits_per_dim, cli, estimate_analytic_moments
from ddpm_plus.data import digits_heldout_tensor
from ddpm_plus.evaluation.options import bound_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """An 8x8 learned_range pipeline with T = 20 (2x output channels)."""
    return _save_tiny_pipeline(tmp_path_factory.mktemp("pipe"), size=8)


@pytest.mark.slow
def test_analytic_writes_a_pipeline_with_the_table(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "analytic"
    argv = ["analytic", str(tiny_pipeline), "--num_images", "16", "--output_dir", str(out), "--no_progress"]
    assert cli.main(argv + ["--eta", "0.5"]) == 0
    assert "variance_type='analytic'" in capsys.readouterr().out
    pipe = DDPMPlusPipeline.from_pretrained(out)
    config = pipe.scheduler.config
    assert config.variance_type == "analytic" and config.eta == 0.5 and len(config.analytic_moments) == 20
    # the same table as the library call (digits train split, first 16 images, seed 0)
    src = DDPMPlusPipeline.from_pretrained(tiny_pipeline)
    want = estimate_analytic_moments(
        src.unet, src.scheduler, digits_heldout_tensor(8, 1, "train")[:16], generator=torch.Generator().manual_seed(0)
    )
    np.testing.assert_allclose(config.analytic_moments, want.numpy(), rtol=1e-12)
    meta = json.loads((out / "analytic_moments.json").read_text())
    assert meta["num_images"] == 16 and meta["timesteps_evaluated"] == 20
    pipe.set_progress_bar_config(disable=True)
    images = pipe(2, torch.Generator().manual_seed(0), 5, output_type="pt").images
    assert torch.isfinite(images).all()
    # interpolated: 5 evenly spaced timesteps plus every t < 3
    out2 = tmp_path / "interp"
    assert cli.main(argv[:-3] + ["--output_dir", str(out2), "--num_timesteps", "5", "--all_timesteps_below", "3"]) == 0
    assert json.loads((out2 / "analytic_moments.json").read_text())["timesteps_evaluated"] == 7  # {0,1,2,5,9,14,19}


def test_analytic_on_an_image_folder(tiny_pipeline, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    out = tmp_path / "out"
    argv = ["analytic", str(tiny_pipeline), "--dataset", str(folder), "--output_dir", str(out), "--no_progress"]
    assert cli.main(argv) == 0
    meta = json.loads((out / "analytic_moments.json").read_text())
    assert meta["num_images"] == 5 and meta["dataset"].startswith("image folder")
    argv = ["analytic", str(tiny_pipeline), "--dataset", str(tmp_path / "nope"), "--output_dir", str(out)]
    assert cli.main(argv) == 2
    assert "dataset must be 'digits' or a local image folder" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_respaced_bound_uses_the_analytic_variance(tiny_pipeline, tmp_path):
    """evaluate's figure is bits_per_dim with the analytic scheduler (same seed, same respaced timesteps)."""
    out = tmp_path / "analytic"
    cli.main(["analytic", str(tiny_pipeline), "--num_images", "32", "--output_dir", str(out), "--no_progress"])
    res_path = tmp_path / "r.json"
    argv = [
        "evaluate",
        str(out),
        "--metrics",
        "bpd",
        "--max_images",
        "6",
        "--num_samples",
        "4",
        "--inference_steps",
        "3",
    ]
    argv += ["--timesteps_respaced", "5", "--json", str(res_path), "--output_dir", str(tmp_path / "ev")]
    argv += ["--classifier_cache_dir", str(tmp_path / "cls"), "--no_progress"]
    assert cli.main(argv) == 0
    res = json.loads(res_path.read_text())
    assert res["variance_type"] == "analytic"
    pipe = DDPMPlusPipeline.from_pretrained(out)
    direct = bits_per_dim(
        pipe.unet,
        pipe.scheduler,
        digits_heldout_tensor(8, 1)[:6],
        num_bins=17,
        timesteps=bound_timesteps(20, 5),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert res["bits_per_dim"] == pytest.approx(direct.mean().item(), rel=1e-9)
