"""Convert openai/improved-diffusion (Nichol & Dhariwal 2021) and openai/guided-diffusion (Dhariwal & Nichol
2021) checkpoints to diffusers folders:

    ddpm-plus convert guided-diffusion 256x256_diffusion.pt --model_flags "$MODEL_FLAGS" --output_dir DIR
    ddpm-plus convert improved-diffusion cifar10_uncond_50M_500K.pt --model_flags "$MODEL_FLAGS" \\
        --diffusion_flags "$DIFFUSION_FLAGS" --output_dir DIR
    ddpm-plus convert guided-diffusion-classifier 256x256_classifier.pt --classifier_flags "$CLASSIFIER_FLAGS" \\
        --output_dir DIR

with the MODEL_FLAGS / DIFFUSION_FLAGS / CLASSIFIER_FLAGS lines of those repositories' READMEs. A denoiser
becomes a ``DDPMPlusPipeline`` folder (``ADMUNetModel`` + the ``DDPMPlusScheduler`` of that diffusion), a
classifier an ``ADMClassifierModel`` folder; both get a model card naming the source checkpoint and its MIT
licence. The checkpoint is read with ``torch.load(weights_only=True)``; its keys are the model's own (the
model mirrors the original module tree), and every key must be used exactly once with the shape the flags
imply: a missing or unexpected key or a wrong shape is a :class:`ConversionError` naming the key and the
flags that decide it. ``--use_fp16`` only says how the original ran (float16 torso): the weights are stored
in float32.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..cache import file_sha256
from ..models.adm_classifier import ADMClassifierModel
from ..models.adm_unet import ADMUNetModel
from ..pipelines.pipeline_ddpm_plus import DDPMPlusPipeline
from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler
from .adm_card import classifier_card, pipeline_card
from .adm_flags import GUIDED, IMPROVED, FlagError, classifier_config, parse_flags, scheduler_config, unet_config

__all__ = [
    "CLASSIFIER",
    "ConversionError",
    "add_convert_parser",
    "check_state_dict",
    "convert_classifier",
    "convert_command",
    "convert_unet",
    "load_checkpoint",
]

CLASSIFIER = "guided-diffusion-classifier"
# state-dict key pattern -> the flags that decide whether it exists and its shape
_KEY_FLAGS = [
    (r"^label_emb\.", "--class_cond"),
    (r"^out\.2\.(positional_embedding|qkv_proj|c_proj)", "--image_size, --classifier_pool, --classifier_width"),
    (r"^out\.", "--learn_sigma, --num_channels (classifier: --classifier_pool)"),
    (r"\.(norm|qkv|proj_out)\.", "--attention_resolutions (classifier: --classifier_attention_resolutions)"),
    (r"emb_layers\.", "--use_scale_shift_norm"),
    (r"\.(op|conv)\.|\.0\.in_layers", "--resblock_updown"),
    (r"^time_embed\.|^input_blocks\.0\.", "--num_channels (classifier: --classifier_width)"),
    (r"^(input|output)_blocks\.", "--num_res_blocks, --image_size, --channel_mult (classifier: --classifier_depth)"),
]


class ConversionError(ValueError):
    """A checkpoint that does not match its flags, or is not a state dict."""


def _flags_for(key: str) -> str:
    return next((flags for pattern, flags in _KEY_FLAGS if re.search(pattern, key)), "the model flags")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read with ``torch.load(weights_only=True)`` onto the CPU."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"no checkpoint at {path}.") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{path} cannot be read with torch.load(weights_only=True): {first}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} is not a state dict (a mapping of names to tensors).")
    return dict(state)


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` checked against ``model``'s own keys and shapes: every key used exactly once; returned as
    float32 tensors ready for ``load_state_dict``. Problems are one :class:`ConversionError` that lists each
    key and the flags that decide it."""
    expected = model.state_dict()
    problems = [f"unexpected key {k!r} ({_flags_for(k)})" for k in state if k not in expected]
    problems += [f"missing key {k!r} ({_flags_for(k)})" for k in expected if k not in state]
    problems += [
        f"key {k!r} has shape {tuple(v.shape)}, the flags give {tuple(expected[k].shape)} ({_flags_for(k)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ConversionError("the checkpoint does not match the flags:\n  " + "\n  ".join(problems[:12]) + more)
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise ConversionError(f"key {bad[0]!r} holds {state[bad[0]].dtype} values; expected floating point weights.")
    return {k: v.detach().to(torch.float32) for k, v in state.items()}


def _loaded(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(check_state_dict(state, model), strict=True)
    return model.eval()


def convert_unet(
    repo: str, state: Mapping[str, torch.Tensor], model_flags: str | None, diffusion_flags: str | None = None
) -> DDPMPlusPipeline:
    """A ``DDPMPlusPipeline`` (``ADMUNetModel`` with ``state``, the scheduler of the diffusion flags) from an
    improved-diffusion or guided-diffusion denoiser state dict and its flag strings."""
    if repo not in (GUIDED, IMPROVED):
        raise ValueError(f"`repo` must be {GUIDED!r} or {IMPROVED!r}; got {repo!r}.")
    flags = parse_flags(repo, model_flags, diffusion_flags)
    unet = _loaded(ADMUNetModel(**unet_config(repo, flags)), state)
    scheduler = DDPMPlusScheduler(**scheduler_config(flags))
    return DDPMPlusPipeline(unet=unet, scheduler=scheduler)


def convert_classifier(state: Mapping[str, torch.Tensor], *flag_texts: str | None) -> ADMClassifierModel:
    """An ``ADMClassifierModel`` with ``state`` from guided-diffusion's classifier flag strings (CLASSIFIER_FLAGS;
    MODEL_FLAGS and DIFFUSION_FLAGS may be given too, as ``classifier_sample.py`` reads them all)."""
    flags = parse_flags(GUIDED, *flag_texts, classifier=True)
    scheduler_config(flags)  # the diffusion flags must make sense too
    return _loaded(ADMClassifierModel(**classifier_config(flags)), state)


def _source(args) -> dict[str, Any]:
    path = Path(args.checkpoint)
    flags = {
        "MODEL_FLAGS": getattr(args, "model_flags", None),
        "DIFFUSION_FLAGS": getattr(args, "diffusion_flags", None),
        "CLASSIFIER_FLAGS": getattr(args, "classifier_flags", None),
    }
    return dict(
        repo=GUIDED if args.source == CLASSIFIER else args.source,
        checkpoint=path.name,
        sha256=file_sha256(path),
        flags={k: v for k, v in flags.items() if v},
    )


def convert_command(args) -> int:
    """``ddpm-plus convert ...``: convert, save (safetensors) and write the model card; 0 on success."""
    try:
        state = load_checkpoint(args.checkpoint)
        out = Path(args.output_dir)
        source = _source(args)
        if args.source == CLASSIFIER:
            model = convert_classifier(state, args.model_flags, args.diffusion_flags, args.classifier_flags)
            model.save_pretrained(out, safe_serialization=True)
            card = classifier_card(model.config, **source)
        else:
            pipe = convert_unet(args.source, state, args.model_flags, args.diffusion_flags)
            pipe.save_pretrained(out, safe_serialization=True)
            card = pipeline_card(pipe.unet.config, pipe.scheduler.config, **source)
    except (ConversionError, FlagError) as err:
        raise SystemExit(f"error: {err}") from None
    (out / "README.md").write_text(card, encoding="utf-8")
    print(f"wrote {out} ({source['checkpoint']}, {source['repo']})")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``convert {guided-diffusion, improved-diffusion, guided-diffusion-classifier}`` to a
    ``ddpm-plus`` subparsers object; the parsed ``args`` go to :func:`convert_command`."""
    convert = subparsers.add_parser(
        "convert",
        help="convert an openai/improved-diffusion or openai/guided-diffusion checkpoint to a diffusers folder",
        description=__doc__.split("\n\n", 1)[0],
    )
    sources = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")
    helps = {
        GUIDED: "an ADM denoiser (guided-diffusion) -> DDPMPlusPipeline folder",
        IMPROVED: "an improved DDPM denoiser (improved-diffusion) -> DDPMPlusPipeline folder",
        CLASSIFIER: "a guided-diffusion noisy classifier -> ADMClassifierModel folder",
    }
    for name, text in helps.items():
        p = sources.add_parser(name, help=text, description=text)
        p.add_argument("checkpoint", metavar="CHECKPOINT.pt")
        p.add_argument("--output_dir", required=True, help="the folder to write (save_pretrained layout)")
        p.add_argument("--model_flags", default="", help='the README\'s MODEL_FLAGS line, e.g. "--image_size 64 ..."')
        p.add_argument("--diffusion_flags", default="", help="the README's DIFFUSION_FLAGS line (if any)")
        if name == CLASSIFIER:
            p.add_argument("--classifier_flags", default="", help="the README's CLASSIFIER_FLAGS line")
    return convert
