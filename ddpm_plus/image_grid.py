"""The sample grid of the trainer and of ``ddpm-plus evaluate``: one function, one look."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["image_grid"]

MIN_TILE = 64  # pixels: 8x8 digits are upscaled (nearest) to at least this
FRAME = 2  # grey pixels around each tile (4 between tiles): digits on black would otherwise run together
GREY = (128, 128, 128)


def _to_pil(images) -> list[Image.Image]:
    """PIL images as they are; a tensor/array [N, C, H, W] in [0, 1] becomes 8-bit PIL images."""
    if isinstance(images, Image.Image):
        return [images]
    if len(images) and isinstance(images[0], Image.Image):
        return list(images)
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def image_grid(images: Sequence[Image.Image] | object, frame: int = FRAME, rows: int | None = None) -> Image.Image:
    """Images in a near-square grid (rows x cols = N exactly, rows the largest divisor <= sqrt N), each
    upscaled (nearest) to at least 64 pixels and framed in ``frame`` grey pixels: a grid of
    ``cols * (tile + 2 * frame)`` by ``rows * (tile + 2 * frame)`` pixels.

    ``images``: a list of PIL images, or a tensor/array [N, C, H, W] with values in [0, 1]. ``rows``: the
    number of rows instead (it must divide N), e.g. one row per class of a conditional model.
    (diffusers' ``make_image_grid`` butts tiles together: digits on black then run into each other.)
    """
    pils = _to_pil(images)
    if not pils:
        raise ValueError("image_grid needs at least one image")
    n = len(pils)
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    elif isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or n % rows:
        raise ValueError(f"rows must be a positive divisor of the number of images ({n}); got {rows!r}")
    cols = n // rows
    width, height = pils[0].size
    scale = max(1, math.ceil(MIN_TILE / min(width, height)))
    cell_w, cell_h = width * scale + 2 * frame, height * scale + 2 * frame
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), GREY)
    for i, image in enumerate(pils):
        tile = image.convert("RGB").resize((width * scale, height * scale), resample=Image.Resampling.NEAREST)
        grid.paste(tile, ((i % cols) * cell_w + frame, (i // cols) * cell_h + frame))
    return grid
