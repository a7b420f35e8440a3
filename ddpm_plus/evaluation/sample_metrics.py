"""Sample-quality metrics on uint8 images: Inception features (torch-fidelity's ``inception-v3-compat``, the
port of the TensorFlow network papers use) for FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and
precision/recall (Kynkaanniemi et al. 2019); DINOv2 features (transformers' ``Dinov2Model``) for FD_DINOv2
(Stein et al. 2023); Frechet distances in float64; reference statistics cached as ``.npz``.

torch-fidelity and transformers (the ``[metrics]`` extra) are imported only when they are used; a missing
one is a :class:`~ddpm_plus.evaluation.errors.MissingExtraError` naming the install command.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import default_cache_dir, file_sha256
from .errors import MetricsSetupError, MissingExtraError

__all__ = [
    "SAMPLE_METRICS",
    "INCEPTION_URL",
    "MetricsSetupError",
    "import_extra",
    "quantize_uint8",
    "to_rgb_uint8",
    "InceptionFeatures",
    "Dinov2Features",
    "gaussian_stats",
    "frechet_distance_from_stats",
    "kernel_inception_distance",
    "precision_recall",
    "ReferenceStats",
    "reference_stats_path",
    "cached_reference_stats",
]

SAMPLE_METRICS = ("fid", "kid", "precision_recall", "fd_dinov2")
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
DOWNLOAD_TIMEOUT_S = 10.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "DDPM_PLUS_OFFLINE")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def import_extra(module: str, metrics: str):
    """``module`` of the ``[metrics]`` extra, imported now; not installed: :class:`MissingExtraError`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if (err.name or "").split(".")[0] != top:
            raise  # installed, but one of its own dependencies is broken: the original error says which
        raise MissingExtraError(top, metrics) from None


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def quantize_uint8(images01: torch.Tensor) -> torch.Tensor:
    """Float images [N, C, H, W] in [0, 1] -> uint8 round(255 x): the one quantisation of samples."""
    return (images01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1|3, H, W] -> [N, 3, H, W] (grey replicated to 3 channels)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images.contiguous()


def _batches(images: torch.Tensor, batch_size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield images[start : start + batch_size]


# ----------------------------------------------------------------------------- Inception


def _inception_file(weights, cache_dir) -> Path:
    """The user's weights file, or the standard one (downloaded once into ``cache_dir``, never offline)."""
    options = (
        "pass --inception_weights FILE (torch-fidelity's inception-v3-compat weights, .pth or .safetensors), "
        f"or run once online so that {INCEPTION_URL} is downloaded into the cache"
    )
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise MetricsSetupError(f"inception weights {str(path)!r} is not a file; {options}")
        return path
    path = Path(cache_dir or default_cache_dir()) / "inception" / INCEPTION_URL.rsplit("/", 1)[1]
    if path.is_file():
        return path
    if offline():
        raise MetricsSetupError(f"no Inception weights and offline ({'/'.join(OFFLINE_VARS)} set): {options}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(INCEPTION_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        os.replace(tmp, path)
    except Exception as err:  # URLError, timeouts, refused connections: all mean "not downloadable now"
        tmp.unlink(missing_ok=True)
        message = f"could not download the Inception weights ({type(err).__name__}: {err}); {options}"
        raise MetricsSetupError(message) from None
    return path


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read as tensors only: safetensors, or torch.load(weights_only=True) (never arbitrary pickles)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MetricsSetupError(f"cannot read inception weights {str(path)!r} as tensors: {err}") from None


class InceptionFeatures:
    """2048-d pool features of torch-fidelity's ``inception-v3-compat`` network for uint8 images (any size:
    resized to 299 as TensorFlow 1.x does, inside the network)."""

    name = "inception-v3-compat"

    def __init__(self, weights=None, *, device="cpu", batch_size=64, progress=False, cache_dir=None):
        fe = import_extra("torch_fidelity.feature_extractor_inceptionv3", "FID, KID and precision/recall")
        path = _inception_file(weights, cache_dir)
        state = _load_tensors(path)
        self.weights_id = file_sha256(path)
        # torch-fidelity reads its file with torch.load(weights_only=False), which can run code from a pickle;
        # it gets a copy we wrote ourselves from the tensors read above.
        with tempfile.TemporaryDirectory() as tmp:
            safe = Path(tmp) / "inception.pth"
            torch.save(state, safe)
            try:
                net = fe.FeatureExtractorInceptionV3(self.name, ["2048"], feature_extractor_weights_path=str(safe))
            except RuntimeError as err:  # missing / unexpected keys, wrong shapes
                raise MetricsSetupError(f"{str(path)!r} is not an inception-v3-compat state dict: {err}") from None
        self.net = net.to(device).eval()
        self.device, self.batch_size, self.progress = torch.device(device), batch_size, progress

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> np.ndarray:
        images = to_rgb_uint8(images_uint8)
        feats = [
            self.net(batch.to(self.device))[0].double().cpu()
            for batch in _batches(images, self.batch_size, self.progress, "Inception features")
        ]
        return torch.cat(feats).numpy()


# ----------------------------------------------------------------------------- DINOv2


class Dinov2Features:
    """DINOv2 features with dgm-eval's protocol: RGB uint8 -> PIL bicubic 224x224 -> [0, 1] -> ImageNet
    mean/std -> ``Dinov2Model`` -> ``pooler_output`` (the CLS token after the final layer norm), float64."""

    def __init__(self, model: str = "facebook/dinov2-large", *, device="cpu", batch_size=32, progress=False):
        transformers = import_extra("transformers", "FD_DINOv2")
        try:
            net = transformers.Dinov2Model.from_pretrained(model, local_files_only=offline())
        except Exception as err:  # OSError for a missing repo/file, or no network
            raise MetricsSetupError(
                f"cannot load the DINOv2 model {model!r} ({type(err).__name__}: {err}); pass --dinov2_model "
                "DIR_OR_ID with a local copy (save_pretrained) when offline"
            ) from None
        self.name = f"dinov2:{model}"
        digest = hashlib.sha256()
        for key, value in sorted(net.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        self.weights_id = digest.hexdigest()
        self.net = net.to(device).eval()
        self.device, self.batch_size, self.progress = torch.device(device), batch_size, progress

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        rgb = to_rgb_uint8(images_uint8).permute(0, 2, 3, 1).cpu().numpy()
        resized = np.stack([np.asarray(Image.fromarray(x).resize((224, 224), Image.BICUBIC)) for x in rgb])
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> np.ndarray:
        feats = []
        for batch in _batches(images_uint8, self.batch_size, self.progress, "DINOv2 features"):
            pixels = self.preprocess(batch).to(self.device, self.net.dtype)
            feats.append(self.net(pixel_values=pixels).pooler_output.double().cpu())
        return torch.cat(feats).numpy()


# ----------------------------------------------------------------------------- distances


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64 of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D] for a covariance, got shape {features.shape}")
    return features.mean(0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    # Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): symmetric PSD, robust when S1 or S2 is singular
    # (fewer samples than feature dimensions), unlike a general matrix square root.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _check_counts(metric: str, gen, real, minimum: int) -> None:
    if gen is None or real is None:
        raise ValueError(f"{metric} needs the features of both sets (reference statistics without features?)")
    if len(gen) < minimum or len(real) < minimum:
        raise ValueError(
            f"{metric} needs at least {minimum} samples per set, got {len(gen)} generated and {len(real)} real"
        )


def kernel_inception_distance(gen_features, real_features, *, subsets=100, subset_size=1000, seed=2020):
    """(mean, std) of the unbiased cubic-polynomial-kernel MMD² over ``subsets`` random subsets of
    min(subset_size, n_gen, n_real): torch-fidelity's estimator, as ``calculate_metrics(kid=True)``."""
    kid = import_extra("torch_fidelity.metric_kid", "KID")
    _check_counts("kid", gen_features, real_features, 2)
    size = min(subset_size, len(gen_features), len(real_features))
    out = kid.kid_features_to_metric(
        torch.as_tensor(np.asarray(gen_features)),
        torch.as_tensor(np.asarray(real_features)),
        kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False,
    )  # fmt: skip
    return float(out[kid.KEY_METRIC_KID_MEAN]), float(out[kid.KEY_METRIC_KID_STD])


def precision_recall(gen_features, real_features, *, neighborhood=3) -> tuple[float, float]:
    """(precision, recall) with k-NN balls (k = ``neighborhood``): torch-fidelity's ``prc`` estimator."""
    prc = import_extra("torch_fidelity.metric_prc", "precision/recall")
    _check_counts("precision_recall", gen_features, real_features, neighborhood + 1)
    out = prc.prc_features_to_metric(
        torch.as_tensor(np.asarray(gen_features, dtype=np.float32)),
        torch.as_tensor(np.asarray(real_features, dtype=np.float32)),
        prc_neighborhood=neighborhood, prc_batch_size=10000, save_cpu_ram=False, verbose=False,
    )  # fmt: skip
    return float(out[prc.KEY_METRIC_PRECISION]), float(out[prc.KEY_METRIC_RECALL])


# ----------------------------------------------------------------------------- reference statistics


@dataclass
class ReferenceStats:
    """Mean and covariance of the real images' features (and the features, for KID and precision/recall)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    num: int

    @classmethod
    def from_features(cls, features) -> ReferenceStats:
        features = np.asarray(features, dtype=np.float64)
        mu, sigma = gaussian_stats(features)
        return cls(mu, sigma, features, len(features))

    def save(self, path) -> None:
        """Atomically, as ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid/ADM keys), ``num`` and the features."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "num": np.array(self.num)}
        if self.features is not None:
            arrays["features"] = self.features
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp.name, path)

    @classmethod
    def load(cls, path) -> ReferenceStats:
        """A statistics file (ours or a published one with only ``mu`` and ``sigma``); never unpickles."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as err:
            raise ValueError(f"reference statistics {str(path)!r} cannot be read as .npz: {err}") from None
        missing = [k for k in ("mu", "sigma") if k not in arrays]
        if missing:
            raise ValueError(f"reference statistics {str(path)!r} lacks {missing} (has {sorted(arrays)})")
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
        features = arrays.get("features")
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"reference statistics {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do not match")
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
            raise ValueError(
                f"reference statistics {str(path)!r}: features {features.shape} do not match mu {mu.shape}"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"reference statistics {str(path)!r} holds non-finite values")
        num = int(arrays["num"]) if "num" in arrays else (len(features) if features is not None else 0)
        return cls(mu, sigma, None if features is None else features.astype(np.float64), num)


def reference_stats_path(key: Mapping[str, Any], cache_dir=None) -> Path:
    """``cache_dir/reference_stats/<extractor>-<hash of key>.npz`` (default cache: ``default_cache_dir()``)."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True, default=str).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", str(key.get("extractor", "features")))
    return Path(cache_dir or default_cache_dir()) / "reference_stats" / f"{slug}-{digest}.npz"


def cached_reference_stats(
    key: Mapping[str, Any], extractor, load_images: Callable[[], torch.Tensor], cache_dir=None
) -> tuple[ReferenceStats, Path, bool]:
    """(statistics, file, reused): the cached file for ``key`` when it loads, else ``extractor(load_images())``
    computed and saved (a corrupt cache file is overwritten)."""
    path = reference_stats_path(key, cache_dir)
    if path.is_file():
        try:
            return ReferenceStats.load(path), path, True
        except ValueError:
            pass
    stats = ReferenceStats.from_features(extractor(load_images()))
    stats.save(path)
    return stats, path, False
