"""`ddpm-plus convert`: every published flag set of openai/improved-diffusion and openai/guided-diffusion (width
shrunk for the CPU, every architecture flag kept) on a state dict with the original key layout and shapes
(tests/adm_reference.py) -> a folder that DiffusionPipeline.from_pretrained loads; every key used once, the
config round trip, the scheduler tables and p_mean_variance against the original formulas, the model card;
and the errors for checkpoints that do not match their flags."""

from __future__ import annotations

import argparse
import math
import sys

import diffusers
import diffusers.pipelines
import numpy as np
import pytest
import torch
from adm_reference import (
    GUIDED_CLASSIFIERS,
    GUIDED_PUBLISHED,
    IMPROVED_PUBLISHED,
    architecture,
    betas,
    classifier_layout,
    diffusion_tables,
    flag_values,
    shrink,
    unet_layout,
)
from diffusers import DiffusionPipeline

import ddpm_plus  # noqa: F401  (registers the pipeline, scheduler and ADM models with diffusers)
from ddpm_plus.conversion.adm import ConversionError, add_convert_parser, convert_command, convert_unet
from ddpm_plus.conversion.adm_flags import FlagError, parse_flags
from ddpm_plus.models.adm_classifier import ADMClassifierModel
from ddpm_plus.models.adm_unet import ADMUNetModel
from ddpm_plus.pipelines.pipeline_ddpm_plus import DDPMPlusPipeline


def test_import_ddpm_plus_registers_the_adm_classes_with_diffusers():
    for cls in (ADMUNetModel, ADMClassifierModel):
        assert getattr(diffusers, cls.__name__) is cls
        assert getattr(diffusers.pipelines, cls.__module__) is sys.modules[cls.__module__]


SLOW = ("512x512_diffusion", "lsun_bedroom", "lsun_bedroom_lr1e-4", "256x256_diffusion_uncond", "lsun_horse_nodropout")
UNET_CASES = [
    pytest.param(repo, name, m, d, id=name, marks=[pytest.mark.slow] if name in SLOW else [])
    for repo, name, m, d in [("improved-diffusion", n, shrink(m, 32), d) for n, (m, d) in IMPROVED_PUBLISHED.items()]
    + [("guided-diffusion", n, shrink(m, 64), "") for n, m in GUIDED_PUBLISHED.items()]
]


def random_state(layout: dict, seed: int = 0, scaled: bool = False) -> dict[str, torch.Tensor]:
    """Gaussian tensors of the layout's shapes; ``scaled``: std 1/sqrt(fan-in) for weights, 0.1 for vectors
    (a network whose activations stay finite)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) for k, shape in sorted(layout.items())}
    if scaled:
        state = {k: v / math.prod(v.shape[1:]) ** 0.5 if v.ndim > 1 else 0.1 * v for k, v in state.items()}
    return state


def run_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-plus")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    return convert_command(parser.parse_args(["convert", *argv]))


def check_scheduler(scheduler, flags: dict[str, str]) -> None:
    steps, schedule = int(flags.get("diffusion_steps", 1000)), flags.get("noise_schedule", "linear")
    ref = diffusion_tables(betas(schedule, steps))
    assert scheduler.config.num_train_timesteps == steps
    np.testing.assert_allclose(scheduler.betas.numpy(), betas(schedule, steps), rtol=1e-12, atol=0)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), ref["alphas_cumprod"], rtol=1e-12)
    np.testing.assert_allclose(
        scheduler.posterior_log_variance_clipped.numpy(), ref["posterior_log_variance_clipped"], rtol=1e-12
    )
    learned = flags.get("learn_sigma", "False") == "True"
    assert scheduler.config.variance_type == ("learned_range" if learned else "fixed_large")
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.clip_sample is True


def reference_p_mean_variance(ref, out, x, t, learned: bool):
    """GaussianDiffusion.p_mean_variance (eps prediction, clip_denoised=True), in float64."""
    eps, v = (out[:, :3], out[:, 3:]) if learned else (out, None)

    def at(name):
        return torch.from_numpy(ref[name])[t].view(-1, 1, 1, 1)

    if learned:
        frac = (v + 1) / 2
        log_var = frac * at("log_betas") + (1 - frac) * at("posterior_log_variance_clipped")
    else:
        log_var = at("large_log_variance").expand_as(x)
    x0 = (at("sqrt_recip") * x - at("sqrt_recipm1") * eps).clamp(-1, 1)
    return at("coef1") * x0 + at("coef2") * x, log_var, x0


@pytest.mark.parametrize("repo,name,model_flags,diffusion_flags", UNET_CASES)
def test_published_flag_set_converts_and_loads(repo, name, model_flags, diffusion_flags, tmp_path):
    arch = architecture(repo.split("-")[0], f"{model_flags} {diffusion_flags}")
    layout = unet_layout(arch)
    state = random_state(layout)
    checkpoint = tmp_path / f"{name}.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "converted"
    argv = [repo, str(checkpoint), "--model_flags", model_flags, "--output_dir", str(out)]
    assert run_convert(argv + (["--diffusion_flags", diffusion_flags] if diffusion_flags else [])) == 0

    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is DDPMPlusPipeline and type(pipe.unet) is ADMUNetModel
    loaded = pipe.unet.state_dict()
    assert sorted(loaded) == sorted(state)  # every key used exactly once
    for key, value in state.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value), key
    flags = {**flag_values(model_flags), **flag_values(diffusion_flags)}
    c = pipe.unet.config
    assert c.sample_size == arch["image_size"] and c.in_channels == 3
    assert c.out_channels == (6 if arch["learn_sigma"] else 3)
    assert c.num_class_embeds == (1000 if arch["classes"] else None)
    improved_rescale = repo == "improved-diffusion" and flags.get("rescale_timesteps", "True") == "True"
    assert c.rescale_timesteps == improved_rescale
    assert c.dropout == float(flags.get("dropout", 0.0))
    assert dict(ADMUNetModel.from_config(c).config) == dict(c)  # config round trip
    check_scheduler(pipe.scheduler, flags)
    card = (out / "README.md").read_text()
    assert f"{name}.pt" in card and "license: mit" in card and f"openai/{repo}" in card


@pytest.mark.parametrize("name,flags", list(GUIDED_CLASSIFIERS.items()), ids=list(GUIDED_CLASSIFIERS))
def test_published_classifier_converts_and_loads(name, flags, tmp_path):
    flags = shrink(flags, 64)
    arch = architecture("guided", flags, classifier=True)
    state = random_state(classifier_layout(arch))
    checkpoint = tmp_path / f"{name}.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "classifier"
    assert (
        run_convert(
            ["guided-diffusion-classifier", str(checkpoint), "--classifier_flags", flags, "--output_dir", str(out)]
        )
        == 0
    )
    model = ADMClassifierModel.from_pretrained(out)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert model.config.num_res_blocks == arch["depth"] and model.config.pool == "attention"
    assert model.config.num_head_channels == 64 and model.config.rescale_timesteps is False
    assert dict(ADMClassifierModel.from_config(model.config).config) == dict(model.config)
    card = (out / "README.md").read_text()
    assert f"{name}.pt" in card and "license: mit" in card
    if name == "64x64_classifier":  # a forward pass with raw timesteps
        logits = model(torch.randn(2, 3, 64, 64), torch.tensor([0, 999]))
        assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "diffusion_flags,learned",
    [
        ("--diffusion_steps 4000 --noise_schedule cosine --learn_sigma True", True),
        ("--diffusion_steps 1000 --noise_schedule linear --learn_sigma True", True),
        ("--diffusion_steps 4000 --noise_schedule linear", False),
    ],
)
def test_p_mean_variance_matches_the_original_formulas(diffusion_flags, learned):
    flags = parse_flags("improved-diffusion", diffusion_flags)
    from ddpm_plus.conversion.adm_flags import scheduler_config

    scheduler = ddpm_plus.DDPMPlusScheduler(**scheduler_config(flags))
    T = flags["diffusion_steps"]
    ref = diffusion_tables(betas(flags["noise_schedule"], T))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(4, 6 if learned else 3, 8, 8, generator=g, dtype=torch.float64)
    out[:, 3:] = out[:, 3:].clamp(-1, 1)
    t = torch.tensor([0, 1, T // 2, T - 1])
    got = scheduler.p_mean_variance(out, x, t, clip_denoised=True)
    mean, log_var, x0 = reference_p_mean_variance(ref, out, x, t, learned)
    torch.testing.assert_close(got.pred_original_sample, x0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.log_variance, log_var, rtol=1e-10, atol=1e-12)


def test_diffusion_flag_variants_set_the_scheduler():
    flags = parse_flags("improved-diffusion", "--sigma_small True --predict_xstart True --timestep_respacing ddim50")
    from ddpm_plus.conversion.adm_flags import scheduler_config

    config = scheduler_config(flags)
    assert config["variance_type"] == "fixed_small" and config["prediction_type"] == "sample"
    assert config["timestep_spacing"] == "leading"
    assert (
        scheduler_config(parse_flags("guided-diffusion", "--timestep_respacing 250"))["timestep_spacing"] == "linspace"
    )


def test_repository_defaults_differ():
    improved, guided = parse_flags("improved-diffusion"), parse_flags("guided-diffusion")
    assert improved["rescale_timesteps"] is True and guided["rescale_timesteps"] is False
    assert "num_head_channels" not in improved and guided["num_head_channels"] == -1
    with pytest.raises(FlagError, match="--sigma_small"):
        parse_flags("guided-diffusion", "--sigma_small True")
    with pytest.raises(FlagError, match="--image_size 32"):
        convert_unet("guided-diffusion", {}, "--image_size 32")


def test_flag_errors_name_the_flag():
    with pytest.raises(FlagError, match="--large_size"):
        parse_flags("guided-diffusion", "--large_size 256 --small_size 64")
    with pytest.raises(FlagError, match="--learn_sigma: boolean"):
        parse_flags("guided-diffusion", "--learn_sigma maybe")
    with pytest.raises(FlagError, match="--num_channels: int"):
        parse_flags("guided-diffusion", "--num_channels 1.5")
    with pytest.raises(FlagError, match="--image_size is given twice"):
        parse_flags("guided-diffusion", "--image_size 64", "--image_size 128")
    assert parse_flags("guided-diffusion", "--image_size=64", "--image_size 64")["image_size"] == 64


SMALL = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True --class_cond True",
    "--diffusion_steps 100",
)


def small_state(scaled: bool = False):
    return random_state(unet_layout(architecture("improved", " ".join(SMALL))), scaled=scaled)


def test_missing_unexpected_and_misshapen_keys_are_named():
    state = small_state()
    missing = {k: v for k, v in state.items() if k != "label_emb.weight"}
    with pytest.raises(ConversionError, match=r"missing key 'label_emb.weight' \(--class_cond\)"):
        convert_unet("improved-diffusion", missing, *SMALL)
    extra = {**state, "input_blocks.1.1.qkv.weight": torch.zeros(96, 32, 1)}
    with pytest.raises(
        ConversionError, match=r"unexpected key 'input_blocks.1.1.qkv.weight' \(--attention_resolutions"
    ):
        convert_unet("improved-diffusion", extra, *SMALL)
    with pytest.raises(ConversionError, match=r"key 'out.2.weight' has shape \(6, 32, 3, 3\).*--learn_sigma"):
        convert_unet("improved-diffusion", state, SMALL[0].replace("--learn_sigma True", ""), SMALL[1])
    with pytest.raises(ConversionError, match="emb_layers.*--use_scale_shift_norm"):
        convert_unet("improved-diffusion", state, SMALL[0] + " --use_scale_shift_norm False", SMALL[1])


def test_use_fp16_keeps_float32_weights_and_half_checkpoints_load(tmp_path):
    state = {k: v.half() for k, v in small_state().items()}
    pipe = convert_unet("improved-diffusion", state, *SMALL)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    torch.save(state, tmp_path / "half.pt")
    run_convert(
        [
            "improved-diffusion",
            str(tmp_path / "half.pt"),
            "--model_flags",
            SMALL[0],
            "--diffusion_flags",
            SMALL[1],
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in stored.values())


def test_checkpoint_is_read_with_weights_only(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"weights": small_state(), "optimizer": argparse.Namespace(lr=1)}, path)
    with pytest.raises(SystemExit, match="error"):
        run_convert(["improved-diffusion", str(path), "--model_flags", SMALL[0], "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        run_convert(["improved-diffusion", str(tmp_path / "none.pt"), "--output_dir", str(tmp_path / "o")])


def test_converted_pipeline_samples_with_raw_timesteps(tmp_path):
    pipe = convert_unet("improved-diffusion", small_state(scaled=True), *SMALL)
    images = pipe(batch_size=2, num_inference_steps=2, class_labels=[3, 7], output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_converted_pipeline_with_fast_sampler_and_bits_per_dim():
    pipe = convert_unet("improved-diffusion", small_state(scaled=True), *SMALL)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 32, 32, generator=generator)
    sampler = ddpm_plus.FastSampler(pipe, dtype=torch.bfloat16, channels_last=True)
    fast = sampler(num_inference_steps=2, latents=latents, class_labels=[1, 2], output_type="pt").images
    plain = pipe(num_inference_steps=2, latents=latents, class_labels=[1, 2], output_type="pt").images
    assert fast.shape == plain.shape == (2, 3, 32, 32) and torch.isfinite(fast).all()
    # the bound: -log p(x | c) with a learned-range scheduler, 4 of the 100 timesteps
    conditional = lambda x, t: pipe.unet(x, t, class_labels=torch.full((x.shape[0],), 5))  # noqa: E731
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=generator) / 127.5 - 1
    bpd = ddpm_plus.bits_per_dim(conditional, pipe.scheduler, images, timesteps=[0, 10, 50, 99], progress=False)
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()
