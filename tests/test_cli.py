"""The `megapixel` command as a user meets it: real processes, one-line errors, the demo end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def megapixel(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megapixel.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megapixel: error:"), result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_info_prints_the_architecture_and_the_papers_parameter_count():
    result = megapixel("info", "l")
    assert result.returncode == 0
    assert "layers 48, width 1536, heads 16 (head dim 96)" in result.stdout
    assert "(1362.3M)" in result.stdout


def test_a_config_typo_is_one_line(tmp_path):
    assert_one_line_error(megapixel("info", "s", "train.lrr=1"), "unknown key train.lrr")
    assert_one_line_error(megapixel("train", str(tmp_path / "nope.yaml")), "config file not found")


def test_overrides_after_an_option_are_still_overrides(tmp_path):
    # Launchers append --resume before the user's overrides; the override must reach the config (and fail there).
    assert_one_line_error(megapixel("train", "tiny", "--resume", "model.n_head=7"), "model.n_head (7) must divide")
    result = megapixel("train", "tiny", "--resume", "--no-such-option")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-option" in result.stderr


def test_report_passes_the_fine_tuning_head_rate_through_and_checks_it_first(tmp_path):
    result = megapixel(
        "report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--finetune-head-lr-scale", "0"
    )
    assert_one_line_error(result, "the head's learning-rate scale must be positive, got 0.0")
    assert not (tmp_path / "report").exists()


def test_a_missing_source_is_one_line(tmp_path):
    assert_one_line_error(megapixel("shards", str(tmp_path / "missing"), str(tmp_path / "out")), "no such file")
    assert not (tmp_path / "out").exists()


def test_a_palette_of_the_wrong_shape_is_one_line_and_writes_nothing(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((16, 4), dtype=np.float32))
    result = megapixel("shards", "digits", str(tmp_path / "out"), "--palette", str(tmp_path / "bad.npy"))
    assert_one_line_error(result, "bad.npy")
    assert not (tmp_path / "out").exists()


def test_a_non_image_among_images_is_skipped_and_listed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        pixels = np.random.randint(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    (images / "notes.png").write_text("not an image")
    result = megapixel("shards", str(images), str(tmp_path / "out"), "--n-px", "8", "--palette-size", "8")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [Path(p).name for p, _ in manifest["skipped"]] == ["notes.png"]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 6


def test_shards_refuse_to_overwrite_an_existing_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(megapixel("shards", "digits", str(out), "--n-px", "8", "--palette-size", "8"), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_trains_samples_and_probes_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = megapixel("demo", "--out", str(out), "--steps", "30")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("samples.png", "probe.md", "probe.json", "demo.json", "run/metrics.jsonl", "run/config.yaml"):
        assert (out / name).is_file(), name
    assert "raw pixels" in result.stdout and "features" in result.stdout
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in line for line in lines)
    assert Image.open(out / "samples.png").size[0] > 200

    # Running it again reuses the shards and the finished run: nothing is retrained or lost.
    shards_before = sorted(p.name for p in (out / "shards").iterdir())
    again = megapixel("demo", "--out", str(out), "--steps", "30")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in (out / "shards").iterdir()) == shards_before
    assert len((out / "run" / "metrics.jsonl").read_text().splitlines()) == len(lines)


def test_ruff_finds_nothing_to_fix():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
