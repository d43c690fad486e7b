"""The trainer on the built-in digits: it learns, logs, evaluates, checkpoints, resumes exactly, and refuses
mistakes before touching what is on disk."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megapixel.checkpoint.files import resolve_checkpoint, tag_name
from megapixel.checkpoint.load import load_model
from megapixel.config import Config, apply_overrides, from_dict, to_yaml
from megapixel.engine.build import build_engine, deepspeed_config
from megapixel.engine.loop import train
from megapixel.engine.metrics import read_metrics
from megapixel.errors import CheckpointError, ConfigError, DataError
from megapixel.parallel.distributed import init_distributed
from tests.harness.runs import losses, snapshot, tiny

LOG_FIELDS = {"step", "loss", "lr", "tokens_per_s", "time"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory) -> tuple[Config, dict]:
    """One 12-step run shared by the tests that only read what it left."""
    cfg = tiny(digits_shards, tmp_path_factory.mktemp("trained") / "run")
    return cfg, train(cfg)


def test_training_on_digits_reduces_the_loss(trained):
    cfg, summary = trained
    records = [r for r in read_metrics(cfg.train.run_dir) if "loss" in r]
    # The zero-initialised head starts at the uniform guess, log 16 = 2.77 nats.
    assert records[0]["loss"] == pytest.approx(2.77, abs=0.05)
    assert summary["train_loss"] < records[0]["loss"] - 0.3
    assert summary["val_loss"] < 2.6
    assert summary["steps"] == 12 and summary["tokens_per_s"] > 0


def test_metrics_log_every_step_and_validation_at_eval_steps(trained):
    cfg, summary = trained
    records = read_metrics(cfg.train.run_dir)
    logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 13))
    assert all(set(r) == LOG_FIELDS for r in logs)
    assert max(r["lr"] for r in logs) == pytest.approx(cfg.train.lr)
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [4, 8, 12]
    assert vals[-1]["val_loss"] == summary["val_loss"]
    assert any((Path(cfg.train.run_dir) / "tb").iterdir())


def test_run_folder_keeps_the_last_checkpoints_and_is_self_contained(trained):
    cfg, _ = trained
    run = Path(cfg.train.run_dir)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [tag_name(8), tag_name(12)]
    assert (checkpoints / "latest").read_text().strip() == tag_name(12)
    assert (run / "palette.npy").read_bytes() == (Path(cfg.data.shards) / "palette.npy").read_bytes()
    assert from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg


def test_load_model_gives_the_engines_logits(trained):
    cfg, _ = trained
    info = init_distributed()
    engine = build_engine(cfg, deepspeed_config(cfg, info.world_size, info.device), info)
    engine.load_checkpoint(str(Path(cfg.train.run_dir) / "checkpoints"))
    model, loaded_cfg, palette = load_model(cfg.train.run_dir)
    assert loaded_cfg == cfg and palette.shape == (16, 3)
    tokens = torch.randint(0, 16, (4, 64))
    with torch.no_grad():
        expected = engine.module.model(tokens).logits
    # The same fp32 weights through the same code on the same input: equal to the bit.
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_resume_continues_with_the_same_losses(digits_shards, tmp_path, objective):
    seed = random.randrange(2**31)
    straight = tiny(digits_shards, tmp_path / "straight", objective, steps=10, save_every=100, seed=seed)
    train(straight)

    interrupted = tiny(
        digits_shards, tmp_path / "interrupted", objective, steps=10, save_every=4, keep_last=5, seed=seed
    )
    train(interrupted)
    # Same config and seed, same losses: the run is deterministic.
    assert losses(interrupted.train.run_dir) == losses(straight.train.run_dir)
    # Pretend it died just after its step-4 checkpoint: later checkpoints gone, metrics of steps 5-10 left over.
    checkpoints = Path(interrupted.train.run_dir) / "checkpoints"
    shutil.rmtree(checkpoints / tag_name(8))
    shutil.rmtree(checkpoints / tag_name(10))
    (checkpoints / "latest").write_text(tag_name(4))

    summary = train(interrupted, resume=True)
    # Optimizer, schedule, data position and random streams all restored: fp32 on the CPU replays bit for bit.
    assert losses(interrupted.train.run_dir) == losses(straight.train.run_dir)
    # ...and the leftover lines were replaced, not kept: steps 5-10 really ran again.
    assert summary["steps"] == 10 and summary["train_loss"] == losses(straight.train.run_dir)[-2][2]
    assert (checkpoints / "latest").read_text() == tag_name(10) and (checkpoints / tag_name(8)).is_dir()


def test_resume_with_more_steps_continues_the_run(digits_shards, tmp_path):
    cfg = tiny(digits_shards, tmp_path / "run", steps=4, eval_every=100)
    train(cfg)
    cfg.train.steps = 6
    summary = train(cfg, resume=True)
    assert summary["steps"] == 6
    assert [r["step"] for r in read_metrics(cfg.train.run_dir) if "loss" in r] == list(range(1, 7))


def test_resume_of_a_finished_run_trains_nothing_and_reports_it(digits_shards, tmp_path):
    cfg = tiny(digits_shards, tmp_path / "run", steps=2)
    first = train(cfg)
    again = train(cfg, resume=True)
    assert again["steps"] == 2 and again["train_loss"] is None
    assert again["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)


def test_bert_objective_trains(digits_shards, tmp_path):
    cfg = tiny(digits_shards, tmp_path / "run", "bert", steps=20, eval_every=20)
    summary = train(cfg)
    first = read_metrics(cfg.train.run_dir)[0]["loss"]
    assert first == pytest.approx(2.77, abs=0.1)
    assert summary["train_loss"] < first - 0.3
    assert summary["val_loss"] < 2.6


def test_gradient_accumulation_matches_the_full_batch(digits_shards, tmp_path):
    seed = random.randrange(2**31)
    # Validation over the whole split, so that both runs score the same images.
    full = tiny(digits_shards, tmp_path / "full", steps=4, seed=seed, eval_batches=1000)
    accumulated = tiny(digits_shards, tmp_path / "accumulated", steps=4, seed=seed, eval_batches=1000, micro_batch=8)
    assert deepspeed_config(accumulated, 1, torch.device("cpu"))["gradient_accumulation_steps"] == 2
    train(full)
    train(accumulated)
    # The stream's sample order does not depend on the batch size, so two micro-batches of 8 hold the
    # images of one batch of 16 and their mean gradient is the full batch's; only fp32 summation order
    # differs, a few ulps that a few Adam steps grow to ~1e-6 relative.
    got, expected = losses(accumulated.train.run_dir), losses(full.train.run_dir)
    assert [(step, key) for step, key, _ in got] == [(step, key) for step, key, _ in expected]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in expected], rel=1e-5)


def test_init_distributed_in_a_plain_process_is_a_world_of_one_and_idempotent():
    first = init_distributed()
    assert (first.rank, first.world_size, first.local_rank, first.is_main) == (0, 1, 0, True)
    assert init_distributed() == first


def test_a_program_started_from_a_single_process_run_gets_its_own_rendezvous():
    init_distributed()  # this process now listens on the port it chose
    code = "from megapixel.parallel.distributed import init_distributed; print(init_distributed().world_size)"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # It inherited this process's invented RANK/MASTER_PORT; taking them for a launcher's would fail to listen.
    assert child.returncode == 0 and child.stdout.strip().endswith("1"), child.stderr[-2000:]


def test_existing_checkpoints_without_resume_are_refused_and_untouched(trained):
    cfg, _ = trained
    before = snapshot(Path(cfg.train.run_dir))
    with pytest.raises(CheckpointError, match="already has checkpoints: pass --resume"):
        train(cfg)
    assert snapshot(Path(cfg.train.run_dir)) == before


def test_resume_without_checkpoints_is_refused(digits_shards, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(tiny(digits_shards, tmp_path / "fresh"), resume=True)
    assert not (tmp_path / "fresh").exists()


def test_resume_with_another_model_names_the_key(trained, tmp_path):
    cfg, _ = trained
    before = snapshot(Path(cfg.train.run_dir))
    other = from_dict(cfg.to_dict())
    other.model.n_embd = 64
    wanted = r"model\.n_embd is 64 but the checkpoint step_0000012 was trained with 32"
    with pytest.raises(CheckpointError, match=wanted):
        train(other, resume=True)
    assert snapshot(Path(cfg.train.run_dir)) == before


def test_missing_shards_are_reported(digits_shards, tmp_path):
    with pytest.raises(ConfigError, match="data.shards is not set"):
        train(tiny("", tmp_path / "run"))
    with pytest.raises(DataError, match="no shard set at"):
        train(tiny(tmp_path / "nowhere", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_vocabulary_and_resolution_must_match_the_shards(digits_shards, tmp_path):
    cfg = tiny(digits_shards, tmp_path / "run")
    cfg.model.n_vocab = 512
    wanted = "model.n_vocab=512 but the shards use a 16-colour palette: set model.n_vocab=16"
    with pytest.raises(ConfigError, match=wanted):
        train(cfg)
    cfg = apply_overrides(tiny(digits_shards, tmp_path / "run"), ["model.n_px=4"])
    with pytest.raises(ConfigError, match="8x8 images: set model.n_px=8"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_batch_sizes_that_do_not_divide_are_refused(digits_shards, tmp_path):
    cfg = tiny(digits_shards, tmp_path / "run", batch_size=16, micro_batch=5)
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch \(5\) x 1 data-parallel ranks = 5"):
        train(cfg)
    with pytest.raises(ConfigError, match="multiple of the 3 data-parallel ranks"):
        deepspeed_config(tiny(digits_shards, tmp_path / "run", batch_size=16), 3, torch.device("cpu"))


def test_layouts_that_cannot_run_are_refused_before_any_work(digits_shards, tmp_path):
    cfg = tiny(digits_shards, tmp_path / "run")
    cfg.parallel.tensor = 2
    with pytest.raises(ConfigError, match=r"1 processes cannot be split into parallel.tensor \(2\)"):
        train(cfg)
    cfg = tiny(digits_shards, tmp_path / "run")
    cfg.parallel.tensor = 3
    with pytest.raises(ConfigError, match=r"parallel.tensor \(3\) must divide model.n_head \(2\)"):
        train(cfg)
    cfg = tiny(digits_shards, tmp_path / "run")
    cfg.parallel.pipeline, cfg.parallel.zero_stage = 2, 2
    with pytest.raises(ConfigError, match="ZeRO stage 2 cannot partition gradients across pipeline stages"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_checkpoints_record_their_layout(trained):
    from megapixel.checkpoint.read import checkpoint_layout, read_client_state

    cfg, _ = trained
    state = read_client_state(resolve_checkpoint(cfg.train.run_dir))
    assert checkpoint_layout(state) == {"tensor": 1, "pipeline": 1, "data": 1}


def test_deepspeed_section_overrides_what_megapixel_derives(digits_shards, tmp_path):
    cfg = tiny(digits_shards, tmp_path / "run", grad_clip=0.5)
    cfg.deepspeed = {"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}
    ds = deepspeed_config(cfg, 1, torch.device("cpu"))
    assert ds["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 2.0
    assert ds["train_batch_size"] == 16 and ds["bf16"] == {"enabled": False}


def launch_two_ranks(config: Path, *args: str) -> None:
    """`torchrun --nproc_per_node 2 megapixel train CONFIG ARGS`, as a user starts data-parallel training."""
    # The launcher sets the rank variables itself; this process's own (single-process) ones must not leak in.
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "megapixel.cli", "train"]
    done = subprocess.run([*command, str(config), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_with_zero3_train_resume_exactly_and_load(digits_shards, tmp_path):
    cfg = tiny(
        digits_shards, tmp_path / "run", "bert", steps=6, save_every=3, keep_last=5, seed=random.randrange(2**31)
    )
    cfg.parallel.zero_stage = 3
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(cfg))
    launch_two_ranks(config)
    straight = losses(cfg.train.run_dir)
    assert [step for step, key, _ in straight if key == "loss"] == list(range(1, 7))

    checkpoints = Path(cfg.train.run_dir) / "checkpoints"
    shutil.rmtree(checkpoints / tag_name(6))
    (checkpoints / "latest").write_text(tag_name(3))
    launch_two_ranks(config, "--resume")
    # Each rank restores its own data position and random streams: the same losses to the bit.
    assert losses(cfg.train.run_dir) == straight

    model, loaded, _ = load_model(cfg.train.run_dir)
    assert loaded == cfg and model(torch.randint(0, 16, (2, 64))).logits.isfinite().all()

    with pytest.raises(CheckpointError, match="written by 2 data-parallel ranks"):
        train(cfg, resume=True)
