"""Stopping on a scheduler's signal: SIGTERM or SIGUSR1 (slurm's warning before the time limit) makes the trainer
finish its step, save, write RUN_DIR/stopped_on_signal.json and exit 0, so a job script can requeue the run."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from megapixel.atomic import write_atomic

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Written into the run folder when the trainer stopped early on a signal after saving; removed by the next start.
STOP_FILE = "stopped_on_signal.json"


class StopRequest:
    """While active (a context manager), SIGTERM and SIGUSR1 are recorded instead of ending the process.

    Only the main thread may install signal handlers; a trainer started from another thread keeps the default
    handlers (the signal ends it, and the last checkpoint is where it resumes).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signal = self.signal or signum

    def agreed(self, device: torch.device) -> str | None:
        """The name of a stop signal any rank has received (the same answer on every rank), else None.

        A collective: every rank calls it at the same step. A scheduler may signal only some ranks (slurm signals
        the processes of the batch step, a launcher may forward to one node), and the ranks must stop at the same
        step to save together.
        """
        # Every step, one 4-byte all_reduce. On CPU (gloo) it is a few microseconds. On GPUs (NCCL) the .item()
        # waits for the step's queued kernels; DeepSpeed already makes the host wait inside every step it is given
        # here (ZeRO's overflow check, the bf16 optimizer's norm, megapixel's non-finite check for fp32 ZeRO-0), so
        # what this adds is one tiny collective's latency, tens of microseconds against steps of hundreds of
        # milliseconds. Checking every K steps would save nothing measurable and stretch the exit bound K-fold.
        flag = torch.tensor([self.signal or 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        return signal.Signals(signum).name if signum else None


def write_stop_file(run_dir: str | Path, step: int, signal_name: str, tag: str) -> Path:
    """Record in the run folder that the trainer stopped at `step` on `signal_name` after saving `tag`."""
    path = Path(run_dir) / STOP_FILE
    return write_atomic(path, json.dumps({"step": step, "signal": signal_name, "checkpoint": tag}) + "\n")
