"""Faults lose nothing: a process killed while saving, a signal from the scheduler, NaN losses, a full disk and bad
files all end in a clear error or a clean stop, with `latest` naming a complete checkpoint that resumes exactly.

Faults are injected by wrapping one library function (tests/reliability_harness.py): in this process through
monkeypatch, or in a `megapixel train` subprocess that the test SIGKILLs or signals.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megapixel.checkpoint.files import resolve_checkpoint, tag_name
from megapixel.checkpoint.load import load_model
from megapixel.checkpoint.read import read_client_state, read_model_weights
from megapixel.config import Config, from_dict, to_yaml
from megapixel.data.palette import load_palette, palette_hash, save_palette
from megapixel.engine.loop import train
from megapixel.engine.metrics import read_metrics
from megapixel.engine.signals import STOP_FILE
from megapixel.errors import CheckpointError, DataError, NonFiniteError
from tests.harness.reliability import install_nan, install_signal, install_write_failure
from tests.harness.runs import losses, snapshot, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def seed() -> int:
    return random.randrange(2**31)


def faulty(digits_shards: Path, run_dir: Path, seed: int, **train: object) -> Config:
    """Six steps, a checkpoint every two keeping only the newest, validation every three."""
    settings = {"steps": 6, "save_every": 2, "keep_last": 1, "eval_every": 3, "seed": seed, **train}
    return tiny(digits_shards, run_dir, **settings)


@pytest.fixture(scope="module")
def straight(digits_shards, seed, tmp_path_factory) -> tuple[Config, list]:
    """The uninterrupted run every faulty one must reproduce, and its losses."""
    cfg = faulty(digits_shards, tmp_path_factory.mktemp("straight") / "run", seed)
    train(cfg)
    return cfg, losses(cfg.train.run_dir)


def folder(cfg: Config) -> set[str]:
    return {p.name for p in (Path(cfg.train.run_dir) / "checkpoints").iterdir()}


def latest(cfg: Config) -> str:
    return (Path(cfg.train.run_dir) / "checkpoints" / "latest").read_text()


def weights(cfg: Config, step: int) -> dict[str, torch.Tensor]:
    return read_model_weights(Path(cfg.train.run_dir) / "checkpoints" / tag_name(step))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def run_harness(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """`python -m tests.harness.reliability ARGS` in the repository (under torchrun for several processes)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "tests.harness.reliability", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "left", "resumes_from"),
    [
        # Killed while DeepSpeed writes a file: only the .partial folder is torn.
        ("kill-writing", {tag_name(2), tag_name(4) + ".partial", "latest"}, 2),
        # Killed between the rename and `latest`: step 4 is complete but not yet named; the resume replaces it.
        ("kill-before-latest", {tag_name(2), tag_name(4), "latest"}, 2),
        # Killed while deleting step 2 after `latest` moved: the half-deleted folder is no longer a step_* tag.
        ("kill-pruning", {tag_name(2) + ".stale", tag_name(4), "latest"}, 4),
    ],
)
def test_a_process_killed_during_a_save_leaves_a_complete_latest_that_resumes_exactly(
    digits_shards, seed, straight, tmp_path, fault, left, resumes_from
):
    cfg = faulty(digits_shards, tmp_path / "run", seed)
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(cfg))
    done = run_harness(fault, "4", "--", "train", str(config))
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert folder(cfg) == left and latest(cfg) == tag_name(resumes_from)
    model, _, _ = load_model(cfg.train.run_dir)  # what `latest` names is whole
    assert resolve_checkpoint(cfg.train.run_dir).name == tag_name(resumes_from)

    summary = train(cfg, resume=True)
    assert summary["steps"] == 6 and losses(cfg.train.run_dir) == straight[1]
    # The leftovers are gone; keep_last=1 keeps the final tag only.
    assert folder(cfg) == {tag_name(6), "latest"}


def test_a_run_killed_before_its_first_latest_resumes_from_its_complete_tag(straight, tmp_path):
    # A save renames its finished folder into place, then writes `latest`: a kill between the two leaves this.
    cfg = copy_run(straight[0], tmp_path)
    (Path(cfg.train.run_dir) / "checkpoints" / "latest").unlink()
    assert resolve_checkpoint(cfg.train.run_dir).name == tag_name(6)
    assert train(cfg, resume=True)["steps"] == 6


def test_a_signal_during_a_step_saves_that_step_stops_and_resumes_exactly(
    digits_shards, seed, straight, tmp_path, monkeypatch
):
    cfg = faulty(digits_shards, tmp_path / "run", seed)
    install_signal(3, 0, "SIGUSR1", monkeypatch.setattr)
    summary = train(cfg)
    # The step the signal arrived in is finished (and validated: step 3 is an eval step), saved, then the run stops.
    assert summary["stopped_by"] == "SIGUSR1" and summary["steps"] == 3
    assert folder(cfg) == {tag_name(3), "latest"} and latest(cfg) == tag_name(3)
    stop_file = Path(cfg.train.run_dir) / STOP_FILE
    assert json.loads(stop_file.read_text()) == {"step": 3, "signal": "SIGUSR1", "checkpoint": tag_name(3)}
    # The handlers are the process's own again.
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    monkeypatch.undo()
    summary = train(cfg, resume=True)
    assert summary["stopped_by"] is None and summary["steps"] == 6
    assert losses(cfg.train.run_dir) == straight[1]
    assert not stop_file.exists()


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_step_with_nan_gradients_is_skipped_counted_and_changes_nothing(
    digits_shards, tmp_path, monkeypatch, zero_stage
):
    # fp32 ZeRO-0 is megapixel's own check (nonfinite.guard_optimizer); ZeRO-1 is DeepSpeed's.
    cfg = tiny(digits_shards, tmp_path / "run", steps=5, save_every=1, keep_last=5, eval_every=100)
    cfg.parallel.zero_stage = zero_stage
    install_nan(3, 0, monkeypatch.setattr)
    summary = train(cfg)
    records = read_metrics(cfg.train.run_dir)
    assert [(r["step"], r["skipped_steps"]) for r in records if "skipped_steps" in r] == [(3, 1)]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 4, 5] and all(np.isfinite(r["loss"]) for r in logged)
    assert summary["steps"] == 5 and np.isfinite(summary["train_loss"])

    # Step 3 left weights, optimizer and schedule as step 2 did; step 4 trained again.
    assert_same_weights(weights(cfg, 2), weights(cfg, 3))
    tags = Path(cfg.train.run_dir) / "checkpoints"
    before, after = (read_client_state(tags / tag_name(s)) for s in (2, 3))
    assert before["lr_scheduler"] == after["lr_scheduler"] and after["skipped_steps"] == 1
    if zero_stage == 0:
        assert before["optimizer"]["state"][0]["step"] == after["optimizer"]["state"][0]["step"]
    assert not torch.equal(weights(cfg, 3)["wte.weight"], weights(cfg, 4)["wte.weight"])


def test_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_weights_saved(digits_shards, tmp_path, monkeypatch):
    cfg = tiny(
        digits_shards, tmp_path / "run", steps=10, save_every=2, keep_last=5, eval_every=100, max_skipped_steps=3
    )
    install_nan(4, 0, monkeypatch.setattr, steps=100)
    wanted = (
        r"steps 4-6 all had non-finite losses or gradients and were skipped \(train.max_skipped_steps=3\): "
        r"stopped and saved step_0000006 with the weights of step 3; lower train.lr or check the data"
    )
    with pytest.raises(NonFiniteError, match=wanted) as stopped:
        train(cfg)
    assert "\n" not in str(stopped.value)
    assert latest(cfg) == tag_name(6)
    assert_same_weights(weights(cfg, 4), weights(cfg, 6))  # both hold step 3's weights
    assert [r["skipped_steps"] for r in read_metrics(cfg.train.run_dir) if "skipped_steps" in r] == [1, 2, 3]

    monkeypatch.undo()
    summary = train(cfg, resume=True)
    assert summary["steps"] == 10 and np.isfinite(summary["train_loss"])


def test_a_full_disk_while_saving_fails_in_one_line_and_keeps_the_earlier_checkpoints(
    digits_shards, seed, straight, tmp_path, monkeypatch
):
    cfg = faulty(digits_shards, tmp_path / "run", seed)
    install_write_failure(4, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), monkeypatch.setattr)
    wanted = r"could not save step_0000004 in .*: No space left on device; the earlier checkpoints and `latest` are"
    with pytest.raises(CheckpointError, match=wanted) as failed:
        train(cfg)
    assert "\n" not in str(failed.value)
    # The half-written folder is removed (it held the space); step 2 and `latest` are as they were.
    assert folder(cfg) == {tag_name(2), "latest"} and latest(cfg) == tag_name(2)

    monkeypatch.undo()
    train(cfg, resume=True)
    assert losses(cfg.train.run_dir) == straight[1]


def copy_run(cfg: Config, tmp_path: Path) -> Config:
    """A copy of `cfg`'s run folder to damage, and its config pointing at it."""
    copy = from_dict(cfg.to_dict())
    copy.train.run_dir = str(tmp_path / "run")
    shutil.copytree(cfg.train.run_dir, copy.train.run_dir)
    return copy


def test_a_truncated_checkpoint_file_is_named_in_one_line_and_nothing_is_written(straight, tmp_path):
    cfg = copy_run(straight[0], tmp_path)
    states = Path(cfg.train.run_dir) / "checkpoints" / tag_name(6) / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    before = snapshot(Path(cfg.train.run_dir))
    with pytest.raises(CheckpointError, match=rf"cannot read {states}: ") as failed:
        train(cfg, resume=True)
    assert "\n" not in str(failed.value)
    with pytest.raises(CheckpointError, match=rf"cannot read {states}: "):
        load_model(cfg.train.run_dir)
    assert snapshot(Path(cfg.train.run_dir)) == before


class RunsCode:
    """A pickle that, when loaded without restriction, creates a file: the harmless stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_file_that_would_run_code_is_refused_before_it_runs(digits_shards, tmp_path):
    # ZeRO-1: the optimizer partition is read only by DeepSpeed's own loader.
    cfg = tiny(digits_shards, tmp_path / "run", steps=2, save_every=2, eval_every=100)
    cfg.parallel.zero_stage = 1
    train(cfg)
    optim = Path(cfg.train.run_dir) / "checkpoints" / tag_name(2) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, optim)
    cfg.train.steps = 3
    refused = rf"refusing to read {optim}: it holds a pickled \w+\.open, not only tensors"
    with pytest.raises(CheckpointError, match=refused):
        train(cfg, resume=True)
    assert not marker.exists()


def test_resuming_on_shards_with_another_palette_is_refused(digits_shards, straight, tmp_path):
    cfg = copy_run(straight[0], tmp_path)
    other = tmp_path / "shards"
    shutil.copytree(digits_shards, other)
    palette = load_palette(other / "palette.npy")
    palette[0] = -palette[0]
    save_palette(other / "palette.npy", palette)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "palette_hash": palette_hash(palette)}))
    cfg.data.shards = str(other)
    with pytest.raises(CheckpointError, match="uses another palette than step_0000006 was trained on"):
        train(cfg, resume=True)


def test_corrupted_shard_bytes_end_the_run_naming_the_shard_and_it_resumes_once_repaired(
    digits_shards, seed, straight, tmp_path, monkeypatch
):
    data = tmp_path / "shards"
    shutil.copytree(digits_shards, data)
    cfg = faulty(data, tmp_path / "run", seed)
    install_signal(4, 0, "SIGTERM", monkeypatch.setattr)
    train(cfg)
    monkeypatch.undo()
    originals = {path: path.read_bytes() for path in data.glob("train-*.tar")}
    for path, content in originals.items():
        path.write_bytes(os.urandom(512) + content[512:])
    with pytest.raises(DataError, match=rf"{data}/train-\d+\.tar is truncated or damaged") as failed:
        train(cfg, resume=True)
    assert "\n" not in str(failed.value)
    assert latest(cfg) == tag_name(4)

    for path, content in originals.items():
        path.write_bytes(content)
    train(cfg, resume=True)
    assert losses(cfg.train.run_dir) == straight[1]


@pytest.mark.slow
def test_two_ranks_skip_a_nan_on_one_together_and_stop_together_on_a_signal_to_the_other(digits_shards, seed, tmp_path):
    cfg = faulty(digits_shards, tmp_path / "run", seed)
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(cfg))
    done = run_harness("nan", "2", "0", "+", "signal", "4", "1", "SIGTERM", "--", "train", str(config), nproc=2)
    # Both ranks finished step 4, saved it together and exited 0.
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(cfg.train.run_dir)
    assert [r["step"] for r in records if "skipped_steps" in r] == [2]
    assert [r["step"] for r in records if "loss" in r] == [1, 3, 4]
    assert latest(cfg) == tag_name(4)
    stop = json.loads((Path(cfg.train.run_dir) / STOP_FILE).read_text())
    assert stop == {"step": 4, "signal": "SIGTERM", "checkpoint": tag_name(4)}
    # Resumable (here on one rank: ZeRO-0 keeps no per-rank optimizer state, the data continues where it stopped).
    summary = train(cfg, resume=True)
    assert summary["steps"] == 6 and [r["step"] for r in read_metrics(cfg.train.run_dir) if "loss" in r] == [
        1, 3, 4, 5, 6,
    ]  # fmt: skip
