"""ddpm_plus.evaluation.sample_metrics against independent computations: FID/KID/precision-recall equal torch-fidelity's
own calculate_metrics on the same uint8 images and weights file, FD_DINOv2's features equal a float64
re-implementation of the dgm-eval protocol, Frechet distances equal closed forms, and reference statistics
files are validated and cached."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ddpm_plus.evaluation import sample_metrics as sm

pytestmark = pytest.mark.usefixtures("one_thread")


class _Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture(scope="module")
def image_sets():
    g = torch.Generator().manual_seed(0)
    gen = torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8)
    real = (torch.randint(0, 128, (20, 3, 16, 16), generator=g) + 64).to(torch.uint8)  # another distribution
    return gen, real


@pytest.fixture(scope="module")
def inception(random_inception_weights):
    return sm.InceptionFeatures(random_inception_weights)


def test_fid_kid_precision_recall_equal_torch_fidelity(image_sets, inception, random_inception_weights):
    import torch_fidelity

    gen, real = image_sets
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(gen), input2=_Images(real), fid=True, kid=True, prc=True, kid_subset_size=10,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",  # their default for prc is VGG16
        feature_extractor_weights_path=str(random_inception_weights), cuda=False, verbose=False,
        samples_shuffle=False, cache=False,
    )  # fmt: skip
    f_gen, f_real = inception(gen), inception(real)
    mu1, s1 = sm.gaussian_stats(f_gen)
    mu2, s2 = sm.gaussian_stats(f_real)
    # ours: float64 features and an eigh-based trace; theirs: float32 features and eigvals of S1 S2
    assert sm.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(
        theirs["frechet_inception_distance"], rel=1e-3
    )
    kid_mean, kid_std = sm.kernel_inception_distance(f_gen, f_real, subset_size=10)
    assert kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert kid_std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)
    precision, recall = sm.precision_recall(f_gen, f_real)
    assert (precision, recall) == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-9)


def test_grey_images_are_replicated_and_safetensors_weights_give_the_same_features(
    image_sets, inception, random_inception_weights, tmp_path
):
    from safetensors.torch import save_file

    gen, _ = image_sets
    grey = gen[:4, :1]
    np.testing.assert_array_equal(inception(grey), inception(grey.expand(-1, 3, -1, -1)))
    state = torch.load(random_inception_weights, weights_only=True)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    np.testing.assert_array_equal(sm.InceptionFeatures(path)(gen[:4]), inception(gen[:4]))


def test_bad_inception_weights_and_offline_errors(random_inception_weights, tmp_path, monkeypatch):
    state = torch.load(random_inception_weights, weights_only=True)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": state["fc.weight"]}, wrong)
    with pytest.raises(sm.MetricsSetupError, match="wrong.pth"):
        sm.InceptionFeatures(wrong)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted offline")

    monkeypatch.setattr(sm.urllib.request, "urlopen", no_network)
    with pytest.raises(sm.MetricsSetupError, match="--inception_weights") as info:
        sm.InceptionFeatures(None, cache_dir=tmp_path / "empty")
    assert "online" in str(info.value)


def test_a_download_that_never_answers_fails_within_seconds(tmp_path, monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sm, "INCEPTION_URL", f"http://127.0.0.1:{server.getsockname()[1]}/weights.pth")
    monkeypatch.setattr(sm, "DOWNLOAD_TIMEOUT_S", 1.0)
    t0 = time.perf_counter()
    with pytest.raises(sm.MetricsSetupError, match="could not download"):
        sm.InceptionFeatures(None, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10
    assert not list(tmp_path.rglob("*.pth")) and not list(tmp_path.rglob("*.part"))  # nothing half-written
    server.close()


def test_dinov2_features_follow_the_reference_protocol(tiny_dinov2):
    from transformers import Dinov2Model

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 20, 20), generator=g, dtype=torch.uint8)
    ours = sm.Dinov2Features(str(tiny_dinov2))(images)
    # independent: PIL bicubic to 224, [0, 1], ImageNet mean/std in float64; CLS token through the final norm
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = np.stack(
        [
            np.asarray(Image.fromarray(x).resize((224, 224), Image.BICUBIC)) / 255.0
            for x in images.permute(0, 2, 3, 1).numpy()
        ]
    )
    pixels = torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2))
    model = Dinov2Model.from_pretrained(tiny_dinov2).double().eval()
    with torch.no_grad():
        encoded = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # before the final norm
        cls = model.layernorm(encoded[:, 0]).numpy()
    np.testing.assert_allclose(ours, cls, rtol=1e-5, atol=1e-5)  # float32 model vs float64
    grey = images[:, :1]
    np.testing.assert_array_equal(
        sm.Dinov2Features(str(tiny_dinov2))(grey), sm.Dinov2Features(str(tiny_dinov2))(grey.expand(-1, 3, -1, -1))
    )


def test_missing_dinov2_model_offline_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sm.MetricsSetupError, match="--dinov2_model"):
        sm.Dinov2Features(str(tmp_path / "no-such-model"))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6))
    mu, sigma = sm.gaussian_stats(feats)
    assert abs(sm.frechet_distance_from_stats(mu, sigma, mu, sigma)) < 1e-8
    # diagonal Gaussians: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert sm.frechet_distance_from_stats(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # full covariances against scipy's general matrix square root (pytorch-fid's formula)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + 0.1 * np.eye(6), y @ y.T + 0.1 * np.eye(6)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert sm.frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)
    # singular covariances (fewer samples than dimensions) stay finite and non-negative
    mu1, c1 = sm.gaussian_stats(rng.normal(size=(4, 10)))
    mu2, c2 = sm.gaussian_stats(rng.normal(size=(5, 10)) + 1)
    assert 0 <= sm.frechet_distance_from_stats(mu1, c1, mu2, c2) < np.inf
    with pytest.raises(ValueError, match=r"\(6,\) vs \(10,\)"):
        sm.frechet_distance_from_stats(m1, s1, mu2, c2)


def test_too_few_samples_and_bad_shapes_are_refused():
    f = np.zeros((3, 4))
    with pytest.raises(ValueError, match="at least 4 samples per set, got 3 generated and 3 real"):
        sm.precision_recall(f, f)
    with pytest.raises(ValueError, match="kid needs at least 2"):
        sm.kernel_inception_distance(f[:1], f)
    with pytest.raises(ValueError, match="uint8"):
        sm.to_rgb_uint8(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))


def test_reference_stats_files(tmp_path):
    rng = np.random.default_rng(0)
    stats = sm.ReferenceStats.from_features(rng.normal(size=(10, 3)))
    stats.save(tmp_path / "s.npz")
    back = sm.ReferenceStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.features, stats.features)
    assert back.num == 10
    np.savez(tmp_path / "published.npz", mu=stats.mu, sigma=stats.sigma)  # pytorch-fid/ADM style
    published = sm.ReferenceStats.load(tmp_path / "published.npz")
    assert published.features is None and published.sigma.shape == (3, 3)
    (tmp_path / "corrupt.npz").write_bytes(b"\x00garbage")
    np.savez(tmp_path / "nosigma.npz", mu=stats.mu)
    np.savez(tmp_path / "shapes.npz", mu=stats.mu, sigma=np.eye(4))
    np.savez(tmp_path / "nan.npz", mu=stats.mu * np.nan, sigma=stats.sigma)
    for name, match in [
        ("corrupt", "cannot be read"),
        ("nosigma", "lacks"),
        ("shapes", "do not match"),
        ("nan", "non-finite"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            sm.ReferenceStats.load(tmp_path / f"{name}.npz")
        assert f"{name}.npz" in str(info.value)


def test_cached_reference_stats_are_reused_and_keyed(tmp_path):
    calls = []

    def load_images():
        calls.append(1)
        return torch.arange(5 * 2, dtype=torch.float64).reshape(5, 2) ** 1.5

    extractor = lambda x: np.asarray(x)  # noqa: E731
    key = {"dataset": "d", "split": "train", "resolution": 8, "channels": 3, "extractor": "x", "weights": "h1"}
    first, path, reused = sm.cached_reference_stats(key, extractor, load_images, tmp_path)
    assert not reused and path.is_file() and len(calls) == 1
    second, path2, reused = sm.cached_reference_stats(key, extractor, load_images, tmp_path)
    assert reused and path2 == path and len(calls) == 1
    np.testing.assert_array_equal(second.sigma, first.sigma)
    for field, value in [("resolution", 16), ("weights", "h2"), ("split", "test"), ("channels", 1)]:
        _, other, reused = sm.cached_reference_stats({**key, field: value}, extractor, load_images, tmp_path)
        assert not reused and other != path
    assert len(calls) == 5
    path.write_bytes(b"corrupt")
    _, _, reused = sm.cached_reference_stats(key, extractor, load_images, tmp_path)
    assert not reused and len(calls) == 6 and sm.ReferenceStats.load(path).num == 5
