"""Training engines on the device machine: 20 steps of the trainer under accelerate's FSDP2 and DeepSpeed
ZeRO-2 configs (training/configs/accelerate/), then a resume to step 30, on a generated image folder (no
downloads). Records, per engine, the exit status, wall time, the distributed type the trainer logged and
whether the pipeline and both checkpoints were written; a missing DeepSpeed is recorded as skipped with the reason.

    python -m benchmarks.engine_check --json engines.json            # on a GPU machine
    python -m benchmarks.engine_check --json engines.json --tiny     # the same code paths on a CPU (accelerate
                                                                     # then runs plain processes: nothing about
                                                                     # FSDP/DeepSpeed is verified there)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs" / "accelerate"
ENGINES = {"fsdp2": "fsdp2.yaml", "deepspeed_zero2": "deepspeed_zero2.yaml"}


def make_images(folder: Path, count: int = 64, size: int = 32) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def train(engine: str, data: Path, out: Path, steps: int, tiny: bool, resume: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / ENGINES[engine])]
    cmd += ["--num_processes", "1", "--mixed_precision", "no" if tiny else "bf16"]
    cmd += ["-m", "ddpm_plus.train", "--train_data_dir", str(data), "--resolution", "32", "--channels", "3"]
    cmd += ["--block_out_channels", "32", "64", "--layers_per_block", "1", "--attention_resolutions", "16"]
    cmd += ["--train_batch_size", "8", "--max_train_steps", str(steps), "--checkpointing_steps", "10"]
    cmd += ["--eval_inference_steps", "4", "--eval_batch_size", "4", "--logger", "none", "--output_dir", str(out)]
    if resume:
        cmd += ["--resume_from_checkpoint", "latest"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def check(engine: str, work: Path, tiny: bool) -> dict:
    if engine == "deepspeed_zero2" and importlib.util.find_spec("deepspeed") is None:
        return {"status": "skipped", "reason": "deepspeed is not installed on this machine"}
    out, start = work / engine, time.time()
    first = train(engine, work / "images", out, 20, tiny, resume=False)
    second = train(engine, work / "images", out, 30, tiny, resume=True) if first.returncode == 0 else None
    log = first.stderr + (second.stderr if second else "")
    return {
        "status": "ok" if first.returncode == 0 and second and second.returncode == 0 else "failed",
        "returncodes": [first.returncode, second.returncode if second else None],
        "wall_s": round(time.time() - start, 1),
        "distributed_type_logged": next((w for w in ("FSDP", "DEEPSPEED", "MULTI_GPU", "NO") if w in log), None),
        "pipeline_written": (out / "model_index.json").is_file(),
        "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
        "stderr_tail": log[-1500:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "images")
        results = {name: check(name, work, args.tiny) for name in ENGINES}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: {r['status']} {r.get('reason', '')} {r.get('checkpoints', '')}")
    return 0 if all(r["status"] != "failed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
