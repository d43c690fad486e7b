"""The colour palette: k-means centres in [-1, 1] that turn RGB pixels into tokens and back.

The palette is stored as openai/image-gpt's `kmeans_centers.npy`: a float32 (k, 3) array of RGB
centres scaled to [-1, 1] (x / 127.5 - 1). A pixel's token is the index of its nearest centre.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from megapixel.atomic import replacing
from megapixel.errors import DataError

# Values a saved palette may exceed [-1, 1] by: k-means centres are means of values in [-1, 1], so
# anything beyond float32 rounding means the file is not a palette in this scale.
_RANGE_SLACK = 1e-3
# Distinct colours x centres up to which the palette is fitted by exact Lloyd k-means (a second or two).
_LLOYD_WORK = 10_000_000
# Squared distances (float64, in [-1, 1] space) closer than this count as a tie between two centres:
# far above the tree's rounding (~1e-15), far below any difference between real colours.
_TIE_MARGIN = 1e-9


def _scale(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def fit_palette(pixels: np.ndarray, k: int = 512, seed: int = 0, max_pixels: int = 200_000) -> np.ndarray:
    """Fit k colour centres to uint8 RGB pixels (N, 3) by k-means; float32 (k, 3) in [-1, 1]."""
    # Imported here: scikit-learn takes ~0.5 s to import, which every shard-writing worker process would pay.
    from sklearn.cluster import KMeans, MiniBatchKMeans

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3:
        raise DataError(f"pixels have dtype {pixels.dtype} and shape {pixels.shape}: expected uint8 (N, 3) RGB")
    if k < 1:
        raise DataError(f"palette size {k}: must be at least 1")
    rng = np.random.default_rng(seed)
    if len(pixels) > max_pixels:
        pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
    packed = (pixels[:, 0].astype(np.int32) << 16) | (pixels[:, 1].astype(np.int32) << 8) | pixels[:, 2]
    colours, counts = np.unique(packed, return_counts=True)
    if len(colours) < k:
        raise DataError(
            f"the images have only {len(colours)} distinct colours among the {len(pixels)} pixels sampled: "
            f"k-means cannot make {k} distinct centres; choose a palette size of at most {len(colours)}"
        )
    # k-means over the distinct colours weighted by their counts has the same objective as over the
    # pixels, and is much faster when colours repeat (a grey set has at most 256).
    distinct = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1).astype(np.uint8)
    if len(distinct) * k <= _LLOYD_WORK:
        # Few colours: exact Lloyd iterations are cheap, and unlike mini-batch k-means (whose random
        # reassignments can stack two centres on one colour) they give every colour its own centre
        # when k equals the number of colours.
        kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed)
    else:
        # Mini-batch k-means fits 200k pixels x 512 centres in a few seconds on two cores; full Lloyd
        # iterations take ~20 s for a barely lower inertia (measured on synthetic colours: 0.0160 vs 0.0155).
        kmeans = MiniBatchKMeans(n_clusters=k, n_init=1, batch_size=16384, max_iter=100, random_state=seed)
    kmeans.fit(_scale(distinct), sample_weight=counts.astype(np.float64))
    return np.clip(kmeans.cluster_centers_, -1.0, 1.0).astype(np.float32)


def encode_pixels(images: np.ndarray, palette: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Map uint8 RGB pixels (..., 3) to the uint16 indices (...) of their nearest palette centres."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 1 or images.shape[-1] != 3:
        raise DataError(f"images have dtype {images.dtype} and shape {images.shape}: expected uint8 (..., 3) RGB")
    centres = np.asarray(palette, dtype=np.float32).astype(np.float64)
    assert len(centres) <= 65536, "palette indices must fit in uint16"
    # A k-d tree over the centres finds nearest centres ~10x faster than the (chunk, k) distance
    # matrix (0.3 s vs 3 s for 460k pixels and 512 centres), which matters at ImageNet scale.
    tree = cKDTree(centres)
    neighbours = min(2, len(centres))
    pixels = images.reshape(-1, 3)
    # Each distinct colour is looked up once: photos and downsampled palette images repeat colours
    # (flat regions), and np.unique costs less than the tree query it saves.
    packed = (pixels[:, 0].astype(np.int32) << 16) | (pixels[:, 1].astype(np.int32) << 8) | pixels[:, 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    flat = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1)
    out = np.empty(len(flat), dtype=np.uint16)
    for start in range(0, len(flat), chunk):
        x = flat[start : start + chunk].astype(np.float64) / 127.5 - 1.0
        dist, index = tree.query(x, k=neighbours, workers=-1)
        if neighbours == 1:
            out[start : start + len(x)] = index
            continue
        best = index[:, 0]
        # The tree may return either of two (nearly) equidistant centres; settle those pixels by
        # brute force, which picks the lowest index, so the result equals a plain argmin.
        close = np.flatnonzero(dist[:, 1] ** 2 - dist[:, 0] ** 2 < _TIE_MARGIN)
        if len(close):
            best[close] = ((x[close, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        out[start : start + len(x)] = best
    return out[inverse.reshape(-1)].reshape(images.shape[:-1])


def decode_tokens(tokens: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map palette indices (...) back to uint8 RGB pixels (..., 3)."""
    centres = np.asarray(palette, dtype=np.float32)
    colours = np.clip(np.rint(127.5 * (centres + 1.0)), 0, 255).astype(np.uint8)
    return colours[np.asarray(tokens, dtype=np.int64)]


def check_palette(palette: np.ndarray, where: str, k: int | None = None) -> np.ndarray:
    """Return `palette` as float32 (k, 3) if it is a valid palette; else DataError naming `where`."""
    palette = np.asarray(palette)
    expected = f"expected ({'k' if k is None else k}, 3) colours in [-1, 1]"
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) == 0 or len(palette) > 65536:
        raise DataError(f"{where} has shape {palette.shape}: {expected}")
    if palette.dtype.kind not in "fiu":
        raise DataError(f"{where} has dtype {palette.dtype}: {expected}")
    if not np.isfinite(palette).all():
        raise DataError(f"{where} holds NaN or infinite values: {expected}")
    if np.abs(palette).max() > 1.0 + _RANGE_SLACK:
        raise DataError(f"{where} has values up to {np.abs(palette).max():.4g}: {expected} (x / 127.5 - 1)")
    if k is not None and len(palette) != k:
        raise DataError(f"{where} has {len(palette)} colours: expected {k} (the vocabulary size)")
    return palette.astype(np.float32)


def save_palette(path: str | Path, palette: np.ndarray) -> None:
    """Write a palette as .npy, atomically: it appears complete under `path` or not at all."""
    path = Path(path)
    palette = check_palette(palette, "the palette")
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, palette)


def load_palette(path: str | Path, k: int | None = None) -> np.ndarray:
    """Read and check a palette .npy: float32 (k, 3) in [-1, 1], with `k` rows when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no palette file at {path}: give a .npy palette (k, 3) or make one with the shards command")
    try:
        palette = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy palette ({err}): expected (k, 3) colours in [-1, 1]") from None
    if not isinstance(palette, np.ndarray):
        palette.close()
        raise DataError(f"{path} is an .npz archive: expected a .npy of (k, 3) colours in [-1, 1]")
    return check_palette(palette, str(path), k)


def palette_hash(palette: np.ndarray) -> str:
    """A short fingerprint of a palette: the first 16 hex digits of sha256 of its float32 bytes."""
    data = np.ascontiguousarray(np.asarray(palette, dtype=np.float32))
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


# Bits per channel of a packed colour sum in `PaletteDownsampler`: three fields in an int64, each
# holding up to 255 * f * f (f <= 90).
_SUM_BITS = 21


class PaletteDownsampler:
    """Area-downsamples token images by an integer factor through a palette: decode, average each f x f
    block (rounded to uint8), re-encode to the nearest colour, exactly as `encode_pixels` would.

    Each token's colour is packed into one int64 (a 21-bit field per channel), so a block's channel
    sums are one gather and one add per pixel. The nearest centre of each averaged colour is
    remembered in a table over all 2^24 colours, filled as colours turn up: the kd-tree is asked once
    per distinct colour over the object's life (images repeat colours: a stream soon asks it almost
    never); the table is allocated zeroed, so memory holds only the pages of colours seen.
    """

    def __init__(self, palette: np.ndarray, factor: int) -> None:
        assert factor >= 1 and 255 * factor * factor < 1 << _SUM_BITS, f"factor {factor} out of range"
        self.palette = check_palette(palette, "the palette")
        self.factor = factor
        rgb = decode_tokens(np.arange(len(self.palette)), self.palette).astype(np.int64)
        self._packed = (rgb[:, 0] << 2 * _SUM_BITS) | (rgb[:, 1] << _SUM_BITS) | rgb[:, 2]
        # Channel sum -> rounded mean, as np.rint(sum / f^2) (half to even) of the float reference.
        self._mean = np.rint(np.arange(255 * factor * factor + 1) / (factor * factor)).astype(np.int64)
        # Token + 1 per colour (0: not looked up yet).
        self._nearest = np.zeros(1 << 24, dtype=np.uint16 if len(self.palette) < 65536 else np.uint32)

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """(B, n * n) tokens of n x n images -> (B, (n/f) * (n/f)) uint16 tokens."""
        batch, length = tokens.shape
        n = round(length**0.5)
        f, m = self.factor, n // self.factor
        assert n * n == length and m * f == n, f"{length} tokens are not a square image divisible by {f}"
        # Rows of f pixels, then columns of f rows, summed by strided adds (numpy's multi-axis sum is ~10x slower).
        wide = self._packed[tokens].reshape(batch * n, m, f)
        rows = sum(wide[:, :, i] for i in range(f))
        tall = rows.reshape(batch, m, f, m)
        sums = sum(tall[:, :, i] for i in range(f))
        mask = (1 << _SUM_BITS) - 1
        mean = self._mean
        colours = (mean[sums >> 2 * _SUM_BITS] << 16) | (mean[(sums >> _SUM_BITS) & mask] << 8) | mean[sums & mask]
        colours = colours.reshape(-1)
        found = self._nearest[colours]
        missing = np.flatnonzero(found == 0)
        if len(missing):
            new = np.unique(colours[missing])
            rgb = np.stack([new >> 16, (new >> 8) & 255, new & 255], axis=1).astype(np.uint8)
            self._nearest[new] = encode_pixels(rgb, self.palette).astype(self._nearest.dtype) + 1
            found[missing] = self._nearest[colours[missing]]
        return (found - 1).astype(np.uint16).reshape(batch, m * m)
