"""The data path: image sources -> palette tokens in grouped .tar shards -> streamed batches.

`sources` reads images, `palette` turns colours into tokens and back, `writer` makes shard sets, `shards` reads and
checks them, `stream` feeds them to training, `images` writes PNGs. Making shards does not import torch.
"""
