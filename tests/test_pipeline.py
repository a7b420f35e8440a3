"""DDPMPlusPipeline: sampling, scheduler swaps, loading through plain DiffusionPipeline.from_pretrained."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)

import ddpm_plus
from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler
from ddpm_plus.pipelines import pipeline_ddpm_plus

MU, S = 0.1, 0.25  # data distribution N(MU, S^2) per pixel; MU ± 3.6 S stays inside [-1, 1]


def tiny_unet(channels=1, out_channels=None, size=8, **kwargs):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=out_channels or channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **kwargs,
    )


def make_pipe(**scheduler_kwargs):
    pipe = DDPMPlusPipeline(unet=tiny_unet(), scheduler=DDPMPlusScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps=3, batch=2, seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, **kwargs)


class GaussianEpsModel(torch.nn.Module):
    """The exact optimal ε-predictor for data ~ N(MU, S²): E[ε|x_t] = √(1−ᾱ)(x − √ᾱ·MU)/(ᾱS² + 1 − ᾱ)."""

    def __init__(self, alphas_cumprod, size=16):
        super().__init__()
        self.register_buffer("ab", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.config = SimpleNamespace(sample_size=size, in_channels=1, num_class_embeds=None, class_embed_type=None)

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return self.ab.device

    def forward(self, x, t, class_labels=None):
        ab = self.ab[torch.as_tensor(t).long()].to(x.dtype)
        return SimpleNamespace(sample=(1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S * S + 1 - ab))


# ----------------------------------------------------------------------------- sampling


def test_output_types_and_shapes():
    pipe = make_pipe()
    pt = sample(pipe, output_type="pt").images
    np_images = sample(pipe, output_type="np").images
    pil = sample(pipe, output_type="pil").images
    assert pt.shape == (2, 1, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    assert np_images.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    assert isinstance(sample(pipe, return_dict=False)[0], torch.Tensor)


def test_rgb_and_rectangular_unet():
    pipe = DDPMPlusPipeline(unet=tiny_unet(channels=3, size=(8, 16)), scheduler=DDPMPlusScheduler())
    pipe.set_progress_bar_config(disable=True)
    assert sample(pipe, steps=3).images.shape == (2, 3, 8, 16)
    assert sample(pipe, steps=3, output_type="pil").images[0].mode == "RGB"


def test_fixed_generator_is_reproducible_and_generator_list_matches_batch():
    pipe = make_pipe()
    a, b = sample(pipe).images, sample(pipe).images
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(pipe, seed=1).images)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert pipe(batch_size=2, generator=gens, num_inference_steps=3, output_type="pt").images.shape[0] == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"generator": [torch.Generator()]}, "generator"),
        ({"output_type": "latent"}, "output_type"),
        ({"latents": torch.zeros(2, 1, 4, 4)}, "latents"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        ({"class_labels": [0, 1]}, "class_labels"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),
    ],
)
def test_bad_call_arguments_are_clear_errors(kwargs, match):
    pipe = make_pipe()
    kwargs = {"batch_size": 2, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_latents_and_callback_on_step_end():
    pipe = make_pipe()
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t)))
        return {"latents": tensors["latents"] * 0}  # zeroing every step must reach the output

    out = pipe(batch_size=2, latents=latents, num_inference_steps=4, output_type="pt", callback_on_step_end=callback)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.allclose(out.images, torch.full_like(out.images, 0.5))


def test_class_conditional_unet():
    pipe = DDPMPlusPipeline(unet=tiny_unet(num_class_embeds=10), scheduler=DDPMPlusScheduler())
    pipe.set_progress_bar_config(disable=True)
    a = sample(pipe, steps=3, class_labels=[1, 1]).images
    b = sample(pipe, steps=3, class_labels=[7, 7]).images
    assert a.shape == (2, 1, 8, 8) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="class_labels"):
        sample(pipe, steps=3)


@pytest.mark.parametrize("scheduler_cls", [DDPMPlusScheduler, DDIMScheduler])
def test_learned_variance_unet(scheduler_cls):
    """A UNet with 2x output channels (improved DDPM) samples with ours (learned_range) and with DDIM."""
    config = DDPMPlusScheduler(variance_type="learned_range").config
    pipe = DDPMPlusPipeline(unet=tiny_unet(out_channels=2), scheduler=scheduler_cls.from_config(config))
    pipe.set_progress_bar_config(disable=True)
    images = sample(pipe, steps=5).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_stock_ddpm_scheduler_with_learned_variance_matches_diffusers_pipeline(variance_type):
    """diffusers' DDPMScheduler reads the variance channels itself: our pipeline must pass them on (it used
    to strip them, and the scheduler raised a TypeError), and then sample exactly as DDPMPipeline does."""
    unet = tiny_unet(out_channels=2)
    with torch.no_grad():  # variance channel = 0.01: a valid σ² for "learned", which takes its square root
        unet.conv_out.weight[1:] = 0
        unet.conv_out.bias[1:] = 0.01
    ours = DDPMPlusPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=variance_type))
    stock = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=variance_type))
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)
    expected = stock(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np"
    ).images
    images = sample(ours, steps=5, output_type="np").images
    assert type(ours.scheduler) is DDPMScheduler  # passed explicitly: not replaced by ours
    assert np.isfinite(images).all() and images.std() > 0
    np.testing.assert_array_equal(images, expected)
    # the variance channels matter: with a fixed variance (stripped, no TypeError) the samples differ
    ours.scheduler = DDPMScheduler()
    assert not np.array_equal(sample(ours, steps=5, output_type="np").images, expected)


@pytest.mark.parametrize(
    "scheduler, takes",
    [
        (DDPMPlusScheduler(), True),
        (DDPMPlusScheduler(variance_type="learned_range"), True),
        (DDPMScheduler(variance_type="learned_range"), True),
        (DDPMScheduler(variance_type="learned"), True),
        (DDPMScheduler(), False),
        (DPMSolverMultistepScheduler(variance_type="learned_range"), True),
        (DPMSolverMultistepScheduler(), False),
        # a learned-variance config carried over from_config, but not a DDIM/Euler setting
        (DDIMScheduler.from_config(DDPMScheduler(variance_type="learned_range").config), False),
        (EulerDiscreteScheduler.from_config(DDPMScheduler(variance_type="learned").config), False),
    ],
)
def test_scheduler_takes_variance(scheduler, takes):
    assert pipeline_ddpm_plus.scheduler_takes_variance(scheduler) is takes


def test_learned_variance_unet_with_ddim_uses_only_the_prediction_channels():
    """DDIM gets the prediction channels of a 2x-channel UNet: the same images as a UNet without the
    variance channels (all other weights equal)."""
    config = DDPMScheduler(variance_type="learned_range").config
    wide = tiny_unet(out_channels=2)
    narrow = tiny_unet(out_channels=1)
    state = wide.state_dict()
    state["conv_out.weight"], state["conv_out.bias"] = state["conv_out.weight"][:1], state["conv_out.bias"][:1]
    narrow.load_state_dict(state)
    images = []
    for unet in (wide, narrow):
        pipe = DDPMPlusPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config))
        pipe.set_progress_bar_config(disable=True)
        images.append(sample(pipe, steps=5).images)
    assert torch.isfinite(images[0]).all()
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "scheduler_cls, steps, tol",
    [
        (DDPMPlusScheduler, 1000, 0.03),  # ancestral: its exact 50-step std is 0.206 (see test_gaussian_exactness)
        (DDIMScheduler, 50, 0.03),
        (EulerDiscreteScheduler, 100, 0.03),
        (DPMSolverMultistepScheduler, 25, 0.03),
    ],
)
def test_any_scheduler_samples_the_right_distribution(scheduler_cls, steps, tol):
    """With the exact ε-predictor of N(MU, S²) data every scheduler must produce ~N(MU, S²) inside our
    pipeline. Euler needs init_noise_sigma and scale_model_input: diffusers' DDPMPipeline skips both."""
    base = DDPMPlusScheduler(clip_sample=False, timestep_spacing="trailing")
    scheduler = scheduler_cls.from_config(base.config)
    pipe = DDPMPlusPipeline(unet=GaussianEpsModel(base.alphas_cumprod, size=32), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    latents = (
        pipe(
            batch_size=8,
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=steps,
            output_type="pt",
            callback_on_step_end=None,
        ).images
        * 2
        - 1
    )  # back to [-1, 1]
    # the pipeline clamps to [-1, 1]: negligible here (MU + 3.6 S = 1).
    assert abs(latents.mean().item() - MU) < tol
    assert abs(latents.std().item() - S) < tol + 0.01


def test_stock_ddpm_pipeline_fails_with_euler_where_ours_succeeds():
    """The reason our pipeline applies init_noise_sigma/scale_model_input: diffusers 0.42's DDPMPipeline applies neither."""
    base = DDPMPlusScheduler(clip_sample=False, timestep_spacing="trailing")
    model = GaussianEpsModel(base.alphas_cumprod, size=16)
    euler = EulerDiscreteScheduler.from_config(base.config)
    euler.set_timesteps(20)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # DDPMPipeline: no init_noise_sigma
    for t in euler.timesteps:
        x = euler.step(model(x, t).sample, t, x).prev_sample  # ... and no scale_model_input
    assert abs(x.std().item() - S) > 0.2  # badly wrong, while the test above is within 0.04


def test_fp16_unet_keeps_float32_chain():
    pipe = make_pipe()
    pipe.unet.to(torch.float16)
    latents = {}

    def keep(p, i, t, tensors):
        latents[i] = tensors["latents"]
        return {}

    images = sample(pipe, steps=3, callback_on_step_end=keep).images
    assert latents[0].dtype == torch.float32 and torch.isfinite(images).all()


# ----------------------------------------------------------------------------- saving and loading


def test_save_and_plain_from_pretrained_round_trip(tmp_path):
    pipe = make_pipe(variance_type="fixed_large", timestep_spacing="trailing")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPlusPipeline"
    assert index["scheduler"] == ["ddpm_plus.schedulers.scheduling_ddpm_plus", "DDPMPlusScheduler"]
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]

    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is DDPMPlusPipeline and type(loaded.scheduler) is DDPMPlusScheduler
    assert loaded.scheduler.config.variance_type == "fixed_large"
    assert torch.equal(sample(pipe).images, sample(loaded).images)


def test_from_pretrained_with_torch_dtype_float16(tmp_path):
    make_pipe().save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.dtype == torch.float16
    images = sample(loaded, steps=3).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_directory_saved_by_diffusers_ddpm_pipeline_loads_into_ours(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(variance_type="fixed_large")).save_pretrained(tmp_path)
    loaded = DDPMPlusPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is DDPMPlusScheduler
    assert loaded.scheduler.config.variance_type == "fixed_large"
    loaded.set_progress_bar_config(disable=True)
    assert sample(loaded, steps=3).images.shape == (2, 1, 8, 8)


def test_plugin_registration_is_where_diffusers_042_looks():
    """If a diffusers release changes these look-ups, loading saved pipelines breaks: fail loudly here."""
    import diffusers
    import diffusers.pipelines
    from diffusers.pipelines import pipeline_loading_utils

    assert diffusers.DDPMPlusPipeline is DDPMPlusPipeline
    assert diffusers.DDPMPlusScheduler is DDPMPlusScheduler
    module = diffusers.pipelines.__dict__["ddpm_plus.schedulers.scheduling_ddpm_plus"]
    assert module.DDPMPlusScheduler is DDPMPlusScheduler
    assert pipeline_loading_utils._get_custom_components_and_folders(
        "user/repo", {"scheduler": ["ddpm_plus.schedulers.scheduling_ddpm_plus", "DDPMPlusScheduler"]}, filenames=[]
    ) == ({}, ["scheduler"])


def test_registration_refuses_to_overwrite_another_class():
    import diffusers

    with pytest.raises(ImportError, match="DDPMPipeline"):
        ddpm_plus._register(diffusers, "DDPMPipeline", DDPMPlusPipeline)
    assert diffusers.DDPMPipeline is DDPMPipeline
