"""Model cards and Hub pushes for a training output directory.

An output directory holds the final pipeline at its root (``model_index.json``, ``scheduler/``, ``unet/``),
``README.md`` (the model card), ``samples/*.png`` and training state (``checkpoint-*``, ``logs/``).
Only the pipeline, the card and the last sample grid are ever pushed; training state never is.
Everything goes through ``huggingface_hub`` (endpoint, token and cache settings as usual).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from .redaction import redact, without_secrets

TEMPLATE = "ddpm_plus_unconditional.md"
CARD_TAGS = ["ddpm_plus", "diffusers", "unconditional-image-generation"]
# What a push uploads, relative to the output directory (fnmatch patterns, as huggingface_hub uses them)...
PUSH_ALLOW_PATTERNS = ["model_index.json", "scheduler/*.json", "unet/*.json", "unet/*.safetensors"]
PUSH_ALLOW_PATTERNS += ["vae/*.json", "vae/*.safetensors"]  # a latent model's autoencoder
# ...and what it never uploads, even if matched above (training state, pickles).
PUSH_IGNORE_PATTERNS = [
    "checkpoint-*",
    "*/checkpoint-*",
    "logs/*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.ckpt",
    "*optimizer*",
]
_FROM_PRETRAINED = re.compile(r'(DiffusionPipeline\.from_pretrained\()"[^"\n]*"')
TOKEN_ON_COMMAND_LINE = (
    "--hub_token: a token on the command line is visible to other users of this machine (ps, /proc) and "
    "stays in the shell history; prefer HF_TOKEN or `hf auth login`"
)
_PUSH_QUEUE_LOCK = threading.Lock()
_push_queue_api: HfApi | None = None


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local output directory is untouched."""


# ----------------------------------------------------------------------------- model card
def _template(name: str) -> str:
    try:
        return resources.files("ddpm_plus.model_cards").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        # Source checkout that is not pip-installed: the folder sits beside the package
        # (pyproject.toml maps it to ddpm_plus.model_cards in installed copies).
        return (Path(__file__).resolve().parent.parent / "model_cards" / name).read_text(encoding="utf-8")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Mapping[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def describe_hardware(num_processes: int = 1) -> str:
    """E.g. ``1 × NVIDIA H100 80GB HBM3`` or ``CPU (x86_64, 2 cores)``, for the model card."""
    import torch

    if torch.cuda.is_available():
        return f"{num_processes} × {torch.cuda.get_device_name(0)}"
    procs = f", {num_processes} processes" if num_processes > 1 else ""
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores{procs})"


def render_model_card(
    repo_id: str | None = None,
    *,
    training_config: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    dataset_description: str | None = None,
    license: str = "apache-2.0",
    hardware: str | None = None,
    train_steps: int | None = None,
    images_per_second: float | None = None,
    final_loss: float | None = None,
    eval_results: Mapping[str, float] | None = None,
    sample_grid: str | None = None,
    id2label: Mapping[int | str, str] | None = None,
    class_dropout_prob: float | None = None,
    grid_guidance_scale: float | None = None,
    latent: str | None = None,
) -> str:
    """The model card (README.md text) of a trained ddpm_plus pipeline.

    ``dataset_name`` is a Hub dataset id (goes into the ``datasets`` metadata); ``dataset_description``
    is free text for data not on the Hub (e.g. the bundled digits). ``training_config`` is the training
    arguments (keys naming tokens, secrets or passwords are left out). ``eval_results`` maps a figure's
    name to its value. ``sample_grid`` is the grid's path relative to the repo root. A class-conditional
    model passes its classes (``id2label``), the label dropout it was trained with and the guidance scale
    of its sample grid: the card lists them and its usage snippet samples by class name. ``latent`` describes
    a latent diffusion model (its VAE and scaling); the card then names ``LatentDDPMPlusPipeline``.
    """
    data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=list(CARD_TAGS) + (["class-conditional", "classifier-free-guidance"] if id2label else []),
        pipeline_tag="unconditional-image-generation",
        datasets=[dataset_name] if dataset_name else None,
    )
    config = dict(sorted(without_secrets(training_config or {}).items()))
    unknown = "not recorded"
    known = lambda v: v is not None and math.isfinite(v)  # noqa: E731 (NaN = not measured)
    values = {
        "card_data": data.to_yaml(),
        "title": f"{repo_id.split('/')[-1]} (ddpm_plus)" if repo_id else "ddpm_plus unconditional image model",
        "repo_id": repo_id or "path/to/output_dir",
        "samples": f"![Sample grid]({sample_grid})" if sample_grid else "No sample grid was saved.",
        "dataset": dataset_name or dataset_description or unknown,
        "hardware": hardware or unknown,
        "train_steps": unknown if train_steps is None else f"{train_steps:,}",
        "images_per_second": f"{images_per_second:.1f} images/s" if known(images_per_second) else unknown,
        "final_loss": f"{final_loss:.5g}" if known(final_loss) else unknown,
        "training_config": _table(config, ("argument", "value")) if config else "Not recorded.",
        "evaluation": _table(dict(eval_results), ("metric", "value")) if eval_results else "Not evaluated.",
        **_conditioning_values(id2label, class_dropout_prob, grid_guidance_scale),
        "pipeline_class": "LatentDDPMPlusPipeline" if latent else "DDPMPlusPipeline",
        "latent": f"\n{latent}\n" if latent else "",
    }
    text = Template(_template(TEMPLATE)).substitute(values)
    ModelCard(text, ignore_metadata_errors=False)  # parses the YAML block: fails here, not on the Hub
    return text


def _conditioning_values(id2label, class_dropout_prob, grid_guidance_scale) -> dict[str, str]:
    """The card's model description, sampling call and (for a class-conditional model) its Classes section."""
    if not id2label:
        return {
            "kind": "An unconditional image diffusion model",
            "sample_call": "images = pipeline(batch_size=16, num_inference_steps=1000).images",
            "conditioning": "",
        }
    names = {int(k): str(v) for k, v in id2label.items()}
    ids = sorted(names)
    guided = bool(class_dropout_prob)
    example = [names[i] for i in ids[:2]]
    call = f"images = pipeline(class_labels={json.dumps(example)}, num_inference_steps=1000"
    call += ", guidance_scale=3.0).images" if guided else ").images"
    shown = ids if len(ids) <= 100 else ids[:100]
    rows = "\n".join(f"| {i} | {_fmt(names[i])} |" for i in shown)
    more = f"\n\n… and {len(ids) - len(shown)} more (all in `model_index.json`)." if len(ids) > len(shown) else ""
    null = len(ids)
    if guided:
        guidance = (
            f"Trained with label dropout {class_dropout_prob:g}: each label was replaced by the null class "
            f"(id {null}) with that probability, so the model also samples unconditionally and supports "
            "classifier-free guidance (Ho & Salimans 2022): `guidance_scale` w = 1 is the conditional model, "
            "0 the unconditional one, w > 1 trades diversity for fidelity."
        )
    else:
        guidance = (
            f"Trained without label dropout (`class_dropout_prob` = 0): the null class (id {null}) is untrained, "
            "so classifier-free guidance is refused; sample with `guidance_scale=1`."
        )
    grid = (
        ""
        if grid_guidance_scale is None
        else f" The sample grid above (one row per class) uses w = {grid_guidance_scale:g}."
    )
    section = (
        f"\n## Classes\n\nA class-conditional model with {len(ids)} classes; pass `class_labels` as ids or names, "
        f"one per image or one for the batch.\n\n| id | name |\n|---|---|\n{rows}{more}\n\n{guidance}{grid}\n"
    )
    return {"kind": "A class-conditional image diffusion model", "sample_call": call, "conditioning": section}


def latest_sample_grid(output_dir: str | os.PathLike) -> str | None:
    """Path (relative, POSIX) of the last sample grid in ``output_dir/samples``: highest step number in
    the file name, then the newest file."""
    grids = list((Path(output_dir) / "samples").glob("*.png"))
    if not grids:
        return None
    key = lambda p: ([int(n) for n in re.findall(r"\d+", p.stem)], p.stat().st_mtime)  # noqa: E731
    return max(grids, key=key).relative_to(output_dir).as_posix()


def write_model_card(output_dir: str | os.PathLike, repo_id: str | None = None, **card_kwargs) -> Path:
    """Render the card into ``output_dir/README.md`` (the last sample grid is found if not given).

    Without ``repo_id`` the usage snippet loads ``output_dir`` itself; a push points it at the repo.
    """
    card_kwargs.setdefault("sample_grid", latest_sample_grid(output_dir))
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(repo_id or Path(output_dir).as_posix(), **card_kwargs), encoding="utf-8")
    return path


MODEL_INDEX_REQUIRED = ("metric_type", "metric_name", "metric_value", "dataset_name", "dataset_type")
MODEL_INDEX_OPTIONAL = ("dataset_split", "dataset_config", "metric_args")


def _eval_result(entry: Mapping[str, Any]):
    """One ``model-index`` entry (keyword arguments of huggingface_hub's ``EvalResult``), checked, as an
    ``EvalResult`` of the unconditional-image-generation task."""
    from huggingface_hub import EvalResult

    if not isinstance(entry, Mapping):
        raise ValueError(f"model_index entry {entry!r} is not a mapping")
    unknown = sorted(set(entry) - set(MODEL_INDEX_REQUIRED) - set(MODEL_INDEX_OPTIONAL))
    if unknown:
        allowed = ", ".join(MODEL_INDEX_REQUIRED + MODEL_INDEX_OPTIONAL)
        raise ValueError(f"model_index entry {dict(entry)!r} has unknown fields {unknown}; allowed: {allowed}")
    for name in MODEL_INDEX_REQUIRED:
        if entry.get(name) in (None, ""):
            raise ValueError(f"model_index entry {dict(entry)!r} lacks {name!r}")
    value = entry["metric_value"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"model_index entry {dict(entry)!r}: 'metric_value' must be a finite number, got {value!r}")
    args = {k: v for k, v in (entry.get("metric_args") or {}).items() if v is not None} or None
    fields = {**entry, "metric_value": float(value), "metric_args": args}
    return EvalResult(task_type="unconditional-image-generation", task_name="Image generation", **fields)


def set_card_evaluation(
    output_dir: str | os.PathLike,
    eval_results: Mapping[str, float],
    *,
    model_index: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Replace the Evaluation section of ``output_dir/README.md`` with a table of ``eval_results``
    (e.g. from ``ddpm-plus evaluate``), keeping the rest of the card. ``model_index`` (entries as made by
    :func:`ddpm_plus.evaluation.metrics_table.model_index_entries`: huggingface_hub ``EvalResult`` fields
    ``metric_type``, ``metric_name``, ``metric_value``, ``dataset_name``, ``dataset_type`` and optionally
    ``dataset_split``, ``dataset_config``, ``metric_args``) also replaces the card's Hub ``model-index``
    results, so the Hub shows them; entries are checked before anything is written."""
    path = Path(output_dir) / "README.md"
    text = path.read_text(encoding="utf-8")
    start = text.find("\n## Evaluation\n")
    if start < 0:
        raise ValueError(f"{path} has no '## Evaluation' section; write it with write_model_card() first")
    end = text.find("\n## ", start + 1)
    table = _table(dict(eval_results), ("metric", "value"))
    text = text[:start] + f"\n## Evaluation\n\n{table}\n" + (text[end:] if end >= 0 else "")
    card = ModelCard(text, ignore_metadata_errors=False)
    if model_index is not None:
        results = [_eval_result(e) for e in model_index]  # all validated before anything is written
        if results:
            card.data.model_name = card.data.model_name or Path(output_dir).resolve().name
        elif card.data.eval_results:  # the name only came from the model-index being dropped
            card.data.model_name = None
        card.data.eval_results = results or None
        text = str(card)
        ModelCard(text, ignore_metadata_errors=False)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- push
def files_to_push(output_dir: str | os.PathLike) -> list[str]:
    """The relative paths a push uploads: pipeline files, README.md and the last sample grid."""
    root = Path(output_dir)
    present = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    chosen = list(
        filter_repo_objects(
            present, allow_patterns=PUSH_ALLOW_PATTERNS + ["README.md"], ignore_patterns=PUSH_IGNORE_PATTERNS
        )
    )
    grid = latest_sample_grid(root)
    return chosen + ([grid] if grid else [])


def _fail(what: str, output_dir: Path, repo_id: str) -> HubPushError:
    return HubPushError(
        f"Pushing {output_dir} to the Hub repo {repo_id!r} failed: {what}. Nothing was changed or deleted "
        f"locally: every file in {output_dir} is intact. Push it again later with: "
        f"ddpm-plus push {output_dir} --hub_model_id {repo_id}"
    )


def _operations(root: Path, repo_id: str) -> list[CommitOperationAdd]:
    """Snapshot the files to push (contents read now, so training may go on writing meanwhile)."""
    paths = files_to_push(root)
    if "model_index.json" not in paths:
        raise _fail("it holds no pipeline (model_index.json is missing)", root, repo_id)
    if not any(p.startswith("unet/") and p.endswith(".safetensors") for p in paths):
        raise _fail("unet/ holds no .safetensors weights (only safetensors are pushed)", root, repo_id)
    ops = [CommitOperationAdd(p, (root / p).read_bytes()) for p in paths if p != "README.md"]
    if "README.md" in paths:  # point the card's usage snippet at the repo it is pushed to
        card = _FROM_PRETRAINED.sub(lambda m: f'{m[1]}"{repo_id}"', (root / "README.md").read_text(encoding="utf-8"))
    else:
        card = render_model_card(repo_id, sample_grid=latest_sample_grid(root))
    ops.append(CommitOperationAdd("README.md", card.encode("utf-8")))
    return ops


def _push_queue() -> HfApi:
    """The process's one push queue, created by the first push (never at import): its run_as_future queue (one
    worker) runs every push in call order, background or not, so an older checkpoint never lands after a newer one."""
    global _push_queue_api
    with _PUSH_QUEUE_LOCK:
        if _push_queue_api is None:
            _push_queue_api = HfApi()
        return _push_queue_api


def _push(api: HfApi, ops, root: Path, repo_id: str, private: bool, commit_message: str):
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.model_info(repo_url.repo_id).private:
            raise _fail("the repo already exists and is public, but a private repo was asked for", root, repo_id)
        return api.create_commit(repo_url.repo_id, ops, commit_message=commit_message)
    except HubPushError:
        raise
    except Exception as err:  # any client/HTTP/network error becomes one error type with one message
        raise _fail(_describe(err), root, repo_id) from err


def _describe(err: BaseException) -> str:
    """One line from an exception and the errors it wraps, down to the Hub's HTTP error."""
    parts = []
    while err is not None and len(parts) < 4:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and "For more information" not in ln]
        parts.append(f"{type(err).__name__}: {' '.join(lines)}")
        if isinstance(err, HfHubHTTPError):
            if err.response is not None and err.response.status_code in (401, 403):
                parts[-1] += " (check that the token is valid and may write to this namespace)"
            break
        err = err.__cause__
    return " <- ".join(parts)


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload ddpm_plus pipeline",
    run_as_future: bool = False,
):
    """Create ``repo_id`` (private if asked; an existing repo is reused) and push the pipeline, the card
    (its usage snippet pointed at ``repo_id``) and the last sample grid as one commit.

    Token: ``token``, else HF_TOKEN or the cached login. Returns huggingface_hub's ``CommitInfo``, or with
    ``run_as_future=True`` a ``Future`` of it. The files are read when this is called; pushes then run
    one at a time in call order in a background thread (a blocking push waits for earlier ones).
    Raises ``HubPushError`` (also through the future) on any failure; local files are never modified.
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise HubPushError(f"output_dir {root} is not a directory")
    token = token or get_token()
    if not token:
        raise _fail("no Hugging Face token (pass --hub_token, set HF_TOKEN or run `hf auth login`)", root, repo_id)
    ops = _operations(root, repo_id)
    future: Future = _push_queue().run_as_future(_push, HfApi(token=token), ops, root, repo_id, private, commit_message)
    return future if run_as_future else future.result()


def push_evaluation(
    pipeline: str,
    repo_id: str,
    card_rows: Mapping[str, Any],
    model_index: Sequence[Mapping[str, Any]],
    *,
    download_dir: str | os.PathLike,
    private: bool = False,
    token: str | None = None,
) -> Path:
    """Put evaluation figures into the model card of ``pipeline`` (a local pipeline directory, or a Hub repo id
    downloaded into ``download_dir``; a missing card is written first) and push it to ``repo_id``. Returns the
    directory pushed; failures are :class:`HubPushError`."""
    source = Path(pipeline)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        try:
            source = Path(snapshot_download(pipeline, local_dir=download_dir, token=token))
        except Exception as err:  # any client/HTTP/network error: one error type, one message
            raise HubPushError(f"could not download {pipeline!r} to update its model card: {_describe(err)}") from err
    if not (source / "README.md").is_file():
        write_model_card(source)
    set_card_evaluation(source, card_rows, model_index=model_index)
    push_output_dir(source, repo_id, private=private, token=token, commit_message="Add ddpm-plus evaluation results")
    return source


# ----------------------------------------------------------------------------- `ddpm-plus push`
def add_push_arguments(parser) -> None:
    """The flags of ``ddpm-plus push OUTPUT_DIR``."""
    parser.add_argument("output_dir", help="a training output directory (holds model_index.json)")
    parser.add_argument("--hub_model_id", required=True, help="the repo id, e.g. user/ddpm-digits")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument(
        "--hub_token",
        default=None,
        help="discouraged (visible to other users of the machine): set HF_TOKEN or run `hf auth login`",
    )
    parser.add_argument("--commit_message", default="Upload ddpm_plus pipeline")


def push_command(args) -> int:
    """``ddpm-plus push``: upload the pipeline, the card and the last grid of a finished output directory
    (never checkpoints, optimizer state or logs). 0 on success, 1 with a message on failure; the output
    directory is never modified."""
    import sys

    if args.hub_token:
        print(f"warning: {TOKEN_ON_COMMAND_LINE}", file=sys.stderr)
    try:
        info = push_output_dir(
            args.output_dir,
            args.hub_model_id,
            private=args.hub_private_repo,
            token=args.hub_token,
            commit_message=args.commit_message,
        )
    except HubPushError as err:
        print(f"error: {redact(str(err), args.hub_token)}", file=sys.stderr)
        return 1
    print(f"Pushed {args.output_dir} to {args.hub_model_id}: {info.commit_url}")
    return 0
