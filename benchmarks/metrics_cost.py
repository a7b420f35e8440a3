"""What the sample metrics cost: images per second of the Inception (inception-v3-compat) and DINOv2
ViT-L/14 feature extractors, and the seconds of the float64 Frechet distance in 2048 and 1024 dimensions.

Random weights of the real shapes (the real files are downloads; speed does not depend on the values):
    python -m benchmarks.metrics_cost [--device cuda] [--images 64] [--batch_size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def _random_inception(path: str) -> None:
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    load, url = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.save(fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), path)
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = load, url


def _random_dinov2_large(path: str) -> None:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    Dinov2Model(config).save_pretrained(path)


def _rate(extractor, images: torch.Tensor) -> float:
    extractor(images[:2])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    extractor(images)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    from ddpm_plus.evaluation import sample_metrics as sm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args(argv)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        _random_inception(f"{tmp}/inception.pth")
        inception = sm.InceptionFeatures(f"{tmp}/inception.pth", device=args.device, batch_size=args.batch_size)
        print(f"inception-v3-compat ({args.device}): {_rate(inception, images):.1f} images/s")
        _random_dinov2_large(f"{tmp}/dinov2")
        dinov2 = sm.Dinov2Features(f"{tmp}/dinov2", device=args.device, batch_size=args.batch_size)
        print(f"DINOv2 ViT-L/14 ({args.device}): {_rate(dinov2, images):.1f} images/s")
    rng = np.random.default_rng(0)
    for dim in (2048, 1024):
        f1, f2 = rng.normal(size=(dim + 100, dim)), rng.normal(size=(dim + 100, dim))
        t0 = time.perf_counter()
        sm.frechet_distance_from_stats(*sm.gaussian_stats(f1), *sm.gaussian_stats(f2))
        print(f"Frechet distance, {dim} dims (float64, CPU): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
