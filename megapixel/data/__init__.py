"""The data path: image sources -> palette tokens in webdataset shards -> streamed batches.

`sources` reads images, `shards` writes and checks shard sets, `stream` feeds them to training.
The modules are imported one by one (`from megapixel.data.shards import write_shards`), so making
shards does not import torch.
"""
