"""Faults injected into a real `megapixel train`: wrap one library function, then run the command line.

    python -m tests.harness.reliability FAULT ARG... [+ FAULT ARG...] -- train CONFIG [--resume]

Faults (steps count the training forward passes of this process, one per step without accumulation):
    kill-writing STEP        SIGKILL halfway through writing the first file of the step-STEP save
    kill-before-latest STEP  SIGKILL once the step-STEP tag has its final name, before `latest` moves to it
    kill-pruning STEP        SIGKILL in the middle of deleting an old tag, after the step-STEP save moved `latest`
    signal STEP RANK NAME    send signal NAME to rank RANK during step STEP
    nan STEP RANK            make rank RANK's loss NaN at step STEP

The in-process tests use the same wrappers (install_*) through pytest's monkeypatch.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megapixel.checkpoint import save
from megapixel.checkpoint.files import tag_name
from megapixel.cli import main as cli
from megapixel.engine import build, loop


def die() -> None:
    """End this process the way an out-of-memory killer or a node failure does: no cleanup of any kind."""
    os.kill(os.getpid(), signal.SIGKILL)


def on_training_steps(steps: range, rank: int, action: Any, setattr_: Any = setattr) -> None:
    """Call `action(loss) -> loss` on rank `rank`'s loss at the training steps `steps` (counted in this process)."""
    forward = build.LossModule.forward
    calls = [0]

    def wrapped(self: build.LossModule, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = forward(self, *args, **kwargs)
        if not self.training:
            return loss
        calls[0] += 1
        return action(loss) if calls[0] in steps and dist.get_rank() == rank else loss

    setattr_(build.LossModule, "forward", wrapped)


def install_nan(step: int, rank: int = 0, setattr_: Any = setattr, steps: int = 1) -> None:
    """Make the loss (and so every gradient) NaN for `steps` steps from `step` on rank `rank`."""
    on_training_steps(range(step, step + steps), rank, lambda loss: loss * float("nan"), setattr_)


def install_signal(step: int, rank: int, name: str, setattr_: Any = setattr) -> None:
    """Deliver signal `name` to this process (rank `rank`) in the middle of step `step`."""

    def send(loss: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), signal.Signals[name])
        return loss

    on_training_steps(range(step, step + 1), rank, send, setattr_)


def during_save(step: int, setattr_: Any = setattr) -> list[bool]:
    """A flag that is true while the trainer saves step `step`."""
    save = loop.save_checkpoint
    active = [False]

    def wrapped(engine: Any, cfg: Any, at: int, *args: Any) -> Path:
        active[0] = at == step
        try:
            return save(engine, cfg, at, *args)
        finally:
            active[0] = False

    setattr_(loop, "save_checkpoint", wrapped)
    return active


def install_write_failure(step: int, error: BaseException | None, setattr_: Any = setattr) -> None:
    """Halfway through writing the first file of the step-`step` save, raise `error` (None: SIGKILL)."""
    active = during_save(step, setattr_)
    real_save = torch.save

    def half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not active[0] or not isinstance(f, (str, os.PathLike)):  # collectives pickle through torch.save too
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        if error is None:
            die()
        raise error

    setattr_(torch, "save", half_then_fail)


def install_kill_before_latest(step: int, setattr_: Any = setattr) -> None:
    """SIGKILL when the step-`step` save is about to move `latest` (its tag already has its final name)."""
    point_latest = save.point_latest

    def wrapped(checkpoints: Path, name: str) -> None:
        if name == tag_name(step):
            die()
        point_latest(checkpoints, name)

    setattr_(save, "point_latest", wrapped)


def install_kill_pruning(step: int, setattr_: Any = setattr) -> None:
    """SIGKILL after deleting one file of the first tag that the step-`step` save prunes."""
    prune = save.prune_checkpoints

    def wrapped(checkpoints: Path, keep_last: int, at: int) -> None:
        rmtree = shutil.rmtree

        def delete_one_file_then_die(path: Any, *args: Any, **kwargs: Any) -> None:
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
            die()

        if at == step:
            shutil.rmtree = delete_one_file_then_die
        try:
            prune(checkpoints, keep_last, at)
        finally:
            shutil.rmtree = rmtree

    setattr_(save, "prune_checkpoints", wrapped)


FAULTS = {
    "kill-writing": lambda step: install_write_failure(int(step), None),
    "kill-before-latest": lambda step: install_kill_before_latest(int(step)),
    "kill-pruning": lambda step: install_kill_pruning(int(step)),
    "signal": lambda step, rank, name: install_signal(int(step), int(rank), name),
    "nan": lambda step, rank: install_nan(int(step), int(rank)),
}


def main(argv: list[str]) -> int:
    """Install the faults named before `--` (separated by `+`), then run the megapixel command line after it."""
    split = argv.index("--")
    faults = " ".join(argv[:split]).split("+")
    for fault, *args in (words.split() for words in faults):
        FAULTS[fault](*args)
    return cli(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
