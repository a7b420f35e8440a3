"""Pipeline folders saved by main 1eb70aa (before the package was split into subpackages; their
model_index.json names the old module ``ddpm_plus.scheduling_ddpm_plus``) load with a plain
``DiffusionPipeline.from_pretrained`` and sample the images they sampled then."""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import ddpm_plus

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_pipelines_1eb70aa"
CALLS = {
    "unconditional_learned_range": {"batch_size": 2},
    "conditional_v": {"batch_size": 2, "class_labels": ["one", "two"], "guidance_scale": 2.0},
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_folder_saved_by_old_main_loads_and_samples_identically(name):
    pipe = DiffusionPipeline.from_pretrained(FIXTURE / name)
    assert isinstance(pipe, ddpm_plus.DDPMPlusPipeline)
    assert isinstance(pipe.scheduler, ddpm_plus.DDPMPlusScheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(num_inference_steps=10, generator=generator, output_type="pt", **CALLS[name]).images
    expected = load_file(FIXTURE / "expected_images.safetensors")[name]
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_resaved_legacy_folder_names_the_current_modules(tmp_path):
    pipe = DiffusionPipeline.from_pretrained(FIXTURE / "conditional_v")
    pipe.save_pretrained(tmp_path)
    again = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is ddpm_plus.DDPMPlusScheduler
    assert again.config.id2label == pipe.config.id2label
    assert dict(again.scheduler.config) == dict(pipe.scheduler.config)
