"""Shard sets: `format` writes and reads them, `remote` finds and fetches a set kept at a URL or behind a command,
`verify` checks a whole set (megapixel/data/writer.py makes them from image sources)."""
