"""Command-line flags of training/train.py, ``--config`` files, and early validation.

Flag names follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (with its
``--ddpm_*`` spellings kept as aliases) so users can bring their command lines along.

A ``--config FILE`` (YAML or JSON mapping of flag names to values) is turned into command-line tokens placed
before the real command line: argparse then checks the file's values exactly like typed ones (types, choices),
and flags typed on the command line override the file. ``null`` in the file means "keep the default".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from diffusers.optimization import SchedulerType

from ddpm_plus.losses import LOSS_TYPES
from ddpm_plus.scheduling_ddpm_plus import (  # the scheduler's own lists of allowed values
    BETA_SCHEDULES,
    LEARNED_VARIANCE_TYPES,
    PREDICTION_TYPES,
    VARIANCE_TYPES,
)
DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownsampleBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpsampleBlock2D")

# UNet shape used when neither shape flags nor --model_config_name_or_path are given: the DDPM paper's
# CIFAR-10 network (35.7M parameters at 3 channels).
DEFAULT_UNET = {"block_out_channels": [128, 256, 256, 256], "layers_per_block": 2, "attention_resolutions": [16]}
UNET_SHAPE_FLAGS = ("block_out_channels", "layers_per_block", "attention_resolutions", "down_block_types", "up_block_types")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train an unconditional DDPM (UNet2DModel + DDPMPlusScheduler) with accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bool_flag = {"action": argparse.BooleanOptionalAction}
    p.add_argument("--config", default=None, help="YAML or JSON file of flag values; command-line flags override it.")

    g = p.add_argument_group("data (bundled sklearn digits when no data flag is given)")
    g.add_argument("--dataset_name", default=None, help="Hub dataset name (needs network access).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="Local image folder (datasets 'imagefolder').")
    g.add_argument("--image_column", default="image")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--resolution", type=int, default=32)
    g.add_argument("--channels", type=int, default=None, choices=(1, 3), help="Default: 1 for digits, else 3.")
    g.add_argument("--center_crop", default=False, **bool_flag)
    g.add_argument("--random_flip", default=False, **bool_flag)
    g.add_argument("--skip_bad_images", default=False, **bool_flag, help="Skip and count unreadable images.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = p.add_argument_group("model")
    g.add_argument("--model_config_name_or_path", default=None, help="Local UNet2DModel config (dir or JSON file).")
    g.add_argument("--block_out_channels", type=int, nargs="+", default=None,
                   help=f"Default {DEFAULT_UNET['block_out_channels']}.")
    g.add_argument("--layers_per_block", type=int, default=None, help=f"Default {DEFAULT_UNET['layers_per_block']}.")
    g.add_argument("--attention_resolutions", type=int, nargs="*", default=None,
                   help=f"Feature-map sizes with self-attention (default {DEFAULT_UNET['attention_resolutions']}); "
                   "alternative to --down_block_types/--up_block_types.")
    g.add_argument("--down_block_types", nargs="+", default=None, choices=DOWN_BLOCK_TYPES)
    g.add_argument("--up_block_types", nargs="+", default=None, choices=UP_BLOCK_TYPES)
    g.add_argument("--norm_num_groups", type=int, default=32)
    g.add_argument("--attention_head_dim", type=int, default=None, help="Default: one head per attention layer (DDPM).")
    g.add_argument("--dropout", type=float, default=0.0)

    g = p.add_argument_group("diffusion")
    g.add_argument("--num_train_timesteps", "--ddpm_num_steps", type=int, default=1000)
    g.add_argument("--beta_schedule", "--ddpm_beta_schedule", default="linear", choices=BETA_SCHEDULES)
    g.add_argument("--beta_start", type=float, default=1e-4)
    g.add_argument("--beta_end", type=float, default=0.02)
    g.add_argument("--variance_type", default="fixed_small", choices=VARIANCE_TYPES)
    g.add_argument("--rescale_betas_for_num_timesteps", default=False, **bool_flag,
                   help="Scale linear betas by 1000/T (improved-DDPM convention for T != 1000).")
    g.add_argument("--clip_sample", default=True, **bool_flag)
    g.add_argument("--prediction_type", default="epsilon", choices=PREDICTION_TYPES)
    g.add_argument("--loss", default="simple", choices=LOSS_TYPES)
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (e.g. 5.0).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="ddpm-plus-model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=16, help="Per process.")
    g.add_argument("--num_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="cosine",
                   choices=[s.value for s in SchedulerType if s.value != "piecewise_constant"])  # needs step rules
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Optimizer steps.")
    g.add_argument("--adam_beta1", type=float, default=0.95)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-6)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="Default: accelerate's config / `accelerate launch --mixed_precision`.")
    g.add_argument("--allow_tf32", default=False, **bool_flag, help="TF32 matmuls/convolutions on NVIDIA GPUs.")
    g.add_argument("--channels_last", default=False, **bool_flag, help="UNet in channels-last memory format.")
    g.add_argument("--compile", default=False, **bool_flag,
                   help="torch.compile the training UNet (fixed shapes: no per-step recompiles).")

    g = p.add_argument_group("EMA")
    g.add_argument("--use_ema", default=False, **bool_flag)
    g.add_argument("--ema_decay", type=float, default=None,
                   help="Fixed EMA decay (DDPM: 0.9999); replaces the warmup schedule below.")
    g.add_argument("--ema_max_decay", type=float, default=0.9999)
    g.add_argument("--ema_min_decay", type=float, default=0.0)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)

    g = p.add_argument_group("checkpoints, logging, samples")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory.")
    g.add_argument("--logger", default="tensorboard", choices=("tensorboard", "wandb", "none"))
    g.add_argument("--logging_steps", type=int, default=10, help="Host sync / logging interval (optimizer steps).")
    g.add_argument("--save_images_steps", type=int, default=1000, help="0: only the final grid.")
    g.add_argument("--eval_batch_size", type=int, default=16)
    g.add_argument("--eval_inference_steps", "--ddpm_num_inference_steps", type=int, default=100)

    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", default=False, **bool_flag)
    g.add_argument("--push_checkpoints", default=False, **bool_flag,
                   help="Also push the current pipeline in the background at each checkpoint.")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_private_repo", default=False, **bool_flag)
    g.add_argument("--hub_token", default=None, help="Default: HF_TOKEN or the cached login.")
    return p


def load_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or JSON (.json) mapping of flag names to values."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config: file not found: {path}")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif file.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"--config: {path} must end in .yaml, .yml or .json")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values, got {type(data).__name__}")
    return data


def config_to_argv(parser: argparse.ArgumentParser, config: dict, source: str) -> list[str]:
    """Turn a config mapping into command-line tokens; unknown keys are an error naming them."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(k for k in config if k not in actions or k in ("config", "help"))
    if unknown:
        raise ValueError(f"--config {source}: unknown key(s) {', '.join(unknown)}")
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(actions[key], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {source}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, (dict, bool)):
            raise ValueError(f"--config {source}: {key} must be a {'list or ' if actions[key].nargs else ''}scalar")
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    pre, _ = config_parser.parse_known_args(argv)
    file_argv = []
    if pre.config is not None:
        try:
            file_argv = config_to_argv(parser, load_config_file(pre.config), pre.config)
        except ValueError as e:
            parser.error(str(e))
    args = parser.parse_args(file_argv + list(sys.argv[1:] if argv is None else argv))
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_args(args: argparse.Namespace) -> None:
    """Check every flag before any data is read or model built; fills in derived UNet shape defaults."""
    positive_ints = ("resolution", "train_batch_size", "num_epochs", "gradient_accumulation_steps",
                     "num_train_timesteps", "checkpointing_steps", "logging_steps", "eval_batch_size",
                     "eval_inference_steps", "norm_num_groups")
    for name in positive_ints:
        _check(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        _check(value is None or value >= 1, f"--{name} must be >= 1 (or left unset), got {value}")
    for name in ("lr_warmup_steps", "save_images_steps", "dataloader_num_workers"):
        _check(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    _check(math.isfinite(args.learning_rate) and args.learning_rate > 0,
           f"--learning_rate must be a positive number, got {args.learning_rate}")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(args, name) < 1, f"--{name} must be in [0, 1), got {getattr(args, name)}")
    _check(args.adam_epsilon > 0, f"--adam_epsilon must be > 0, got {args.adam_epsilon}")
    _check(args.adam_weight_decay >= 0, f"--adam_weight_decay must be >= 0, got {args.adam_weight_decay}")
    _check(args.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0 disables clipping), got {args.max_grad_norm}")
    _check(0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}")

    # Diffusion process and objective.
    _check(0 < args.beta_start < args.beta_end < 1,
           f"--beta_start and --beta_end must satisfy 0 < beta_start < beta_end < 1, got {args.beta_start}, {args.beta_end}")
    _check(args.eval_inference_steps <= args.num_train_timesteps,
           f"--eval_inference_steps must be between 1 and --num_train_timesteps ({args.num_train_timesteps}), "
           f"got {args.eval_inference_steps}")
    _check(args.snr_gamma is None or args.snr_gamma > 0, f"--snr_gamma must be > 0, got {args.snr_gamma}")
    learned = args.variance_type in LEARNED_VARIANCE_TYPES
    _check(learned == (args.loss in ("hybrid", "vlb")),
           f"--loss hybrid/vlb train the variance and need --variance_type learned or learned_range, and a learned "
           f"variance needs --loss hybrid or vlb; got --loss {args.loss} with --variance_type {args.variance_type}")
    _check(args.snr_gamma is None or args.loss != "vlb", "--snr_gamma weights L_simple; it has no effect with --loss vlb")
    from ddpm_plus import DDPMPlusScheduler

    try:  # the scheduler's own checks (e.g. rescaled betas out of range) before anything is loaded
        DDPMPlusScheduler(
            num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
            beta_start=args.beta_start, beta_end=args.beta_end, variance_type=args.variance_type,
            prediction_type=args.prediction_type, clip_sample=args.clip_sample,
            rescale_betas_for_num_timesteps=args.rescale_betas_for_num_timesteps,
        )
    except ValueError as e:
        raise ValueError(f"scheduler flags: {e}") from e

    # EMA.
    _check(args.ema_decay is None or 0 <= args.ema_decay < 1, f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    _check(0 <= args.ema_min_decay <= args.ema_max_decay <= 1,
           f"--ema_min_decay and --ema_max_decay must satisfy 0 <= min <= max <= 1, "
           f"got {args.ema_min_decay}, {args.ema_max_decay}")
    _check(args.ema_inv_gamma > 0 and args.ema_power > 0, "--ema_inv_gamma and --ema_power must be > 0")

    # Data.
    _check(not (args.dataset_name and args.train_data_dir),
           "give at most one of --dataset_name and --train_data_dir (neither: the bundled digits)")
    _check(args.train_data_dir is None or Path(args.train_data_dir).is_dir(),
           f"--train_data_dir {args.train_data_dir} is not a directory")
    if args.channels is None:
        args.channels = 1 if (args.dataset_name is None and args.train_data_dir is None) else 3

    # Model.
    if args.model_config_name_or_path is not None:
        given = [f"--{k}" for k in UNET_SHAPE_FLAGS if getattr(args, k) is not None]
        _check(not given, f"--model_config_name_or_path replaces the UNet shape flags; drop {', '.join(given)}")
        _check(Path(args.model_config_name_or_path).exists(),
               f"--model_config_name_or_path {args.model_config_name_or_path} is not a local directory or JSON "
               "file (nothing is downloaded)")
    else:
        _validate_unet_shape(args)

    # Checkpoints and Hub.
    if args.resume_from_checkpoint not in (None, "latest"):
        _check(Path(args.resume_from_checkpoint).is_dir(),
               f"--resume_from_checkpoint must be 'latest' or a checkpoint directory, got {args.resume_from_checkpoint}")
    _check(not args.push_checkpoints or args.push_to_hub, "--push_checkpoints needs --push_to_hub")
    _check(not args.push_to_hub or args.hub_model_id, "--push_to_hub needs --hub_model_id (e.g. your-name/ddpm-digits)")


def _validate_unet_shape(args: argparse.Namespace) -> None:
    """Fill UNet shape defaults and derive block types from --attention_resolutions when not given."""
    if args.block_out_channels is None:
        args.block_out_channels = list(DEFAULT_UNET["block_out_channels"])
    if args.layers_per_block is None:
        args.layers_per_block = DEFAULT_UNET["layers_per_block"]
    n = len(args.block_out_channels)
    _check(args.layers_per_block >= 1, f"--layers_per_block must be >= 1, got {args.layers_per_block}")
    for c in args.block_out_channels:
        _check(c >= 1 and c % args.norm_num_groups == 0,
               f"--block_out_channels entries must be positive multiples of --norm_num_groups "
               f"({args.norm_num_groups}), got {args.block_out_channels}")
    _check(args.attention_head_dim is None or all(c % args.attention_head_dim == 0 for c in args.block_out_channels),
           f"--attention_head_dim {args.attention_head_dim} must divide every --block_out_channels entry")
    _check(args.resolution % 2 ** (n - 1) == 0,
           f"--resolution {args.resolution} must be divisible by 2**(len(--block_out_channels) - 1) = {2 ** (n - 1)}")
    if args.down_block_types is None and args.up_block_types is None:
        attention = DEFAULT_UNET["attention_resolutions"] if args.attention_resolutions is None else args.attention_resolutions
        sizes = [args.resolution // 2**i for i in range(n)]
        bad = [r for r in attention if r not in sizes]
        _check(not bad, f"--attention_resolutions {bad} not among this UNet's feature-map sizes {sizes} "
               f"(--resolution {args.resolution}, {n} blocks)")
        args.attention_resolutions = list(attention)
        args.down_block_types = ["AttnDownBlock2D" if s in attention else "DownBlock2D" for s in sizes]
        args.up_block_types = ["AttnUpBlock2D" if s in attention else "UpBlock2D" for s in reversed(sizes)]
    else:
        _check(args.attention_resolutions is None,
               "give either --attention_resolutions or --down_block_types/--up_block_types, not both")
        _check(args.down_block_types is not None and args.up_block_types is not None,
               "--down_block_types and --up_block_types must be given together")
        _check(len(args.down_block_types) == n and len(args.up_block_types) == n,
               f"--down_block_types and --up_block_types need one entry per --block_out_channels entry ({n}), "
               f"got {len(args.down_block_types)} and {len(args.up_block_types)}")
