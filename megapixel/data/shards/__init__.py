"""Shard sets on disk: `format` writes and reads them, `verify` checks a whole set (megapixel/data/writer.py makes
them from image sources)."""
