"""Atomic training checkpoints around ``accelerator.save_state``/``load_state``.

Layout of ``output_dir/checkpoint-N`` (N = optimizer steps done): accelerate's own files (model
safetensors, optimizer, RNG states of every process, GradScaler) plus ours, written without pickle:
``training_state.json`` (step and the data layout that resuming depends on), ``lr_scheduler.json``,
``ema.safetensors``/``ema.json`` and ``importance_sampler.safetensors``/``.json`` when used.
(Accelerate's ``register_for_checkpointing`` would pickle these objects and load them with
``weights_only=False``; keeping them in safetensors/JSON means resuming unpickles nothing of ours.)

A checkpoint is written to ``.tmp-checkpoint-N`` by every process (``save_state`` must run on every
rank for FSDP/DeepSpeed), then renamed to ``checkpoint-N`` by the main process once all ranks are
done. A run killed mid-write leaves only a ``.tmp-`` directory, which ``latest`` never picks and the
next run deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "training_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    """Delete ``.tmp-checkpoint-*`` left by a killed run (main process only)."""
    removed = []
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX) and child.is_dir():
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


def save_checkpoint(accelerator, output_dir, step: int, write_extra_state) -> Path:
    """Write ``checkpoint-{step}`` atomically; call on EVERY process.

    ``write_extra_state(tmp_dir)`` runs on the main process after ``save_state`` and must write
    ``training_state.json`` (which marks the checkpoint complete) and any other state files.
    """
    root = Path(output_dir)
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_extra_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. resumed from it): swap, never a half state
            trash = root / f".old-{CHECKPOINT_PREFIX}{step}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


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
    tensors = load_file(file)
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
    state.update(load_file(directory / "importance_sampler.safetensors"))
    sampler.load_state_dict(state)


def save_lr_scheduler(directory: Path, lr_scheduler) -> None:
    write_json(directory / "lr_scheduler.json", lr_scheduler.state_dict())


def load_lr_scheduler(directory: Path, lr_scheduler) -> None:
    lr_scheduler.load_state_dict(read_json(directory / "lr_scheduler.json"))


def load_training_state(directory: Path, expected_layout: dict) -> int:
    """Return the step stored in a checkpoint after checking that the data layout it assumed
    (samples per optimizer step, steps per epoch, seed) matches this run's."""
    state = read_json(Path(directory) / STATE_FILE)
    mismatched = {k: (state.get(k), v) for k, v in expected_layout.items() if state.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"cannot resume from {directory}: the run's data layout changed ({details}); resume with the same "
            "--train_batch_size, --gradient_accumulation_steps, number of processes, data and --seed"
        )
    return int(state["global_step"])
