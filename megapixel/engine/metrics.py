"""A run's scalars: one JSON line each in RUN_DIR/metrics.jsonl, and the same values in TensorBoard (RUN_DIR/tb)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from megapixel.atomic import write_atomic


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, in the order they were written ([] when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records to metrics.jsonl and TensorBoard; a disabled log (ranks other than 0) does nothing."""

    def __init__(self, run_dir: str | Path, start_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        # A resumed run repeats the steps after its checkpoint: drop what an interrupted run logged
        # for them, so every step appears once.
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        # Imported here: TensorBoard takes a second or two to import, and only the main rank writes it.
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, **scalars: float) -> None:
        """Record `scalars` at `step` with the wall-clock time (seconds since the epoch)."""
        if not self.enabled:
            return
        record = {"step": step, **scalars, "time": time.time()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard's writer."""
        if self.tb is not None:
            self.tb.close()
