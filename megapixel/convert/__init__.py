"""Checkpoint conversion: one consolidated file, resharding to any layout, and to and from HF transformers' ImageGPT."""

from megapixel.convert.consolidate import (
    consolidate,
    is_consolidated,
    load_consolidated,
    read_consolidated,
    write_consolidated,
)
from megapixel.convert.hf import export_hf, from_hf_state, import_hf, load_hf, read_hf, to_hf_state
from megapixel.convert.loading import load_any, load_initial_weights, read_any
from megapixel.convert.reshard import reshard

__all__ = [
    "consolidate",
    "export_hf",
    "from_hf_state",
    "import_hf",
    "is_consolidated",
    "load_any",
    "load_consolidated",
    "load_hf",
    "load_initial_weights",
    "read_any",
    "read_consolidated",
    "read_hf",
    "reshard",
    "to_hf_state",
    "write_consolidated",
]
