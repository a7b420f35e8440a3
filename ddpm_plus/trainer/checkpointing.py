"""Atomic training checkpoints around ``accelerator.save_state``/``load_state``.

Layout of ``output_dir/checkpoint-N`` (N = optimizer steps done): accelerate's own files (model
safetensors, optimizer, RNG states of every process, GradScaler) plus ours, written without pickle:
``training_state.json`` (step and the data layout that resuming depends on), ``data_state.json`` (with
``--streaming``: the stream's position), ``lr_scheduler.json``,
``ema.safetensors``/``ema.json`` and ``importance_sampler.safetensors``/``.json`` when used.
(Accelerate's ``register_for_checkpointing`` would pickle these objects and load them with
``weights_only=False``; keeping them in safetensors/JSON means resuming unpickles nothing of ours.)

A checkpoint is written to ``.tmp-checkpoint-N`` by every process (``save_state`` must run on every
rank for FSDP/DeepSpeed), then renamed to ``checkpoint-N`` by the main process once all ranks are
done. A run killed mid-write leaves only a ``.tmp-`` directory, which ``latest`` never picks and the
next run deletes. A write that fails (disk full, quota, read-only) removes its ``.tmp-`` directory and
raises :class:`CheckpointWriteError` naming the directory and the cause; earlier checkpoints are kept. With
several processes a write that fails on any one of them stops all of them, each raising the same
``RankFailedError`` (ddpm_plus/trainer/collective_errors.py) that names the rank and that message.
The final pipeline is written the same way (:func:`save_pipeline`): into ``.tmp-pipeline``, then moved in
with ``model_index.json`` last, so a half-written pipeline never looks loadable.

Loading (:func:`check_checkpoint`, the ``load_*`` helpers) raises :class:`CorruptCheckpointError` (a
ValueError) naming the file and the problem: a missing file, malformed JSON, a truncated or foreign
``*.safetensors``. Accelerate's pickled files (``optimizer.bin``, ``random_states_*.pkl``, the GradScaler)
are loaded with ``weights_only=True`` (tensors, plain containers and the numpy arrays of RNG states that
accelerate allowlists; nothing else is unpickled).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .collective_errors import all_or_none

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"
TMP_PIPELINE = ".tmp-pipeline"
STATE_FILE = "training_state.json"
DATA_STATE_FILE = "data_state.json"  # --streaming: the stream position (ddpm_plus/trainer/streaming.py)
PIPELINE_INDEX = "model_index.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint or the final pipeline failed; nothing half-written was left looking valid."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated, malformed or foreign; the message names it."""


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free space",
    errno.EDQUOT: "the disk quota is exceeded: free space or raise the quota",
    errno.EFBIG: "the file size limit (ulimit -f) was reached: raise it",
    errno.EROFS: "the filesystem is read-only: use a writable --output_dir",
    errno.EACCES: "permission denied: use a writable --output_dir",
    errno.EPERM: "permission denied: use a writable --output_dir",
}
_WRITE_HINT_TEXT = {  # libraries that re-raise OS errors as text (safetensors, torch's zip writer)
    "No space left": errno.ENOSPC,
    "Disk quota": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "os error 28": errno.ENOSPC,
    "os error 27": errno.EFBIG,
}


def _errno_of(exc: BaseException) -> int | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        for text, code in _WRITE_HINT_TEXT.items():
            if text in str(exc):
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def describe_write_error(exc: BaseException) -> str:
    """'<Type>: <message> (<what to do>)' for an exception raised while writing files."""
    code = _errno_of(exc)
    hint = _WRITE_HINTS.get(code, "check that the filesystem is writable and has space")
    return f"{type(exc).__name__}: {exc} ({hint})"


_critical_depth = 0
_after_critical: list = []


@contextlib.contextmanager
def critical_section():
    """The few renames that swap a directory in place. A signal handler that wants to exit at once calls
    :func:`when_safe`, which waits for the end of the section (a fraction of a millisecond)."""
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        while not _critical_depth and _after_critical:
            _after_critical.pop(0)()


def when_safe(action) -> None:
    """Run ``action`` now, or at the end of the current :func:`critical_section`."""
    if _critical_depth:
        _after_critical.append(action)
    else:
        action()


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    found = []
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_stale_tmp(output_dir) -> list[Path]:
    """Delete ``.tmp-checkpoint-*`` and ``.tmp-pipeline`` left by a killed run (main process only). A
    ``.old-checkpoint-N`` (a swap of a re-saved step cut short) is put back if ``checkpoint-N`` is missing."""
    removed = []
    root = Path(output_dir)
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.name.startswith(OLD_PREFIX) and child.is_dir():
                final = root / (CHECKPOINT_PREFIX + child.name[len(OLD_PREFIX) :])
                if not final.exists():
                    os.replace(child, final)
                    continue
            if (child.name.startswith((TMP_PREFIX, OLD_PREFIX)) or child.name == TMP_PIPELINE) and child.is_dir():
                shutil.rmtree(child)
                removed.append(child)
    return removed


def prune_checkpoints(output_dir, total_limit: int | None) -> list[Path]:
    """Keep the newest ``total_limit`` complete checkpoints; delete the older ones."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


@contextlib.contextmanager
def _as_write_error(final: Path, tmp: Path):
    """Any exception inside becomes a :class:`CheckpointWriteError` naming ``final``, ``tmp``, the cause and
    whether an earlier checkpoint is there to resume from."""
    try:
        yield
    except Exception as e:
        previous = latest_checkpoint(final.parent)
        raise CheckpointWriteError(
            f"could not write checkpoint {final.name} (into {tmp}): {describe_write_error(e)}. "
            + (
                f"The previous checkpoint {previous} is intact: resume from it with --resume_from_checkpoint latest."
                if previous is not None
                else "There is no earlier checkpoint in this output_dir."
            )
        ) from e


def save_checkpoint(accelerator, output_dir, step: int, write_extra_state) -> Path:
    """Write ``checkpoint-{step}`` atomically; call on EVERY process.

    ``write_extra_state(tmp_dir)`` runs on the main process after ``save_state`` and must write
    ``training_state.json`` (which marks the checkpoint complete) and any other state files.

    Each phase (clearing the ``.tmp-`` directory, every process's writes, the rename) ends with an agreement
    between the processes (:func:`~ddpm_plus.trainer.collective_errors.all_or_none`), so a failure on any one
    of them raises on all: :class:`CheckpointWriteError` with one process, else ``RankFailedError`` naming the
    failed rank and that message. Only the main process removes the ``.tmp-`` directory, once all have stopped
    writing into it.
    """
    root = Path(output_dir)
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}"
    agreed = functools.partial(all_or_none, accelerator, f"writing {final.name}", quiet=(CheckpointWriteError,))
    try:
        with agreed(), _as_write_error(final, tmp):
            if accelerator.is_main_process and tmp.exists():
                shutil.rmtree(tmp)
        with agreed(), _as_write_error(final, tmp):
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                write_extra_state(tmp)
    except Exception:
        if accelerator.is_main_process:  # frees the space; a .tmp- directory is never picked anyway
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with agreed(), _as_write_error(final, tmp):
        if accelerator.is_main_process:
            _move_into_place(tmp, final, root / f"{OLD_PREFIX}{step}")
    return final


def _move_into_place(tmp: Path, final: Path, trash: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again, e.g. resumed from it) is
    swapped out through ``trash``, never leaving a half state."""
    with critical_section():  # a signal between the two renames would leave checkpoint-N missing
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
    if final.exists() and trash.exists():
        shutil.rmtree(trash)


def save_pipeline(pipeline, output_dir) -> None:
    """``pipeline.save_pretrained(output_dir)`` (safetensors) without a half-written pipeline that looks
    valid: written to ``output_dir/.tmp-pipeline``, then the components moved in, ``model_index.json``
    (what loaders look for) removed first and moved in last. On failure the temporary directory is
    removed and :class:`CheckpointWriteError` names the target and the cause."""
    root = Path(output_dir)
    tmp = root / TMP_PIPELINE
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        with critical_section():
            (root / PIPELINE_INDEX).unlink(missing_ok=True)
            for entry in sorted(tmp.iterdir()):
                if entry.name == PIPELINE_INDEX:
                    continue
                target = root / entry.name
                if target.is_dir() and entry.is_dir():
                    trash = root / f".old-{entry.name}"
                    shutil.rmtree(trash, ignore_errors=True)
                    os.replace(target, trash)
                    os.replace(entry, target)
                    shutil.rmtree(trash)
                else:
                    os.replace(entry, target)
            os.replace(tmp / PIPELINE_INDEX, root / PIPELINE_INDEX)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write the final pipeline to {root} (via {tmp}): {describe_write_error(e)}. Nothing there "
            f"looks loadable ({PIPELINE_INDEX} is written last). The last checkpoint holds the trained state: "
            "fix the cause, then run the same command with --resume_from_checkpoint latest to write the pipeline."
        ) from e
    shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def read_json(path: Path) -> dict:
    """A JSON object; :class:`CorruptCheckpointError` naming the file if it is missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint file {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"checkpoint file {path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"checkpoint file {path} holds a {type(data).__name__}, not a JSON object")
    return data


def check_safetensors(path: Path) -> None:
    """Open the header of a ``*.safetensors`` file (the format checks that the data fits the file);
    :class:`CorruptCheckpointError` naming the file if it is missing, truncated or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError: truncated, garbage, header too large, ...
        raise CorruptCheckpointError(
            f"checkpoint file {path} ({path.stat().st_size} bytes) is not a complete safetensors file: {e}"
        ) from None


def _load_safetensors(path: Path) -> dict:
    check_safetensors(path)
    return load_file(path)


def check_checkpoint(directory, *, num_processes: int, ema: bool, importance_sampler: bool) -> None:
    """Before loading anything: every file this run needs from ``directory`` is present, and the JSON
    and safetensors files parse. Raises :class:`CorruptCheckpointError` naming the first bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorruptCheckpointError(f"checkpoint {directory} is not a directory")
    read_json(directory / STATE_FILE)
    read_json(directory / "lr_scheduler.json")
    models = sorted(directory.glob("model*.safetensors")) + sorted(directory.glob("pytorch_model*.bin"))
    if not models:
        raise CorruptCheckpointError(f"checkpoint {directory} has no model weights (model.safetensors is missing)")
    for model in models:
        if model.suffix == ".safetensors":
            check_safetensors(model)
    needed = ["optimizer.bin"] + [f"random_states_{i}.pkl" for i in range(num_processes)]
    if ema:
        needed += ["ema.safetensors", "ema.json"]
    if importance_sampler:
        needed += ["importance_sampler.safetensors", "importance_sampler.json"]
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise CorruptCheckpointError(
            f"checkpoint {directory} is incomplete: missing {', '.join(missing)}"
            + (" (was it saved without --use_ema?)" if "ema.safetensors" in missing else "")
        )
    for name in needed:
        if name.endswith(".safetensors"):
            check_safetensors(directory / name)
        elif name.endswith(".json"):
            read_json(directory / name)
        elif not zipfile.is_zipfile(directory / name):  # torch.save's format: reads only the zip directory
            size = (directory / name).stat().st_size
            raise CorruptCheckpointError(
                f"checkpoint file {directory / name} ({size} bytes) is truncated or not a file written by torch.save"
            )
        elif name.startswith("random_states_"):
            _check_rng_states(directory / name)


_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def _check_rng_states(path: Path) -> None:
    """Load an RNG-state file as accelerate does (``weights_only=True``, numpy arrays allowlisted). Checked
    here because accelerate's ``load_state`` ignores a failure to load it (logged at INFO), which would make
    the resumed run silently diverge from the uninterrupted one."""
    from accelerate.utils.other import load

    try:
        states = load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        culprit = re.search(r"Unsupported global: GLOBAL \S+", str(e))  # torch's verdict, without its advice
        first = culprit.group(0) if culprit else (str(e).strip().splitlines() or [""])[0]
        raise CorruptCheckpointError(
            f"checkpoint file {path} cannot be loaded with weights_only=True (it holds more than tensors and "
            f"numbers, or is damaged): {type(e).__name__}: {first}"
        ) from None
    missing = [k for k in _RNG_KEYS if not isinstance(states, dict) or k not in states]
    if missing:
        raise CorruptCheckpointError(f"checkpoint file {path} is not an accelerate RNG state (no {', '.join(missing)})")


def save_ema(directory: Path, ema) -> None:
    """diffusers EMAModel state: shadow parameters in safetensors, scalars in JSON."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file(
        {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(shadow)}, directory / "ema.safetensors"
    )
    write_json(directory / "ema.json", state)


def load_ema(directory: Path, ema) -> None:
    file = directory / "ema.safetensors"
    if not file.is_file():
        raise ValueError(f"checkpoint {directory} has no EMA state (ema.safetensors); was it saved without --use_ema?")
    tensors = _load_safetensors(file)
    state = read_json(directory / "ema.json")
    state["shadow_params"] = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
    ema.load_state_dict(state)
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    ema.shadow_params = [p.to(device) for p in ema.shadow_params]


def save_importance_sampler(directory: Path, sampler) -> None:
    state = sampler.state_dict()
    save_file(
        {"history": state.pop("history"), "counts": state.pop("counts")}, directory / "importance_sampler.safetensors"
    )
    write_json(directory / "importance_sampler.json", state)


def load_importance_sampler(directory: Path, sampler) -> None:
    state = read_json(directory / "importance_sampler.json")
    state.update(_load_safetensors(directory / "importance_sampler.safetensors"))
    sampler.load_state_dict(state)


def save_lr_scheduler(directory: Path, lr_scheduler) -> None:
    write_json(directory / "lr_scheduler.json", lr_scheduler.state_dict())


def load_lr_scheduler(directory: Path, lr_scheduler) -> None:
    lr_scheduler.load_state_dict(read_json(directory / "lr_scheduler.json"))


def load_training_state(directory: Path, expected_layout: dict) -> int:
    """Return the step stored in a checkpoint after checking that the data layout it assumed
    (samples per optimizer step, steps per epoch, seed) matches this run's."""
    state = read_json(Path(directory) / STATE_FILE)
    if not isinstance(state.get("global_step"), int) or state["global_step"] < 0:
        raise CorruptCheckpointError(
            f"checkpoint file {Path(directory) / STATE_FILE} has no valid global_step (got {state.get('global_step')!r})"
        )
    mismatched = {k: (state.get(k), v) for k, v in expected_layout.items() if state.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"cannot resume from {directory}: the run's data layout changed ({details}); resume with the same "
            "--train_batch_size, --gradient_accumulation_steps, number of processes, data and --seed"
        )
    return int(state["global_step"])
