"""Configs load from presets and YAML, take dotted overrides, and reject mistakes in one line."""

import pytest

from megapixel.config import Config, load, preset, to_yaml
from megapixel.errors import ConfigError


def test_presets_give_the_papers_shapes():
    s, l48, xl = preset("s"), preset("l-48"), preset("xl")
    assert (s.model.n_layer, s.model.n_embd, s.model.n_head, s.model.n_ctx) == (24, 512, 8, 1024)
    assert (l48.model.n_layer, l48.model.n_embd, l48.model.n_head, l48.model.n_ctx) == (48, 1536, 16, 2304)
    assert (xl.model.n_layer, xl.model.n_embd, xl.model.head_dim, xl.model.n_ctx) == (60, 3072, 128, 4096)


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "preset: s\nmodel:\n  n_px: 48\ntrain:\n  lr: 0.001\n  steps: 10\ndeepspeed:\n  wall_clock_breakdown: true\n"
    )
    cfg = load(path, ["train.lr=3e-3", "model.objective=bert", "deepspeed.zero_optimization.stage=2"])
    assert cfg.model.n_layer == 24 and cfg.model.n_ctx == 48 * 48
    assert cfg.train.lr == 3e-3 and cfg.train.steps == 10 and cfg.model.objective == "bert"
    assert cfg.deepspeed == {"wall_clock_breakdown": True, "zero_optimization": {"stage": 2}}


def test_a_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load("tiny", ["train.steps=7", "model.n_classes=10"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load(path) == cfg


def test_integer_values_are_accepted_for_float_fields():
    assert load("tiny", ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=3e-3"], "unknown key train.lrr"),
        (["trian.lr=3e-3"], "unknown section 'trian'"),
        (["model.n_head=3"], "must divide model.n_embd"),
        (["model.n_ctx=100"], "disagrees with model.n_px"),
        (["train.lr=fast"], "train.lr must be float"),
        (["model.n_layer=2.5"], "model.n_layer must be int"),
        (["model.objective=gan"], "model.objective must be one of"),
        (["parallel.pipeline=8"], "cannot exceed model.n_layer"),
        (["train.lr"], "must look like section.key=value"),
    ],
)
def test_mistakes_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load("tiny", overrides)
    assert "\n" not in str(info.value)


def test_unknown_yaml_keys_and_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: 4\n")
    with pytest.raises(ConfigError, match="unknown key model.n_layers"):
        load(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load("huge")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(broken)


def test_default_config_is_valid():
    assert Config().model.n_ctx == 1024
