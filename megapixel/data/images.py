"""Small RGB images laid out as one PNG: nearest-neighbour upscaling, grids with separators, captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megapixel.atomic import replacing

# Mid grey for the part of an image a model has not been shown; white between cells, as palette images
# (digits especially) are mostly dark.
HIDDEN_GREY = 128
SEPARATOR = 255
CAPTION_HEIGHT = 16


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """An (h, w, 3) uint8 image blown up `scale` times by nearest neighbour (each pixel a square)."""
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def scale_for(n_px: int, min_cell: int = 64) -> int:
    """The smallest integer upscale that makes an n_px-wide image at least `min_cell` pixels wide."""
    return max(1, -(-min_cell // n_px))


def grid(rows: list[list[np.ndarray]], scale: int = 1, sep: int = 2) -> np.ndarray:
    """Rows of equally sized (h, w, 3) uint8 cells as one image: cells upscaled, `sep` pixels of separator
    between neighbours (none around the border); short rows are padded with the separator colour."""
    cells = [cell for row in rows for cell in row]
    assert cells, "a grid needs at least one cell"
    h, w = cells[0].shape[0] * scale, cells[0].shape[1] * scale
    n_cols = max(len(row) for row in rows)
    out = np.full((len(rows) * (h + sep) - sep, n_cols * (w + sep) - sep, 3), SEPARATOR, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            assert cell.shape == cells[0].shape, "grid cells must share one shape"
            y, x = r * (h + sep), c * (w + sep)
            out[y : y + h, x : x + w] = upscale(cell, scale)
    return out


def with_caption(image: np.ndarray, text: str) -> np.ndarray:
    """The image with a CAPTION_HEIGHT-pixel band of text above it, in PIL's default font."""
    band = Image.new("RGB", (image.shape[1], CAPTION_HEIGHT), (0, 0, 0))
    ImageDraw.Draw(band).text((2, 2), text, fill=(255, 255, 255), font=ImageFont.load_default())
    return np.concatenate([np.asarray(band), image], axis=0)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 image as a PNG, atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    return path
