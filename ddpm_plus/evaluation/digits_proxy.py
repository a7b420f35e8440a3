"""Sample-quality proxy for the bundled digits: a small CNN classifier trained on the digits train split,
and the Frechet distance between Gaussian fits of its penultimate-layer features.

This is a *proxy*, reported as "digits Frechet distance (proxy, not FID)": the features are not
Inception's, the images are 8x8 digits, and the value depends on the number of samples. Compare it only
with the reference floor computed the same way (held-out real digits vs the train split).

For class-conditional models the same classifier measures fidelity to the requested class
(:func:`class_accuracy`: the share of samples it assigns to the class they were sampled for), to be read
next to its own accuracy on held-out real digits. :func:`digits_proxy_figures` computes all of these for one
set of uint8 samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import default_cache_dir
from ..data import DIGITS_NUM_BINS, digits_heldout_tensor, load_digits_arrays
from .metrics_table import PROXY_NAME
from .sample_metrics import frechet_distance_from_stats, gaussian_stats

__all__ = [
    "DigitsClassifier",
    "load_or_train_digits_classifier",
    "to_digits_frame",
    "classifier_features",
    "classify",
    "class_accuracy",
    "frechet_distance",
    "digits_proxy_figures",
]


CLASSIFIER_VERSION = "1"  # bump when the architecture or training recipe changes (new cache file)
_TRAIN_SEED = 0


class DigitsClassifier(nn.Module):
    """conv(1->16) - conv(16->32) - maxpool - fc(512->32) - fc(32->10) on 8x8 images in [-1, 1]."""

    feature_dim = 32

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _digits_arrays(split: str):
    """(images [N,1,8,8] float32 on the 17-level grid in [-1, 1], labels [N]) of the bundled digits, from
    :func:`ddpm_plus.data.load_digits_arrays` (the one digits loader; same split)."""
    levels, labels = load_digits_arrays(split)
    x = torch.from_numpy(levels).float() * (2.0 / (DIGITS_NUM_BINS - 1)) - 1.0  # level v -> v / 16 * 2 - 1
    return x[:, None], torch.from_numpy(labels).long()


@torch.enable_grad()  # also when called under no_grad (e.g. the trainer's evaluation of its EMA weights)
def _train(epochs: int = 20, batch_size: int = 128) -> DigitsClassifier:
    """Deterministic CPU training (seeded init and batch order, small random shifts as augmentation)."""
    g = torch.Generator().manual_seed(_TRAIN_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TRAIN_SEED)
        model = DigitsClassifier()
    x, y = _digits_arrays("train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            b = perm[start : start + batch_size]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(x[b], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _accuracy(model: DigitsClassifier, split: str = "test") -> float:
    x, y = _digits_arrays(split)
    return float((model(x).argmax(1) == y).float().mean())


def load_or_train_digits_classifier(cache_dir: os.PathLike | None = None):
    """(classifier in eval mode on CPU, its held-out accuracy). Weights are cached as safetensors in
    ``cache_dir`` (default ``default_cache_dir()``); a missing or unreadable cache is retrained in seconds."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir or default_cache_dir()) / f"digits_classifier_v{CLASSIFIER_VERSION}.safetensors"
    model = DigitsClassifier()
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval(), _accuracy(model)
        except Exception:  # corrupt or foreign file: retrain and overwrite
            pass
    model = _train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model, _accuracy(model)


def to_digits_frame(images: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> [N, 1, 8, 8] float32: channels averaged, area-resampled to 8x8
    (exactly the inverse of a nearest upsampling by an integer factor)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    x = images.float().mean(1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="area")
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def classifier_features(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    x = to_digits_frame(images.cpu())
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


@torch.no_grad()
def classify(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The classifier's digit (argmax) for each image [N, C, H, W] in [-1, 1] (any size: see to_digits_frame)."""
    x = to_digits_frame(images.cpu())
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def class_accuracy(model: DigitsClassifier, images: torch.Tensor, digits) -> float:
    """Share of ``images`` (in [-1, 1]) that the classifier assigns to ``digits`` (the requested digit of each)."""
    digits = torch.as_tensor(digits).long().reshape(-1)
    if len(digits) != len(images):
        raise ValueError(f"need one digit per image; got {len(digits)} digits for {len(images)} images")
    return float((classify(model, images) == digits).float().mean())


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussian fits of two feature sets (float64)."""
    if len(feats1) < 2 or len(feats2) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples on each side")
    return frechet_distance_from_stats(*gaussian_stats(feats1), *gaussian_stats(feats2))


def digits_proxy_figures(
    samples_uint8: torch.Tensor, heldout: torch.Tensor, *, seed: int, requested_digits=None, cache_dir=None
) -> dict:
    """The proxy of uint8 samples [N, C, H, W] (vs the train split's features), its floor (as many ``heldout``
    real images in [-1, 1], drawn with ``seed``) and the classifier's held-out accuracy; with
    ``requested_digits`` (one per sample) also the share of samples classified as their digit."""
    classifier, accuracy = load_or_train_digits_classifier(cache_dir)
    train_feats = classifier_features(classifier, digits_heldout_tensor(8, 1, split="train"))
    samples = samples_uint8.float() / 127.5 - 1
    perm = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed))
    floor_images = heldout[perm[: len(samples)]]
    out = {
        "classifier_heldout_accuracy": accuracy,
        "frechet_proxy_name": PROXY_NAME,
        "frechet_proxy_samples_vs_train": frechet_distance(classifier_features(classifier, samples), train_feats),
        "frechet_proxy_floor_heldout_vs_train": frechet_distance(
            classifier_features(classifier, floor_images), train_feats
        ),
        "frechet_proxy_floor_num_images": int(len(floor_images)),
    }
    if requested_digits is not None:
        out["sample_class_accuracy"] = class_accuracy(classifier, samples, requested_digits)
    return out
