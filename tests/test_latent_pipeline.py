"""LatentDDPMPlusPipeline (ddpm_plus/pipelines/pipeline_latent_ddpm_plus.py): DDPM sampling on VAE latents.

Tiny random AutoencoderKL / VQModel / UNet2DModel / DiTTransformer2DModel: save_pretrained -> plain
DiffusionPipeline.from_pretrained -> sample -> decode; output_type="latent"; latent scaling (scaling_factor,
shift_factor); class-conditional DiT with classifier-free guidance through its built-in null class; learned
variances; Analytic-DPM; FastSampler; argument errors raised before any model call.
"""

import warnings
from types import SimpleNamespace

import diffusers
import diffusers.pipelines
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
    VQModel,
)

import ddpm_plus  # noqa: F401 (registers the package's classes with diffusers)
from ddpm_plus import DDPMPlusScheduler, FastSampler
from ddpm_plus.pipelines import pipeline_latent_ddpm_plus as latent_module
from ddpm_plus.pipelines.denoisers import DenoiserCall, builtin_null_class, denoiser_config
from ddpm_plus.pipelines.pipeline_latent_ddpm_plus import (
    LatentDDPMPlusPipeline,
    label_id_of,
    labels_to_id2label,
    scale_latents,
    unique_names,
    unscale_latents,
)


def test_import_ddpm_plus_registers_the_latent_pipeline_with_diffusers():
    assert diffusers.LatentDDPMPlusPipeline is LatentDDPMPlusPipeline
    assert getattr(diffusers.pipelines, latent_module.__name__) is latent_module


pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


def tiny_kl(latent_channels=4, seed=0, **config):
    torch.manual_seed(seed)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return AutoencoderKL(
        **blocks,
        block_out_channels=(4, 8),
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=16,
        **config,
    ).eval()


def tiny_vq(seed=0):
    torch.manual_seed(seed)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return VQModel(
        **blocks, block_out_channels=(4, 8), latent_channels=3, num_vq_embeddings=16, norm_num_groups=2, sample_size=16
    ).eval()


def tiny_unet(channels=4, out_channels=None, seed=1, **config):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=out_channels or channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
        **config,
    ).eval()


def tiny_dit(out_channels=8, seed=2, num_classes=1000):
    """DiT-XL/2's layout in miniature: 4 latent channels, learned sigma (8 outputs), 1000 classes + null."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=out_channels,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()


def plus_scheduler(**config):
    return DDPMPlusScheduler(clip_sample=False, **config)


def unet_pipe(**config):
    return LatentDDPMPlusPipeline(vae=tiny_kl(), unet=tiny_unet(), scheduler=plus_scheduler(**config))


def dit_pipe(scheduler=None, **kwargs):
    scheduler = scheduler or plus_scheduler(variance_type="learned_range")
    return LatentDDPMPlusPipeline(vae=tiny_kl(), transformer=tiny_dit(), scheduler=scheduler, **kwargs)


def sample(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def forbid_calls(module):
    """Make any forward call of ``module`` fail the test (for errors that must come before the model runs)."""

    def called(*args, **kwargs):
        raise AssertionError(f"{type(module).__name__} was called")

    module.forward = called


# ------------------------------------------------------------------ save, load, sample, decode
@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_save_then_plain_diffusers_from_pretrained_samples_the_same_images(tmp_path, denoiser):
    pipe = unet_pipe() if denoiser == "unet" else dit_pipe(id2label={"0": "tench", "1": "goldfish"})
    labels = None if denoiser == "unet" else [0, 1]
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is LatentDDPMPlusPipeline
    assert type(loaded.denoiser) is type(pipe.denoiser)
    assert (loaded.unet is None) == (denoiser == "transformer")
    assert type(loaded.scheduler) is DDPMPlusScheduler and type(loaded.vae) is AutoencoderKL
    assert loaded.conditioning == pipe.conditioning
    images = sample(loaded, batch_size=2, class_labels=labels, output_type="np")
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
    np.testing.assert_array_equal(images, sample(pipe, batch_size=2, class_labels=labels, output_type="np"))
    pil = sample(loaded, batch_size=2, class_labels=labels, output_type="pil")
    assert [im.size for im in pil] == [(16, 16)] * 2


def test_vq_vae_with_unet_samples_and_decodes_through_the_quantiser(tmp_path):
    pipe = LatentDDPMPlusPipeline(vae=tiny_vq(), unet=tiny_unet(channels=3), scheduler=plus_scheduler())
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.vae) is VQModel
    z = sample(loaded, batch_size=2, output_type="latent")
    assert z.shape == (2, 3, 8, 8)
    expected = (loaded.vae.decode(z / loaded.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(sample(loaded, batch_size=2), expected)
    unquantised = loaded.vae.decode(z / loaded.vae.config.scaling_factor, force_not_quantize=True).sample
    assert not torch.allclose(loaded.decode_latents(z), unquantised)


def test_output_type_latent_returns_the_scaled_latents_undecoded_and_decoding_them_gives_the_images():
    vae = tiny_kl(scaling_factor=0.5, shift_factor=0.25)
    pipe = LatentDDPMPlusPipeline(vae=vae, unet=tiny_unet(), scheduler=plus_scheduler())
    z = sample(pipe, batch_size=2, output_type="latent")
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    decoded = vae.decode(z / 0.5 + 0.25).sample
    torch.testing.assert_close(pipe.decode_latents(z), decoded)
    torch.testing.assert_close(sample(pipe, batch_size=2), (decoded / 2 + 0.5).clamp(0, 1))
    z_tuple = pipe(
        batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent",
        return_dict=False,
    )[0]  # fmt: skip
    torch.testing.assert_close(z_tuple, z)


def test_latent_scaling_uses_scaling_factor_and_shift_factor_and_round_trips():
    z = torch.randn(2, 4, 3, 3)
    shifted = AutoencoderKL(scaling_factor=0.5, shift_factor=0.25).config
    torch.testing.assert_close(scale_latents(z, shifted), (z - 0.25) * 0.5)
    torch.testing.assert_close(unscale_latents(scale_latents(z, shifted), shifted), z)
    vq = tiny_vq().config  # VQModel has no shift_factor: a pure scaling
    torch.testing.assert_close(scale_latents(z, vq), z * vq.scaling_factor)
    torch.testing.assert_close(unscale_latents(z, vq), z / vq.scaling_factor)


def test_given_latents_are_the_starting_noise():
    pipe = unet_pipe()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 8, 8, generator=generator)  # the pipeline's own first draw for seed 0
    z = pipe(latents=noise, num_inference_steps=STEPS, output_type="latent", generator=generator).images
    torch.testing.assert_close(z, sample(pipe, seed=0, batch_size=2, output_type="latent"))
    other = pipe(latents=-noise, num_inference_steps=STEPS, output_type="latent", generator=torch.manual_seed(1))
    assert not torch.allclose(other.images, z)


def test_callback_on_step_end_sees_and_may_replace_the_latents():
    pipe = unet_pipe()
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else None

    z = sample(pipe, batch_size=2, output_type="latent", callback_on_step_end=callback)
    assert seen == [(i, (2, 4, 8, 8)) for i in range(STEPS)]
    assert torch.equal(z, torch.zeros_like(z))


# ------------------------------------------------------------------ DiT: classes, guidance, learned variances
def test_dit_null_class_and_label_dropout_come_from_the_model():
    dit = tiny_dit()
    assert builtin_null_class(dit).null_class_id == 1000 and builtin_null_class(dit).class_dropout_prob == 0.1
    view = denoiser_config(dit)
    assert (view.sample_size, view.in_channels, view.out_channels, view.num_class_embeds) == (8, 4, 8, 1001)
    conditioning = dit_pipe().conditioning
    assert (conditioning.num_classes, conditioning.null_class_id, conditioning.class_dropout_prob) == (1000, 1000, 0.1)
    assert builtin_null_class(tiny_unet()) is None


def test_dit_classifier_free_guidance_is_one_batched_call_of_conditional_and_null_labels():
    pipe = dit_pipe(scheduler=DDIMScheduler(clip_sample=False))
    calls = []
    forward = pipe.transformer.forward

    def spy(x, timestep=None, class_labels=None, **kwargs):
        calls.append((x.shape[0], timestep.tolist(), class_labels.tolist()))
        return forward(x, timestep=timestep, class_labels=class_labels, **kwargs)

    pipe.transformer.forward = spy
    guided = sample(pipe, class_labels=[3, 7], guidance_scale=4.0, output_type="latent")
    t0 = int(pipe.scheduler.timesteps[0])
    assert len(calls) == STEPS and calls[0] == (4, [t0] * 4, [3, 7, 1000, 1000])
    calls.clear()
    plain = sample(pipe, class_labels=[3, 7], output_type="latent")
    assert len(calls) == STEPS and calls[0] == (2, [t0] * 2, [3, 7])
    assert not torch.allclose(guided, plain)
    null = sample(pipe, class_labels=[3, 7], guidance_scale=0.0, output_type="latent")  # the null class only
    torch.testing.assert_close(null, sample(pipe, class_labels=[5, 1], guidance_scale=0.0, output_type="latent"))
    assert not torch.allclose(null, plain)


def test_learned_variance_channels_reach_ddpm_plus_and_are_dropped_for_fixed_variance_schedulers():
    shapes = {}
    for name, scheduler in [
        ("learned", plus_scheduler(variance_type="learned_range")),
        ("fixed", plus_scheduler()),
        ("ddim", DDIMScheduler(clip_sample=False)),
    ]:
        pipe = dit_pipe(scheduler=scheduler)
        step = pipe.scheduler.step

        def spy(model_output, *args, _step=step, _name=name, **kwargs):
            shapes.setdefault(_name, set()).add(model_output.shape[1])
            return _step(model_output, *args, **kwargs)

        pipe.scheduler.step = spy
        shapes[name + "_z"] = sample(pipe, class_labels=[1, 2], guidance_scale=2.0, output_type="latent")
    assert shapes["learned"] == {8} and shapes["fixed"] == {8} and shapes["ddim"] == {4}
    assert torch.isfinite(shapes["learned_z"]).all()
    assert not torch.allclose(shapes["learned_z"], shapes["fixed_z"])  # the learned σ was used


def test_class_names_and_dit_style_synonyms():
    names = unique_names({"0": "great white shark, white shark", "134": "crane", "517": "crane", "2": "tench"})
    assert names == {"0": "great white shark, white shark", "2": "tench", "134": "crane (134)", "517": "crane (517)"}
    pipe = dit_pipe(id2label=names)
    assert pipe.get_label_ids(["white shark", "tench", "crane (517)"]) == [0, 2, 517]
    assert pipe.get_label_ids("great white shark, white shark") == [0]
    with pytest.raises(ValueError, match="'crane' is ambiguous: it names classes \\[134, 517\\]"):
        pipe.get_label_ids("crane")
    with pytest.raises(ValueError, match="unknown class name 'dog'"):
        pipe.get_label_ids("dog")
    with pytest.raises(ValueError, match="stores no class names"):
        label_id_of("tench", None)
    torch.testing.assert_close(
        sample(pipe, class_labels=["white shark", 2], output_type="latent"),
        sample(pipe, class_labels=[0, 2], output_type="latent"),
    )
    torch.testing.assert_close(
        sample(pipe, class_labels="tench", output_type="latent"), sample(pipe, class_labels=2, output_type="latent")
    )
    assert labels_to_id2label({"white shark": 0, "great white shark": 0, "tench": 2}) == {
        "0": "great white shark, white shark",
        "2": "tench",
    }
    assert labels_to_id2label({}) is None


# ------------------------------------------------------------------ other samplers in latent space
def test_analytic_dpm_samples_in_latent_space():
    moments = np.linspace(0.95, 1.0, 1000).tolist()
    analytic = unet_pipe(variance_type="analytic", analytic_moments=moments)
    z = sample(analytic, batch_size=2, output_type="latent")
    assert torch.isfinite(z).all()
    assert not torch.allclose(z, sample(unet_pipe(), batch_size=2, output_type="latent"))
    images = sample(analytic, batch_size=2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_a_scheduler_that_clips_the_predicted_latents_to_a_pixel_range_is_warned_about():
    with pytest.warns(UserWarning, match="clip_sample=True"):
        LatentDDPMPlusPipeline(vae=tiny_kl(), unet=tiny_unet(), scheduler=DDPMPlusScheduler())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatentDDPMPlusPipeline(vae=tiny_kl(), unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False))


def test_any_diffusers_scheduler_runs_in_latent_space():
    for scheduler in (DDIMScheduler(clip_sample=False), DDPMScheduler(clip_sample=False)):
        pipe = LatentDDPMPlusPipeline(vae=tiny_kl(), unet=tiny_unet(), scheduler=scheduler)
        assert torch.isfinite(sample(pipe, batch_size=1, output_type="latent")).all()


@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_fast_sampler_reproduces_the_latent_pipeline_and_decodes_at_the_end(denoiser):
    pipe = unet_pipe() if denoiser == "unet" else dit_pipe()
    kwargs = {} if denoiser == "unet" else {"class_labels": [4, 9], "guidance_scale": 3.0}
    sampler = FastSampler(pipe, dtype=torch.float32, channels_last=False, cuda_graph=False)
    fast_z = sampler(
        batch_size=2, num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="latent", **kwargs
    )
    z = sample(pipe, batch_size=2, output_type="latent", **kwargs)
    torch.testing.assert_close(fast_z.images, z, rtol=1e-4, atol=1e-5)
    fast_images = sampler(
        batch_size=2, num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="pt", **kwargs
    )
    assert fast_images.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(fast_images.images, sample(pipe, batch_size=2, **kwargs), rtol=1e-4, atol=1e-5)


def test_denoiser_call_expands_the_timestep_to_the_batch():
    seen = []
    call = DenoiserCall(lambda x, t, class_labels=None: seen.append((t.shape, t.tolist(), class_labels)))
    call(torch.zeros(3, 1), 5)
    call(torch.zeros(2, 1), torch.tensor([7]), class_labels=torch.tensor([1, 2]))
    call(torch.zeros(2, 1), torch.tensor([1, 2]))
    assert seen[0] == (torch.Size([3]), [5, 5, 5], None)
    assert seen[1][:2] == (torch.Size([2]), [7, 7]) and seen[1][2].tolist() == [1, 2]
    assert seen[2][1] == [1, 2]


# ------------------------------------------------------------------ loading
def test_from_pretrained_replaces_a_stock_ddpm_scheduler_unless_one_is_given(tmp_path):
    LatentDDPMPlusPipeline(vae=tiny_kl(), unet=tiny_unet(), scheduler=DDPMScheduler(clip_sample=False)).save_pretrained(
        tmp_path
    )
    loaded = LatentDDPMPlusPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is DDPMPlusScheduler and loaded.scheduler.config.clip_sample is False
    kept = LatentDDPMPlusPipeline.from_pretrained(tmp_path, scheduler=DDIMScheduler(clip_sample=False))
    assert type(kept.scheduler) is DDIMScheduler


# ------------------------------------------------------------------ errors
def test_component_errors_name_the_argument():
    kl, unet = tiny_kl(), tiny_unet()
    with pytest.raises(ValueError, match="exactly one denoiser"):
        LatentDDPMPlusPipeline(vae=kl, scheduler=plus_scheduler())
    with pytest.raises(ValueError, match="exactly one denoiser"):
        LatentDDPMPlusPipeline(vae=kl, unet=unet, transformer=tiny_dit(), scheduler=plus_scheduler())
    with pytest.raises(ValueError, match="`vae` must be a diffusers AutoencoderKL or VQModel; got UNet2DModel"):
        LatentDDPMPlusPipeline(vae=unet, unet=unet, scheduler=plus_scheduler())
    with pytest.raises(ValueError, match="`unet` takes 3 input channels but `vae` has 4 latent channels"):
        LatentDDPMPlusPipeline(vae=kl, unet=tiny_unet(channels=3), scheduler=plus_scheduler())
    with pytest.raises(ValueError, match="outputs 5 channels; expected 4 .* or 8"):
        LatentDDPMPlusPipeline(vae=kl, unet=tiny_unet(out_channels=5), scheduler=plus_scheduler())
    with pytest.raises(ValueError, match="latents_mean/latents_std"):
        LatentDDPMPlusPipeline(vae=tiny_kl(latents_mean=(0.0,) * 4), unet=unet, scheduler=plus_scheduler())
    with pytest.raises(ValueError, match="`null_class_id` must be the UNet's last class id"):
        dit_pipe(null_class_id=3, class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="has no \\['sample_size'\\]"):
        denoiser_config(SimpleNamespace(config=SimpleNamespace(in_channels=4)))


def test_sampling_errors_are_raised_before_any_model_call():
    pipe = dit_pipe()
    forbid_calls(pipe.transformer)
    forbid_calls(pipe.vae)
    cases = [
        ({"output_type": "png", "class_labels": 1}, "`output_type` must be one of .*'latent'"),
        ({"latents": torch.zeros(1, 4, 4, 4), "class_labels": 1}, "`latents` must have shape \\(1, 4, 8, 8\\)"),
        ({}, "class-conditional: pass `class_labels`"),
        ({"class_labels": 1000}, "class id 1000 is out of range.*1000 is the null class"),
        ({"class_labels": "tench"}, "stores no class names"),
        ({"class_labels": 1, "guidance_scale": float("nan")}, "`guidance_scale` must be finite"),
        ({"class_labels": 1, "callback_on_step_end_tensor_inputs": ["x"]}, "may only contain"),
        ({"class_labels": [1, 2], "batch_size": 3}, "one label per image"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(num_inference_steps=STEPS, **kwargs)
    unconditional = unet_pipe()
    forbid_calls(unconditional.unet)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        unconditional(num_inference_steps=STEPS, guidance_scale=2.0)
    with pytest.raises(ValueError, match="`class_labels` were given"):
        unconditional(num_inference_steps=STEPS, class_labels=[1])
