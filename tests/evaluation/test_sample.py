"""Sampling: the KV cache draws exactly what full recompute draws, prompts are kept, grids have their size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megapixel.config import from_dict
from megapixel.data.images import CAPTION_HEIGHT, grid, scale_for
from megapixel.data.sources.files import ArraySource
from megapixel.data.writer import write_shards
from megapixel.engine.loop import train
from megapixel.errors import ConfigError, DataError
from megapixel.evaluation.commands import sample_command
from megapixel.evaluation.sample import sample, sample_naive, write_sample_grid

N_PX = 4
N_VOCAB = 16


def random_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.mark.parametrize(
    ("temperature", "top_k", "n_prompt"),
    [(1.0, None, 0), (0.7, 5, 0), (1.3, None, 6), (1.0, 3, 6)],
)
def test_cached_sampling_draws_the_same_tokens_as_full_recompute(tiny_model, temperature, top_k, n_prompt):
    model = tiny_model()
    prompt = torch.randint(0, N_VOCAB, (5, n_prompt)) if n_prompt else None
    seed = random_seed()
    # batch_size 2 over 5 samples: the generator's draws must also line up across uneven batches.
    kwargs = dict(temperature=temperature, top_k=top_k, prompt=prompt, seed=seed, batch_size=2)
    cached = sample(model, 5, **kwargs)
    naive = sample_naive(model, 5, **kwargs)
    assert cached.shape == (5, N_PX * N_PX)
    assert torch.equal(cached, naive)


def test_completions_keep_the_prompt_tokens(tiny_model):
    model = tiny_model()
    prompt = torch.randint(0, N_VOCAB, (3, 7))
    out = sample(model, 3, prompt=prompt, seed=random_seed())
    assert torch.equal(out[:, :7], prompt)
    one = torch.randint(0, N_VOCAB, (5,))
    shared = sample(model, 4, prompt=one, seed=random_seed())
    assert torch.equal(shared[:, :5], one.expand(4, -1))


def test_a_full_length_prompt_comes_back_unchanged(tiny_model):
    model = tiny_model()
    prompt = torch.randint(0, N_VOCAB, (2, N_PX * N_PX))
    assert torch.equal(sample(model, 2, prompt=prompt), prompt)


def test_the_same_seed_repeats_and_different_seeds_differ(tiny_model):
    model = tiny_model()
    seed = random_seed()
    first = sample(model, 8, seed=seed)
    assert torch.equal(first, sample(model, 8, seed=seed))
    # 8 images x 16 tokens from non-degenerate distributions: two seeds agreeing everywhere is vanishingly rare.
    assert not torch.equal(first, sample(model, 8, seed=seed + 1))


def test_top_k_1_is_greedy_decoding(tiny_model):
    model = tiny_model()
    prompt = torch.randint(0, N_VOCAB, (3, 2))
    out = sample(model, 3, top_k=1, prompt=prompt, seed=random_seed())
    expected = torch.zeros(3, N_PX * N_PX, dtype=torch.long)
    expected[:, :2] = prompt
    with torch.no_grad():
        for pos in range(2, N_PX * N_PX):
            expected[:, pos] = model(expected[:, : pos + 1]).logits[:, pos].argmax(dim=-1)
    assert torch.equal(out, expected)


def test_top_k_draws_only_among_the_k_most_likely_tokens(tiny_model):
    model = tiny_model()
    out = sample(model, 16, top_k=2, temperature=2.0, seed=random_seed())
    with torch.no_grad():
        logits = model(out).logits
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == out.unsqueeze(-1)).any(dim=-1).all()


def test_sampling_runs_in_the_models_dtype(tiny_model):
    model = tiny_model().to(torch.bfloat16)
    out = sample(model, 2, top_k=4, seed=random_seed())
    assert out.shape == (2, N_PX * N_PX) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < N_VOCAB


def test_sampling_leaves_a_training_model_in_training_mode(tiny_model):
    model = tiny_model().train()
    sample(model, 1)
    assert model.training


def test_a_bert_model_cannot_sample(tiny_model):
    with pytest.raises(ConfigError, match="autoregressive"):
        sample(tiny_model(objective="bert"), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=N_VOCAB + 1), "top_k"),
        (dict(prompt=torch.zeros(N_PX * N_PX + 1, dtype=torch.long)), "prompt"),
        (dict(prompt=torch.full((3,), N_VOCAB)), "palette indices"),
        (dict(prompt=torch.zeros(3, 2, dtype=torch.long)), "prompt must be"),
    ],
)
def test_bad_sampling_arguments_say_what_to_fix(tiny_model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sample(tiny_model(), 2, **kwargs)


def test_write_sample_grid_lays_out_samples_and_completion_rows(tiny_model, tmp_path):
    model = tiny_model()
    palette = np.random.uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32)
    held_out = torch.randint(0, N_VOCAB, (2, N_PX * N_PX))
    path = write_sample_grid(model, palette, tmp_path / "grid.png", n_uncond=7, completions_from=held_out, per_image=4)
    cell = N_PX * scale_for(N_PX)
    assert cell >= 64
    # 6 columns (original, half, 4 completions); 7 samples fill 2 rows, then one row per held-out image.
    columns, rows = 6, 2 + 2
    with Image.open(path) as image:
        assert image.size == (columns * cell + (columns - 1) * 2, CAPTION_HEIGHT + rows * cell + (rows - 1) * 2)
        pixels = np.asarray(image.convert("RGB"))[CAPTION_HEIGHT:]
    # The completion row's second cell shows the top half and grey where the bottom half is hidden.
    y = 2 * (cell + 2)
    x = cell + 2
    assert (pixels[y + cell - 1, x : x + cell] == 128).all()


def test_grid_separates_cells_and_upscales_by_nearest_neighbour():
    a = np.random.randint(0, 256, (2, 2, 3), dtype=np.uint8)
    b = np.random.randint(0, 256, (2, 2, 3), dtype=np.uint8)
    out = grid([[a, b]], scale=3, sep=2)
    assert out.shape == (6, 6 + 2 + 6, 3)
    assert (out[:3, :3] == a[0, 0]).all() and (out[3:, 3:6] == a[1, 1]).all()
    assert (out[:, 8:] == np.kron(b, np.ones((3, 3, 1), dtype=np.uint8))).all()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A real run: random 4x4 images sharded with an 8-colour palette, trained two steps; (run_dir, shards)."""
    root = tmp_path_factory.mktemp("sample_run")
    np.save(root / "images.npy", np.random.randint(0, 256, (40, N_PX, N_PX, 3), dtype=np.uint8))
    shards = root / "shards"
    write_shards(ArraySource(root / "images.npy"), shards, n_px=N_PX, k=8, val_fraction=0.25, progress=False)
    cfg = from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": N_PX, "n_vocab": 8},
            "data": {"shards": str(shards)},
            "train": {"run_dir": str(root / "run"), "steps": 2, "batch_size": 4, "eval_batches": 1, "progress": False},
        }
    )
    train(cfg)
    return root / "run", shards


def test_sample_command_completes_the_top_half_of_val_images(run, tmp_path):
    run_dir, shards = run
    path = sample_command(str(run_dir), str(tmp_path / "s.png"), 5, 1.0, None, 0, None, 3, "cpu")
    cell = N_PX * scale_for(N_PX)
    columns, rows = 6, 1 + 3
    with Image.open(path) as image:
        assert image.size == (columns * cell + (columns - 1) * 2, CAPTION_HEIGHT + rows * cell + (rows - 1) * 2)
        pixels = np.asarray(image.convert("RGB"))[CAPTION_HEIGHT:]
    for row in range(1, rows):
        y = row * (cell + 2)
        original = pixels[y : y + cell // 2, :cell]
        # Every cell of a completion row (top half shown, then four completions) starts with the original's top half.
        for column in range(1, columns):
            x = column * (cell + 2)
            assert np.array_equal(pixels[y : y + cell // 2, x : x + cell], original)


def test_sample_command_refuses_shards_with_another_palette(run, tmp_path):
    run_dir, _ = run
    np.save(tmp_path / "other.npy", np.random.randint(0, 256, (8, N_PX, N_PX, 3), dtype=np.uint8))
    other = tmp_path / "other"
    write_shards(ArraySource(tmp_path / "other.npy"), other, n_px=N_PX, k=8, val_fraction=0.5, progress=False)
    with pytest.raises(DataError, match="another palette"):
        sample_command(str(run_dir), str(tmp_path / "s.png"), 2, 1.0, None, 0, str(other), 2, "cpu")
    assert not (tmp_path / "s.png").exists()
