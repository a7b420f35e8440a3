"""Evaluating a latent model (``LatentDDPMPlusPipeline``): sample metrics on the decoded images, the bound of the
real images' VAE latents (scaled as the pipeline scales them) reported as latent bits/dim, labelled as not
comparable with pixel bits/dim in the table, JSON, trackers and model index; and ``--eval_steps`` with ``--vae``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_latent_pipeline import plus_scheduler, tiny_kl, tiny_unet
from test_latent_training import latent_args, save_tiny_vae, write_images
from test_training import run_train

from ddpm_plus import LatentDDPMPlusPipeline, cli
from ddpm_plus.data import digits_heldout_tensor
from ddpm_plus.evaluation import engine, metrics_table
from ddpm_plus.evaluation.distributed import sample_generators
from ddpm_plus.evaluation.errors import EvaluationError
from ddpm_plus.evaluation.latent import pipeline_geometry
from ddpm_plus.evaluation.likelihood import vlb_terms
from ddpm_plus.evaluation.options import bound_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")

LABEL = "latent bits/dim (not comparable with pixel bits/dim)"


@pytest.fixture(scope="module")
def latent_pipeline(tmp_path_factory):
    """16x16 RGB images from 4x8x8 latents; the VAE scales by 0.5 and shifts by 0.1 (both must be applied)."""
    vae = tiny_kl(scaling_factor=0.5, shift_factor=0.1)
    scheduler = plus_scheduler(num_train_timesteps=20, beta_start=0.005, beta_end=0.5, variance_type="learned_range")
    pipe = LatentDDPMPlusPipeline(vae=vae, unet=tiny_unet(out_channels=8), scheduler=scheduler)
    path = tmp_path_factory.mktemp("latent") / "pipe"
    pipe.save_pretrained(path)
    return path


def test_geometry_is_the_decoded_images(latent_pipeline):
    pipe = LatentDDPMPlusPipeline.from_pretrained(latent_pipeline)
    assert pipeline_geometry(pipe) == (16, 3)
    with pytest.raises(EvaluationError, match="samples 16x16 images"):
        pipeline_geometry(pipe, 8)


def test_evaluate_scores_decoded_samples_and_reports_latent_bits_per_dim(
    latent_pipeline, tmp_path, random_inception_weights
):
    argv = ["evaluate", str(latent_pipeline), "--metrics", "bpd,fid", "--max_images", "5", "--num_samples", "3"]
    argv += ["--batch_size", "2", "--inference_steps", "3", "--timesteps_respaced", "4", "--no_progress"]
    argv += ["--inception_weights", str(random_inception_weights), "--stats_cache_dir", str(tmp_path / "cache")]
    argv += ["--classifier_cache_dir", str(tmp_path / "clf"), "--output_dir", str(tmp_path / "out")]
    argv += ["--json", str(tmp_path / "r.json"), "--save_samples", str(tmp_path / "png"), "--num_threads", "1"]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    # the bound of the latents, never reported as pixel bits/dim
    assert "bits_per_dim" not in res and "bits_per_source_pixel" not in res
    assert math.isfinite(res["latent_bits_per_dim"]) and res["latent_shape"] == [4, 8, 8]
    assert "not comparable with pixel bits/dim" in res["bound_space"]
    # ... computed on the real images' latents, E(x) (posterior mode), shifted and scaled as the pipeline does
    pipe = LatentDDPMPlusPipeline.from_pretrained(latent_pipeline)
    images = digits_heldout_tensor(16, 3)[:5]
    with torch.no_grad():  # encoded in the evaluation's blocks of --batch_size 2
        z = torch.cat([(pipe.vae.encode(images[i : i + 2]).latent_dist.mode() - 0.1) * 0.5 for i in (0, 2, 4)])
    direct = vlb_terms(
        pipe.unet, pipe.scheduler, z, timesteps=bound_timesteps(20, 4), num_bins=256, on_grid=False,
        generator=torch.Generator().manual_seed(0), batch_size=2, progress=False,
    )["total_bpd"]  # fmt: skip
    assert res["latent_bits_per_dim"] == pytest.approx(direct.mean().item(), rel=1e-12)
    # sample metrics on the decoded 16x16 RGB images, as for a pixel model
    assert math.isfinite(res["fid"]) and math.isfinite(res["frechet_proxy_samples_vs_train"])
    assert res["num_samples"] == 3 and res["num_processes"] == 1
    # every view labels it as latent bits/dim
    rows = dict(metrics_table.metric_rows(res))
    assert rows[LABEL].startswith(f"{res['latent_bits_per_dim']:.4f} ± ") and "bits/dim" not in rows
    assert metrics_table.tracker_values(res)["eval/latent_bpd"] == res["latent_bits_per_dim"]
    entries = metrics_table.model_index_entries(res, res["dataset_key"])
    assert ("latent_bits_per_dim", LABEL) in [(e["metric_type"], e["metric_name"]) for e in entries]
    assert LABEL in metrics_table.format_table(res)


def test_the_samples_are_the_pipelines_decoded_output(latent_pipeline):
    pipe = LatentDDPMPlusPipeline.from_pretrained(latent_pipeline)
    pipe.set_progress_bar_config(disable=True)
    options = engine.EvaluationOptions(metrics="bpd", num_samples=3, num_inference_steps=3, batch_size=2)
    samples = engine.sample_uint8(pipe, options, None)
    assert samples.shape == (3, 3, 16, 16) and samples.dtype == torch.uint8
    direct = pipe(batch_size=1, generator=sample_generators(0, range(2, 3)), num_inference_steps=3, output_type="np")
    want = torch.from_numpy((np.clip(direct.images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)
    assert torch.equal(samples[2:], want)


@pytest.mark.slow
def test_the_trainer_evaluates_a_latent_model_during_training(tmp_path):
    """`--eval_steps` with `--vae` was refused; now the EMA latent model's decoded samples and latent bound are
    scored and logged under eval/latent_bpd, and the model card labels the figure."""
    vae = save_tiny_vae(tmp_path / "vae")
    images, out = write_images(tmp_path / "images"), tmp_path / "run"
    argv = latent_args(vae, images, tmp_path / "cache", "--output_dir", out, "--max_train_steps", 1)
    argv += ["--eval_steps", 1, "--eval_metrics", "bpd", "--eval_num_samples", 2, "--eval_bound_timesteps", 3]
    argv += ["--eval_max_images", 4, "--stats_cache_dir", tmp_path / "stats"]
    summary = run_train(argv)
    figures = summary["evaluation"]
    assert math.isfinite(figures["latent_bits_per_dim"]) and "bits_per_dim" not in figures
    assert figures["num_samples"] == 2 and figures["resolution"] == 16 and figures["channels"] == 3
    assert "eval/latent_bpd" in metrics_table.tracker_values(figures)
    assert LABEL in (out / "README.md").read_text()
