"""Hub sharing against the loopback Hub-protocol server (tests/hub_server.py) with the real clients:
huggingface_hub's HfApi/snapshot_download and DiffusionPipeline.from_pretrained."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

import ddpm_plus
from ddpm_plus.hub import (
    HubPushError,
    files_to_push,
    latest_sample_grid,
    push_output_dir,
    render_model_card,
    set_card_evaluation,
    write_model_card,
)

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}


def tree_digest(root: Path) -> dict:
    """Every file under root -> (sha256, size, mtime_ns): equal digests mean nothing was touched."""
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_size,
            p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def output_dir(tmp_path):
    """A training output directory: pipeline files, card and grids, plus training state that must stay local."""
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    _write(out / "model_index.json", json.dumps({"_class_name": "DDPMPlusPipeline"}).encode())
    _write(out / "scheduler/scheduler_config.json", b'{"_class_name": "DDPMPlusScheduler"}')
    _write(out / "unet/config.json", b'{"_class_name": "UNet2DModel"}')
    _write(out / "unet/diffusion_pytorch_model.safetensors", rng.bytes(4096))
    _write(out / "unet/diffusion_pytorch_model.bin", rng.bytes(100))  # a pickle: never pushed
    for step in (100, 1000, 500):
        _write(out / f"samples/step_{step:06d}.png", rng.bytes(64))
    _write(out / "checkpoint-10/optimizer.bin", rng.bytes(100))
    _write(out / "checkpoint-10/model.safetensors", rng.bytes(100))
    _write(out / "checkpoint-10/unet/config.json", b"{}")
    _write(out / "checkpoint-10/random_states_0.pkl", rng.bytes(10))
    _write(out / "logs/train/events.out.tfevents.1.host", rng.bytes(50))
    _write(out / "logs/scalars.json", b"{}")
    _write(out / "optimizer.pt", rng.bytes(10))
    write_model_card(
        out,
        None,
        training_config={"learning_rate": 1e-4, "hub_token": "hf_secret"},
        dataset_description="bundled digits",
    )
    return out


def test_every_hub_client_points_at_the_loopback_server(hub_server):
    import datasets.config
    import diffusers.utils.constants
    import huggingface_hub.constants

    assert huggingface_hub.constants.ENDPOINT == hub_server.endpoint
    assert diffusers.utils.constants.HUGGINGFACE_CO_RESOLVE_ENDPOINT == hub_server.endpoint
    assert datasets.config.HF_ENDPOINT == hub_server.endpoint
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET and not huggingface_hub.constants.HF_HUB_OFFLINE
    for host in ("huggingface.co", "cdn-lfs.huggingface.co", "hf.co"):
        with pytest.raises(OSError, match="must not contact the real Hub"):
            socket.getaddrinfo(host, 443)


def test_server_round_trip_with_the_real_client(hub_server, hub_repo_id, tmp_path):
    api = HfApi(token=hub_server.token)
    assert api.whoami()["name"] == hub_server.user
    url = api.create_repo(hub_repo_id, private=True)
    assert url.repo_id == hub_repo_id
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(hub_repo_id)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(hub_repo_id, exist_ok=True).repo_id == hub_repo_id

    folder = tmp_path / "folder"
    files = {"config.json": b'{"a": 1}', "weights/model.safetensors": os.urandom(3000), "deep/er/x.txt": b"x"}
    for name, data in files.items():
        _write(folder / name, data)
    before = len(hub_server.requests)
    api.upload_folder(repo_id=hub_repo_id, folder_path=folder)
    lfs_put = [r for r in hub_server.requests[before:] if r[0] == "PUT"]
    assert len(lfs_put) == 1 and lfs_put[0][2] == 200  # the .safetensors went through git-LFS

    assert set(api.list_repo_files(hub_repo_id)) == set(files) | {".gitattributes"}
    info = api.model_info(hub_repo_id)
    assert info.private is True and {s.rfilename for s in info.siblings} == set(files) | {".gitattributes"}
    local = Path(snapshot_download(hub_repo_id, token=hub_server.token, cache_dir=tmp_path / "cache"))
    assert {n: (local / n).read_bytes() for n in files} == files
    assert hub_server.files(hub_repo_id)["weights/model.safetensors"] == files["weights/model.safetensors"]

    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the owner's token
        HfApi().model_info(hub_repo_id, token=False)
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi().create_repo(hub_repo_id + "-2", token="hf_not_a_valid_token")
    assert unauthorized.value.response.status_code == 401


def test_push_uploads_only_the_pipeline_card_and_last_grid(hub_server, hub_repo_id, output_dir):
    assert latest_sample_grid(output_dir) == "samples/step_001000.png"
    before = tree_digest(output_dir)
    info = push_output_dir(output_dir, hub_repo_id, private=True, token=hub_server.token)
    remote = hub_server.files(hub_repo_id)
    assert info.oid == HfApi(token=hub_server.token).model_info(hub_repo_id).sha
    assert set(remote) == PIPELINE_FILES | {"README.md", "samples/step_001000.png", ".gitattributes"}
    for name in PIPELINE_FILES | {"samples/step_001000.png"}:
        assert remote[name] == (output_dir / name).read_bytes()
    card = remote["README.md"].decode()
    assert f'DiffusionPipeline.from_pretrained("{hub_repo_id}")' in card  # snippet points at the pushed repo
    assert f'from_pretrained("{output_dir}")' in (output_dir / "README.md").read_text()  # ...in the upload only
    assert "hf_secret" not in card and "hub_token" not in card
    assert HfApi(token=hub_server.token).model_info(hub_repo_id).private is True
    assert tree_digest(output_dir) == before


def test_files_to_push_never_selects_training_state(output_dir):
    chosen = files_to_push(output_dir)
    assert set(chosen) == PIPELINE_FILES | {"README.md", "samples/step_001000.png"}
    assert not any(re.search(r"checkpoint-|logs/|\.bin$|\.pt$|\.pkl$|optimizer", p) for p in chosen)


def test_push_without_token_fails_clearly_and_touches_nothing(hub_server, hub_repo_id, output_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before, served = tree_digest(output_dir), len(hub_server.requests)
    with pytest.raises(HubPushError, match=r"no Hugging Face token.*intact"):
        push_output_dir(output_dir, hub_repo_id)
    assert len(hub_server.requests) == served  # failed before any request
    with pytest.raises(HubPushError, match=r"(?s)401.*intact"):  # a token the server rejects
        push_output_dir(output_dir, hub_repo_id, token="hf_not_a_valid_token")
    assert hub_repo_id not in hub_server.repos
    assert tree_digest(output_dir) == before


@pytest.mark.parametrize(
    "fault, expected",
    [
        (dict(step="lfs_put", nth=2, truncate=True), r"sha256 of the uploaded body does not match"),
        (dict(step="commit", status=500), r"500.*injected failure of commit"),
    ],
    ids=["interrupted-lfs-upload", "server-error-at-commit"],
)
def test_push_fails_mid_upload_clearly_and_can_be_retried(hub_server, hub_repo_id, output_dir, fault, expected):
    before = tree_digest(output_dir)
    hub_server.fail(**fault)
    with pytest.raises(HubPushError, match=rf"(?s){expected}.*every file in .* is intact"):
        push_output_dir(output_dir, hub_repo_id, token=hub_server.token)
    assert set(hub_server.files(hub_repo_id)) == {".gitattributes"}  # nothing was committed
    assert tree_digest(output_dir) == before
    hub_server.clear_faults()
    push_output_dir(output_dir, hub_repo_id, token=hub_server.token)  # the same push, later, succeeds
    assert PIPELINE_FILES <= set(hub_server.files(hub_repo_id))


def test_push_as_future_reports_success_and_failure(hub_server, hub_repo_id, output_dir):
    future = push_output_dir(output_dir, hub_repo_id, token=hub_server.token, run_as_future=True)
    assert future.result(timeout=60).oid == HfApi(token=hub_server.token).model_info(hub_repo_id).sha
    _write(output_dir / "samples/step_002000.png", b"a newer grid")  # something new to commit
    hub_server.fail("commit", status=503)
    failing = push_output_dir(output_dir, hub_repo_id, token=hub_server.token, run_as_future=True)
    with pytest.raises(HubPushError, match="intact"):
        failing.result(timeout=60)


def test_pushes_land_in_call_order(hub_server, hub_repo_id, output_dir):
    """A slow background push of an older state must not land after a later push."""
    hub_server.fail("commit", nth=1, status=None, delay=1.0)  # the first commit is slow, not failed
    older = push_output_dir(output_dir, hub_repo_id, token=hub_server.token, run_as_future=True)
    _write(output_dir / "unet/diffusion_pytorch_model.safetensors", b"newer weights")
    newer = push_output_dir(output_dir, hub_repo_id, token=hub_server.token)
    assert older.done() and older.result().oid != newer.oid
    assert HfApi(token=hub_server.token).model_info(hub_repo_id).sha == newer.oid
    assert hub_server.files(hub_repo_id)["unet/diffusion_pytorch_model.safetensors"] == b"newer weights"


def test_push_refuses_a_directory_without_a_safetensors_pipeline(hub_server, hub_repo_id, output_dir):
    (output_dir / "unet/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(HubPushError, match=r"no \.safetensors weights"):
        push_output_dir(output_dir, hub_repo_id, token=hub_server.token)
    (output_dir / "model_index.json").unlink()
    with pytest.raises(HubPushError, match="model_index.json is missing"):
        push_output_dir(output_dir, hub_repo_id, token=hub_server.token)
    assert hub_repo_id not in hub_server.repos


def test_model_card_metadata_snippet_and_figures():
    text = render_model_card(
        "user/ddpm-digits",
        training_config={"learning_rate": 2e-4, "resolution": 16, "hub_token": "hf_secret", "api_secret": "s"},
        dataset_name="user/digits",
        hardware="1 × NVIDIA H100",
        train_steps=12000,
        images_per_second=4321.5,
        final_loss=0.0312,
        eval_results={"bits_per_dim": 1.234, "frechet_distance_proxy": 5.6},
        sample_grid="samples/step_012000.png",
    )
    card = ModelCard(text)  # parses and validates the YAML block
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"ddpm_plus", "unconditional-image-generation", "diffusers"} <= set(card.data.tags)
    assert card.data.datasets == ["user/digits"] and card.data.license == "apache-2.0"
    body = card.text
    snippet = (
        "import ddpm_plus\nfrom diffusers import DiffusionPipeline\n\n"
        'pipeline = DiffusionPipeline.from_pretrained("user/ddpm-digits")'
    )
    assert snippet in body
    for fact in (
        "| `learning_rate` | 0.0002 |",
        "| `resolution` | 16 |",
        "1 × NVIDIA H100",
        "12,000",
        "4321.5 images/s",
        "0.0312",
        "| `bits_per_dim` | 1.234 |",
        "![Sample grid](samples/step_012000.png)",
    ):
        assert fact in body
    assert "hf_secret" not in text and "hub_token" not in text and "api_secret" not in text

    bare = ModelCard(render_model_card())
    assert bare.data.datasets is None and "Not evaluated." in bare.text and "No sample grid" in bare.text


def test_evaluation_figures_can_be_added_to_a_written_card(output_dir):
    assert "Not evaluated." in (output_dir / "README.md").read_text()
    set_card_evaluation(output_dir, {"bits_per_dim": 1.5, "test_split": "digits/test"})
    card = ModelCard.load(output_dir / "README.md")
    assert "| `bits_per_dim` | 1.5 |" in card.text and "| `test_split` | digits/test |" in card.text
    assert "Not evaluated." not in card.text and "## Training" in card.text and "ddpm_plus" in card.data.tags
    set_card_evaluation(output_dir, {"bits_per_dim": 1.25})  # replaces, does not append
    text = (output_dir / "README.md").read_text()
    assert text.count("## Evaluation") == 1 and "| 1.25 |" in text and "| 1.5 |" not in text


def test_push_to_an_existing_public_repo_refuses_private_request(hub_server, hub_repo_id, output_dir):
    HfApi(token=hub_server.token).create_repo(hub_repo_id, private=False)
    with pytest.raises(HubPushError, match="already exists and is public"):
        push_output_dir(output_dir, hub_repo_id, private=True, token=hub_server.token)
    assert set(hub_server.files(hub_repo_id)) == {".gitattributes"}


@pytest.mark.slow
def test_push_cli_exit_codes(hub_server, hub_repo_id, output_dir, monkeypatch, capsys):
    """`ddpm-plus push`: exit 1 with the retry command and untouched files on failure, 0 on success; a token
    given on the command line is used, warned about and never printed."""
    from ddpm_plus import cli

    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    before = tree_digest(output_dir)
    failed = subprocess.run(
        [sys.executable, "-m", "ddpm_plus.cli", "push", str(output_dir), "--hub_model_id", hub_repo_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1, failed.stderr
    assert "error: " in failed.stderr and "no Hugging Face token" in failed.stderr and "intact" in failed.stderr
    assert f"ddpm-plus push {output_dir} --hub_model_id {hub_repo_id}" in failed.stderr
    assert tree_digest(output_dir) == before

    # The success path in-process (same main(), saves a second interpreter start-up).
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code = cli.main(
        ["push", str(output_dir), "--hub_model_id", hub_repo_id, "--hub_private_repo", "--hub_token", hub_server.token]
    )
    captured = capsys.readouterr()
    assert code == 0 and hub_repo_id in captured.out and "visible to other users" in captured.err
    assert hub_server.token not in captured.out + captured.err
    assert PIPELINE_FILES <= set(hub_server.files(hub_repo_id)) and hub_server.repos[hub_repo_id].private


OFFLINE_LOAD = """
import sys, numpy as np, torch
import ddpm_plus
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], cache_dir=sys.argv[2])
assert type(pipe).__name__ == "DDPMPlusPipeline" and type(pipe.scheduler).__name__ == "DDPMPlusScheduler"
images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np").images
np.save(sys.argv[3], images)
"""


@pytest.mark.slow
def test_pipeline_round_trip_through_the_hub_and_offline_cache(hub_server, hf_token, hub_repo_id, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    local = ddpm_plus.DDPMPlusPipeline(unet=unet, scheduler=ddpm_plus.DDPMPlusScheduler())
    out = tmp_path / "run"
    local.save_pretrained(out)
    write_model_card(out, hub_repo_id, training_config={"resolution": 8})

    def sample(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe(batch_size=2, generator=generator, num_inference_steps=4, output_type="np").images

    push_output_dir(out, hub_repo_id, private=True)  # token from HF_TOKEN
    cache = tmp_path / "fresh_cache"
    loaded = DiffusionPipeline.from_pretrained(hub_repo_id, cache_dir=cache)
    assert type(loaded) is ddpm_plus.DDPMPlusPipeline
    assert type(loaded.scheduler) is ddpm_plus.DDPMPlusScheduler
    expected = sample(local)
    np.testing.assert_array_equal(sample(loaded), expected)

    # Offline: HF_HUB_OFFLINE is read at import, hence a subprocess; it must load from the cache alone.
    served = len(hub_server.requests)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD, hub_repo_id, str(cache), str(tmp_path / "off.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "off.npy"), expected)
    assert len(hub_server.requests) == served  # not one request reached the server


def test_wheel_ships_the_model_card_templates_trainer_and_presets(tmp_path):
    """A non-editable install gets the templates, the trainer and its presets: build the wheel (setuptools,
    as pip would) and look inside."""
    src = tmp_path / "src"
    for name in ("ddpm_plus", "model_cards", "training/configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path)!r}))"
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / done.stdout.strip().splitlines()[-1]) as wheel:
        shipped = wheel.read("ddpm_plus/model_cards/ddpm_plus_unconditional.md")
        names = set(wheel.namelist())
        presets = {
            p.name: wheel.read(f"ddpm_plus/presets/{p.name}") for p in (ROOT / "training/configs").glob("*.yaml")
        }
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert shipped == (ROOT / "model_cards" / "ddpm_plus_unconditional.md").read_bytes()
    assert {
        "ddpm_plus/hub.py",
        "ddpm_plus/train.py",
        "ddpm_plus/trainer/args.py",
        "ddpm_plus/trainer/checkpointing.py",
        "ddpm_plus/presets/__init__.py",
    } <= names
    assert {"digits.yaml", "ddpm_cifar10.yaml", "iddpm_cifar10.yaml"} <= set(presets)
    assert all(data == (ROOT / "training/configs" / name).read_bytes() for name, data in presets.items())
    assert "ddpm-plus = ddpm_plus.cli:main" in entry_points
    assert not [n for n in names if n.startswith(("training/", "tests/", "benchmarks/"))]


def test_every_subpackage_is_packaged():
    """pyproject lists packages explicitly (to map model_cards/ in): a new subpackage must be added there."""
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ddpm_plus").rglob("*.py")}
    assert on_disk <= packages, f"add {sorted(on_disk - packages)} to [tool.setuptools] packages in pyproject.toml"


def test_importing_hub_creates_no_client():
    """No HfApi is built at import (it reads the token and endpoint); the push queue is made by the first push."""
    code = (
        "import huggingface_hub\n"
        "made = []\n"
        "init = huggingface_hub.HfApi.__init__\n"
        "def counting(self, *a, **k):\n"
        "    made.append(1)\n"
        "    init(self, *a, **k)\n"
        "huggingface_hub.HfApi.__init__ = counting\n"
        "import ddpm_plus.hub, ddpm_plus.cli\n"
        "print(len(made))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
