"""Independent references for the ADM tests: the published flag sets of openai/improved-diffusion and
openai/guided-diffusion (shrunk in width for the CPU, every architecture flag kept), the state-dict layout
(key -> shape) their UNetModel / EncoderUNetModel build from those flags, and their diffusion formulas.

Written from the structure of the original modules, separately from ddpm_plus.models, so that a mistake in
the model is not repeated here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_CLASSES = 1000

# name -> (MODEL_FLAGS, DIFFUSION_FLAGS) as the READMEs publish them
IMPROVED_PUBLISHED = {
    "imagenet64_uncond_hybrid": (
        "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True",
        "--diffusion_steps 4000 --noise_schedule cosine",
    ),
    "cifar10_uncond_hybrid": (
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3",
        "--diffusion_steps 4000 --noise_schedule cosine",
    ),
    "imagenet64_cond_270M": (
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True",
        "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False",
    ),
    "lsun_bedroom_lr1e-4": (
        "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
        "--use_scale_shift_norm False --attention_resolutions 16",
        "--diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
    ),
    "lsun_bedroom_lr2e-5": (
        "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
        "--use_scale_shift_norm False --attention_resolutions 16",
        "--diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
        "--use_scale_shift_norm False",
    ),
    "imagenet64_uncond_vlb": (
        "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True",
        "--diffusion_steps 4000 --noise_schedule cosine --use_kl True",
    ),
    "cifar10_uncond_vlb": (
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3",
        "--diffusion_steps 4000 --noise_schedule cosine --use_kl True",
    ),
    "readme_example_eps": (
        "--image_size 64 --num_channels 128 --num_res_blocks 3",
        "--diffusion_steps 4000 --noise_schedule linear",
    ),
}
GUIDED_PUBLISHED = {
    "64x64_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
    "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True "
    "--use_scale_shift_norm True",
    "128x128_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_diffusion_uncond": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "512x512_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 False --use_scale_shift_norm True",
    "lsun_bedroom": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "lsun_horse_nodropout": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.0 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
}
# classifier_sample.py reads MODEL_FLAGS and CLASSIFIER_FLAGS together; 64x64 adds --classifier_depth 4
GUIDED_CLASSIFIERS = {
    "64x64_classifier": "--image_size 64 --classifier_depth 4",
    "128x128_classifier": "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
    "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
    "--classifier_use_scale_shift_norm True --classifier_scale 1.0 --classifier_use_fp16 True",
    "256x256_classifier": "--image_size 256 --classifier_scale 1.0",
    "512x512_classifier": "--image_size 512 --classifier_scale 4.0",
}


def shrink(flags: str, width: int) -> str:
    """``flags`` with the width flag (--num_channels or --classifier_width) replaced or added."""
    tokens = flags.split()
    name = "--classifier_width" if "classifier" in flags else "--num_channels"
    if name in tokens:
        tokens[tokens.index(name) + 1] = str(width)
    else:
        tokens += [name, str(width)]
    return " ".join(tokens)


def flag_values(text: str) -> dict[str, str]:
    tokens = text.split()
    return dict(zip((t[2:] for t in tokens[::2]), tokens[1::2], strict=True))


def _true(value: str) -> bool:
    return value.lower() in ("true", "1", "yes", "t", "y")


def _res_block(keys: dict, prefix: str, cin: int, cout: int, emb: int, scale_shift: bool) -> None:
    keys[f"{prefix}.in_layers.0.weight"] = keys[f"{prefix}.in_layers.0.bias"] = (cin,)
    keys[f"{prefix}.in_layers.2.weight"], keys[f"{prefix}.in_layers.2.bias"] = (cout, cin, 3, 3), (cout,)
    e = 2 * cout if scale_shift else cout
    keys[f"{prefix}.emb_layers.1.weight"], keys[f"{prefix}.emb_layers.1.bias"] = (e, emb), (e,)
    keys[f"{prefix}.out_layers.0.weight"] = keys[f"{prefix}.out_layers.0.bias"] = (cout,)
    keys[f"{prefix}.out_layers.3.weight"], keys[f"{prefix}.out_layers.3.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        keys[f"{prefix}.skip_connection.weight"], keys[f"{prefix}.skip_connection.bias"] = (cout, cin, 1, 1), (cout,)


def _attention(keys: dict, prefix: str, c: int) -> None:
    keys[f"{prefix}.norm.weight"] = keys[f"{prefix}.norm.bias"] = (c,)
    keys[f"{prefix}.qkv.weight"], keys[f"{prefix}.qkv.bias"] = (3 * c, c, 1), (3 * c,)
    keys[f"{prefix}.proj_out.weight"], keys[f"{prefix}.proj_out.bias"] = (c, c, 1), (c,)


def _encoder(keys: dict, a: dict) -> tuple[list[int], int, int]:
    mc, emb, ss = a["model_channels"], 4 * a["model_channels"], a["scale_shift"]
    ch = int(a["mult"][0] * mc)
    keys["time_embed.0.weight"], keys["time_embed.0.bias"] = (emb, mc), (emb,)
    keys["time_embed.2.weight"], keys["time_embed.2.bias"] = (emb, emb), (emb,)
    keys["input_blocks.0.0.weight"], keys["input_blocks.0.0.bias"] = (ch, 3, 3, 3), (ch,)
    chans, ds, n = [ch], 1, 1
    for level, mult in enumerate(a["mult"]):
        for _ in range(a["depth"]):
            out = int(mult * mc)
            _res_block(keys, f"input_blocks.{n}.0", ch, out, emb, ss)
            ch = out
            if ds in a["attention_ds"]:
                _attention(keys, f"input_blocks.{n}.1", ch)
            chans.append(ch)
            n += 1
        if level != len(a["mult"]) - 1:
            if a["updown"]:
                _res_block(keys, f"input_blocks.{n}.0", ch, ch, emb, ss)
            else:
                keys[f"input_blocks.{n}.0.op.weight"], keys[f"input_blocks.{n}.0.op.bias"] = (ch, ch, 3, 3), (ch,)
            chans.append(ch)
            ds, n = ds * 2, n + 1
    _res_block(keys, "middle_block.0", ch, ch, emb, ss)
    _attention(keys, "middle_block.1", ch)
    _res_block(keys, "middle_block.2", ch, ch, emb, ss)
    return chans, ch, ds


def unet_layout(a: dict) -> dict[str, tuple[int, ...]]:
    """key -> shape of the original UNetModel for the architecture ``a`` (see :func:`architecture`)."""
    keys: dict[str, tuple[int, ...]] = {}
    chans, ch, ds = _encoder(keys, a)
    mc, emb, ss = a["model_channels"], 4 * a["model_channels"], a["scale_shift"]
    if a["classes"]:
        keys["label_emb.weight"] = (a["classes"], emb)
    n = 0
    for level, mult in reversed(list(enumerate(a["mult"]))):
        for i in range(a["depth"] + 1):
            out = int(mult * mc)
            _res_block(keys, f"output_blocks.{n}.0", ch + chans.pop(), out, emb, ss)
            ch, j = out, 1
            if ds in a["attention_ds"]:
                _attention(keys, f"output_blocks.{n}.1", ch)
                j = 2
            if level and i == a["depth"]:
                if a["updown"]:
                    _res_block(keys, f"output_blocks.{n}.{j}", ch, ch, emb, ss)
                else:
                    keys[f"output_blocks.{n}.{j}.conv.weight"] = (ch, ch, 3, 3)
                    keys[f"output_blocks.{n}.{j}.conv.bias"] = (ch,)
                ds //= 2
            n += 1
    keys["out.0.weight"] = keys["out.0.bias"] = (ch,)
    out_ch = 6 if a["learn_sigma"] else 3
    keys["out.2.weight"], keys["out.2.bias"] = (out_ch, int(a["mult"][0] * mc), 3, 3), (out_ch,)
    return keys


def classifier_layout(a: dict) -> dict[str, tuple[int, ...]]:
    """key -> shape of the original EncoderUNetModel with attention pooling."""
    keys: dict[str, tuple[int, ...]] = {}
    _, ch, ds = _encoder(keys, a)
    keys["out.0.weight"] = keys["out.0.bias"] = (ch,)
    side = a["image_size"] // ds
    keys["out.2.positional_embedding"] = (ch, side * side + 1)
    keys["out.2.qkv_proj.weight"], keys["out.2.qkv_proj.bias"] = (3 * ch, ch, 1), (3 * ch,)
    keys["out.2.c_proj.weight"], keys["out.2.c_proj.bias"] = (NUM_CLASSES, ch, 1), (NUM_CLASSES,)
    return keys


MULTS = {
    "improved": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
    "guided": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
}


def architecture(repo: str, flags: str, classifier: bool = False) -> dict:
    """The architecture a flag string builds in ``repo`` ("improved" or "guided"), with its defaults."""
    f = flag_values(flags)
    size = int(f.get("image_size", 64))
    if classifier:
        return dict(
            image_size=size,
            model_channels=int(f.get("classifier_width", 128)),
            mult=MULTS["guided"][size],
            depth=int(f.get("classifier_depth", 2)),
            attention_ds={size // int(r) for r in f.get("classifier_attention_resolutions", "32,16,8").split(",")},
            scale_shift=_true(f.get("classifier_use_scale_shift_norm", "True")),
            updown=_true(f.get("classifier_resblock_updown", "True")),
        )
    return dict(
        image_size=size,
        model_channels=int(f.get("num_channels", 128)),
        mult=MULTS[repo][size],
        depth=int(f.get("num_res_blocks", 2)),
        attention_ds={size // int(r) for r in f.get("attention_resolutions", "16,8").split(",")},
        scale_shift=_true(f.get("use_scale_shift_norm", "True")),
        updown=repo == "guided" and _true(f.get("resblock_updown", "False")),
        classes=NUM_CLASSES if _true(f.get("class_cond", "False")) else 0,
        learn_sigma=_true(f.get("learn_sigma", "False")),
    )


def betas(schedule: str, steps: int) -> np.ndarray:
    """The β table of ``get_named_beta_schedule`` (both repositories)."""
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])


def diffusion_tables(b: np.ndarray) -> dict[str, np.ndarray]:
    """The GaussianDiffusion tables p_mean_variance reads."""
    ac = np.cumprod(1.0 - b)
    prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - prev) / (1.0 - ac)
    return dict(
        alphas_cumprod=ac,
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        log_betas=np.log(b),
        large_log_variance=np.log(np.append(post_var[1], b[1:])),
        coef1=b * np.sqrt(prev) / (1.0 - ac),
        coef2=(1.0 - prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        sqrt_recip=np.sqrt(1.0 / ac),
        sqrt_recipm1=np.sqrt(1.0 / ac - 1),
    )


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """float64 weights for ``shapes`` (key -> shape), drawn key by key in sorted order from one seeded
    generator, scaled so that activations stay O(1); every tensor random (zero-initialised ones included)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        std = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.2
        if "positional_embedding" in key or "label_emb" in key:
            std = 0.5
        out[key] = torch.randn(shape, generator=g, dtype=torch.float64) * std
    return out


# flag sets of the stored original outputs (tests/fixtures/adm_original_outputs.pt)
ORIGINAL_OUTPUT_CASES = {
    "improved_cond_rescaled": (
        "improved-diffusion",
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True --class_cond True --num_heads 2 "
        "--attention_resolutions 16,8 --dropout 0.3",
        "--diffusion_steps 4000 --noise_schedule cosine",
    ),
    "guided_new_order_updown": (
        "guided-diffusion",
        "--image_size 32 --channel_mult 1,2,2 --num_channels 64 --num_head_channels 32 --num_res_blocks 1 "
        "--attention_resolutions 16,8 --resblock_updown True --use_new_attention_order True --class_cond True "
        "--learn_sigma True --use_fp16 True --dropout 0.1",
        "",
    ),
    "guided_legacy_heads_no_scale_shift": (
        "guided-diffusion",
        "--image_size 32 --channel_mult 1,2 --num_channels 64 --num_heads 4 --num_heads_upsample 2 "
        "--num_res_blocks 2 --attention_resolutions 16,32 --resblock_updown True --use_scale_shift_norm False",
        "--diffusion_steps 1000 --noise_schedule linear",
    ),
}
ORIGINAL_CLASSIFIER_CASE = "--image_size 64 --classifier_width 64 --classifier_depth 1"
