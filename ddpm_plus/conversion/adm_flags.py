"""The command-line flags of openai/improved-diffusion and openai/guided-diffusion, read as those repositories'
scripts read them, and what they mean for ``ADMUNetModel``, ``ADMClassifierModel`` and ``DDPMPlusScheduler``.

The defaults are each repository's own ``script_util.py`` defaults, and they differ: improved DDPM
(Nichol & Dhariwal 2021) rescales timesteps to t·1000/T by default and has ``--sigma_small``; guided-diffusion
(Dhariwal & Nichol 2021) does not rescale, and adds ``--num_head_channels``, ``--resblock_updown``,
``--use_new_attention_order``, ``--channel_mult``, ``--use_fp16`` and the classifier flags. As in the
original scripts the MODEL_FLAGS and DIFFUSION_FLAGS strings are one flag set (a model flag may stand in
DIFFUSION_FLAGS, as in one of improved-diffusion's published LSUN lines); a flag given twice with different
values is an error. Flags of the sampling and training scripts (``--batch_size``, ``--classifier_scale``,
``--timestep_respacing`` ...) are accepted and do not change the converted model.
"""

from __future__ import annotations

import shlex
from typing import Any

__all__ = [
    "GUIDED",
    "IMPROVED",
    "NUM_CLASSES",
    "FlagError",
    "classifier_config",
    "parse_flags",
    "scheduler_config",
    "unet_config",
]

GUIDED, IMPROVED = "guided-diffusion", "improved-diffusion"
NUM_CLASSES = 1000  # ImageNet, fixed in both repositories

_DIFFUSION_COMMON = dict(
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
)
_MODEL_COMMON = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
)
DEFAULTS: dict[str, dict[str, Any]] = {
    IMPROVED: {
        **_MODEL_COMMON,
        **_DIFFUSION_COMMON,
        "sigma_small": False,
        "rescale_timesteps": True,
        "rescale_learned_sigmas": True,
    },
    GUIDED: {
        **_MODEL_COMMON,
        **_DIFFUSION_COMMON,
        "num_head_channels": -1,
        "channel_mult": "",
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
    },
}
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)
# flags of the sampling/training scripts: accepted, no effect on the conversion
SCRIPT_FLAGS: dict[str, Any] = dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,
)
# channel multipliers by image size when --channel_mult is not given
CHANNEL_MULT = {
    IMPROVED: {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
    GUIDED: {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
}
CLASSIFIER_HEAD_CHANNELS = 64


class FlagError(ValueError):
    """A flag string that the original scripts would not accept, or that this conversion cannot honour."""


def _bool(name: str, text: str) -> bool:
    low = text.lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise FlagError(f"--{name}: boolean value expected (True/False); got {text!r}.")


def _typed(name: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        return _bool(name, text)
    kind = type(default)
    try:
        return kind(text)
    except ValueError:
        raise FlagError(f"--{name}: {kind.__name__} value expected; got {text!r}.") from None


def _pairs(text: str):
    tokens = shlex.split(text or "")
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise FlagError(f"expected a flag such as --image_size, got {token!r} in {text!r}.")
        if "=" in token:
            name, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise FlagError(f"--{token[2:]}: a value is missing.")
            name, value = token[2:], tokens[i + 1]
            i += 2
        yield name, value


def parse_flags(repo: str, *texts: str | None, classifier: bool = False) -> dict[str, Any]:
    """The flag values of ``texts`` (MODEL_FLAGS, DIFFUSION_FLAGS, CLASSIFIER_FLAGS ... strings, read as one
    set) over ``repo``'s defaults; with ``classifier``, guided-diffusion's classifier flags too. Unknown flags,
    malformed values and a flag given twice with different values are :class:`FlagError`."""
    defaults = {**DEFAULTS[repo], **(CLASSIFIER_DEFAULTS if classifier else {}), **SCRIPT_FLAGS}
    values, given = dict(defaults), {}
    for text in texts:
        for name, raw in _pairs(text or ""):
            if name not in defaults:
                raise FlagError(f"--{name} is not a flag of {repo}'s scripts (known: {', '.join(sorted(defaults))}).")
            value = _typed(name, raw, defaults[name])
            if name in given and given[name] != value:
                raise FlagError(f"--{name} is given twice, as {given[name]!r} and {value!r}.")
            given[name] = values[name] = value
    return values


def _resolutions(name: str, text: str, image_size: int) -> list[int]:
    try:
        sizes = [int(r) for r in text.split(",")]
    except ValueError:
        raise FlagError(f"--{name} must be comma-separated feature-map sizes such as 32,16,8; got {text!r}.") from None
    if any(s < 1 for s in sizes):
        raise FlagError(f"--{name} {text}: every size must be positive.")
    return sizes


def _channel_mult(repo: str, flags: dict[str, Any], classifier: bool = False) -> list[float]:
    text = "" if classifier else flags.get("channel_mult", "")
    if text:
        try:
            return [int(m) for m in text.split(",")]
        except ValueError:
            raise FlagError(f"--channel_mult must be comma-separated integers; got {text!r}.") from None
    size = flags["image_size"]
    table = CHANNEL_MULT[GUIDED if classifier else repo]
    if size not in table:
        raise FlagError(f"--image_size {size} is not supported by {repo} (sizes: {sorted(table)}).")
    return list(table[size])


def _heads(value: int) -> int | None:
    return None if value == -1 else value


def unet_config(repo: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The ``ADMUNetModel`` config of a parsed flag set (``create_model`` of ``repo``'s script_util.py)."""
    size = flags["image_size"]
    guided = repo == GUIDED
    return dict(
        sample_size=size,
        in_channels=3,
        out_channels=6 if flags["learn_sigma"] else 3,
        model_channels=flags["num_channels"],
        channel_mult=_channel_mult(repo, flags),
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=_resolutions("attention_resolutions", flags["attention_resolutions"], size),
        num_heads=flags["num_heads"],
        num_head_channels=_heads(flags["num_head_channels"]) if guided else None,
        num_heads_upsample=_heads(flags["num_heads_upsample"]),
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"] if guided else False,
        use_new_attention_order=flags["use_new_attention_order"] if guided else False,
        conv_resample=True,
        dropout=flags["dropout"],
        num_class_embeds=NUM_CLASSES if flags["class_cond"] else None,
        learn_sigma=flags["learn_sigma"],
        rescale_timesteps=flags["rescale_timesteps"],
        num_train_timesteps=flags["diffusion_steps"],
    )


def classifier_config(flags: dict[str, Any]) -> dict[str, Any]:
    """The ``ADMClassifierModel`` config of guided-diffusion's classifier flags (``create_classifier``)."""
    size = flags["image_size"]
    return dict(
        sample_size=size,
        in_channels=3,
        out_channels=NUM_CLASSES,
        model_channels=flags["classifier_width"],
        channel_mult=_channel_mult(GUIDED, flags, classifier=True),
        num_res_blocks=flags["classifier_depth"],
        attention_resolutions=_resolutions(
            "classifier_attention_resolutions", flags["classifier_attention_resolutions"], size
        ),
        num_heads=1,
        num_head_channels=CLASSIFIER_HEAD_CHANNELS,
        use_scale_shift_norm=flags["classifier_use_scale_shift_norm"],
        resblock_updown=flags["classifier_resblock_updown"],
        use_new_attention_order=False,
        conv_resample=True,
        dropout=0.0,
        pool=flags["classifier_pool"],
        rescale_timesteps=flags["rescale_timesteps"],
        num_train_timesteps=flags["diffusion_steps"],
    )


def scheduler_config(flags: dict[str, Any]) -> dict[str, Any]:
    """The ``DDPMPlusScheduler`` config of the diffusion flags (``create_gaussian_diffusion``): the same β
    table (linear: β from 0.1/T to 20/T; cosine: Nichol & Dhariwal 2021 eq. 17, β ≤ 0.999), learned range
    variances for ``--learn_sigma``, x_0 prediction for ``--predict_xstart``, x̂_0 clipped to [-1, 1] as their
    samplers do. ``--timestep_respacing ddimN`` samples on "leading" steps, N on "linspace" ones (their
    spacing); the step count itself is ``num_inference_steps`` of each call."""
    steps, schedule = flags["diffusion_steps"], flags["noise_schedule"]
    if steps < 2:
        raise FlagError(f"--diffusion_steps must be at least 2; got {steps}.")
    config: dict[str, Any] = dict(num_train_timesteps=steps)
    if schedule == "linear":
        scale = 1000 / steps
        config.update(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02)
    elif schedule == "cosine":
        config.update(beta_schedule="squaredcos_cap_v2")
    else:
        raise FlagError(f"--noise_schedule must be linear or cosine; got {schedule!r}.")
    if flags["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if flags.get("sigma_small") else "fixed_large"
    respacing = flags["timestep_respacing"]
    config.update(
        variance_type=variance,
        prediction_type="sample" if flags["predict_xstart"] else "epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="leading" if respacing.startswith("ddim") else "linspace",
    )
    return config
