"""To and from HF transformers' ImageGPT, where OpenAI's released iGPT-S/M/L weights live.

The two networks are the same (RMS norm with gain and eps 1e-5, quick GELU, learned positions, untied
head); the files differ in layout:
- HF keeps the SOS vector as the last row of `wte` (vocab_size = n_vocab + 1); its `lm_head` has n_vocab rows.
- HF fuses q, k, v into one `c_attn` and uses GPT-2's Conv1D, whose weight is the transpose of nn.Linear's.
- HF's Conv1D layers have biases; megapixel's iGPT has none, so they are written as zeros and must be zero
  to be read.
- HF's ImageGPT is always causal: only autoregressive models are exported.
A classifier exports as ImageGPTForImageClassification (`score`) and keeps its generative head as `lm_head`,
so the folder also loads as ImageGPTForCausalImageModeling and a round trip loses nothing.

Reading needs no transformers (JSON, safetensors, or torch.load(weights_only=True)); writing uses its config
and image-processor classes, so the files are what `from_pretrained` expects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from megapixel.atomic import new_folder
from megapixel.checkpoint.consolidate import save_safetensors, write_consolidated
from megapixel.checkpoint.weights import Weights, build_model, meta_state
from megapixel.config import Config, from_dict
from megapixel.data.palette import check_palette
from megapixel.errors import CheckpointError, MegapixelError
from megapixel.model.igpt import IGPT, NORM_EPS

CAUSAL = "ImageGPTForCausalImageModeling"
CLASSIFIER = "ImageGPTForImageClassification"
HF_CONFIG = "config.json"
HF_PROCESSOR = "preprocessor_config.json"
HF_WEIGHTS = "model.safetensors"
# Weight files a from_pretrained folder may hold, in the order they are looked for; an index names shards.
WEIGHT_FILES = ("model.safetensors.index.json", HF_WEIGHTS, "pytorch_model.bin.index.json", "pytorch_model.bin")
# Older HF checkpoints saved each attention's causal mask as a buffer; it is no weight, and is skipped.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# HF config fields that change the network, with the values megapixel's iGPT has (missing fields default to these).
ARCHITECTURE_FIELDS: dict[str, Any] = {
    "activation_function": "quick_gelu",
    "layer_norm_epsilon": NORM_EPS,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": False,
}


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with its own storage (safetensors refuses tensors that share memory)."""
    return t.clone(memory_format=torch.contiguous_format)


def _name_pairs(n_layer: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(megapixel, HF) names of the tensors stored alike, and of the linear weights HF stores transposed."""
    same = [
        ("wpe.weight", "transformer.wpe.weight"),
        ("ln_f.weight", "transformer.ln_f.weight"),
        ("head.weight", "lm_head.weight"),
        ("clf.weight", "score.weight"),
    ]
    transposed = []
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        same += [(ours + "norm1.weight", theirs + "ln_1.weight"), (ours + "norm2.weight", theirs + "ln_2.weight")]
        transposed += [
            (ours + f"{n}.weight", theirs + f"{n}.weight") for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        ]
    return same, transposed


def to_hf_state(state: Weights, cfg: Config) -> Weights:
    """An IGPT state dict in HF ImageGPT's names and layout (CausalImageModeling, plus `score` for a classifier)."""
    if cfg.model.objective != "ar":
        raise CheckpointError(
            "HF's ImageGPT is causal only: a model trained with the BERT objective cannot be exported to it"
        )
    same, transposed = _name_pairs(cfg.model.n_layer)
    wte = state["wte.weight"]
    hf: Weights = {"transformer.wte.weight": torch.cat([wte, state["sos"][None].to(wte.dtype)])}
    hf.update({theirs: _own(state[ours]) for ours, theirs in same if ours in state})
    # Conv1D holds (in, out), the transpose of nn.Linear's (out, in).
    hf.update({theirs: _own(state[ours].t()) for ours, theirs in transposed})
    for i in range(cfg.model.n_layer):
        qkv = torch.cat([state[f"blocks.{i}.attn.{p}_proj.weight"] for p in "qkv"])
        hf[f"transformer.h.{i}.attn.c_attn.weight"] = _own(qkv.t())
    for name in [name for name in hf if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))]:
        hf[name.removesuffix(".weight") + ".bias"] = hf[name].new_zeros(hf[name].shape[1])
    return hf


def from_hf_state(hf: Weights, cfg: Config, where: str | Path = "the HF weights") -> Weights:
    """An IGPT state dict from HF ImageGPT tensors; CheckpointError naming the first tensor that is missing,
    unexpected, misshapen, or a nonzero bias."""
    hf = {name: t for name, t in hf.items() if not name.endswith(MASK_BUFFERS)}
    expected = {name: t.shape for name, t in to_hf_state(meta_state(cfg), cfg).items()}
    for name, tensor in hf.items():
        if name not in expected:
            raise CheckpointError(
                f"{where} holds {name}, which megapixel's iGPT does not have: its architecture differs"
            )
        if tensor.shape != expected[name]:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(tensor.shape)}; the config wants {tuple(expected[name])}"
            )
        if name.endswith(".bias") and bool(tensor.any()):
            raise CheckpointError(
                f"{where}: {name} is nonzero (max |b| = {tensor.abs().max().item():.3g}); megapixel's iGPT has no "
                "biases, so this model cannot be read exactly"
            )
    missing = [name for name in expected if name not in hf]
    if missing:
        raise CheckpointError(f"{where} lacks {missing[0]}: the files do not hold the model the config describes")

    n_vocab = cfg.model.n_vocab
    same, transposed = _name_pairs(cfg.model.n_layer)
    wte = hf["transformer.wte.weight"]
    state: Weights = {"wte.weight": _own(wte[:n_vocab]), "sos": _own(wte[n_vocab])}
    state.update({ours: _own(hf[theirs]) for ours, theirs in same if theirs in hf})
    state.update({ours: _own(hf[theirs].t()) for ours, theirs in transposed})
    for i in range(cfg.model.n_layer):
        for p, weight in zip("qkv", hf[f"transformer.h.{i}.attn.c_attn.weight"].t().chunk(3), strict=True):
            state[f"blocks.{i}.attn.{p}_proj.weight"] = _own(weight)
    return state


def export_hf(state: Weights, cfg: Config, palette: np.ndarray, out: str | Path, source: str = "") -> Path:
    """Write an IGPT as a HF ImageGPT folder `out` (config.json, model.safetensors, preprocessor_config.json
    with the palette as clusters) that `from_pretrained` loads; atomically."""
    # Imported here: transformers is optional (a test extra), and only exporting needs it.
    try:
        from transformers import ImageGPTConfig, ImageGPTImageProcessorPil
    except ImportError as e:
        raise MegapixelError(hf_import_error(e)) from None

    m = cfg.model
    hf_state = to_hf_state(state, cfg)
    palette = check_palette(palette, "the palette", m.n_vocab)
    classifier = "score.weight" in hf_state
    hf_config = ImageGPTConfig(
        vocab_size=m.n_vocab + 1,
        n_positions=m.n_ctx,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        # The paper trains without dropout; HF's defaults of 0.1 would change fine-tuning there.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        architectures=[CLASSIFIER if classifier else CAUSAL],
        **ARCHITECTURE_FIELDS,
        **({"num_labels": m.n_classes} if classifier else {}),
    )
    # HF's default processor resizes with bilinear filtering to `size`, scales to [-1, 1] and takes the nearest
    # cluster: the palette is already in that scale (openai/image-gpt's clusters format).
    processor = ImageGPTImageProcessorPil(clusters=palette, size={"height": m.n_px, "width": m.n_px})
    with new_folder(out) as tmp:
        hf_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        save_safetensors(hf_state, tmp / HF_WEIGHTS, {"format": "pt", "megapixel_source": source})
    return Path(out)


def hf_import_error(error: ImportError) -> str:
    """One line saying why transformers' ImageGPT could not be imported, and what to do about it."""
    if isinstance(error, ModuleNotFoundError) and error.name == "transformers":
        return "exporting to HF needs transformers 5 or later, which is not installed: pip install 'transformers>=5'"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"exporting to HF needs transformers' ImageGPT, whose import failed ({type(error).__name__}: {text}): "
        "repair that installation (pip install -U 'transformers>=5')"
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} lacks {path.name}: expected a folder that HF's from_pretrained loads")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


def _read_weight_file(path: Path) -> Weights:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: its index names it")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # Only tensors and plain containers unpickle: a file that would run code is refused.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch and safetensors raise several types for foreign or truncated files
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _read_hf_weights(folder: Path) -> Weights:
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path)
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path} has no weight_map: expected a HF weight index")
        state: Weights = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_weight_file(folder / shard))
        return state
    raise CheckpointError(f"{folder} lacks {HF_WEIGHTS} (or pytorch_model.bin): expected HF ImageGPT weights")


def _model_config(hf: dict[str, Any], path: Path, n_classes: int) -> Config:
    if hf.get("model_type") != "imagegpt":
        raise CheckpointError(f"{path} has model_type {hf.get('model_type')!r}: megapixel reads 'imagegpt' models")
    architectures = hf.get("architectures") or [CAUSAL]
    if architectures[0] not in (CAUSAL, CLASSIFIER):
        raise CheckpointError(f"{path} names architecture {architectures[0]}: megapixel reads {CAUSAL} or {CLASSIFIER}")
    for name, ours in ARCHITECTURE_FIELDS.items():
        theirs = hf.get(name, ours)
        same = math.isclose(theirs, ours, rel_tol=1e-6) if isinstance(ours, float) else theirs == ours
        if not same:
            raise CheckpointError(f"{path} sets {name} = {theirs!r}; megapixel's iGPT has {ours!r}")
    n_embd, n_positions = hf.get("n_embd", 512), hf.get("n_positions", 1024)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"{path} sets n_inner = {hf['n_inner']}; megapixel's iGPT has 4 * n_embd = {4 * n_embd}")
    n_px = math.isqrt(n_positions)
    if n_px * n_px != n_positions:
        raise CheckpointError(f"{path} sets n_positions = {n_positions}, not a square image's pixel count")
    model = {
        "n_layer": hf.get("n_layer", 24),
        "n_embd": n_embd,
        "n_head": hf.get("n_head", 8),
        "n_vocab": hf.get("vocab_size", 513) - 1,  # the last row is the SOS vector
        "n_px": n_px,
        "n_classes": n_classes,
    }
    return from_dict({"model": model}, where=str(path))


def _palette(folder: Path, n_vocab: int) -> np.ndarray:

    path = folder / HF_PROCESSOR
    processor = _read_json(path)
    if processor.get("clusters") is None:
        raise CheckpointError(f"{path} holds no clusters: the colour palette is needed to read and write images")
    # The clusters are in [-1, 1] only when pixels are scaled as x / 127.5 - 1 before quantising.
    scaled = processor.get("do_normalize", True) and all(
        math.isclose(x, 0.5) for key in ("image_mean", "image_std") for x in processor.get(key, [0.5])
    )
    if not scaled:
        raise CheckpointError(f"{path} does not scale pixels to [-1, 1] (x / 127.5 - 1) before quantising")
    try:
        return check_palette(np.asarray(processor["clusters"], dtype=np.float32), f"{path} clusters", n_vocab)
    except MegapixelError as e:
        raise CheckpointError(str(e)) from None


def read_hf(folder: str | Path) -> tuple[Weights, Config, np.ndarray, dict[str, str]]:
    """The IGPT weights, config, palette and provenance of a HF ImageGPT folder (as from_pretrained reads it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no HF model at {folder}: expected a folder with {HF_CONFIG} and {HF_WEIGHTS}")
    hf_config = _read_json(folder / HF_CONFIG)
    hf_state = _read_hf_weights(folder)
    score = hf_state.get("score.weight")
    cfg = _model_config(hf_config, folder / HF_CONFIG, 0 if score is None else score.shape[0])
    metadata = {"source": str(folder.resolve())}
    if score is not None and "lm_head.weight" not in hf_state:
        # A classifier fine-tuned in HF has no generative head; megapixel's starts at zero, as in a fresh model.
        hf_state["lm_head.weight"] = torch.zeros(cfg.model.n_vocab, cfg.model.n_embd, dtype=score.dtype)
        metadata["note"] = "no lm_head.weight: the generative head starts at zero, as in a fresh model"
    state = from_hf_state(hf_state, cfg, folder)
    return state, cfg, _palette(folder, cfg.model.n_vocab), metadata


def import_hf(folder: str | Path, out: str | Path) -> dict[str, str]:
    """Write a HF ImageGPT folder as a consolidated megapixel folder `out`; returns its metadata."""
    state, cfg, palette, metadata = read_hf(folder)
    write_consolidated(state, cfg, palette, out, metadata)
    return metadata


def load_hf(folder: str | Path, device: str | torch.device = "cpu") -> tuple[IGPT, Config, np.ndarray]:
    """The model of a HF ImageGPT folder as an IGPT in eval mode on `device`, with its config and palette."""
    state, cfg, palette, _ = read_hf(folder)
    return build_model(state, cfg, device), cfg, palette
