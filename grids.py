"""Image batches in [-1, 1] -> uint8 pictures and grid PNGs, written atomically (used by train.py and sample.py)."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from atomic import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] floats in [-1, 1] (C = 1 or 3) -> [B,H,W,C] uint8 in 0..255 (rounded, clipped)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape [B,C,H,W], got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """[B,C,H,W] in [-1, 1] -> one [rows*(H+p)+p, nrow*(W+p)+p, C] uint8 picture, row-major, `nrow` per row."""
    pics = to_uint8(images)
    b, h, w, c = pics.shape
    ncol = max(1, min(nrow, b))
    nrows = max(1, math.ceil(b / ncol))
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(b):
        r, k = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[y:y + h, x:x + w] = pics[i]
    return grid


def png_bytes(picture: np.ndarray) -> bytes:
    """[H, W, C] uint8 (C = 1 or 3) -> PNG bytes. PIL's encoder at its defaults is deterministic: the same pixels give
    the same bytes, which the grids and the --outdir images of sample.py promise for a seed."""
    buf = io.BytesIO()
    Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(buf, format="PNG")
    return buf.getvalue()


def label_rows(grid: np.ndarray, labels: list[str], row_height: int, padding: int) -> np.ndarray:
    """The grid with a white margin on the left holding one text label per row (PIL's built-in font)."""
    font = ImageFont.load_default()
    width = max(int(math.ceil(font.getlength(t))) for t in labels) + 8
    canvas = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid if grid.shape[-1] == 3 else np.repeat(grid, 3, axis=-1)), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(labels):
        y = padding + r * (row_height + padding) + row_height // 2
        draw.text((4, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(canvas)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
              labels: list[str] | None = None) -> Path:
    """Save [B,C,H,W] images in [-1, 1] as one PNG grid with `nrow` images per row, atomically; `labels`: one text
    per row, drawn in a margin on the left."""
    grid = make_grid(images, nrow=nrow, padding=padding)
    if labels:
        grid = label_rows(grid, labels, images.shape[-2], padding)
    return atomic_write(path, png_bytes(grid))
