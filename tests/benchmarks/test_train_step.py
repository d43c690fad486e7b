"""benchmarks/train_step.py runs end to end on the CPU with --tiny and writes its JSON: every implementation
trains a step, megapixel's engine carries the planner's prediction, and the peak used for MFU is stated."""

import json
import math

import pytest

from benchmarks.train_step import main


@pytest.mark.slow
def test_tiny_run_times_every_implementation_and_writes_json(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    main(["--tiny", "--out", str(out)])
    assert "over 989 TFLOP/s" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["benchmark"] == "train_step" and data["tiny"] and data["peak_tflops"] == 989.0
    by_impl = {r["impl"]: r for r in data["results"]}
    # The Triton kernels need CUDA: on a CPU the other four run.
    assert set(by_impl) >= {"megapixel-torch", "plain", "plain-compiled", "hf"}
    for record in by_impl.values():
        assert "error" not in record, record
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1
        # Every implementation starts near the uniform guess over 512 colours (HF's head also scores SOS).
        assert abs(record["loss"] - math.log(512)) < 0.5
    assert by_impl["megapixel-torch"]["planned_peak_gib"] > 0
    assert "planned_peak_gib" not in by_impl["plain"]
