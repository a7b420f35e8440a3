"""Command-line flags of the trainer (``ddpm_plus.train``), ``--config`` presets and files, and early validation.

Flag names follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (with its
``--ddpm_*`` spellings kept as aliases) so users can bring their command lines along. The defaults are the
``digits`` preset: without ``--config`` the trainer trains the bundled digits at 8x8 with a 1.6M-parameter UNet.

``--config`` takes a preset name (``digits``, ``digits_cond``, ``ddpm_cifar10``, ``iddpm_cifar10``: the YAML files
shipped as ``ddpm_plus.presets``, from training/configs/ in the repository) or a YAML/JSON file path. The mapping of flag
names to values is turned into command-line tokens placed before the real command line: argparse then checks
the file's values exactly like typed ones, and flags typed on the command line override the file. ``null`` in
the file means "keep the default".

Each value is checked in one place: the scheduler's flags by constructing ``DDPMPlusScheduler`` (its
``ValueError`` becomes an argparse error naming the flag), the trainer's own flags here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from importlib import resources
from pathlib import Path

from diffusers.optimization import SchedulerType

from ..data import DatasetSource
from ..schedulers.scheduling_ddpm_plus import (  # the scheduler's own lists of allowed values
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    DDPMPlusScheduler,
    SchedulerConfigError,
)
from .latents import add_latent_arguments, check_latent_flags, denoiser_shape
from .loss_types import LOSS_TYPES, check_loss_variance
from .periodic_evaluation import add_eval_arguments, check_eval_arguments
from .streaming import add_streaming_arguments, check_streaming_flags

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownsampleBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpsampleBlock2D")

# UNet shape used when neither shape flags nor --model_config_name_or_path are given: the digits preset's
# 1.6M-parameter UNet (the CIFAR-10 presets give the DDPM paper's 35.7M network explicitly).
MODEL_TYPES = ("unet2d", "adm")  # diffusers' UNet2DModel, or ddpm_plus.ADMUNetModel (improved DDPM / ADM)
ADM_GROUPS = 32  # ADMUNetModel normalises with GroupNorm(32, channels), as improved-/guided-diffusion
DEFAULT_UNET = {"block_out_channels": [32, 64, 64], "layers_per_block": 2, "attention_resolutions": [4]}
UNET_SHAPE_FLAGS = (
    "block_out_channels",
    "layers_per_block",
    "attention_resolutions",
    "down_block_types",
    "up_block_types",
)
# Flags passed to DDPMPlusScheduler under the same names (validated by constructing it).
SCHEDULER_FLAGS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "variance_type",
    "prediction_type",
    "clip_sample",
    "rescale_betas_for_num_timesteps",
)
DEFAULT_MAX_TRAIN_STEPS = 1500  # the digits preset's
PRESETS_PACKAGE = "ddpm_plus.presets"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _presets_dir():
    try:
        return resources.files(PRESETS_PACKAGE)
    except ModuleNotFoundError:
        # A source checkout used without installing (e.g. PYTHONPATH=.): the YAML files sit in training/configs.
        return Path(__file__).resolve().parent.parent / "training" / "configs"


def preset_names() -> list[str]:
    """Names that ``--config`` accepts besides file paths (the packaged YAML presets)."""
    return sorted(Path(f.name).stem for f in _presets_dir().iterdir() if f.name.endswith(".yaml"))


def resolve_config(value: str):
    """A ``--config`` value: an existing file path, else a preset name (with or without ``.yaml``)."""
    if Path(value).is_file():
        return Path(value)
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    if "/" not in name and name in preset_names():
        return _presets_dir().joinpath(f"{name}.yaml")
    raise ValueError(f"--config: {value} is neither a file nor a preset (presets: {', '.join(preset_names())})")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train an unconditional or class-conditional DDPM (UNet2DModel + DDPMPlusScheduler) "
        "with accelerate. "
        "The defaults are the digits preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"A preset ({', '.join(preset_names())}) or a YAML/JSON file of flag values; "
        "command-line flags override it.",
    )
    _add_data_flags(p)
    add_latent_arguments(p)
    _add_conditioning_flags(p)
    _add_model_flags(p)
    _add_diffusion_flags(p)
    _add_optimisation_flags(p)
    _add_ema_flags(p)
    _add_outputs_flags(p)
    add_eval_arguments(p)
    _add_hub_flags(p)
    return p


BOOL_FLAG = {"action": argparse.BooleanOptionalAction}


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data (bundled sklearn digits when no data flag is given)")
    g.add_argument("--dataset_name", default=None, help="Hub dataset name (needs network access).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="Local image folder (datasets 'imagefolder').")
    g.add_argument("--image_column", default="image")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--resolution", type=int, default=8)
    g.add_argument("--channels", type=int, default=None, choices=(1, 3), help="Default: 1 for digits, else 3.")
    g.add_argument("--center_crop", default=False, **BOOL_FLAG)
    g.add_argument("--random_flip", default=False, **BOOL_FLAG)
    g.add_argument("--skip_bad_images", default=False, **BOOL_FLAG, help="Skip and count unreadable images.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    add_streaming_arguments(g)


def _add_conditioning_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("class conditioning and classifier-free guidance (Ho & Salimans 2022)")
    g.add_argument(
        "--class_conditional",
        default=False,
        **BOOL_FLAG,
        help="Train on the labels of --label_column: the UNet gets num_classes + 1 class embeddings, the last "
        "(id num_classes) being the null class of classifier-free guidance.",
    )
    g.add_argument(
        "--label_column",
        default="label",
        help="Integer or ClassLabel column (digits: 'label'; imagefolder: one sub-folder per class gives 'label').",
    )
    g.add_argument(
        "--class_dropout_prob",
        type=float,
        default=0.1,
        help="Share of labels replaced by the null class in training; 0 trains a purely conditional model "
        "(no guidance at sampling).",
    )
    g.add_argument(
        "--eval_guidance_scale", type=float, default=1.0, help="Guidance scale of the sample grids (1: none)."
    )


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model_config_name_or_path", default=None, help="Local UNet2DModel config (dir or JSON file).")
    g.add_argument(
        "--block_out_channels", type=int, nargs="+", default=None, help=f"Default {DEFAULT_UNET['block_out_channels']}."
    )
    g.add_argument("--layers_per_block", type=int, default=None, help=f"Default {DEFAULT_UNET['layers_per_block']}.")
    g.add_argument(
        "--attention_resolutions",
        type=int,
        nargs="*",
        default=None,
        help=f"Feature-map sizes with self-attention (default {DEFAULT_UNET['attention_resolutions']}); "
        "alternative to --down_block_types/--up_block_types.",
    )
    g.add_argument("--down_block_types", nargs="+", default=None, choices=DOWN_BLOCK_TYPES)
    g.add_argument("--up_block_types", nargs="+", default=None, choices=UP_BLOCK_TYPES)
    g.add_argument("--norm_num_groups", type=int, default=8)
    g.add_argument("--attention_head_dim", type=int, default=None, help="Default: one head per attention layer (DDPM).")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument(
        "--model_type",
        default="unet2d",
        choices=MODEL_TYPES,
        help="unet2d: diffusers' UNet2DModel; adm: the improved-DDPM/ADM UNet (ddpm_plus.ADMUNetModel), with "
        "--block_out_channels as model_channels x channel_mult, --layers_per_block as num_res_blocks, "
        "--attention_resolutions as its attention sizes and --attention_head_dim as num_head_channels.",
    )
    g.add_argument(
        "--num_heads", type=int, default=4, help="adm: heads per attention layer without --attention_head_dim."
    )
    g.add_argument("--use_scale_shift_norm", default=True, **BOOL_FLAG, help="adm: AdaGN conditioning (ADM).")
    g.add_argument("--resblock_updown", default=False, **BOOL_FLAG, help="adm: residual blocks resample (ADM).")
    g.add_argument("--use_new_attention_order", default=False, **BOOL_FLAG, help="adm: split q, k, v before heads.")
    g.add_argument(
        "--rescale_timesteps", default=False, **BOOL_FLAG, help="adm: the network sees t*1000/T (improved DDPM)."
    )


def _validate_model(args: argparse.Namespace) -> None:
    """The denoiser flags: a local UNet2DModel config replaces the shape flags; else the shape is checked."""
    _check_model_type(args)
    if args.model_config_name_or_path is not None:
        given = [f"--{k}" for k in UNET_SHAPE_FLAGS if getattr(args, k) is not None]
        _check(not given, f"--model_config_name_or_path replaces the UNet shape flags; drop {', '.join(given)}")
        _check(
            Path(args.model_config_name_or_path).exists(),
            f"--model_config_name_or_path {args.model_config_name_or_path} is not a local directory or JSON "
            "file (nothing is downloaded)",
        )
    else:
        _validate_unet_shape(args)


def _check_model_type(args: argparse.Namespace) -> None:
    """--model_type adm: no UNet2DModel-only flags; channels that ADM's GroupNorm(32) can normalise."""
    if args.model_type != "adm":
        return
    unet2d_only = [f for f in ("model_config_name_or_path", "down_block_types", "up_block_types") if getattr(args, f)]
    _check(not unet2d_only, f"--model_type adm builds its own UNet; drop {', '.join('--' + f for f in unet2d_only)}")
    _check(
        all(c % ADM_GROUPS == 0 for c in args.block_out_channels or DEFAULT_UNET["block_out_channels"]),
        f"--model_type adm: --block_out_channels entries must be multiples of {ADM_GROUPS} (ADM's GroupNorm)",
    )


def _add_diffusion_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("diffusion")
    g.add_argument("--num_train_timesteps", "--ddpm_num_steps", type=int, default=1000)
    g.add_argument(
        "--beta_schedule", "--ddpm_beta_schedule", default="linear", help=f"One of {', '.join(BETA_SCHEDULES)}."
    )
    g.add_argument("--beta_start", type=float, default=1e-4)
    g.add_argument("--beta_end", type=float, default=0.02)
    g.add_argument("--variance_type", default="fixed_small", help=f"One of {', '.join(VARIANCE_TYPES)}.")
    g.add_argument(
        "--rescale_betas_for_num_timesteps",
        default=False,
        **BOOL_FLAG,
        help="Scale linear betas by 1000/T (improved-DDPM convention for T != 1000).",
    )
    g.add_argument(
        "--clip_sample", default=None, **BOOL_FLAG, help="Default: on; off with --vae (latents are not in [-1, 1])."
    )
    g.add_argument("--prediction_type", default="epsilon", help=f"One of {', '.join(PREDICTION_TYPES)}.")
    g.add_argument("--loss", default="simple", choices=LOSS_TYPES)
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (e.g. 5.0).")


def _add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--output_dir", default="ddpm-digits")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=64, help="Per process.")
    g.add_argument(
        "--num_epochs",
        type=int,
        default=None,
        help=f"Default: --max_train_steps {DEFAULT_MAX_TRAIN_STEPS} when neither is given.",
    )
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=2e-3)
    g.add_argument(
        "--lr_scheduler", default="cosine", choices=[s.value for s in SchedulerType if s.value != "piecewise_constant"]
    )  # needs step rules
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="Optimizer steps.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    g.add_argument(
        "--mixed_precision",
        default=None,
        choices=("no", "fp16", "bf16"),
        help="Default: accelerate's config / `accelerate launch --mixed_precision`.",
    )
    g.add_argument("--allow_tf32", default=False, **BOOL_FLAG, help="TF32 matmuls/convolutions on NVIDIA GPUs.")
    g.add_argument("--channels_last", default=False, **BOOL_FLAG, help="UNet in channels-last memory format.")
    g.add_argument(
        "--compile",
        default=False,
        **BOOL_FLAG,
        help="torch.compile the training UNet (fixed shapes: no per-step recompiles).",
    )


def _add_ema_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("EMA")
    g.add_argument("--use_ema", default=True, **BOOL_FLAG)
    g.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help="Fixed EMA decay (DDPM: 0.9999); replaces the warmup schedule below.",
    )
    g.add_argument("--ema_max_decay", type=float, default=0.999)
    g.add_argument("--ema_min_decay", type=float, default=0.0)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)


def _add_outputs_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoints, logging, samples")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="Newest checkpoints kept; 0 keeps all.")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory.")
    g.add_argument("--logger", default="tensorboard", choices=("tensorboard", "wandb", "none"))
    g.add_argument("--logging_steps", type=int, default=50, help="Host sync / logging interval (optimizer steps).")
    g.add_argument("--save_images_steps", type=int, default=500, help="0: only the final grid.")
    g.add_argument("--eval_batch_size", type=int, default=64)
    g.add_argument("--eval_inference_steps", "--ddpm_num_inference_steps", type=int, default=100)


def _add_hub_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", default=False, **BOOL_FLAG)
    g.add_argument(
        "--push_checkpoints",
        default=False,
        **BOOL_FLAG,
        help="Also push the current pipeline in the background at each checkpoint.",
    )
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_private_repo", default=False, **BOOL_FLAG)
    g.add_argument(
        "--hub_token",
        default=None,
        help="Discouraged (visible to other users of the machine): set HF_TOKEN or run `hf auth login`.",
    )


def load_config_file(path) -> dict:
    """Read a YAML (.yaml/.yml) or JSON (.json) mapping of flag names to values (a path or a preset file)."""
    suffix = Path(path.name).suffix
    if suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"--config: {path} must end in .yaml, .yml or .json")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
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


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    pre, _ = config_parser.parse_known_args(argv)
    file_argv = []
    if pre.config is not None:
        try:
            file_argv = config_to_argv(parser, load_config_file(resolve_config(pre.config)), pre.config)
        except ValueError as e:
            parser.error(str(e))
    args = parser.parse_args(file_argv + argv)
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def build_scheduler(args: argparse.Namespace) -> DDPMPlusScheduler:
    """The training noise scheduler from the flags of the same names (its constructor validates them)."""
    return DDPMPlusScheduler(**{name: getattr(args, name) for name in SCHEDULER_FLAGS})


def _flags_named_in(error: SchedulerConfigError) -> str:
    """The flags of the config keys a scheduler error names (``error.arguments``), e.g. ``--beta_start/--beta_end``."""
    return "/".join(f"--{name}" for name in error.arguments if name in SCHEDULER_FLAGS) or f"--{error.argument}"


def _validate_with_scheduler(args: argparse.Namespace) -> None:
    """Construct the scheduler and set the sampling steps: their own checks are the only ones these flags get."""
    try:
        scheduler = build_scheduler(args)
    except SchedulerConfigError as e:
        raise ValueError(f"argument {_flags_named_in(e)}: {e}") from None
    try:
        scheduler.set_timesteps(args.eval_inference_steps)
    except SchedulerConfigError as e:
        raise ValueError(f"argument --eval_inference_steps: {e}") from None


def _validate_counts_and_optimiser(args: argparse.Namespace) -> None:
    """Step counts, sizes and optimiser values; ``--max_train_steps`` defaults to the digits preset's."""
    positive_ints = (
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "logging_steps",
        "eval_batch_size",
        "norm_num_groups",
    )
    for name in positive_ints:
        _check(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "num_epochs"):
        value = getattr(args, name)
        _check(value is None or value >= 1, f"--{name} must be >= 1 (or left unset), got {value}")
    if args.max_train_steps is None and args.num_epochs is None:
        args.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
    for name in ("lr_warmup_steps", "save_images_steps", "dataloader_num_workers", "checkpoints_total_limit"):
        _check(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    _check(
        math.isfinite(args.learning_rate) and args.learning_rate > 0,
        f"--learning_rate must be a positive number, got {args.learning_rate}",
    )
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(args, name) < 1, f"--{name} must be in [0, 1), got {getattr(args, name)}")
    _check(args.adam_epsilon > 0, f"--adam_epsilon must be > 0, got {args.adam_epsilon}")
    _check(args.adam_weight_decay >= 0, f"--adam_weight_decay must be >= 0, got {args.adam_weight_decay}")
    _check(args.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0 disables clipping), got {args.max_grad_norm}")
    _check(0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}")


def validate_args(args: argparse.Namespace) -> None:
    """Check every flag before any data is read or model built; fills in derived defaults."""
    _validate_counts_and_optimiser(args)
    check_latent_flags(args)  # --vae: the VAE's config read; the latent shape, channels and clip_sample set

    # Diffusion process and objective.
    _validate_with_scheduler(args)
    _check(args.snr_gamma is None or args.snr_gamma > 0, f"--snr_gamma must be > 0, got {args.snr_gamma}")
    try:
        check_loss_variance(args.loss, args.variance_type, variance_must_be_trained=True)
    except ValueError as e:
        raise ValueError(f"argument --loss/--variance_type: {e}") from None
    _check(
        args.snr_gamma is None or args.loss != "vlb", "--snr_gamma weights L_simple; it has no effect with --loss vlb"
    )

    # EMA.
    _check(args.ema_decay is None or 0 <= args.ema_decay < 1, f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    _check(
        0 <= args.ema_min_decay <= args.ema_max_decay <= 1,
        f"--ema_min_decay and --ema_max_decay must satisfy 0 <= min <= max <= 1, "
        f"got {args.ema_min_decay}, {args.ema_max_decay}",
    )
    _check(args.ema_inv_gamma > 0 and args.ema_power > 0, "--ema_inv_gamma and --ema_power must be > 0")

    # Data.
    check_streaming_flags(args)
    try:
        source = DatasetSource.from_flags(args.dataset_name, args.train_data_dir)
    except ValueError as e:
        raise ValueError(f"argument --dataset_name/--train_data_dir: {e} (neither: the bundled digits)") from None
    _check(
        args.train_data_dir is None or Path(args.train_data_dir).is_dir(),
        f"--train_data_dir {args.train_data_dir} is not a directory",
    )
    if args.channels is None:
        args.channels = 1 if source.is_digits and not args.train_data_files else 3

    # Model.
    _validate_model(args)

    # Checkpoints and Hub.
    if args.resume_from_checkpoint not in (None, "latest"):
        _check(
            Path(args.resume_from_checkpoint).is_dir(),
            f"--resume_from_checkpoint must be 'latest' or a checkpoint directory, got {args.resume_from_checkpoint}",
        )
    _validate_conditioning(args)
    check_eval_arguments(args)
    _check(not args.push_checkpoints or args.push_to_hub, "--push_checkpoints needs --push_to_hub")
    _check(not args.push_to_hub or args.hub_model_id, "--push_to_hub needs --hub_model_id (e.g. your-name/ddpm-digits)")


def _validate_conditioning(args: argparse.Namespace) -> None:
    """--class_dropout_prob in [0, 1); a grid guidance scale other than 1 needs a model that can be guided."""
    p = args.class_dropout_prob
    _check(math.isfinite(p) and 0 <= p < 1, f"--class_dropout_prob must be in [0, 1), got {p}")
    w = args.eval_guidance_scale
    _check(math.isfinite(w), f"--eval_guidance_scale must be a finite number, got {w}")
    if w != 1:
        _check(args.class_conditional, f"--eval_guidance_scale {w} needs --class_conditional")
        _check(p > 0, f"--eval_guidance_scale {w} needs --class_dropout_prob > 0 (guidance needs a trained null class)")


def _validate_unet_shape(args: argparse.Namespace) -> None:
    """Fill UNet shape defaults and derive block types from --attention_resolutions when not given."""
    size = denoiser_shape(args)[1]  # the UNet's input size: the image's, or its latents' with --vae
    latent = f" (latents {size}x{size})" if args.vae else ""
    if args.block_out_channels is None:
        args.block_out_channels = list(DEFAULT_UNET["block_out_channels"])
    if args.layers_per_block is None:
        args.layers_per_block = DEFAULT_UNET["layers_per_block"]
    n = len(args.block_out_channels)
    _check(args.layers_per_block >= 1, f"--layers_per_block must be >= 1, got {args.layers_per_block}")
    for c in args.block_out_channels:
        _check(
            c >= 1 and c % args.norm_num_groups == 0,
            f"--block_out_channels entries must be positive multiples of --norm_num_groups "
            f"({args.norm_num_groups}), got {args.block_out_channels}",
        )
    _check(
        args.attention_head_dim is None or all(c % args.attention_head_dim == 0 for c in args.block_out_channels),
        f"--attention_head_dim {args.attention_head_dim} must divide every --block_out_channels entry",
    )
    _check(
        size % 2 ** (n - 1) == 0,
        f"--resolution {args.resolution}{latent} must be divisible by 2**(len(--block_out_channels) - 1) = "
        f"{2 ** (n - 1)}",
    )
    if args.down_block_types is None and args.up_block_types is None:
        attention = (
            DEFAULT_UNET["attention_resolutions"] if args.attention_resolutions is None else args.attention_resolutions
        )
        sizes = [size // 2**i for i in range(n)]
        bad = [r for r in attention if r not in sizes]
        _check(
            not bad,
            f"--attention_resolutions {bad} not among this UNet's feature-map sizes {sizes} "
            f"(--resolution {args.resolution}{latent}, {n} blocks)",
        )
        args.attention_resolutions = list(attention)
        args.down_block_types = ["AttnDownBlock2D" if s in attention else "DownBlock2D" for s in sizes]
        args.up_block_types = ["AttnUpBlock2D" if s in attention else "UpBlock2D" for s in reversed(sizes)]
    else:
        _check(
            args.attention_resolutions is None,
            "give either --attention_resolutions or --down_block_types/--up_block_types, not both",
        )
        _check(
            args.down_block_types is not None and args.up_block_types is not None,
            "--down_block_types and --up_block_types must be given together",
        )
        _check(
            len(args.down_block_types) == n and len(args.up_block_types) == n,
            f"--down_block_types and --up_block_types need one entry per --block_out_channels entry ({n}), "
            f"got {len(args.down_block_types)} and {len(args.up_block_types)}",
        )
