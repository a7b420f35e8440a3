"""`ddpm-plus evaluate` / `reference-stats` on an image folder with every metric, and `--eval_steps` in the
trainer: the figures equal independent computations on the same uint8 images, reference statistics are
cached and reused, and bad input is refused before sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import _save_tiny_pipeline

from ddpm_plus import cli
from ddpm_plus.evaluation import sample_metrics
from ddpm_plus.evaluation.likelihood import bits_per_dim
from ddpm_plus.evaluation.metrics_table import format_table
from ddpm_plus.evaluation.options import bound_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 RGB 16x16 8-bit PNGs (smooth random blobs)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        Image.fromarray(np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def rgb_pipeline(tmp_path_factory):
    return _save_tiny_pipeline(tmp_path_factory.mktemp("rgb"), channels=3, size=16)


def _evaluate(pipe, tmp_path, *extra):
    json_path = tmp_path / "r.json"
    argv = ["evaluate", str(pipe), "--num_samples", "6", "--inference_steps", "2", "--timesteps_respaced", "3"]
    argv += ["--json", str(json_path), "--output_dir", str(tmp_path / "out"), "--no_progress", *extra]
    assert cli.main(argv) == 0
    return json.loads(json_path.read_text())


def _folder_uint8(folder):
    files = sorted(folder.glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files])).permute(0, 3, 1, 2).contiguous()


def test_folder_bits_per_dim_equals_the_python_api_on_the_same_tensors(rgb_pipeline, folder, tmp_path):
    from diffusers import DiffusionPipeline

    res = _evaluate(rgb_pipeline, tmp_path, "--dataset", str(folder), "--metrics", "bpd")
    assert res["num_bins"] == 256 and res["num_images"] == 12  # 8-bit images: their own grid
    pipe = DiffusionPipeline.from_pretrained(rgb_pipeline)
    images = _folder_uint8(folder).double() / 127.5 - 1  # independent of the trainer's transform
    direct = bits_per_dim(
        pipe.unet, pipe.scheduler, images.float(), num_bins=256, timesteps=bound_timesteps(20, 3),
        generator=torch.Generator().manual_seed(0), progress=False,
    )  # fmt: skip
    assert res["bits_per_dim"] == pytest.approx(direct.mean().item(), rel=1e-9)
    assert "fid" not in res and "bits_per_source_pixel" not in res


def test_every_metric_on_a_folder_matches_the_saved_samples(
    rgb_pipeline, folder, tmp_path, random_inception_weights, tiny_dinov2, caplog
):
    cache = tmp_path / "stats"
    common = ["--dataset", str(folder), "--inception_weights", str(random_inception_weights)]
    common += ["--dinov2_model", str(tiny_dinov2), "--stats_cache_dir", str(cache)]
    res = _evaluate(
        rgb_pipeline, tmp_path, *common, "--metrics", "fid,kid,precision_recall,fd_dinov2",
        "--save_samples", str(tmp_path / "pngs"),
    )  # fmt: skip
    assert res["num_samples"] == 6 and res["num_reference"] == 12
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "fd_dinov2"):
        assert np.isfinite(res[key]), key
    assert "bits_per_dim" not in res
    # the saved PNGs are the images every metric used: recompute from them
    saved = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "pngs").glob("*.png"))]))
    saved = saved.permute(0, 3, 1, 2).contiguous()
    assert saved.shape == (6, 3, 16, 16)
    inception = sample_metrics.InceptionFeatures(random_inception_weights)
    gen, real = inception(saved), inception(_folder_uint8(folder))
    mu1, s1 = sample_metrics.gaussian_stats(gen)
    mu2, s2 = sample_metrics.gaussian_stats(real)
    assert res["fid"] == pytest.approx(sample_metrics.frechet_distance_from_stats(mu1, s1, mu2, s2), rel=1e-6)
    dino = sample_metrics.Dinov2Features(str(tiny_dinov2))
    mu1, s1 = sample_metrics.gaussian_stats(dino(saved))
    mu2, s2 = sample_metrics.gaussian_stats(dino(_folder_uint8(folder)))
    assert res["fd_dinov2"] == pytest.approx(sample_metrics.frechet_distance_from_stats(mu1, s1, mu2, s2), rel=1e-6)
    table = (tmp_path / "out").exists() and format_table(res)
    assert "FID@6" in table and "FD_DINOv2@6" in table and "biased upward" in table
    # a second run reuses both cached reference statistics (same files, not rewritten)
    files = sorted(cache.rglob("*.npz"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    res2 = _evaluate(rgb_pipeline, tmp_path, *common, "--metrics", "fid,fd_dinov2")
    assert [f.stat().st_mtime_ns for f in files] == mtimes and sorted(cache.rglob("*.npz")) == files
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-9)


def test_reference_stats_command_precomputes_what_evaluate_reuses(
    rgb_pipeline, folder, tmp_path, random_inception_weights, capsys
):
    cache = tmp_path / "stats"
    argv = ["reference-stats", "--dataset", str(folder), "--resolution", "16", "--channels", "3", "--no_progress"]
    argv += ["--inception_weights", str(random_inception_weights), "--stats_cache_dir", str(cache)]
    assert cli.main(argv) == 0
    (path,) = cache.rglob("*.npz")
    assert str(path) in capsys.readouterr().out
    stats = sample_metrics.ReferenceStats.load(path)
    assert stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048)
    mtime = path.stat().st_mtime_ns
    res = _evaluate(
        rgb_pipeline, tmp_path, "--dataset", str(folder), "--metrics", "fid",
        "--inception_weights", str(random_inception_weights), "--stats_cache_dir", str(cache),
    )  # fmt: skip
    assert res["inception_reference_stats"] == str(path) and path.stat().st_mtime_ns == mtime
    # a published-style file with only mu and sigma is accepted with --reference_stats
    published = tmp_path / "published.npz"
    np.savez(published, mu=stats.mu, sigma=stats.sigma)
    res2 = _evaluate(
        rgb_pipeline, tmp_path, "--dataset", str(folder), "--metrics", "fid",
        "--inception_weights", str(random_inception_weights), "--reference_stats", str(published),
    )  # fmt: skip
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-9)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--metrics", "bpd,is"], "unknown metric 'is'"),
        (["--dataset", "{folder}", "--image_column", "pixels", "--metrics", "bpd"], "image_column='pixels'"),
        (["--dataset", "{empty}", "--metrics", "bpd"], "no image files"),
        (["--metrics", "precision_recall", "--num_samples", "3"], "precision_recall"),
        (["--metrics", "fid", "--reference_stats", "{corrupt}", "--inception_weights", "{weights}"], "corrupt.npz"),
        (["--metrics", "fid", "--inception_weights", "/nonexistent.pth"], "is not a file"),
    ],
)
def test_bad_input_is_refused_before_sampling(
    rgb_pipeline, folder, tmp_path, random_inception_weights, monkeypatch, extra, match, capsys
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    subs = {"{folder}": str(folder), "{empty}": str(tmp_path / "empty"), "{corrupt}": str(tmp_path / "corrupt.npz")}
    subs["{weights}"] = str(random_inception_weights)
    monkeypatch.setattr(
        "ddpm_plus.evaluation.engine.sample_uint8", lambda *a, **k: pytest.fail("sampled before the check")
    )
    argv = ["evaluate", str(rgb_pipeline), "--no_progress", "--inference_steps", "2", *[subs.get(a, a) for a in extra]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading bar
    assert err.startswith("error: ") and match in err


def test_offline_without_inception_weights_names_both_options(rgb_pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["evaluate", str(rgb_pipeline), "--metrics", "fid", "--stats_cache_dir", str(tmp_path), "--no_progress"]
    argv += ["--inference_steps", "2"]
    assert cli.main(argv) == 2
    assert "--inception_weights" in capsys.readouterr().err


def test_training_evaluates_logs_and_writes_the_model_index(tmp_path, random_inception_weights):
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_training import TINY, run_train

    out = tmp_path / "run"
    argv = [
        *TINY,
        "--max_train_steps",
        "2",
        "--output_dir",
        out,
        "--logger",
        "tensorboard",
        "--num_train_timesteps",
        20,
    ]
    argv += ["--eval_steps", 1, "--eval_num_samples", 4, "--eval_metrics", "bpd,fid", "--eval_max_images", 5]
    argv += ["--eval_bound_timesteps", 3]
    argv += ["--inception_weights", random_inception_weights, "--stats_cache_dir", tmp_path / "stats"]
    summary = run_train(argv)
    assert summary["evaluation"]["step"] == 2 and np.isfinite(summary["evaluation"]["fid"])
    assert len(list((tmp_path / "stats").rglob("*.npz"))) == 1  # computed once for the run's evaluations
    events = sorted({p.parent for p in out.rglob("events.out.tfevents.*")})
    tags = {}
    for folder_ in events:
        acc = EventAccumulator(str(folder_))
        acc.Reload()
        tags.update({t: acc for t in acc.Tags()["scalars"]})
    assert {"eval/fid@4", "eval/bpd"} <= set(tags)
    assert [e.step for e in tags["eval/fid@4"].Scalars("eval/fid@4")] == [1, 2]
    card = ModelCard.load(out / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["fid"].metric_value == pytest.approx(summary["evaluation"]["fid"])
    assert results["fid"].dataset_split == "test" and results["bits_per_dim"].metric_value > 0
