"""Files of an evaluation: the sample grid, the samples as PNG files and the results as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..image_grid import image_grid
from .engine import EvaluationResult

__all__ = ["save_sample_pngs", "write_evaluation"]


def save_sample_pngs(samples_uint8: torch.Tensor, folder) -> Path:
    """Write each uint8 sample [C, H, W] as ``folder/000000.png`` (grey for one channel)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(samples_uint8.cpu().numpy()):
        Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    return folder


def write_evaluation(result: EvaluationResult, out_dir, *, json_path=None, samples_dir=None, header=None) -> dict:
    """Write ``out_dir/samples_grid.png``, the samples as PNGs (with ``samples_dir``) and ``header`` (e.g. the
    pipeline's name) with the figures as JSON (default ``out_dir/eval_results.json``); returns what the JSON
    holds, with ``json`` (its own path) added."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {**(header or {}), **result.figures}
    grid_path = out_dir / "samples_grid.png"
    image_grid(result.samples.float() / 255).save(grid_path)
    figures["sample_grid"] = str(grid_path)
    if samples_dir is not None:
        figures["samples_dir"] = str(save_sample_pngs(result.samples, samples_dir))
    json_path = Path(json_path) if json_path else out_dir / "eval_results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return {**figures, "json": str(json_path)}
