"""Test-suite isolation from the real Hugging Face Hub.

``huggingface_hub`` and ``diffusers`` read ``HF_ENDPOINT`` (and the cache/Xet settings) once, when first
imported. So, at import of this conftest, before any test module can import them, a loopback
Hub-protocol server (tests/hub_server.py) is started and the environment points every Hub client, in
this process and in subprocesses, at it, with an empty temporary ``HF_HOME`` (no cached login, no cached
models) and no token. Host names of the real Hub are refused by a resolver guard, so no test can reach
it even through a hard-coded URL.

Fixtures: ``one_thread`` (module-scoped: one intra-op thread, for modules that sample small UNets), ``hub_server`` (``.endpoint``, ``.token``, ``.user``, ``.fail(step, ...)``, ``.files(repo_id)``,
``.requests``; faults are cleared after each test), ``hf_token`` (a valid token, exported as HF_TOKEN
for the test) and ``hub_repo_id`` (a fresh ``user/name`` repo id).
"""

import atexit
import os
import shutil
import socket
import sys
import tempfile
import uuid

import pytest
from hub_server import HubServer

if "huggingface_hub" in sys.modules or "diffusers" in sys.modules:
    raise RuntimeError(
        "huggingface_hub/diffusers were imported before tests/conftest.py, so they may point at the real "
        "Hub; remove that import from plugins or the root conftest."
    )

_SERVER = HubServer().start()
_HF_HOME = tempfile.mkdtemp(prefix="ddpm_plus_hf_home_")
for _var in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "HF_HUB_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_DATASETS_CACHE",
):
    os.environ.pop(_var, None)
os.environ.update(
    HF_ENDPOINT=_SERVER.endpoint,
    HF_HOME=_HF_HOME,
    HF_HUB_DISABLE_XET="1",  # the test server speaks git-LFS, not Xet (hf_xet is installed)
    HF_HUB_DISABLE_TELEMETRY="1",
)

_REAL_GETADDRINFO = socket.getaddrinfo


def _no_real_hub(host, *args, **kwargs):
    name = (host.decode() if isinstance(host, bytes) else str(host or "")).lower().rstrip(".")
    if name in ("huggingface.co", "hf.co") or name.endswith((".huggingface.co", ".hf.co")):
        raise OSError(f"tests must not contact the real Hub ({name}); use the hub_server fixture")
    return _REAL_GETADDRINFO(host, *args, **kwargs)


socket.getaddrinfo = _no_real_hub


@atexit.register
def _shutdown() -> None:
    _SERVER.stop()
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture
def hub_server():
    """The session's loopback Hub server; injected faults are cleared before and after the test."""
    _SERVER.clear_faults()
    yield _SERVER
    _SERVER.clear_faults()


@pytest.fixture
def hf_token(hub_server, monkeypatch):
    """A token the server accepts for ``hub_server.user``, also set as HF_TOKEN during the test."""
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    return hub_server.token


@pytest.fixture
def hub_repo_id(hub_server):
    """A repo id in the token owner's namespace that does not exist yet."""
    return f"{hub_server.user}/test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads of a small UNet stall on each
    other's barriers (seen here: the same sampling call 0.17 s with 1 thread, 2-15 s with 2). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A weights file for torch-fidelity's inception-v3-compat network with random (seeded) weights: the
    real file is a download, and tests compare computations on the same weights, not published values."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    original_load, original_url = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state_dict, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = original_load, original_url
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    """A tiny random ``Dinov2Model`` saved with ``save_pretrained`` (safetensors), as a local --dinov2_model."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224, patch_size=56
    )
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(path)
    return path
