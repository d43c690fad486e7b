"""The palette: k-means centres in [-1, 1], nearest-centre encoding, decoding, and palette files."""

import numpy as np
import pytest

from megapixel.data.palette import (
    PaletteDownsampler,
    decode_tokens,
    encode_pixels,
    fit_palette,
    load_palette,
    palette_hash,
    save_palette,
)
from megapixel.errors import DataError


def distinct_colours(n: int, rng: np.random.Generator) -> np.ndarray:
    codes = rng.choice(256**3, n, replace=False)
    return np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1).astype(np.uint8)


def brute_force_nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    x = pixels.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
    dist = ((x[:, None, :] - palette.astype(np.float64)[None]) ** 2).sum(axis=2)
    return dist.argmin(axis=1).reshape(pixels.shape[:-1])


def test_fit_palette_gives_k_distinct_float32_centres_in_unit_range_the_same_for_the_same_seed():
    rng = np.random.default_rng()
    pixels = rng.integers(0, 256, (5000, 3), dtype=np.uint8)
    palette = fit_palette(pixels, k=16, seed=3)
    assert palette.dtype == np.float32 and palette.shape == (16, 3)
    assert np.abs(palette).max() <= 1.0
    assert len(np.unique(palette, axis=0)) == 16
    np.testing.assert_array_equal(fit_palette(pixels, k=16, seed=3), palette)


def test_fit_palette_finds_the_colours_of_an_image_made_of_k_colours():
    rng = np.random.default_rng()
    colours = distinct_colours(8, rng)
    pixels = colours[rng.integers(0, 8, 4000)]
    palette = fit_palette(pixels, k=8)
    # Every colour is its own cluster, so each centre is that colour (to well within rounding).
    assert sorted(map(tuple, decode_tokens(np.arange(8), palette))) == sorted(map(tuple, colours))


def test_fit_palette_refuses_more_centres_than_distinct_colours():
    pixels = np.repeat(distinct_colours(5, np.random.default_rng()), 100, axis=0)
    with pytest.raises(DataError, match="only 5 distinct colours.*at most 5"):
        fit_palette(pixels, k=8)


def test_encoding_the_centres_returns_their_indices_and_decoding_returns_the_colours():
    colours = distinct_colours(64, np.random.default_rng())
    palette = (colours / 127.5 - 1).astype(np.float32)
    tokens = encode_pixels(colours, palette)
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, np.arange(64))
    np.testing.assert_array_equal(decode_tokens(tokens, palette), colours)


def test_encode_matches_the_brute_force_nearest_centre_for_any_batch_shape_and_chunk():
    rng = np.random.default_rng()
    palette = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    images = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    tokens = encode_pixels(images, palette, chunk=777)
    assert tokens.shape == (3, 20, 30)
    np.testing.assert_array_equal(tokens, brute_force_nearest(images, palette))


def test_encode_breaks_exact_ties_towards_the_lower_index_like_argmin():
    rng = np.random.default_rng()
    palette = rng.uniform(-1, 1, (6, 3)).astype(np.float32)
    palette[4] = palette[1]
    pixels = rng.integers(0, 256, (2000, 3), dtype=np.uint8)
    tokens = encode_pixels(pixels, palette)
    assert not (tokens == 4).any()
    np.testing.assert_array_equal(tokens, brute_force_nearest(pixels, palette))


def test_decode_rounds_centres_to_the_nearest_uint8_and_clips():
    palette = np.array([[-1, 0, 1], [-1.2, 1.2, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(
        decode_tokens(np.array([[0, 1]]), palette), [[[0, 128, 255], [0, 255, 191]]]
    )  # rint(127.5) = 128 (half to even), rint(191.25) = 191


def test_a_saved_palette_loads_back_identically_with_the_same_hash(tmp_path):
    palette = np.random.default_rng().uniform(-1, 1, (32, 3)).astype(np.float32)
    save_palette(tmp_path / "palette.npy", palette)
    loaded = load_palette(tmp_path / "palette.npy", k=32)
    np.testing.assert_array_equal(loaded, palette)
    assert palette_hash(loaded) == palette_hash(palette)
    assert len(palette_hash(palette)) == 16 and int(palette_hash(palette), 16) >= 0
    assert [p.name for p in tmp_path.iterdir()] == ["palette.npy"]  # no temporary file left behind


def test_the_hash_changes_when_one_colour_changes():
    palette = np.random.default_rng().uniform(-1, 1, (16, 3)).astype(np.float32)
    changed = palette.copy()
    changed[7, 2] = np.nextafter(changed[7, 2], np.float32(2))
    assert palette_hash(changed) != palette_hash(palette)


@pytest.mark.parametrize(
    "content, k, message",
    [
        (None, None, "no palette file"),
        (b"this is not numpy", None, "not a readable .npy"),
        (np.zeros((512, 4), np.float32), None, r"has shape \(512, 4\): expected \(k, 3\) colours in \[-1, 1\]"),
        (np.zeros((512,), np.float32), None, r"has shape \(512,\)"),
        (np.full((8, 3), 2.0, np.float32), None, "values up to 2"),
        (np.full((8, 3), np.nan, np.float32), None, "NaN"),
        (np.zeros((8, 3), np.float32), 16, "has 8 colours: expected 16"),
    ],
)
def test_load_palette_refuses_bad_files_naming_the_file(tmp_path, content, k, message):
    path = tmp_path / "palette.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(DataError, match=message) as err:
        load_palette(path, k=k)
    assert "palette.npy" in str(err.value)


def area_downsample_and_encode(tokens: np.ndarray, palette: np.ndarray, factor: int) -> np.ndarray:
    """The definition: decode, average each factor x factor block in float64, round to uint8, encode."""
    n = round(tokens.shape[1] ** 0.5)
    m = n // factor
    rgb = decode_tokens(tokens, palette).reshape(-1, m, factor, m, factor, 3).astype(np.float64)
    return encode_pixels(np.rint(rgb.mean(axis=(2, 4))).astype(np.uint8), palette).reshape(len(tokens), m * m)


@pytest.mark.parametrize("factor, n, k", [(2, 8, 512), (3, 9, 16), (4, 8, 7)])
def test_palette_downsampling_equals_encoding_the_area_downsampled_decoded_image(factor, n, k):
    rng = np.random.default_rng()
    palette = rng.uniform(-1, 1, (k, 3)).astype(np.float32)
    downsample = PaletteDownsampler(palette, factor)
    for _ in range(3):  # later batches are answered partly from the colours the first ones looked up
        tokens = rng.integers(0, k, (20, n * n)).astype(np.uint16)
        got = downsample(tokens)
        assert got.dtype == np.uint16 and got.shape == (20, (n // factor) ** 2)
        np.testing.assert_array_equal(got, area_downsample_and_encode(tokens, palette, factor))


def test_palette_downsampling_rounds_half_way_means_like_the_definition():
    # The block [0, 0, 1, 1] averages to (0.5, 11.5, 252.5): rounding half up instead of half to even
    # gives (1, 12, 253), whose nearest colour is 0, not 1.
    palette = (np.array([[0, 10, 255], [1, 13, 250], [2, 200, 3]]) / 127.5 - 1).astype(np.float32)
    tokens = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [2, 0, 1, 2]], dtype=np.uint16)
    np.testing.assert_array_equal(
        PaletteDownsampler(palette, 2)(tokens), area_downsample_and_encode(tokens, palette, 2)
    )
