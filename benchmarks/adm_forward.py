"""Forward-pass time of ``ADMUNetModel`` (ddpm_plus.models.adm_unet), optionally against the original
``UNetModel`` of openai/guided-diffusion or openai/improved-diffusion with the same weights and input.

    python -m benchmarks.adm_forward                                   # ours only
    python -m benchmarks.adm_forward --original_repo ~/src/guided-diffusion --model guided-64
    python -m benchmarks.adm_forward --original_repo ~/src/improved-diffusion --model improved-cifar10

``--original_repo`` is a checkout of one of those repositories (nothing of it is vendored here): its package
(``guided_diffusion`` or ``improved_diffusion``) is imported from there, the model is built with its own
``script_util``, every parameter is randomised, and the state dict is converted with
``ddpm_plus.conversion.adm``. Both run in float32 (the original's ``--use_fp16`` torso is switched off so
both do the same arithmetic); the figures are medians of interleaved rounds (benchmarks/timing.py) and the
ratio is original / ours (> 1: ours is faster). The widths are reduced from the published ones by
``--width`` so that a CPU run takes seconds.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
from pathlib import Path

import torch

from ddpm_plus.conversion.adm import convert_unet
from ddpm_plus.conversion.adm_flags import parse_flags, unet_config
from ddpm_plus.models.adm_unet import ADMUNetModel

try:
    from .timing import interleaved
except ImportError:  # run as a file: python benchmarks/adm_forward.py
    from timing import interleaved

# name -> (repository, MODEL_FLAGS, DIFFUSION_FLAGS) as published; --num_channels is replaced by --width
MODELS = {
    "guided-64": (
        "guided-diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
        "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
        "",
    ),
    "guided-256": (
        "guided-diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True",
        "",
    ),
    "improved-cifar10": (
        "improved-diffusion",
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3",
        "--diffusion_steps 4000 --noise_schedule cosine",
    ),
}


def with_width(flags: str, width: int) -> str:
    tokens = shlex.split(flags)
    tokens[tokens.index("--num_channels") + 1] = str(width)
    return " ".join(tokens)


def import_original(repo_dir: Path, package: str):
    """``package``'s script_util from a checkout at ``repo_dir``, imported from that folder directly (the import path is left as it is)."""
    init = repo_dir / package / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"error: {repo_dir} has no {package}/__init__.py")
    spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.script_util")


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (the zero-initialised output convolutions included), O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 25
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def original_model(repo_dir: Path, repo: str, model_flags: str, diffusion_flags: str):
    su = import_original(repo_dir, repo.replace("-", "_"))
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, su.model_and_diffusion_defaults())
    args = vars(parser.parse_args(shlex.split(f"{model_flags} {diffusion_flags}")))
    model, _ = su.create_model_and_diffusion(**args)
    if "dtype" in model.__dict__:  # guided-diffusion: run the torso in float32 like ours
        model.dtype = torch.float32
    return model, args["rescale_timesteps"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original_repo", type=Path, default=None, help="checkout of guided- or improved-diffusion")
    parser.add_argument("--model", choices=sorted(MODELS), default="guided-64")
    parser.add_argument("--width", type=int, default=64, help="--num_channels (published: 128-256)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both models, same precision: float32)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repo, model_flags, diffusion_flags = MODELS[args.model]
    model_flags = with_width(model_flags, args.width)
    flags = parse_flags(repo, model_flags, diffusion_flags)
    g = torch.Generator().manual_seed(1)
    size, steps = flags["image_size"], flags["diffusion_steps"]
    device = torch.device(args.device)
    x = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    t = torch.randint(0, steps, (args.batch_size,), generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device) if flags["class_cond"] else None
    cases = {}
    if args.original_repo is None:
        ours = ADMUNetModel(**unet_config(repo, flags)).eval()
        randomise(ours)
        ours.to(device)
    else:
        original, rescale = original_model(args.original_repo.expanduser(), repo, model_flags, diffusion_flags)
        randomise(original)
        original.eval()
        ours = convert_unet(repo, original.state_dict(), model_flags, diffusion_flags).unet.eval().to(device)
        original.to(device)
        t_original = t.float() * (1000.0 / steps) if rescale else t
        kwargs = {"y": y} if y is not None else {}
        with torch.no_grad():
            a, b = original(x, t_original, **kwargs), ours(x, t, class_labels=y).sample
        err = ((a - b).abs().max() / a.abs().max()).item()
        print(f"max |original - ours| / max |original| = {err:.2e} (float32)")
        cases["original"] = lambda: original(x, t_original, **kwargs)
    cases["ours"] = lambda: ours(x, t, class_labels=y)
    with torch.no_grad():
        samples = interleaved(cases, rounds=args.rounds, device=device)
    medians = {name: sorted(s)[len(s) // 2] for name, s in samples.items()}
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(
        f"{args.model} width {args.width} ({params:.1f}M params), batch {args.batch_size}, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, seconds in medians.items():
        print(f"  {name:9s} {seconds * 1e3:9.1f} ms / forward")
    if "original" in medians:
        print(f"  ratio original / ours: {medians['original'] / medians['ours']:.2f}")


if __name__ == "__main__":
    main()
