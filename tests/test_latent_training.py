"""Latent diffusion training (``--vae``; ddpm_plus/trainer/latents.py and latent_cache.py) with tiny random VAEs
saved to folders: encode -> cache -> train -> save -> ``DiffusionPipeline.from_pretrained`` -> sample -> decode,
for an AutoencoderKL and a VQModel; the cache reused (encode calls counted) and rebuilt when a key field changes;
a corrupt shard or manifest rebuilt with a warning naming it; exact resume on cached latents; class-conditional
latent sampling with guidance; the scaling factor (config, number, measured) saved with the pipeline; the flag
errors; the 256 px preset; and the CPU command of docs/latent.md, run as written. Nothing is downloaded."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, VQModel
from PIL import Image
from safetensors.torch import load_file
from test_resume import assert_same_tensors
from test_training import expect_exit, run_train, unet_weights

import ddpm_plus
from ddpm_plus.data import ImageTransform
from ddpm_plus.trainer import latent_cache
from ddpm_plus.trainer.args import parse_args
from ddpm_plus.trainer.components import build_unet
from ddpm_plus.trainer.latent_cache import SHARD_SIZE, LatentCache, LatentDataset
from ddpm_plus.trainer.latents import encode, load_vae

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}


def save_tiny_vae(folder, kind="kl", seed=0, levels=2) -> Path:
    """A random AutoencoderKL (4 latent channels) or VQModel (3) of a few thousand parameters, downsampling
    2 ** (levels - 1), saved (safetensors) to ``folder``."""
    torch.manual_seed(seed)
    shape = {
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": (4,) * levels,
        "layers_per_block": 1,
        "norm_num_groups": 2,
        "sample_size": 16,
    }
    if kind == "kl":
        vae = AutoencoderKL(**shape, latent_channels=4)
    else:
        vae = VQModel(**shape, latent_channels=3, num_vq_embeddings=16)
    assert sum(p.numel() for p in vae.parameters()) < 20_000
    vae.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_images(folder, n=8, size=20, classes=None, seed=0) -> Path:
    """``n`` random RGB images of ``size`` px (20 > 16: the center crop matters), in one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = Path(folder) / (classes[i % len(classes)] if classes else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return Path(folder)


# A 0.05M-parameter UNet on the tiny VAEs' 8x8 latents of 16 px images.
LATENT_TINY = [
    "--resolution", 16, "--center_crop", "--block_out_channels", 16, 32, "--layers_per_block", 1,
    "--attention_resolutions", 4, "--norm_num_groups", 8, "--train_batch_size", 4, "--learning_rate", "1e-3",
    "--lr_warmup_steps", 1, "--logging_steps", 1, "--eval_batch_size", 2, "--eval_inference_steps", 3,
    "--save_images_steps", 0, "--logger", "none", "--no-use_ema", "--checkpoints_total_limit", 0,
]  # fmt: skip


@pytest.fixture
def counted_encodes(monkeypatch):
    """Counts the images the latent cache encodes (its calls of ``latents.encode``)."""
    counter = {"images": 0}

    def counting(vae, pixels):
        counter["images"] += len(pixels)
        return encode(vae, pixels)

    monkeypatch.setattr(latent_cache, "encode", counting)
    return counter


def latent_args(vae, images, cache, *extra):
    return LATENT_TINY + ["--vae", vae, "--train_data_dir", images, "--latent_cache_dir", cache, *extra]


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("kind, channels", [("kl", 4), ("vq", 3)])
def test_encode_cache_train_save_load_sample_decode(tmp_path, kind, channels, counted_encodes):
    vae = save_tiny_vae(tmp_path / "vae", kind)
    images, cache, out = write_images(tmp_path / "images"), tmp_path / "cache", tmp_path / "run"
    argv = latent_args(vae, images, cache, "--output_dir", out, "--max_train_steps", 2, "--save_images_steps", 2)
    summary = run_train(argv + ["--use_ema", "--ema_max_decay", 0.9])
    assert summary["global_step"] == 2 and np.isfinite(summary["final_loss"])
    assert counted_encodes["images"] == 8  # each image encoded once (no --random_flip)
    (directory,) = cache.iterdir()
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    assert load_file(directory / "shard-00000.safetensors")["latents"].shape == (8, channels, 8, 8)

    # The saved pipeline: vae + unet (on the latent shape) + scheduler, safetensors only, the factor in vae/.
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDDPMPlusPipeline" and index["vae"][1] == type_name(kind)
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert (unet_config["in_channels"], unet_config["sample_size"]) == (channels, 8)
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt") and "checkpoint-" not in str(p)]
    saved_factor = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    assert saved_factor == json.loads((vae / "config.json").read_text())["scaling_factor"]  # the VAE config's
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    assert (out / "samples" / "step-2.png").is_file() and Image.open(out / "samples" / "step-2.png").size[0] >= 16
    card = (out / "README.md").read_text()
    assert "latent diffusion model" in card and "LatentDDPMPlusPipeline" in card and str(vae) in card

    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, ddpm_plus.LatentDDPMPlusPipeline) and isinstance(
        pipe.scheduler, ddpm_plus.DDPMPlusScheduler
    )
    generator = torch.Generator().manual_seed(0)
    images_out = pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np").images
    assert images_out.shape == (2, 16, 16, 3) and np.isfinite(images_out).all()
    latents = pipe(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent"
    )
    with torch.no_grad():
        decoded = pipe.decode_latents(latents.images)
    np.testing.assert_allclose(((decoded / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy(), images_out, atol=1e-5)


def type_name(kind):
    return "AutoencoderKL" if kind == "kl" else "VQModel"


def test_the_cache_is_reused_and_rebuilt_when_a_key_field_changes(tmp_path, counted_encodes, caplog):
    vae = save_tiny_vae(tmp_path / "vae")
    images, cache = write_images(tmp_path / "images"), tmp_path / "cache"
    base = latent_args(vae, images, cache, "--max_train_steps", 1)
    run_train(base + ["--output_dir", tmp_path / "a"])
    assert counted_encodes["images"] == 8
    with caplog.at_level(logging.INFO, logger="ddpm_plus.train"):
        run_train(base + ["--output_dir", tmp_path / "b"])  # the same data, VAE and transform: nothing encoded
    assert counted_encodes["images"] == 8 and "reusing the latent cache" in caplog.text

    def encodes(args, vae_dir=vae):
        counted_encodes["images"] = 0
        parsed = parse_args([str(a) for a in latent_args(vae_dir, images, cache, *args)])
        cached = LatentCache(parsed, load_vae(parsed, torch.device("cpu"))).load_or_build()
        return counted_encodes["images"], cached

    assert encodes([])[0] == 0
    n, cached = encodes(["--random_flip"])  # both flips: the image and its mirror image
    assert n == 16 and cached.flipped.shape == cached.latents.shape
    assert encodes(["--resolution", 8])[0] == 8
    assert encodes(["--seed", 3, "--learning_rate", "0.1", "--latent_scaling_factor", "measure"])[0] == 0  # no key
    assert encodes([], vae_dir=save_tiny_vae(tmp_path / "vae2", seed=1))[0] == 8  # other weights
    write_images(images, n=9, seed=1)  # the folder changed (an image added, the others rewritten)
    n, cached = encodes([])
    assert n == 9 and len(cached.latents) == 9
    assert len(list(cache.iterdir())) == 5  # one directory per key


def test_mirror_latents_are_the_mirror_images_encodings_and_flips_are_seeded(tmp_path):
    vae_dir = save_tiny_vae(tmp_path / "vae")
    images = write_images(tmp_path / "images", n=4)
    args = parse_args([str(a) for a in latent_args(vae_dir, images, tmp_path / "cache", "--random_flip")])
    vae = load_vae(args, torch.device("cpu"))
    cached = LatentCache(args, vae).load_or_build()
    transform = ImageTransform(16, 3, center_crop=True)  # resize the short side to 16, center crop, no flip
    pixels = torch.stack([transform(Image.open(images / f"{i:02d}.png")) for i in range(4)])
    torch.testing.assert_close(cached.latents, encode(vae, pixels))
    torch.testing.assert_close(cached.flipped, encode(vae, pixels.flip(-1)))
    dataset = LatentDataset(cached.latents, cached.flipped, None, seed=0)
    picks = [[torch.equal(dataset[(e, i)]["pixel_values"], cached.flipped[i]) for i in range(4)] for e in range(8)]
    assert 0 < sum(map(sum, picks)) < 32  # both versions are used...
    again = LatentDataset(cached.latents, cached.flipped, None, seed=0)
    assert all(torch.equal(again[(e, 1)]["pixel_values"], dataset[(e, 1)]["pixel_values"]) for e in range(8))


def test_a_corrupt_shard_or_manifest_is_rebuilt_and_named(tmp_path, counted_encodes, caplog, monkeypatch):
    monkeypatch.setattr(latent_cache, "SHARD_SIZE", 4)  # two shards of 4 images
    vae_dir = save_tiny_vae(tmp_path / "vae")
    images = write_images(tmp_path / "images")
    args = parse_args([str(a) for a in latent_args(vae_dir, images, tmp_path / "cache")])
    vae = load_vae(args, torch.device("cpu"))
    first = LatentCache(args, vae).load_or_build()
    shard = first.directory / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    counted_encodes["images"] = 0
    with caplog.at_level(logging.WARNING, logger="ddpm_plus.train"):
        again = LatentCache(args, vae).load_or_build()
    assert counted_encodes["images"] == 4 and again.encoded == 4  # only the bad shard
    assert f"latent cache shard {shard} is unusable" in caplog.text
    torch.testing.assert_close(again.latents, first.latents)
    (first.directory / "manifest.json").write_text("{not json")
    counted_encodes["images"] = 0
    with caplog.at_level(logging.WARNING, logger="ddpm_plus.train"):
        rebuilt = LatentCache(args, vae).load_or_build()
    assert (
        counted_encodes["images"] == 8 and f"latent cache manifest {first.directory / 'manifest.json'}" in caplog.text
    )
    torch.testing.assert_close(rebuilt.latents, first.latents)
    assert SHARD_SIZE == 4096  # the module's constant, unchanged by the test's monkeypatch of the module


def test_resume_on_cached_latents_continues_the_same_trajectory(tmp_path):
    vae = save_tiny_vae(tmp_path / "vae")
    images, cache = write_images(tmp_path / "images", n=12), tmp_path / "cache"
    common = latent_args(vae, images, cache, "--train_batch_size", 2, "--gradient_accumulation_steps", 2)
    common += ["--max_train_steps", 6, "--checkpointing_steps", 4, "--random_flip", "--dropout", 0.1]
    common += ["--use_ema", "--ema_max_decay", 0.9, "--latent_scaling_factor", "measure"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = run_train(common + ["--output_dir", straight])
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    again = run_train(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert again["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-6)
    assert_same_tensors(unet_weights(straight), unet_weights(resumed))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(load_file(straight / "checkpoint-6" / name), load_file(resumed / "checkpoint-6" / name))
    before = load_file(straight / "checkpoint-4" / "model.safetensors")
    assert any(
        not torch.equal(before[k], v) for k, v in load_file(straight / "checkpoint-6" / "model.safetensors").items()
    )
    state = json.loads((straight / "checkpoint-4" / "training_state.json").read_text())
    assert state["latents"] == next(cache.iterdir()).name and state["latent_scaling_factor"] > 0


def test_resume_refuses_other_latents(tmp_path, capsys):
    vae = save_tiny_vae(tmp_path / "vae")
    images, out = write_images(tmp_path / "images"), tmp_path / "run"
    common = latent_args(vae, images, tmp_path / "cache", "--output_dir", out, "--checkpointing_steps", 1)
    run_train(common + ["--max_train_steps", 1])
    err = expect_exit(common + ["--max_train_steps", 2, "--resume_from_checkpoint", "latest", "--random_flip"], capsys)
    assert "data layout changed (latents: checkpoint" in err


def test_scaling_factor_is_measured_or_given_and_saved_with_the_pipeline(tmp_path):
    vae = save_tiny_vae(tmp_path / "vae")
    images, cache = write_images(tmp_path / "images"), tmp_path / "cache"
    base = latent_args(vae, images, cache, "--max_train_steps", 1)
    run_train(base + ["--output_dir", tmp_path / "m", "--latent_scaling_factor", "measure"])
    latents = load_file(next(cache.iterdir()) / "shard-00000.safetensors")["latents"].double()
    measured = json.loads((tmp_path / "m" / "vae" / "config.json").read_text())["scaling_factor"]
    assert measured == pytest.approx(1 / float(latents.flatten().std()), rel=1e-12) and measured != 1.0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "m")
    assert pipe.vae.config.scaling_factor == measured
    run_train(base + ["--output_dir", tmp_path / "g", "--latent_scaling_factor", "0.5"])
    assert json.loads((tmp_path / "g" / "vae" / "config.json").read_text())["scaling_factor"] == 0.5
    assert len(list(cache.iterdir())) == 1  # the factor is not part of the cache key


def test_class_conditional_latent_training_samples_with_guidance(tmp_path):
    vae = save_tiny_vae(tmp_path / "vae")
    images = write_images(tmp_path / "images", classes=["cat", "dog"])
    out = tmp_path / "run"
    argv = latent_args(vae, images, tmp_path / "cache", "--output_dir", out, "--max_train_steps", 2)
    run_train(argv + ["--class_conditional", "--class_dropout_prob", 0.2, "--eval_guidance_scale", 2.0])
    pipe = DiffusionPipeline.from_pretrained(out)
    assert {int(k): v for k, v in pipe.config.id2label.items()} == {0: "cat", 1: "dog"}
    assert pipe.unet.config.num_class_embeds == 3
    out_images = pipe(
        class_labels=["dog", "cat"], guidance_scale=3.0, num_inference_steps=3,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    assert out_images.shape == (2, 16, 16, 3) and np.isfinite(out_images).all()
    unguided = pipe(
        class_labels=["dog", "cat"], guidance_scale=1.0, num_inference_steps=3,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images  # fmt: skip
    guided = pipe(
        class_labels=["dog", "cat"], guidance_scale=3.0, num_inference_steps=3,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images  # fmt: skip
    assert not torch.allclose(guided, unguided)  # guidance changes the chain
    shard = load_file(next((tmp_path / "cache").iterdir()) / "shard-00000.safetensors")
    assert sorted(shard["class_labels"].tolist()) == [0] * 4 + [1] * 4


# ------------------------------------------------------------------------------------ flags and preset


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-center_crop"], "--vae caches one encoding per image: pass --center_crop"),
        (["--clip_sample"], "--clip_sample clips to [-1, 1], a pixel range"),
        (["--resolution", 15], "--resolution 15 must be a multiple of the VAE's downsampling factor 2"),
        (["--channels", 1], "--channels 1: the VAE"),
        (["--latent_scaling_factor", "0"], "--latent_scaling_factor: expected a positive number or 'measure'"),
        (
            ["--attention_resolutions", 16],
            "--attention_resolutions [16] not among this UNet's feature-map sizes [8, 4]",
        ),
    ],
)
def test_latent_flag_errors_name_the_flag(tmp_path, capsys, extra, message):
    vae = save_tiny_vae(tmp_path / "vae")
    err = expect_exit(latent_args(vae, tmp_path, tmp_path / "cache", *extra), capsys)
    assert message in err


def test_vae_errors_name_the_flag(tmp_path, capsys):
    err = expect_exit(LATENT_TINY + ["--vae", tmp_path / "missing"], capsys)
    assert f"--vae {tmp_path / 'missing'}: cannot read the VAE's config.json" in err
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert "is a UNet2DModel; expected one of AutoencoderKL, VQModel" in expect_exit(
        LATENT_TINY + ["--vae", tmp_path / "unet"], capsys
    )
    assert "--latent_cache_dir need(s) --vae" in expect_exit(LATENT_TINY + ["--latent_cache_dir", tmp_path], capsys)
    vae = save_tiny_vae(tmp_path / "pipe" / "vae")  # a pipeline folder: its vae/ is found
    args = parse_args([str(a) for a in LATENT_TINY + ["--vae", vae.parent]])
    assert (args.latent_channels, args.latent_size, args.clip_sample) == (4, 8, False)
    pixel = parse_args(["--resolution", "8"])
    assert pixel.clip_sample is True and pixel.latent_size is None


def test_latent_256_preset_is_an_ldm_size_unet_on_kl_f8_latents(tmp_path):
    vae = save_tiny_vae(tmp_path / "vae", levels=4)  # downsampling 8, as the KL-f8 autoencoder's
    args = parse_args(["--config", "latent_256", "--vae", str(vae)])
    assert (args.resolution, args.latent_channels, args.latent_size) == (256, 4, 32)
    assert args.center_crop and args.random_flip and args.clip_sample is False
    unet = build_unet(args)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 274.1  # the estimate's figure
    assert (unet.config.in_channels, unet.config.sample_size) == (4, 32)
    text = (ROOT / "training" / "configs" / "latent_256.yaml").read_text()
    assert "vae: stabilityai/sd-vae-ft-mse" in text and "ESTIMATE" in text


def test_the_cpu_command_of_docs_latent_md_runs_as_written(tmp_path, monkeypatch, counted_encodes):
    """The tiny-VAE Python block and the CPU command of docs/latent.md, in an empty directory."""
    page = (ROOT / "docs" / "latent.md").read_text()
    section = page.split("## On this CPU: the same command with a tiny VAE", 1)[1].split("\n## ", 1)[0]
    (python_block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (command,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_PLUS_CACHE", str(tmp_path / "ddpm_plus_cache"))
    exec(compile(python_block, "docs/latent.md", "exec"), {"__name__": "__docs__"})
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:4] == ["ddpm-plus", "train", "--config", "latent_256"]
    summary = run_train(argv[2:])
    assert summary["global_step"] >= 1 and counted_encodes["images"] > 0
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path / "latent-tiny"), ddpm_plus.LatentDDPMPlusPipeline)
    assert list((tmp_path / "ddpm_plus_cache" / "latents").iterdir())


@pytest.mark.slow
def test_latent_caching_benchmark_runs_tiny_on_the_cpu(tmp_path):
    """`python -m benchmarks.latent_caching --size tiny` end to end (one round): both variants and the VAE's
    encode/decode give finite, positive figures. No timing threshold: it keeps the benchmark in step with the
    trainer's API."""
    import subprocess
    import sys

    out = tmp_path / "latent.json"
    cmd = [sys.executable, "-m", "benchmarks.latent_caching", "--size", "tiny", "--device", "cpu", "--threads", "1"]
    cmd += ["--rounds", "1", "--steps_per_round", "1", "--batch", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cached / encode every batch:" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["images_per_s"]) == {"cached latents", "encode every batch"}
    assert all(0 < v < float("inf") for v in result["images_per_s"].values())
    assert 0 < result["ratio_cached_over_encoding"] < float("inf") and result["latent_shape"] == [4, 8, 8]
    assert all(v > 0 for v in result["vae_ms_per_image"].values())
