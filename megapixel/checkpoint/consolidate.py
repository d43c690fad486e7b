"""One consolidated file per model: a folder of model.safetensors, config.yaml and palette.npy.

A DeepSpeed training checkpoint of any layout (tensor x pipeline x data, ZeRO 0-3; ZeRO-3 with one stage)
becomes a folder that evaluation, export and sharing read without DeepSpeed, and that loads back as an
IGPT. Reading never unpickles code: safetensors for the weights, YAML for the config, .npy without pickle.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# How a tag's config and palette are found belongs to checkpoint.py: consolidation must find exactly what
# load_model finds.
from megapixel.checkpoint import (
    config_of,
    gather_tensor_shards,
    palette_of,
    read_client_state,
    read_model_weights,
    resolve_checkpoint,
)
from megapixel.config import Config, load, to_yaml
from megapixel.errors import CheckpointError, MegapixelError
from megapixel.model import IGPT

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
PALETTE = "palette.npy"
# safetensors metadata is str -> str; this key marks files megapixel wrote.
FORMAT_KEY = "megapixel_format"
FORMAT = "consolidated-1"

Weights = dict[str, torch.Tensor]


def meta_state(cfg: Config) -> Weights:
    """The state dict of an IGPT built from `cfg` on the meta device: names, shapes and dtypes, no memory."""
    with torch.device("meta"):
        return IGPT(cfg.model).state_dict()


def check_weights(state: Weights, cfg: Config, where: str | Path) -> None:
    """CheckpointError naming the first tensor of `state` (in the model's order) that is unexpected, misshapen or
    missing for `cfg`."""
    expected = {name: t.shape for name, t in meta_state(cfg).items()}
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{where} holds {unexpected[0]}, which the model does not have: the config does not match"
        )
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{where} lacks {name}: the config does not match it")
        if state[name].shape != shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(state[name].shape)} but the model wants {tuple(shape)}"
            )


def refuse_existing(out: Path) -> None:
    """CheckpointError unless `out` is absent or an empty folder: nothing already on disk is overwritten."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CheckpointError(f"{out} already exists: choose a new output folder (nothing was written)")


@contextmanager
def new_folder(out: str | Path) -> Iterator[Path]:
    """A temporary sibling of `out` to fill; renamed to `out` when the block ends without error, else removed.
    An existing `out` is refused, so nothing already on disk is overwritten."""
    out = Path(out)
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # the empty folder checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(state: Weights, path: Path, metadata: dict[str, str]) -> None:
    """Write `state` as a safetensors file readable as the umask allows (safetensors itself creates it 0600)."""
    save_file({name: t.detach().contiguous() for name, t in state.items()}, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_consolidated(
    state: Weights, cfg: Config, palette: np.ndarray, out: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write `state` (IGPT names) with its config and palette as a consolidated folder `out`, atomically."""
    from megapixel.palette import check_palette, palette_hash, save_palette

    check_weights(state, cfg, "the weights")
    palette = check_palette(palette, "the palette", cfg.model.n_vocab)
    meta = {**(metadata or {}), FORMAT_KEY: FORMAT, "palette_hash": palette_hash(palette)}
    with new_folder(out) as tmp:
        save_safetensors(state, tmp / WEIGHTS, meta)
        (tmp / CONFIG).write_text(to_yaml(cfg))
        save_palette(tmp / PALETTE, palette)
    return Path(out)


def is_consolidated(path: str | Path) -> bool:
    """Whether `path` is a consolidated folder (model.safetensors and config.yaml in it)."""
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def read_consolidated(path: str | Path) -> tuple[Weights, Config, np.ndarray, dict[str, str]]:
    """The weights, config, palette and file metadata of a consolidated folder, checked against each other."""
    from megapixel.palette import load_palette, palette_hash

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no consolidated model at {path}: expected a folder with {WEIGHTS}, {CONFIG}, {PALETTE}")
    for name in (WEIGHTS, CONFIG, PALETTE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} lacks {name}: a consolidated folder holds {WEIGHTS}, {CONFIG} and {PALETTE}")
    cfg = load(path / CONFIG)
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error type and OSError for foreign or truncated files
        raise CheckpointError(f"cannot read {path / WEIGHTS}: {str(e).splitlines()[0]}") from None
    check_weights(state, cfg, path / WEIGHTS)
    try:
        palette = load_palette(path / PALETTE, k=cfg.model.n_vocab)
    except MegapixelError as e:
        raise CheckpointError(str(e)) from None
    saved = metadata.get("palette_hash")
    if saved is not None and saved != palette_hash(palette):
        raise CheckpointError(f"{path / PALETTE} is not the palette {path / WEIGHTS} was saved with: restore it")
    return state, cfg, palette, metadata


def load_consolidated(path: str | Path, device: str | torch.device = "cpu") -> tuple[IGPT, Config, np.ndarray]:
    """The model of a consolidated folder, in fp32 and eval mode on `device`, with its config and palette
    (what checkpoint.load_model returns for a training checkpoint)."""
    state, cfg, palette, _ = read_consolidated(path)
    return build_model(state, cfg, device), cfg, palette


def build_model(state: Weights, cfg: Config, device: str | torch.device = "cpu") -> IGPT:
    """An fp32 IGPT in eval mode on `device` holding `state` (checked against `cfg` beforehand)."""
    with torch.device("meta"):
        model = IGPT(cfg.model)
    # Allocated uninitialised, then every tensor is filled (load_state_dict is strict): no wasted random init.
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return model.eval()


def read_checkpoint(path: str | Path) -> tuple[Weights, Config, np.ndarray, dict[str, str]]:
    """The full weights, config, palette and provenance of a training checkpoint (run, checkpoints/ or tag folder)."""
    tag = resolve_checkpoint(path)
    client = read_client_state(tag)
    cfg = config_of(tag, client)
    state = read_model_weights(tag)
    if isinstance(state, list):  # one state dict of shards per tensor rank
        state = gather_tensor_shards(state, meta_state(cfg))
    check_weights(state, cfg, tag)
    palette = palette_of(tag, cfg, client.get("palette_hash"))
    metadata = {"source": str(tag.resolve())}
    if "step" in client:
        metadata["step"] = str(client["step"])
    return state, cfg, palette, metadata


def read_model(path: str | Path) -> tuple[Weights, Config, np.ndarray, dict[str, str]]:
    """Weights, config, palette and metadata of a consolidated folder or a training checkpoint, whichever `path` is."""
    return read_consolidated(path) if is_consolidated(path) else read_checkpoint(path)


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a training checkpoint (any tensor x pipeline x data layout, ZeRO 0-3) as a consolidated folder `out`."""
    state, cfg, palette, metadata = read_checkpoint(checkpoint)
    return write_consolidated(state, cfg, palette, out, metadata)


def describe(state: Weights, cfg: Config) -> str:
    """One line saying what model `state` is: blocks, width, heads, colours, resolution, parameters, dtype."""
    m = cfg.model
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    clf = f", {m.n_classes}-class head" if m.n_classes else ""
    return (
        f"{m.n_layer} blocks x {m.n_embd} wide, {m.n_head} heads, {m.n_vocab} colours, {m.n_px}x{m.n_px}, "
        f"{m.objective.upper()}{clf}: {sum(t.numel() for t in state.values()):,} parameters ({'/'.join(dtypes)})"
    )
