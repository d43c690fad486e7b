"""A model's weights as a state dict under IGPT's names, whatever file held them: what a config expects, checking a
state dict against it, building the model from one, and describing it in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megapixel.config import Config
from megapixel.errors import CheckpointError
from megapixel.model import IGPT

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


def build_model(state: Weights, cfg: Config, device: str | torch.device = "cpu") -> IGPT:
    """An fp32 IGPT in eval mode on `device` holding `state` (checked against `cfg` beforehand)."""
    with torch.device("meta"):
        model = IGPT(cfg.model)
    # Allocated uninitialised, then every tensor is filled (load_state_dict is strict): no wasted random init.
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return model.eval()


def describe(state: Weights, cfg: Config) -> str:
    """One line saying what model `state` is: blocks, width, heads, colours, resolution, parameters, dtype."""
    m = cfg.model
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    clf = f", {m.n_classes}-class head" if m.n_classes else ""
    return (
        f"{m.n_layer} blocks x {m.n_embd} wide, {m.n_head} heads, {m.n_vocab} colours, {m.n_px}x{m.n_px}, "
        f"{m.objective.upper()}{clf}: {sum(t.numel() for t in state.values()):,} parameters ({'/'.join(dtypes)})"
    )
