"""megapixel: train Image GPT (iGPT) at any scale, from a CPU demo to iGPT-XL on a cluster."""

__version__ = "0.1.0"
