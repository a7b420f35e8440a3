"""Model cards of converted improved-diffusion / guided-diffusion checkpoints: the source checkpoint (name and
SHA-256), its repository and MIT licence, the flags it was converted with, the papers, and how to load it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["classifier_card", "pipeline_card"]

PAPERS = {
    "improved-diffusion": (
        "Nichol & Dhariwal 2021, Improved Denoising Diffusion Probabilistic Models",
        "https://arxiv.org/abs/2102.09672",
    ),
    "guided-diffusion": (
        "Dhariwal & Nichol 2021, Diffusion Models Beat GANs on Image Synthesis",
        "https://arxiv.org/abs/2105.05233",
    ),
}


def _front_matter(tags: list[str]) -> str:
    lines = ["---", "license: mit", "library_name: diffusers", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def _source_section(repo: str, checkpoint: str, sha256: str, flags: Mapping[str, str]) -> str:
    title, url = PAPERS[repo]
    flag_lines = "\n".join(f'{name}="{text}"' for name, text in flags.items()) or "(the repository's defaults)"
    return f"""## Source

- Checkpoint: `{checkpoint}` (SHA-256 `{sha256}`) from [openai/{repo}](https://github.com/openai/{repo}).
- Licence: MIT (Copyright (c) 2021 OpenAI), the licence of openai/{repo}; this conversion keeps it. Read the
  original repository's notes on the intended use and limitations of these models before using them.
- Paper: {title}, {url}.
- Converted with `ddpm-plus convert` from these flags:

```
{flag_lines}
```

The weights are the checkpoint's own, unchanged, stored as float32 safetensors.
"""


def _config_table(config: Mapping[str, Any], keys: list[str]) -> str:
    rows = "\n".join(f"| {k} | {config.get(k)} |" for k in keys)
    return f"| setting | value |\n|---|---|\n{rows}\n"


def pipeline_card(
    unet_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any],
    repo: str,
    checkpoint: str,
    sha256: str,
    flags: Mapping[str, str],
) -> str:
    """The README.md of a converted denoiser (a ``DDPMPlusPipeline`` folder)."""
    conditional = unet_config.get("num_class_embeds") is not None
    task = "class-conditional" if conditional else "unconditional"
    tags = ["ddpm_plus", "diffusers", f"{task}-image-generation", repo]
    labels = ", class_labels=[207]" if conditional else ""
    keys = ["num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "variance_type", "prediction_type"]
    keys += ["clip_sample", "timestep_spacing"]
    return (
        _front_matter(tags)
        + f"# {checkpoint} ({repo}), converted for diffusers\n\n"
        + f"A {task} {unet_config['sample_size']}x{unet_config['sample_size']} DDPM: an `ADMUNetModel` and the "
        + "`DDPMPlusScheduler` that reproduces its diffusion, in a `DDPMPlusPipeline`.\n\n"
        + _source_section(repo, checkpoint, sha256, flags)
        + "\n## Usage\n\n```python\nimport ddpm_plus  # registers the classes with diffusers\n"
        + "from diffusers import DiffusionPipeline\n\n"
        + 'pipe = DiffusionPipeline.from_pretrained("PATH_OR_REPO_ID")\n'
        + f"images = pipe(batch_size=4, num_inference_steps=250{labels}).images\n```\n\n"
        + "The original models ran their torso in float16 (`--use_fp16`); on a GPU pass "
        + "`torch_dtype=torch.float16` to `from_pretrained` for the same speed.\n\n"
        + "## Diffusion\n\n"
        + _config_table(scheduler_config, keys)
    )


def classifier_card(
    config: Mapping[str, Any], repo: str, checkpoint: str, sha256: str, flags: Mapping[str, str]
) -> str:
    """The README.md of a converted noisy classifier (an ``ADMClassifierModel`` folder)."""
    tags = ["ddpm_plus", "diffusers", "image-classification", "classifier-guidance", repo]
    keys = ["sample_size", "model_channels", "num_res_blocks", "attention_resolutions", "pool", "num_train_timesteps"]
    return (
        _front_matter(tags)
        + f"# {checkpoint} ({repo}): noisy ImageNet classifier, converted for diffusers\n\n"
        + "The classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, Sec. 4) as an "
        + "`ADMClassifierModel`: `classifier(x_t, t)` returns the 1000 class logits for raw timesteps t.\n\n"
        + _source_section(repo, checkpoint, sha256, flags)
        + "\n## Usage\n\n```python\nfrom ddpm_plus.models.adm_classifier import ADMClassifierModel\n\n"
        + 'classifier = ADMClassifierModel.from_pretrained("PATH_OR_REPO_ID")\n'
        + "logits = classifier(x_t, t)\n```\n\n"
        + _config_table(config, keys)
    )
