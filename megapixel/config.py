"""One config object for a run: model, data, train and parallel sections plus a DeepSpeed pass-through.

Loaded from a preset name or a YAML file, then overridden with dotted keys
(`train.lr=3e-3`). Every field is checked once, here, so the rest of the library
can trust it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megapixel.errors import ConfigError

OBJECTIVES = ("ar", "bert")
KERNELS = ("auto", "triton", "torch")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    """The iGPT network: GPT-2 blocks over palette tokens in raster order."""

    # Transformer blocks.
    n_layer: int = 24
    # Width of the residual stream.
    n_embd: int = 512
    # Attention heads; must divide n_embd.
    n_head: int = 8
    # Palette size: a token is a colour's index (must match the shard set's palette).
    n_vocab: int = 512
    # Image side in pixels: an image is n_px * n_px tokens in raster order.
    n_px: int = 32
    # Sequence length; must equal n_px * n_px (None: derived from n_px).
    n_ctx: int | None = None
    # "ar" (autoregressive: predict each pixel from the ones before) or "bert" (predict masked pixels).
    objective: str = "ar"
    # The share of positions the BERT objective masks.
    bert_mask_prob: float = 0.15
    # Classes of the classification head; 0 means no head.
    n_classes: int = 0
    # "triton" (the fused kernels), "torch", or "auto" (Triton for CUDA tensors, torch elsewhere).
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.n_ctx is None:
            self.n_ctx = self.n_px * self.n_px

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    # A shard set (palette.npy, manifest.json, train-*.tar, val-*.tar): a folder, or where to fetch it through
    # webdataset: a folder URL (https://host/set/), a brace pattern of its shards
    # (https://host/set/train-{000000..000127}.tar) or a pipe: command naming them
    # (pipe:aws s3 cp s3://bucket/set/train-{000000..000127}.tar -); megapixel/data/shards/remote.py.
    shards: str = ""
    # Data-loader worker processes per rank; 0: load in the training process.
    num_workers: int = 0
    # Each epoch shuffles the samples inside windows of this many consecutive samples of its shard order.
    shuffle_buffer: int = 1000
    # Random horizontal flips of the training images.
    flip: bool = False
    # Shards stored at a multiple of model.n_px (64x64 for a 32x32 model) are area-downsampled through
    # the palette while streaming; off, a resolution mismatch is an error.
    downsample: bool = False


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    # Where the run's files go: config.yaml, palette.npy, metrics.jsonl, tb/ and checkpoints/.
    run_dir: str = "runs/default"
    # Optimizer steps in the run.
    steps: int = 1000
    # Global batch in images: micro_batch * gradient accumulation steps * data-parallel ranks.
    batch_size: int = 32
    # Images a rank runs at once; 0: batch_size / data-parallel ranks (no accumulation).
    micro_batch: int = 0
    # Peak learning rate, reached at the end of the warmup.
    lr: float = 3e-3
    # Steps of linear warmup from 0 to lr; a cosine decay to min_lr follows.
    warmup_steps: int = 100
    # Learning rate at the end of the cosine decay (the paper decays to 0).
    min_lr: float = 0.0
    # Adam's decay rate of the gradient mean (the paper: 0.9).
    beta1: float = 0.9
    # Adam's decay rate of the squared gradient mean (the paper: 0.95).
    beta2: float = 0.95
    # AdamW's decoupled weight decay (the paper uses none).
    weight_decay: float = 0.0
    # Clip the global gradient norm to this; 0: no clipping.
    grad_clip: float = 1.0
    # "auto": bf16 on CUDA, fp32 on CPU; or "fp32", "bf16", "fp16".
    precision: str = "auto"
    # Seeds the initial weights, the data order, flips and BERT masks.
    seed: int = 0
    # Steps between lines of metrics.jsonl (and TensorBoard points).
    log_every: int = 10
    # Steps between validation passes (one also runs at the last step).
    eval_every: int = 200
    # Val batches a validation pass reads at most; 0: no validation.
    eval_batches: int = 10
    # Steps between checkpoints (one is also saved at the last step and on a stop signal).
    save_every: int = 500
    # Checkpoints kept; older ones are deleted.
    keep_last: int = 3
    # Stop (after saving) when this many steps in a row had non-finite gradients and were skipped; 0: never.
    # fp16's loss scale search skips a few steps in a row at the start, so the limit leaves room for it.
    max_skipped_steps: int = 20
    # Show a progress bar (on the main rank).
    progress: bool = True
    # Start from these weights instead of a random init, in whatever layout this run has: a consolidated
    # folder, a HF ImageGPT folder or a training checkpoint ("": random init). --resume replaces them.
    init_from: str = ""


@dataclass
class ParallelConfig:
    """How the model is laid out over processes; data-parallel size is what is left."""

    # Tensor-parallel size: each block's matrices, the embedding and the head split over this many ranks (it
    # must divide model.n_head and model.n_vocab).
    tensor: int = 1
    # Pipeline stages, each a run of consecutive blocks (at most model.n_layer).
    pipeline: int = 1
    # DeepSpeed's ZeRO stage, 0-3 (2 and 3 only with one pipeline stage).
    zero_stage: int = 0
    # Recompute each block in the backward pass instead of keeping its activations.
    activation_checkpointing: bool = False


@dataclass
class Config:
    """Everything a run needs, flowing down from the entry point."""

    # The network.
    model: ModelConfig = field(default_factory=ModelConfig)
    # The shard set and how it is streamed.
    data: DataConfig = field(default_factory=DataConfig)
    # Optimisation, schedule, logging and checkpointing.
    train: TrainConfig = field(default_factory=TrainConfig)
    # The layout over processes.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Passed through to DeepSpeed's config, overriding what megapixel derives.
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, ready for YAML or JSON."""
        return dataclasses.asdict(self)


# Presets: (layers, width, heads, default resolution). Paper's Table 1; XL heads chosen so the head
# dim is 128, as the paper does not state them.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 128, 4, 16),
    "s": (24, 512, 8, 32),
    "m": (36, 1024, 8, 32),
    "l": (48, 1536, 16, 32),
    "xl": (60, 3072, 24, 64),
}
RESOLUTIONS = (32, 48, 64)


def preset(name: str) -> Config:
    """A config for a preset `NAME` or `NAME-PX` (e.g. `l-48`); names: tiny, s, m, l, xl."""
    base, _, px = name.lower().partition("-")
    if base.startswith("igpt_") or base.startswith("igpt-"):
        base = base[5:]
    if base not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} (optionally -32, -48 or -64)")
    n_layer, n_embd, n_head, n_px = PRESETS[base]
    if px:
        if not px.isdigit() or (int(px) not in RESOLUTIONS and base != "tiny"):
            raise ConfigError(f"preset {name!r}: resolution must be one of {RESOLUTIONS}")
        n_px = int(px)
    cfg = Config(model=ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_px=n_px))
    if base in ("l", "xl"):
        cfg.train.lr = 1e-3
    if base == "xl":
        cfg.train.batch_size = 64
    validate(cfg)
    return cfg


def _section_from_dict(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}: valid keys are {', '.join(sorted(names))}")
    obj = cls()
    for key, value in data.items():
        setattr(obj, key, _coerce(cls, key, value, f"{where}.{key}"))
    if hasattr(obj, "__post_init__"):
        obj.__post_init__()
    return obj


def from_dict(data: dict[str, Any], where: str = "config") -> Config:
    """Build and validate a Config from plain data (a parsed YAML file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    base = data.pop("preset", None)
    cfg = preset(base) if base else Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{where}: unknown section {unknown[0]!r}: valid sections are preset, {', '.join(sections)}")
    for name, value in data.items():
        if name == "deepspeed":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: deepspeed must be a mapping")
            cfg.deepspeed = value
            continue
        section = getattr(cfg, name)
        merged = {**dataclasses.asdict(section), **(value or {})}
        if name == "model" and value and "n_px" in value and "n_ctx" not in value:
            merged["n_ctx"] = None
        setattr(cfg, name, _section_from_dict(type(section), merged, name))
    validate(cfg)
    return cfg


def load(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path, apply `key.sub=value` overrides, validate."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        cfg = from_dict(data, where=str(path))
    else:
        cfg = preset(str(source))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `section.key=value` strings (values parsed as YAML scalars) and re-validate."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        value = yaml.safe_load(raw) if raw.strip() else ""
        if parts[0] == "deepspeed":
            node = cfg.deepspeed
            for p in parts[1:-1]:
                node = node.setdefault(p, {})
            if len(parts) < 2:
                raise ConfigError(f"override {item!r}: name a key inside deepspeed")
            node[parts[-1]] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: the key must be section.key (e.g. train.lr=3e-3)")
        section_name, name = parts
        section = getattr(cfg, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown section {section_name!r} in override {item!r}")
        names = {f.name for f in dataclasses.fields(section)}
        if name not in names:
            raise ConfigError(f"unknown key {key}: valid keys are {', '.join(sorted(names))}")
        setattr(section, name, _coerce(type(section), name, value, key))
        if section_name == "model" and name == "n_px":
            section.n_ctx = section.n_px * section.n_px
    validate(cfg)
    return cfg


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Check a value against the field's declared type, converting int -> float where asked."""
    declared = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if value is None and "None" in str(declared):
        return None
    if declared in ("float", float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if declared in ("float", float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    expect = {"int": int, "int | None": int, "float": float, "bool": bool, "str": str}.get(str(declared))
    if expect is None:
        return value
    if expect is int and isinstance(value, bool) or not isinstance(value, expect):
        raise ConfigError(f"{where} must be {expect.__name__}, got {value!r}")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Reject impossible values with one line that says what to change."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    for name in ("n_layer", "n_embd", "n_head", "n_vocab", "n_px"):
        _require(getattr(m, name) >= 1, f"model.{name} must be at least 1, got {getattr(m, name)}")
    _require(m.n_embd % m.n_head == 0, f"model.n_head ({m.n_head}) must divide model.n_embd ({m.n_embd})")
    _require(
        m.n_ctx == m.n_px * m.n_px,
        f"model.n_ctx ({m.n_ctx}) disagrees with model.n_px ({m.n_px}): it must be n_px*n_px = {m.n_px * m.n_px}",
    )
    _require(m.n_vocab <= 65536, f"model.n_vocab ({m.n_vocab}) must fit in uint16 tokens (at most 65536)")
    _require(m.objective in OBJECTIVES, f"model.objective must be one of {OBJECTIVES}, got {m.objective!r}")
    _require(0.0 < m.bert_mask_prob < 1.0, f"model.bert_mask_prob must be in (0, 1), got {m.bert_mask_prob}")
    _require(m.n_classes >= 0, f"model.n_classes must be >= 0, got {m.n_classes}")
    _require(m.kernels in KERNELS, f"model.kernels must be one of {KERNELS}, got {m.kernels!r}")
    _require(t.steps >= 1, f"train.steps must be at least 1, got {t.steps}")
    _require(t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}")
    _require(t.micro_batch >= 0, f"train.micro_batch must be >= 0, got {t.micro_batch}")
    _require(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be a positive number, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr must be between 0 and train.lr, got {t.min_lr}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}")
    _require(t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
    for name in ("log_every", "eval_every", "save_every", "keep_last"):
        _require(getattr(t, name) >= 1, f"train.{name} must be at least 1, got {getattr(t, name)}")
    _require(t.eval_batches >= 0, f"train.eval_batches must be >= 0, got {t.eval_batches}")
    _require(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    _require(cfg.data.shuffle_buffer >= 1, f"data.shuffle_buffer must be at least 1, got {cfg.data.shuffle_buffer}")
    _require(p.tensor >= 1 and p.pipeline >= 1, "parallel.tensor and parallel.pipeline must be at least 1")
    _require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    _require(
        p.pipeline <= m.n_layer,
        f"parallel.pipeline ({p.pipeline}) cannot exceed model.n_layer ({m.n_layer}): a stage needs a block",
    )


def to_yaml(cfg: Config) -> str:
    """The config as YAML text, loadable by `load`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
