"""Training: the DeepSpeed engine of a run (`build`), the shard set it reads (`inputs`), the loop (`loop`) with its
validation, schedule, metrics, per-rank state, signal handling and non-finite guard, and resharding a run for
another layout (`reshard`)."""
