"""Resharding and starting from saved weights: train.init_from fills the model before it is laid out, reshard writes
any model as a checkpoint of any tensor x pipeline x data layout that training resumes exactly where the source
stood, and 1 -> tensor 2 x pipeline 2 -> 1 gives back the same weights to the bit."""

import contextlib
import importlib.util
import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megapixel.checkpoint.consolidate import consolidate, read_consolidated, write_consolidated
from megapixel.checkpoint.files import tag_name
from megapixel.checkpoint.hf import export_hf
from megapixel.checkpoint.load import load_model
from megapixel.config import from_dict
from megapixel.data.palette import save_palette
from megapixel.engine.build import build_engine, deepspeed_config
from megapixel.engine.loop import train
from megapixel.engine.metrics import read_metrics
from megapixel.engine.reshard import reshard
from megapixel.errors import CheckpointError, ConfigError
from megapixel.model import IGPT
from megapixel.parallel.distributed import init_distributed
from tests.harness.runs import save_engine_checkpoint

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def engine_model(cfg):
    """The IGPT a one-process engine builds for `cfg`."""
    info = init_distributed()
    return build_engine(cfg, deepspeed_config(cfg, 1, info.device), info).module.model


def with_changes(cfg, **sections):
    """A copy of `cfg` with section.key values replaced (e.g. train={"init_from": ...})."""
    data = cfg.to_dict()
    for section, values in sections.items():
        data[section].update(values)
    return from_dict(data)


def clean_env() -> dict[str, str]:
    """This process's environment without the rank variables a launcher sets for its own children."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGAPIXEL_INVENTED_RANK_VARS")
    return {k: v for k, v in os.environ.items() if k not in launcher}


@pytest.fixture()
def source(tmp_path):
    """A trained two-block model as a training checkpoint and as a consolidated folder."""
    _, cfg, palette = save_engine_checkpoint(tmp_path / "run", steps=2)
    return cfg, palette, consolidate(tmp_path / "run", tmp_path / "model")


def test_init_from_starts_a_run_from_a_consolidated_folder_a_checkpoint_or_a_hf_folder(source, tmp_path):
    cfg, palette, model_dir = source
    saved, _, _, _ = read_consolidated(model_dir)
    sources = [model_dir, tmp_path / "run"]
    if importlib.util.find_spec("transformers"):  # writing a HF folder needs transformers (reading does not)
        sources.append(export_hf(saved, cfg, palette, tmp_path / "hf"))
    for path in sources:
        # Another seed: nothing of the random init may survive.
        start = engine_model(with_changes(cfg, train={"init_from": str(path), "seed": cfg.train.seed + 1}))
        for name, tensor in saved.items():
            torch.testing.assert_close(start.state_dict()[name], tensor, rtol=0, atol=0, msg=f"{path}: {name}")


def test_init_from_a_generative_model_adds_a_fresh_class_head_for_fine_tuning(source):
    cfg, _, model_dir = source
    saved, _, _, _ = read_consolidated(model_dir)
    classifier = with_changes(cfg, model={"n_classes": 3})
    fresh = engine_model(classifier).state_dict()
    start = engine_model(with_changes(classifier, train={"init_from": str(model_dir)})).state_dict()
    assert start.keys() == saved.keys() | {"clf.weight"}
    for name, tensor in saved.items():
        assert torch.equal(start[name], tensor), name
    assert torch.equal(start["clf.weight"], fresh["clf.weight"])


def test_init_from_names_what_does_not_fit(source, tmp_path):
    cfg, palette, model_dir = source
    wider = with_changes(cfg, model={"n_embd": 64}, train={"init_from": str(model_dir)})
    with pytest.raises(
        CheckpointError, match="has model.n_embd=32 but this run has model.n_embd=64: set model.n_embd=32"
    ):
        engine_model(wider)
    classifier = with_changes(cfg, model={"n_classes": 3})
    classifier_dir = write_consolidated(IGPT(classifier.model).state_dict(), classifier, palette, tmp_path / "clf")
    with pytest.raises(CheckpointError, match=r"holds clf.weight, which this model does not have \(model.n_classes=3"):
        engine_model(with_changes(cfg, train={"init_from": str(classifier_dir)}))
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"no checkpoint at {missing}"):
        engine_model(with_changes(cfg, train={"init_from": str(missing)}))
    # Shards over another palette: their tokens would mean other colours to these weights.
    shards = tmp_path / "shards"
    shards.mkdir()
    # (Its own generator: building an engine reseeds numpy's global one, with which the source's was drawn.)
    other = np.random.default_rng().uniform(-1, 1, (cfg.model.n_vocab, 3)).astype(np.float32)
    save_palette(shards / "palette.npy", other)
    with pytest.raises(CheckpointError, match=f"was trained with another palette than {shards / 'palette.npy'}"):
        engine_model(with_changes(cfg, train={"init_from": str(model_dir)}, data={"shards": str(shards)}))


def test_evaluation_loads_consolidated_folders_through_load_model(source, tmp_path):
    cfg, palette, model_dir = source
    model, loaded_cfg, loaded_palette = load_model(model_dir)
    reference, _, _ = load_model(tmp_path / "run")
    assert loaded_cfg == cfg and not model.training
    np.testing.assert_array_equal(loaded_palette, palette)
    tokens = torch.randint(0, cfg.model.n_vocab, (2, cfg.model.n_ctx))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    done = subprocess.run(
        [sys.executable, "-m", "megapixel.cli", "sample", str(model_dir), "--n", "2", "--out", str(tmp_path / "s.png")],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "s.png").is_file()


def test_reshard_refuses_what_it_cannot_do_before_any_process_starts(source, tmp_path):
    _, _, model_dir = source
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'nowhere'}"):
        reshard(tmp_path / "nowhere", tmp_path / "out", tensor=2)
    with pytest.raises(CheckpointError, match=f"{model_dir} already exists"):
        reshard(tmp_path / "run", model_dir, tensor=2)
    # A consolidated folder records no data position: the shards its config names give the start.
    with pytest.raises(
        CheckpointError,
        match="this source has no data position, so its checkpoint starts at the beginning of the shards",
    ):
        reshard(model_dir, tmp_path / "out", tensor=2)
    with pytest.raises(ConfigError, match=r"parallel.tensor \(3\) must divide model.n_head \(2\)"):
        reshard(model_dir, tmp_path / "out", tensor=3)
    with pytest.raises(ConfigError, match=r"parallel.pipeline \(4\) cannot exceed model.n_layer \(2\)"):
        reshard(model_dir, tmp_path / "out", pipeline=4)
    assert not (tmp_path / "out").exists()
    done = subprocess.run(
        [sys.executable, str(TOOL), "reshard", str(model_dir), str(tmp_path / "out"), "--tensor", "3"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "must divide model.n_head" in done.stderr


def run_config(shards: Path, run_dir: Path, seed: int):
    """A two-block model trained 4 steps on the digits, a loss logged every step, checkpoints every 2 steps."""
    return from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": 8, "n_vocab": 16, "kernels": "torch"},
            "data": {"shards": str(shards), "shuffle_buffer": 100},
            "train": {
                "run_dir": str(run_dir),
                "seed": seed,
                "steps": 4,
                "batch_size": 8,
                "warmup_steps": 2,
                "save_every": 2,
                "keep_last": 5,
                "log_every": 1,
                "eval_every": 100,
                "eval_batches": 0,
                "precision": "fp32",
                "progress": False,
            },
        }
    )


def logged(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, lr) of a run's metrics."""
    return {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def resharded(digits_shards, tmp_path_factory):
    """A run trained 4 steps in one process; its step-2 checkpoint resharded by the tool to tensor 2 x pipeline 2
    (4 processes under torchrun), and that resharded back to one process. Returns (folder, seed, tool output)."""
    root, seed = tmp_path_factory.mktemp("reshard"), random.randrange(2**31)
    train(run_config(digits_shards, root / "run", seed))
    step2 = root / "run" / "checkpoints" / tag_name(2)
    # The tool in this process (its own start would add seconds); it launches the four processes itself.
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert tool.main(["reshard", str(step2), str(root / "2x2"), "--tensor", "2", "--pipeline", "2"]) == 0
    reshard(root / "2x2", root / "back")
    return root, seed, printed.getvalue()


@pytest.mark.slow
def test_reshard_one_to_tensor2_pipeline2_and_back_is_the_identity_on_the_weights(resharded):
    root, _, printed = resharded
    assert "to   tensor 2 x pipeline 2 x data 1, ZeRO 0 (4 processes)" in printed
    assert "carried: the weights, step 2, the learning-rate schedule, the data position (16 samples consumed)" in (
        printed
    )
    assert "the optimizer starts fresh" in printed
    tag = root / "2x2" / "checkpoints" / tag_name(2)
    assert (tag / "layer_03-model_01-model_states.pt").is_file()  # the head layer's second tensor shard
    # Each hop copies the same fp32 numbers: equal to the bit, and so are the logits.
    before, _, _, _ = read_consolidated(consolidate(root / "run" / "checkpoints" / tag_name(2), root / "c-before"))
    split, _, _, _ = read_consolidated(consolidate(tag, root / "c-2x2"))
    after, _, _, _ = read_consolidated(consolidate(root / "back" / "checkpoints" / tag_name(2), root / "c-back"))
    assert before.keys() == split.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(split[name], tensor) and torch.equal(after[name], tensor), name
    tokens = torch.randint(0, 16, (4, 64))
    with torch.no_grad():
        original = load_model(root / "run" / "checkpoints" / tag_name(2))[0](tokens).logits
        assert torch.equal(load_model(root / "c-2x2")[0](tokens).logits, original)
    # A stage's file gone: the error names it.
    broken = root / "broken"
    shutil.copytree(root / "2x2", broken)
    (broken / "checkpoints" / tag_name(2) / "layer_02-model_00-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="cannot read .*layer_02-model_00-model_states.pt"):
        consolidate(broken / "checkpoints" / tag_name(2), root / "c-broken")


@pytest.mark.slow
def test_training_resumes_from_a_resharded_checkpoint_where_the_source_stood(digits_shards, resharded):
    root, seed, _ = resharded
    # Step 3's loss is taken before its update: the same weights on the same images (the carried data
    # position) give the original run's loss, at the schedule's learning rate for step 3.
    expected = logged(root / "run")
    train(run_config(digits_shards, root / "back", seed), resume=True)
    back = logged(root / "back")
    assert back.keys() == {3, 4} and back[3] == expected[3]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    command += ["-m", "megapixel.cli", "train", str(root / "2x2" / "config.yaml"), "--resume"]
    done = subprocess.run(command, capture_output=True, text=True, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    split = logged(root / "2x2")
    assert split.keys() == {3, 4} and split[3][1] == expected[3][1] and split[4][1] == expected[4][1]
    # Split matmuls add in another order: a dozen ulps (as in test_parallel_engine).
    assert split[3][0] == pytest.approx(expected[3][0], rel=1e-5)
    # Both continued with a fresh optimizer (step 4 differs from the original run's, which had Adam's moments):
    # the tensor 2 x pipeline 2 run's checkpoint consolidates to the one-process run's weights, to a fraction
    # of an Adam step (near-zero gradients round differently: see test_parallel_engine).
    assert split[4][0] == pytest.approx(back[4][0], rel=1e-4)
    joined, _, _, _ = read_consolidated(consolidate(root / "2x2", root / "c-2x2-trained"))
    single, _, _, _ = read_consolidated(consolidate(root / "back", root / "c-back-trained"))
    for name, tensor in single.items():
        torch.testing.assert_close(joined[name], tensor, rtol=0, atol=0.1 * 3e-3, msg=lambda m, n=name: f"{n}: {m}")
