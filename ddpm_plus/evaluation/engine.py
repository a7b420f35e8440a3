"""The evaluation engine: one function, :func:`evaluate_pipeline`, samples a pipeline, quantises the samples to
uint8 once and computes every figure asked for (the bound, FID/KID/precision-recall/FD_DINOv2, and on the
digits the Frechet proxy) against real images. ``ddpm-plus evaluate``, the trainer's periodic evaluation and
the benchmarks call it, so the same options give the same figures everywhere.

Sample i's noise comes from its own generator seeded by (seed, i), and the work is dealt to the processes of
an ``accelerate launch`` in blocks of ``batch_size`` (evaluation/distributed.py), so 1 or W processes give the
same samples and figures. A ``LatentDDPMPlusPipeline`` is scored on its decoded images; its bound is the latent
bound of the real images' VAE latents (evaluation/latent.py), reported as ``latent_bits_per_dim``.

A class-conditional pipeline is sampled class-balanced: sample i gets the i-th class in turn (class ids in
order), at ``guidance_scale``; its bound is -log p(x|c) with each real image's own class.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..pipelines.pipeline_ddpm_plus import Conditioning, guidance_labels
from .bound import bound_figures
from .digits_proxy import digits_proxy_figures
from .distributed import Shard, current_shard, sample_generators
from .errors import EvaluationError, EvaluationOptionsError, PipelineLoadError
from .latent import denoiser_of, encode_latents, is_latent, pipeline_conditioning, pipeline_geometry
from .options import EvaluationOptions
from .real_images import EvalImages
from .sample_metrics import quantize_uint8
from .sample_quality import FeatureExtractors, compute_sample_metrics

__all__ = [
    "EvaluationResult",
    "evaluate_pipeline",
    "load_pipeline",
    "class_balanced_labels",
    "digit_classes",
    "sample_block",
    "sample_uint8",
    "default_num_threads",
    "cpu_threads",
    "resolve_device",
    "model_geometry",
    "pipeline_geometry",
]

MAX_DEFAULT_THREADS = 8


@dataclass
class EvaluationResult:
    """What :func:`evaluate_pipeline` returns: every figure (JSON-serialisable) and the uint8 samples
    [N, C, H, W] that every sample metric used (on the main process; None on the others)."""

    figures: dict
    samples: torch.Tensor | None


def default_num_threads() -> int:
    """Intra-op threads for CPU evaluation when none are asked for: half the usable cores, at most 8 (1 on a
    2-core machine). OpenMP threads that share cores with another job stall on each other (seen: one UNet
    forward 7.6 s with 2 threads beside a concurrent job, 0.62 s with 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT_THREADS, cores // 2))


@contextmanager
def cpu_threads(device: torch.device, num_threads: int | None = None) -> Iterator[int]:
    """torch's intra-op thread count while the block runs (restored after): ``num_threads``, else on a CPU
    device :func:`default_num_threads` (elsewhere torch's own count)."""
    previous = torch.get_num_threads()
    if num_threads is None:
        num_threads = default_num_threads() if device.type == "cpu" else previous
    torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str | None) -> torch.device:
    """``name`` (e.g. "cpu", "cuda:1"), default CUDA when available, else the CPU."""
    try:
        return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise EvaluationOptionsError("device", f"{name!r} is not a torch device: {err}") from None


def model_geometry(unet_config, resolution: int | None = None) -> tuple[int, int]:
    """(resolution, channels) to evaluate a square UNet at: ``resolution``, default its ``sample_size``."""
    size = unet_config.sample_size
    if not isinstance(size, int) and len(set(size)) != 1:
        raise EvaluationError(f"only square UNets can be evaluated, this one has sample_size={size}")
    return resolution or (size if isinstance(size, int) else int(size[0])), int(unet_config.in_channels)


def load_pipeline(name_or_path: str) -> DiffusionPipeline:
    """A saved pipeline from a local directory (holding model_index.json) or a Hub repo id; anything else is
    a :class:`PipelineLoadError` saying which it is not."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise PipelineLoadError(f"{name_or_path!r} is a directory without model_index.json: not a saved pipeline")
    if not path.is_dir():
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            raise PipelineLoadError(f"{name_or_path!r} is not a directory and not a Hub repo id") from None
    try:
        return DiffusionPipeline.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:  # missing repo or file, no network, a broken folder
        first = (str(err).strip().splitlines() or [""])[0]
        where = "a local pipeline directory" if path.is_dir() else "no local directory, nor a loadable Hub repo"
        raise PipelineLoadError(f"cannot load {name_or_path!r} ({where}): {type(err).__name__}: {first}") from err


def digit_classes(conditioning: Conditioning) -> dict[int, int] | None:
    """Class id -> digit for a conditional pipeline over the digits 0..9 (names '0'..'9', or 10 unnamed
    classes); None for an unconditional one. Other classes cannot be compared with the digits: an error."""
    if not conditioning.conditional:
        return None
    n = conditioning.num_classes
    names = conditioning.id2label or ({str(i): str(i) for i in range(n)} if n == 10 else {})
    digits = {int(k): v for k, v in names.items()}
    if n != 10 or sorted(digits.values()) != [str(d) for d in range(10)]:
        raise EvaluationError(
            "on the digits a class-conditional pipeline must have the 10 classes '0'..'9' (id2label); this one "
            f"has {n} classes: {sorted(digits.values())[:12]}"
        )
    return {i: int(name) for i, name in digits.items()}


def class_balanced_labels(conditioning: Conditioning, num_samples: int) -> list[int] | None:
    """The one sampling rule: sample i gets class id ``i mod K`` (the K classes in turn); None when unconditional."""
    if not conditioning.conditional:
        return None
    if conditioning.num_classes is None:
        raise EvaluationError(
            "this class embedding takes no class ids (class_embed_type): it cannot be sampled by class"
        )
    return [i % conditioning.num_classes for i in range(num_samples)]


def sample_block(pipe, options: EvaluationOptions, class_labels: list[int] | None, block: range) -> torch.Tensor:
    """Samples ``block`` (indices into the ``options.num_samples``) in one pipeline call, quantised to uint8
    [n, C, H, W]: sample i's noise comes from its own generator (:func:`~.distributed.sample_generators`,
    seeded by ``options.seed`` and i), so it does not depend on the batch or the process that draws it."""
    extra = {}
    if class_labels is not None:
        extra = {"class_labels": class_labels[block.start : block.stop], "guidance_scale": options.guidance_scale}
    with torch.no_grad():
        # "np" (N, H, W, C in [0, 1]) is what DDPMPlusPipeline, LatentDDPMPlusPipeline and DDPMPipeline return.
        images = pipe(
            batch_size=len(block),
            generator=sample_generators(options.seed, block),
            num_inference_steps=options.num_inference_steps,
            output_type="np",
            **extra,
        ).images
    return quantize_uint8(torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2))


def sample_uint8(pipe, options: EvaluationOptions, class_labels: list[int] | None) -> torch.Tensor:
    """All ``options.num_samples`` samples, in blocks of ``options.batch_size`` (:func:`sample_block`), as
    uint8 [N, C, H, W]."""
    blocks = Shard().blocks(options.num_samples, options.batch_size)
    return torch.cat([sample_block(pipe, options, class_labels, block) for block in blocks])


def _bound_class_ids(conditioning: Conditioning, reals: EvalImages, digit_of: dict[int, int] | None):
    """Each real image's class id for a conditional bound (digits mapped to the model's ids), else None."""
    if not conditioning.conditional:
        return None
    if reals.labels is None:
        raise EvaluationError(
            "the bound of a class-conditional pipeline needs each real image's class: load the images with a "
            "label column"
        )
    if digit_of is None:
        return reals.labels
    id_of_digit = {d: i for i, d in digit_of.items()}
    return np.array([id_of_digit[int(d)] for d in reals.labels])


def _check_before_running(pipe, reals: EvalImages, options: EvaluationOptions):
    """Every check that needs the pipeline: (labels per sample, class id -> digit, bound class ids)."""
    conditioning = pipeline_conditioning(pipe)
    options.check_for(on_digits=reals.is_digits, num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps))
    labels = class_balanced_labels(conditioning, options.num_samples)
    digit_of = digit_classes(conditioning) if reals.is_digits else None
    try:
        guidance_labels(conditioning, labels, options.num_samples, options.guidance_scale, pipe.device)
    except ValueError as err:
        raise EvaluationOptionsError("guidance_scale", str(err)) from None
    class_ids = _bound_class_ids(conditioning, reals, digit_of) if "bpd" in options.metrics else None
    return labels, digit_of, class_ids


def evaluate_pipeline(
    pipe,
    reals: EvalImages,
    options: EvaluationOptions,
    extractors: FeatureExtractors | None = None,
    shard: Shard | None = None,
) -> EvaluationResult:
    """Evaluate ``pipe`` (a pixel pipeline, or a ``LatentDDPMPlusPipeline``: its decoded images, and the bound of
    the real images' latents) against ``reals`` as ``options`` say: every check first (options against the
    model and the data, classes, guidance), then the bound, the samples (quantised to uint8 once) and their
    features, the sample metrics (with ``extractors``, default: built here for ``options.metrics``) and on the
    digits the Frechet proxy.

    Over processes (``shard``, default: torch.distributed's group if formed, evaluation/distributed.py): each
    process samples and extracts the features of its blocks of samples and runs the bound on its blocks of
    images; the main process gathers them and computes the figures, which every process returns. The samples
    are returned on the main process (None on the others)."""
    shard = shard or current_shard()
    labels, digit_of, class_ids = _check_before_running(pipe, reals, options)
    if extractors is None:
        with shard.main_first():
            extractors = FeatureExtractors.for_metrics(options.metrics, device=pipe.device, progress=options.progress)
    figures = {
        "dataset": reals.description,
        "dataset_key": reals.key,
        "metrics": list(options.metrics),
        "num_images": len(reals.images),
        "resolution": int(reals.images.shape[-1]),
        "channels": int(reals.images.shape[1]),
        "num_bins": reals.num_bins,
        "num_processes": shard.world,
    }
    if "bpd" in options.metrics:
        latents = encode_latents(pipe, reals.images, options.batch_size, shard) if is_latent(pipe) else None
        figures.update(bound_figures(denoiser_of(pipe), pipe.scheduler, reals, options, class_ids, shard, latents))
    pieces = []
    for block in shard.blocks(options.num_samples, options.batch_size):
        samples = sample_block(pipe, options, labels, block)
        pieces.append((block.start, (samples, extractors.features(samples, options.metrics))))
    gathered = shard.gather(pieces, to_all=False)
    extractors.share_references(options.metrics, reals, shard)
    samples = None if gathered is None else torch.cat([s for _, (s, _) in gathered])
    figures.update(
        _on_main(shard, lambda: _sample_figures(samples, gathered, reals, options, extractors, labels, digit_of))
    )
    if is_latent(pipe) and "bpd" in options.metrics:
        figures["bound_space"] = "VAE latents: latent bits/dim, not comparable with pixel bits/dim"
    return EvaluationResult(figures, samples)


def _on_main(shard: Shard, compute) -> dict:
    """``compute()`` on the main process; its result (or the error it raised) on every process."""
    if shard.world == 1:
        return compute()
    outcome, error = None, None
    if shard.is_main:
        try:
            outcome = (True, compute())
        except Exception as err:  # sent to the other processes, which would otherwise wait for the figures
            error = err
            try:
                pickle.dumps(err)
                outcome = (False, err)
            except Exception:
                outcome = (False, RuntimeError(f"{type(err).__name__}: {err}"))
    ok, value = shard.broadcast(outcome)
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def _sample_figures(samples, gathered, reals, options, extractors, labels, digit_of) -> dict:
    """The sample metrics of the gathered samples and features, and on the digits the proxy."""
    features = {}
    for name in gathered[0][1][1] if gathered else ():
        features[name] = np.concatenate([f[name] for _, (_, f) in gathered])
    figures = {"num_samples": options.num_samples, "inference_steps": options.num_inference_steps}
    try:
        figures.update(compute_sample_metrics(samples, reals, options.metrics, extractors, features))
    except EvaluationError:
        raise
    except ValueError as err:  # e.g. KID from reference statistics that hold no features
        raise EvaluationError(f"sample metrics: {err}") from err
    if reals.is_digits:
        requested = None if labels is None else [digit_of[i] for i in labels]
        figures.update(
            digits_proxy_figures(
                samples, reals.images, seed=options.seed, requested_digits=requested,
                cache_dir=options.classifier_cache_dir,
            )
        )  # fmt: skip
    if labels is not None:
        figures.update(class_conditional=True, guidance_scale=options.guidance_scale)
        figures["sampling"] = "class-balanced (the classes in turn)"
    return figures
