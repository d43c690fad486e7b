"""Checkpoints for evaluation: finding the latest one, loading its model safely, and the saved training state."""

import random

import numpy as np
import pytest
import torch

from megapixel.checkpoint.files import list_tags, prune_checkpoints, resolve_checkpoint, tag_name
from megapixel.checkpoint.load import load_model
from megapixel.config import to_yaml
from megapixel.data.palette import save_palette
from megapixel.engine.rank_state import rng_state, set_rng_state
from megapixel.errors import CheckpointError
from tests.harness.runs import save_engine_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_load_model_returns_the_trained_weights_config_and_palette(tmp_path, zero_stage):
    engine, cfg, palette = save_engine_checkpoint(tmp_path / "run", zero_stage=zero_stage)
    model, loaded_cfg, loaded_palette = load_model(tmp_path / "run")
    assert loaded_cfg.model == cfg.model
    np.testing.assert_array_equal(loaded_palette, palette)
    assert not model.training
    tokens = torch.randint(0, cfg.model.n_vocab, (3, cfg.model.n_ctx))
    if zero_stage == 0:
        with torch.no_grad():
            expected = engine.module.model(tokens).logits
        # Same weights, same code, same input: equal to the bit.
        torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
    else:
        # ZeRO-3 keeps each parameter partitioned; the reassembled fp32 weights must be the trained ones.
        import deepspeed

        params = dict(engine.module.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, tensor in model.state_dict().items():
                torch.testing.assert_close(tensor, params[name].detach(), rtol=0, atol=0, msg=name)


def test_resolve_checkpoint_accepts_run_folder_checkpoints_folder_and_tag(tmp_path):
    run = tmp_path / "run"
    save_engine_checkpoint(run, steps=1)
    tag = run / "checkpoints" / tag_name(1)
    assert resolve_checkpoint(run) == tag
    assert resolve_checkpoint(run / "checkpoints") == tag
    assert resolve_checkpoint(tag) == tag
    assert resolve_checkpoint(str(tag)) == tag
    assert resolve_checkpoint(tag / "mp_rank_00_model_states.pt") == tag


def test_resolve_checkpoint_without_one_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path / "empty_run")


def test_latest_naming_a_missing_tag_is_an_error(tmp_path):
    run = tmp_path / "run"
    save_engine_checkpoint(run, steps=1)
    (run / "checkpoints" / "latest").write_text(tag_name(99))
    with pytest.raises(CheckpointError, match="step_0000099"):
        resolve_checkpoint(run)


def test_config_falls_back_to_the_runs_config_yaml_and_a_mismatch_names_the_tensor(tmp_path):
    run = tmp_path / "run"
    _, cfg, _ = save_engine_checkpoint(run, with_config=False)
    (run / "config.yaml").write_text(to_yaml(cfg))
    model, loaded_cfg, _ = load_model(run)
    assert loaded_cfg.model == cfg.model

    cfg.model.n_vocab += 1
    (run / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(CheckpointError, match=r"wte\.weight has shape \(8, 32\) but the model wants \(9, 32\)"):
        load_model(run)


def test_a_palette_other_than_the_trained_one_is_refused(tmp_path):
    run = tmp_path / "run"
    save_engine_checkpoint(run)
    save_palette(run / "palette.npy", np.random.uniform(-1, 1, (8, 3)).astype(np.float32))
    with pytest.raises(CheckpointError, match="no palette"):
        load_model(run)


def test_prune_keeps_the_newest_tags_up_to_the_current_step(tmp_path):
    for step in (5, 10, 15, 20, 25):
        (tmp_path / tag_name(step)).mkdir()
    prune_checkpoints(tmp_path, keep_last=2, current_step=20)
    # step 25 lies past the current step (left by an interrupted run) and is overwritten when reached.
    assert [p.name for p in list_tags(tmp_path)] == [tag_name(15), tag_name(20), tag_name(25)]


def test_rng_state_round_trip_replays_every_generator():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_rng_state_is_readable_without_unpickling_code(tmp_path):
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    set_rng_state(state)
