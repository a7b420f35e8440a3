"""Folders saved by diffusers' LDMPipeline (CompVis/ldm-celebahq-256's layout: ``vqvae`` VQModel + ``unet`` +
DDIMScheduler) and DiTPipeline (facebook/DiT-XL-2-256's: ``transformer`` with learned sigma and 1000 classes + null
class, ``vae`` AutoencoderKL, DDIMScheduler, ``id2label`` in model_index.json) load into LatentDDPMPlusPipeline,
with a DDPMPlusScheduler of the same config, and give diffusers' own images for the same scheduler and noise.
Tiny random models of the same classes stand in for the real weights.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DiTPipeline, LDMPipeline
from test_latent_pipeline import STEPS, tiny_dit, tiny_kl, tiny_unet, tiny_vq

from ddpm_plus import DDPMPlusScheduler, FastSampler
from ddpm_plus.pipelines.denoisers import denoiser_config
from ddpm_plus.pipelines.pipeline_latent_ddpm_plus import LatentDDPMPlusPipeline, ddpm_plus_scheduler_for

pytestmark = pytest.mark.usefixtures("one_thread")

# the scheduler configs of the two Hub repos (their scheduler_config.json, without version keys)
LDM_SCHEDULER = dict(
    beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True
)
DIT_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
ID2LABEL = {"0": "tench, Tinca tinca", "2": "great white shark, white shark", "134": "crane", "517": "crane"}


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ldm")
    LDMPipeline(vqvae=tiny_vq(), unet=tiny_unet(channels=3), scheduler=DDIMScheduler(**LDM_SCHEDULER)).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit")
    DiTPipeline(transformer=tiny_dit(), vae=tiny_kl(), scheduler=DDIMScheduler(**DIT_SCHEDULER)).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())  # DiTPipeline does not save id2label; the Hub
    (path / "model_index.json").write_text(json.dumps({**index, "id2label": ID2LABEL}))  # repo's file has it
    return path


def ours_and_theirs(path, scheduler):
    """Our pipeline and diffusers' own, both loaded from ``path`` with ``scheduler`` (one instance each)."""
    ours = LatentDDPMPlusPipeline.from_pretrained(path, scheduler=scheduler)
    theirs = DiffusionPipeline.from_pretrained(path, scheduler=type(scheduler).from_config(scheduler.config))
    return ours, theirs


def test_ldm_folder_loads_with_a_ddpm_plus_scheduler_of_the_same_config(ldm_dir):
    assert type(DiffusionPipeline.from_pretrained(ldm_dir)) is LDMPipeline  # diffusers' own loading is unchanged
    pipe = LatentDDPMPlusPipeline.from_pretrained(ldm_dir)
    assert type(pipe.scheduler) is DDPMPlusScheduler
    for key, value in {**LDM_SCHEDULER, "num_train_timesteps": 1000, "variance_type": "fixed_small"}.items():
        assert pipe.scheduler.config[key] == value, key
    assert type(pipe.vae).__name__ == "VQModel" and pipe.transformer is None
    assert pipe.unet.config.in_channels == 3 and not pipe.conditioning.conditional
    images = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_ldm_folder_gives_ldm_pipelines_images_for_the_same_scheduler_and_noise(ldm_dir):
    ours, theirs = ours_and_theirs(ldm_dir, DDIMScheduler.from_config(DDIMScheduler(**LDM_SCHEDULER).config))
    kwargs = {"batch_size": 2, "num_inference_steps": STEPS, "output_type": "np"}
    expected = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert expected.std() > 0
    other = ours(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert not np.allclose(other, expected)


def test_dit_folder_loads_with_its_classes_null_class_and_learned_sigma(dit_dir):
    pipe = LatentDDPMPlusPipeline.from_pretrained(dit_dir)
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel" and pipe.unet is None
    assert type(pipe.scheduler) is DDPMPlusScheduler
    assert pipe.scheduler.config.variance_type == "learned_range"  # DiT was trained with learned_range σ
    for key, value in {**DIT_SCHEDULER, "num_train_timesteps": 1000}.items():
        assert pipe.scheduler.config[key] == value, key
    c = pipe.conditioning
    assert (c.num_classes, c.null_class_id, c.class_dropout_prob) == (1000, 1000, 0.1)
    assert c.id2label == {"0": "tench, Tinca tinca", "2": "great white shark, white shark", "134": "crane (134)",
                          "517": "crane (517)"}  # fmt: skip
    assert pipe.get_label_ids(["white shark", "tench", "crane (517)"]) == [2, 0, 517]
    images = pipe(
        class_labels=pipe.get_label_ids(["white shark", "tench"]),
        guidance_scale=4.0,
        num_inference_steps=STEPS,
        generator=torch.manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 0
    assert type(FastSampler(pipe, dtype=torch.float32).scheduler) is DDPMPlusScheduler


def test_dit_folder_gives_dit_pipelines_images_with_guidance_for_the_same_ddim_scheduler(dit_dir):
    ours, theirs = ours_and_theirs(dit_dir, DDIMScheduler(**DIT_SCHEDULER))
    kwargs = {"class_labels": [2, 517], "guidance_scale": 4.0, "num_inference_steps": STEPS, "output_type": "np"}
    expected = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    unguided = ours(generator=torch.Generator().manual_seed(0), **{**kwargs, "guidance_scale": 1.0}).images
    assert not np.allclose(unguided, expected)


def test_dit_folder_gives_dit_pipelines_images_for_the_same_ddpm_scheduler(dit_dir):
    # DiTPipeline draws the step noise of DDPMScheduler from the global RNG (it passes no generator to
    # step()); ours draws it from `generator`: with generator=None both draw everything from the global RNG.
    ours, theirs = ours_and_theirs(dit_dir, DDPMScheduler(**DIT_SCHEDULER))
    kwargs = {"class_labels": [2, 0], "guidance_scale": 1.0, "num_inference_steps": STEPS, "output_type": "pt"}
    torch.manual_seed(0)
    expected = theirs(**kwargs).images
    torch.manual_seed(0)
    got = ours(**kwargs).images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_from_diffusers_pipeline_converts_loaded_pipelines_and_refuses_others(dit_dir, ldm_dir):
    dit = DiTPipeline(tiny_dit(), tiny_kl(), DDIMScheduler(**DIT_SCHEDULER), id2label={"1": "goldfish, Carassius"})
    converted = LatentDDPMPlusPipeline.from_diffusers_pipeline(dit)
    assert converted.transformer is dit.transformer and converted.vae is dit.vae  # shared, not copied
    assert converted.conditioning.id2label == {"1": "Carassius, goldfish"}  # rebuilt from DiTPipeline.labels
    assert converted.get_label_ids("goldfish") == [1]
    ddim = DDIMScheduler(clip_sample=False)
    assert LatentDDPMPlusPipeline.from_diffusers_pipeline(dit, scheduler=ddim).scheduler is ddim
    ldm = LDMPipeline.from_pretrained(ldm_dir)
    assert LatentDDPMPlusPipeline.from_diffusers_pipeline(ldm).vae is ldm.vqvae
    with pytest.raises(ValueError, match="`pipe` must be a diffusers LDMPipeline or DiTPipeline; got"):
        LatentDDPMPlusPipeline.from_diffusers_pipeline(LatentDDPMPlusPipeline.from_pretrained(ldm_dir))


def test_scheduler_conversion_keeps_a_learned_variance_type_the_config_names():
    learned = denoiser_config(tiny_dit())
    assert ddpm_plus_scheduler_for(DDIMScheduler().config, learned).config.variance_type == "learned_range"
    config = DDPMScheduler(variance_type="learned").config
    assert ddpm_plus_scheduler_for(config, learned).config.variance_type == "learned"
    fixed = denoiser_config(tiny_unet())
    assert ddpm_plus_scheduler_for(DDIMScheduler().config, fixed).config.variance_type == "fixed_small"


def test_hub_repo_of_an_ldm_pipeline_loads_by_repo_id(hub_server, hf_token, hub_repo_id, ldm_dir):
    LDMPipeline.from_pretrained(ldm_dir).push_to_hub(hub_repo_id, token=hf_token)
    pipe = LatentDDPMPlusPipeline.from_pretrained(hub_repo_id, token=hf_token)
    assert type(pipe.vae).__name__ == "VQModel" and type(pipe.scheduler) is DDPMPlusScheduler
    local = LatentDDPMPlusPipeline.from_pretrained(ldm_dir)
    for a, b in zip(pipe.unet.parameters(), local.unet.parameters(), strict=True):
        assert torch.equal(a, b)
