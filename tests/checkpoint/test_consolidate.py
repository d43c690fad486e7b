"""Consolidation: a DeepSpeed training checkpoint becomes one safetensors file with its config and palette beside
it, which loads back as the trained model; bad inputs are named and nothing on disk is damaged."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megapixel.checkpoint.consolidate import (
    CONFIG,
    PALETTE,
    WEIGHTS,
    consolidate,
    is_consolidated,
    load_consolidated,
    read_consolidated,
)
from megapixel.checkpoint.files import tag_name
from megapixel.checkpoint.load import load_model
from megapixel.config import from_dict, to_yaml
from megapixel.data.palette import save_palette
from megapixel.errors import CheckpointError
from tests.harness.runs import save_engine_checkpoint

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def engine_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's current IGPT weights, gathered whole (ZeRO-3 keeps each rank a partition)."""
    import deepspeed

    model = engine.module.model
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_consolidated_checkpoint_holds_the_trained_weights_config_and_palette(tmp_path, zero_stage):
    engine, cfg, palette = save_engine_checkpoint(tmp_path / "run", steps=2, zero_stage=zero_stage)
    out = consolidate(tmp_path / "run", tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, CONFIG, PALETTE]) and is_consolidated(out)

    state, loaded_cfg, loaded_palette, metadata = read_consolidated(out)
    assert loaded_cfg == cfg and metadata["step"] == "2"
    np.testing.assert_array_equal(loaded_palette, palette)
    trained = engine_weights(engine)
    assert state.keys() == trained.keys()
    for name, tensor in trained.items():
        # Copies of the same fp32 numbers: equal to the bit.
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)

    model, _, _ = load_consolidated(out)
    assert not model.training
    tokens = torch.randint(0, cfg.model.n_vocab, (3, cfg.model.n_ctx))
    reference, _, _ = load_model(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=0)
        # load_model takes either form.
        assert torch.equal(load_model(out)[0](tokens).logits, load_model(tmp_path / "run")[0](tokens).logits)


def test_tool_consolidates_and_says_what_it_wrote(tmp_path):
    save_engine_checkpoint(tmp_path / "run", steps=1)
    done = subprocess.run(
        [sys.executable, str(TOOL), "consolidate", str(tmp_path / "run"), str(tmp_path / "model")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "consolidated step 1 of" in done.stdout and "2 blocks x 32 wide" in done.stdout
    assert is_consolidated(tmp_path / "model")


def test_an_existing_output_folder_is_refused_and_left_as_it_was(tmp_path):
    save_engine_checkpoint(tmp_path / "run", steps=1)
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        consolidate(tmp_path / "run", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture()
def consolidated(tmp_path) -> Path:
    save_engine_checkpoint(tmp_path / "run", steps=1)
    return consolidate(tmp_path / "run", tmp_path / "model")


@pytest.mark.parametrize("missing", [WEIGHTS, PALETTE, CONFIG])
def test_a_missing_file_is_named(consolidated, missing):
    (consolidated / missing).unlink()
    with pytest.raises(CheckpointError, match=f"lacks {missing}"):
        load_consolidated(consolidated)


def test_a_config_that_does_not_fit_the_weights_names_the_tensor(consolidated):
    state, cfg, _, _ = read_consolidated(consolidated)
    cfg.model.n_embd = 64
    (consolidated / CONFIG).write_text(to_yaml(cfg))
    with pytest.raises(CheckpointError, match=r"sos has shape \(32,\) but the model wants \(64,\)"):
        load_consolidated(consolidated)


def test_a_palette_other_than_the_saved_one_is_refused(consolidated):
    save_palette(consolidated / PALETTE, np.random.uniform(-1, 1, (8, 3)).astype(np.float32))
    with pytest.raises(CheckpointError, match="is not the palette"):
        load_consolidated(consolidated)


def test_a_truncated_weights_file_is_named(consolidated):
    data = (consolidated / WEIGHTS).read_bytes()
    (consolidated / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{WEIGHTS}"):
        load_consolidated(consolidated)


def run_trainer(shards: Path, run_dir: Path, seed: int, processes: int, **parallel: int) -> None:
    """Two steps of the real trainer on the digits, in one process or under torchrun (gloo) as a user starts it."""
    cfg = from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": 8, "n_vocab": 16},
            "data": {"shards": str(shards), "shuffle_buffer": 100},
            "train": {"steps": 2, "batch_size": 8, "save_every": 2, "eval_every": 100, "progress": False},
            "parallel": parallel,
        }
    )
    cfg.train.run_dir, cfg.train.seed = str(run_dir), seed
    config = run_dir.with_suffix(".yaml")
    config.write_text(to_yaml(cfg))
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}"] if processes > 1 else []
    # A launcher sets the rank variables itself; this process's own (single-process) ones must not leak in.
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    command = [sys.executable, *launcher, "-m", "megapixel.cli", "train", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_data_ranks_with_zero3_consolidate_to_what_load_model_reads(digits_shards, tmp_path):
    """ZeRO-3 over two data ranks: each rank's file holds a partition of every weight."""
    run_trainer(digits_shards, tmp_path / "run", random.randrange(2**31), processes=2, zero_stage=3)
    assert len(list((tmp_path / "run" / "checkpoints" / tag_name(2)).glob("zero_pp_rank_*_model_states.pt"))) == 2

    model, _, palette = load_consolidated(consolidate(tmp_path / "run", tmp_path / "model"))
    reference, _, reference_palette = load_model(tmp_path / "run")
    np.testing.assert_array_equal(palette, reference_palette)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_consolidates_to_the_one_process_run(digits_shards, tmp_path):
    """Tensor 2 x data 1 trains on the same batches as one process, so the joined weights are that run's."""
    seed = random.randrange(2**31)
    run_trainer(digits_shards, tmp_path / "tensor2", seed, processes=2, tensor=2)
    run_trainer(digits_shards, tmp_path / "single", seed, processes=1)
    assert (tmp_path / "tensor2" / "checkpoints" / tag_name(2) / "mp_rank_01_model_states.pt").is_file()

    joined, _, _, _ = read_consolidated(consolidate(tmp_path / "tensor2", tmp_path / "joined"))
    single, _, _, _ = read_consolidated(consolidate(tmp_path / "single", tmp_path / "one"))
    # Split matmuls add in another order, and Adam turns a near-zero gradient's rounding into a step of up to
    # lr: the runs agree to a fraction of one step (as in test_parallel_training), while a misplaced shard
    # would be off by the weights' own size (init std 0.02 and up).
    atol = 0.1 * 3e-3  # the default train.lr
    for name, tensor in single.items():
        torch.testing.assert_close(
            joined[name], tensor, rtol=0, atol=atol, msg=lambda m, n=name: f"{n} (seed {seed}): {m}"
        )
