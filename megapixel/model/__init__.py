"""The iGPT network."""

from megapixel.model.igpt import IGPT, Output

__all__ = ["IGPT", "Output"]
