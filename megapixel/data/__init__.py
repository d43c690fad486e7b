"""The data path: image sources -> palette tokens in grouped .tar shards -> streamed batches.

`sources` and `archives` read images, `writer` makes shard sets, `shards` reads and checks them,
`stream` feeds them to training. The modules are imported one by one
(`from megapixel.data.shards import write_shards`), so making shards does not import torch.
"""
