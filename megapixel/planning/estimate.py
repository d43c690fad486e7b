"""Memory and time per GPU for a model laid out over a cluster (the search over layouts: megapixel/planning/search.py).

Model state follows what DeepSpeed allocates with bf16 and ZeRO (measured on real engines, docs/scaling.md):
bf16 working weights, bf16 gradients, fp32 master weights and Adam moments, and the fp32 gradient the
optimizer step reads. Activations follow Megatron's count (Korthikanti et al. 2022) redone for iGPT's block.
Time is FLOPs at an assumed MFU, the 1F1B pipeline bubble, and ring collectives over stated bandwidths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megapixel.config import Config
from megapixel.planning.counts import flops_per_token

GB = 1e9
# H100 SXM, dense bf16 tensor-core peak (NVIDIA's datasheet, without sparsity).
H100_PEAK_TFLOPS = 989.0
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) that size its buffers.
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_PERSISTENCE_THRESHOLD = 100_000


@dataclass(frozen=True)
class Cluster:
    """The machines: GPUs per node, memory, peak and the assumed efficiency, link bandwidths (GB/s one way)."""

    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    peak_tflops: float = H100_PEAK_TFLOPS
    # Model FLOPs utilisation assumed for the matmuls (the GPU README measured 37-51% for plain PyTorch iGPT-L).
    mfu: float = 0.45
    # NVLink 4: 900 GB/s per H100 both ways, 450 one way; 8 x 400 Gb/s InfiniBand a node: 50 GB/s per GPU.
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    # PCIe Gen5 x16 between host and GPU, about half its 64 GB/s in practice.
    host_gbps: float = 25.0
    # DeepSpeed's CPU Adam, parameters a second for one GPU's process (an assumption, not measured here).
    cpu_adam_params_per_s: float = 1e9
    # Host memory of a node, shared by its GPUs' offloaded state (a DGX H100 has 2 TB).
    host_memory_gb: float = 2048.0
    # Share of GPU memory a plan may fill: the rest is the allocator's fragmentation and cuDNN/NCCL workspaces.
    usable_fraction: float = 0.9


@dataclass(frozen=True)
class Layout:
    """How one training step is laid out: parallel sizes, ZeRO, offload, checkpointing and batching."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpointing: bool = False
    micro_batch: int = 1
    grad_accum: int = 1
    # Flash-style attention (Triton kernel or SDPA's flash/cuDNN) keeps no (seq x seq) scores.
    flash: bool = True
    # Bytes of one activation element: 2 for bf16 training, 4 to check against fp32 on a CPU.
    act_bytes: int = 2
    # DeepSpeed's ZeRO-3 knobs, at their defaults.
    persistence_threshold: int = DS_PERSISTENCE_THRESHOLD
    reduce_bucket: int = DS_REDUCE_BUCKET

    @property
    def gpus(self) -> int:
        """GPUs the layout occupies."""
        return self.tensor * self.pipeline * self.data

    def describe(self) -> str:
        """The layout in one short line."""
        extras = [f"ZeRO-{self.zero_stage}"]
        if self.offload_optimizer:
            extras.append("offload optimizer")
        if self.offload_params:
            extras.append("offload params")
        if self.checkpointing:
            extras.append("checkpointing")
        return (
            f"T{self.tensor} x P{self.pipeline} x D{self.data}, {', '.join(extras)}, "
            f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation"
        )


@dataclass
class Estimate:
    """Per-GPU bytes (on the worst pipeline stage) and seconds of one optimizer step."""

    layout: Layout
    params: float = 0.0  # bf16 weights held between steps
    grads: float = 0.0  # bf16 gradients at the end of backward
    optimizer: float = 0.0  # fp32 master weights and Adam's two moments
    step_grads: float = 0.0  # fp32 gradients the optimizer step reads (alive only during the step)
    buffers: float = 0.0  # DeepSpeed's buckets held for the whole run (ZeRO-3's reduce bucket)
    working: float = 0.0  # alive during forward and backward: ZeRO-3's gathered layers, ZeRO-1/2's bucket
    activations: float = 0.0
    # Model state (weights, gradients, optimizer, buffers) at three moments of a step, as DeepSpeed holds it.
    between_steps: float = 0.0
    after_backward: float = 0.0
    in_step: float = 0.0
    peak: float = 0.0
    build: float = 0.0  # a rank's fp32 weights as build_engine makes them, one full weight being sliced beside them
    cpu: float = 0.0  # host memory per GPU for offloaded state
    times: dict[str, float] = field(default_factory=dict)
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        out = dataclasses.asdict(self)
        out["layout"] = dataclasses.asdict(self.layout)
        return out


def parameter_shapes(cfg: Config) -> list[tuple[str, int, bool]]:
    """Every weight tensor as (place, elements, split by tensor parallelism); place is embed, block or head."""
    m = cfg.model
    d = m.n_embd
    tensors = [("embed", m.n_vocab * d, True), ("embed", m.n_ctx * d, False), ("embed", d, False)]
    block = [("block", d * d, True)] * 4 + [("block", 4 * d * d, True)] * 2 + [("block", d, False)] * 2
    tensors += block * m.n_layer
    tensors += [("head", d, False), ("head", d * m.n_vocab, True)]
    if m.n_classes:
        tensors.append(("head", d * m.n_classes, False))
    return tensors


def stage_blocks(cfg: Config, layout: Layout, stage: int) -> range:
    """The blocks pipeline stage `stage` runs, as the trainer's PipelineModule (partitioned by block count)
    splits them: as evenly as they go, the first n_layer % pipeline stages one more."""
    base, extra = divmod(cfg.model.n_layer, layout.pipeline)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def stage_tensors(cfg: Config, layout: Layout, stage: int) -> list[int]:
    """Elements of each weight tensor one tensor rank of pipeline stage `stage` holds."""
    blocks = stage_blocks(cfg, layout, stage)
    out = []
    for i, (place, numel, split) in enumerate(parameter_shapes(cfg)):
        if place == "block" and (i - 3) // 8 not in blocks:  # 3 embedding tensors, then 8 a block
            continue
        if (place == "embed" and stage != 0) or (place == "head" and stage != layout.pipeline - 1):
            continue
        out.append(numel // layout.tensor if split else numel)
    return out


def block_activation_bytes(cfg: Config, layout: Layout) -> float:
    """Bytes one block keeps for backward per micro-batch, on one tensor rank.

    Per token, in units of width x element: the block input and the mid-block residual (the norms' inputs,
    2), both norm outputs (2), q, k, v and the attention output (4, split over tensor ranks), and the MLP's
    4d input, sigmoid and product (12, split): quick GELU keeps its input and sigmoid where Megatron's GELU
    keeps one. Plus fp32 per-token statistics (two norms' rstd, attention's log-sum-exp per head), and,
    without a flash-style kernel, the (seq x seq) softmax of every head.
    """
    m = cfg.model
    s, b, h, t, e = m.n_ctx, layout.micro_batch, m.n_embd, layout.tensor, layout.act_bytes
    heads = m.n_head // t
    dense = s * b * h * e * (4 + 16 / t)
    stats = 4 * s * b * (2 + heads)
    scores = 0.0 if layout.flash else e * heads * s * s * b
    return dense + stats + scores


def head_activation_bytes(cfg: Config, layout: Layout) -> float:
    """Bytes the final norm, output head and loss keep per micro-batch: the norm's input and output, and the
    fp32 log-softmax over this rank's share of the palette (the bf16 logits are freed once cast)."""
    m = cfg.model
    s, b = m.n_ctx, layout.micro_batch
    return 2 * s * b * m.n_embd * layout.act_bytes + 4 * s * b + 4 * s * b * m.n_vocab / layout.tensor


def _model_state(est: Estimate, tensors: list[int], layout: Layout) -> None:
    """Fill the model-state fields of `est` for one rank holding `tensors` (elements of each weight).

    What DeepSpeed 0.19 allocates with bf16, measured on its engines (tests/test_plan.py): ZeRO-0 keeps bf16
    weights, fp32 master weights and moments (14 bytes a weight), gradients (2) in backward and fp32 copies
    of them (4) in the step. ZeRO-1/2 partition the 12 optimizer bytes and reduce gradients into a 2/D
    partition, freed before the step's 4/D fp32 gradients. ZeRO-3 partitions all 16 bytes (the gradient
    partition persists), keeps weights of at most `persistence_threshold` elements whole on every rank beside
    their partitions (released during the step), and holds a bf16 reduce bucket.
    """
    n = float(sum(tensors))
    z = layout.zero_stage
    d = layout.data if z else 1  # ZeRO-0 partitions nothing
    est.optimizer, est.step_grads = 12 * n / d, 4 * n / d
    whole = 0.0
    if z == 0:
        est.params = est.grads = 2 * n
    elif z in (1, 2):
        est.params, est.grads = 2 * n, 2 * n / d
        est.working = 2 * min(layout.reduce_bucket, n)
    else:
        # On one rank the partition is the whole weight, so nothing is held twice.
        whole = 2.0 * sum(x for x in tensors if x <= layout.persistence_threshold) if d > 1 else 0.0
        est.params, est.grads = 2 * n / d + whole, 2 * n / d
        est.buffers = 2 * layout.reduce_bucket
    if layout.offload_optimizer:
        est.cpu += est.optimizer + est.step_grads
        est.optimizer = est.step_grads = 0.0
    if layout.offload_params and z == 3:
        est.cpu += est.params - whole
        est.params = whole
    est.between_steps = est.params + est.optimizer + est.buffers + (est.grads if z == 3 else 0.0)
    est.after_backward = est.between_steps + (0.0 if z == 3 else est.grads)
    est.in_step = est.between_steps - whole + est.step_grads + (est.grads if z == 0 else 0.0)


def estimate(cfg: Config, layout: Layout, cluster: Cluster) -> Estimate:
    """Memory of the worst pipeline stage and the time of one optimizer step for cfg's model under `layout`."""
    m = cfg.model
    largest = max(numel for _, numel, _ in parameter_shapes(cfg))
    worst: Estimate | None = None
    for stage in range(layout.pipeline):
        tensors = stage_tensors(cfg, layout, stage)
        est = Estimate(layout)
        _model_state(est, tensors, layout)
        blocks = len(stage_blocks(cfg, layout, stage))
        in_flight = min(layout.pipeline - stage, layout.grad_accum)
        per_block = block_activation_bytes(cfg, layout)
        if layout.checkpointing:
            # Only each block's input survives the forward; backward recomputes one block at a time.
            kept = blocks * in_flight * m.n_ctx * layout.micro_batch * m.n_embd * layout.act_bytes
            est.activations = kept + per_block
        else:
            est.activations = blocks * in_flight * per_block
        if stage == layout.pipeline - 1:
            est.activations += head_activation_bytes(cfg, layout)
        if layout.zero_stage == 3:
            # The layer being computed and the one prefetched are gathered whole.
            block_params = 12 * m.n_embd * m.n_embd / layout.tensor
            est.working = 2 * (2 * block_params + DS_PREFETCH_BUCKET)
        # Backward frees activations as it makes gradients; counting both at once is an upper bound.
        est.peak = max(est.after_backward + est.working + est.activations, est.in_step)
        # Before DeepSpeed casts and partitions them: this rank's slices, made one full weight at a time.
        est.build = 4 * (sum(tensors) + largest)
        if worst is None or est.peak > worst.peak:
            worst = est
    assert worst is not None
    _step_time(worst, cfg, layout, cluster)
    return worst


def _ring(nbytes: float, ranks: int, gbps: float, factor: float = 2.0) -> float:
    """Seconds of a ring collective moving `nbytes` per rank: all-reduce factor 2, gather or scatter 1."""
    if ranks <= 1:
        return 0.0
    return factor * (ranks - 1) / ranks * nbytes / (gbps * GB)


def _step_time(est: Estimate, cfg: Config, layout: Layout, cluster: Cluster) -> None:
    """Fill times, step_s, tokens_per_s and mfu: compute at the assumed MFU stretched by the bubble, plus
    communication that is not overlapped (a pessimistic choice: DeepSpeed overlaps some of it)."""
    m = cfg.model
    t, p, d = layout.tensor, layout.pipeline, layout.data
    tokens = layout.micro_batch * layout.grad_accum * d * m.n_ctx
    model_flops = flops_per_token(cfg) * tokens
    recompute = 4 / 3 if layout.checkpointing else 1.0  # one more forward: 8 instead of 6 per parameter
    compute = model_flops * recompute / (layout.gpus * cluster.peak_tflops * 1e12 * cluster.mfu)
    bubble = (p - 1) / (layout.grad_accum + p - 1)
    times = {"compute": compute, "bubble": compute * bubble / (1 - bubble)}

    def link(span: int) -> float:
        return cluster.intra_node_gbps if span <= cluster.gpus_per_node else cluster.inter_node_gbps

    # Tensor parallelism: per block and micro-batch, forward all-reduces after attention and MLP; backward one
    # per column-parallel input (q, k, v separately, and the MLP's): 6, and 2 more when the forward is redone.
    act = layout.micro_batch * m.n_ctx * m.n_embd * 2
    per_block = 8 if layout.checkpointing else 6
    blocks = math.ceil(m.n_layer / p)
    times["tensor"] = _ring(act, t, link(t)) * per_block * blocks * layout.grad_accum
    # Pipeline: each micro-batch's activations forward and their gradients back across every stage boundary.
    times["pipeline"] = 2 * layout.grad_accum * act / t / (link(t * d * p) * GB) if p > 1 else 0.0
    # Data parallelism over this rank's weights (bf16 gradients): ZeRO 0/1 all-reduce once a step; ZeRO-2
    # reduce-scatters every micro-batch then all-gathers weights; ZeRO-3 also all-gathers them twice each.
    n = _rank_params(cfg, layout)
    grad_bytes, bw = 2 * n, link(t * d)
    if layout.zero_stage <= 1:
        dp = _ring(grad_bytes, d, bw)
    elif layout.zero_stage == 2:
        dp = _ring(grad_bytes, d, bw, 1) * layout.grad_accum + _ring(grad_bytes, d, bw, 1)
    else:
        dp = _ring(grad_bytes, d, bw, 1) * 3 * layout.grad_accum
    times["data"] = dp
    offload = 0.0
    if layout.offload_optimizer:
        # bf16 gradients to the host and bf16 weights back, and Adam on the host.
        offload = 4 * n / d / (cluster.host_gbps * GB) + n / d / cluster.cpu_adam_params_per_s
    if layout.offload_params:
        offload += 2 * layout.grad_accum * 2 * n / d / (cluster.host_gbps * GB)
    times["offload"] = offload
    est.times = times
    est.step_s = sum(times.values())
    est.tokens_per_s = tokens / est.step_s
    est.mfu = model_flops / (est.step_s * layout.gpus * cluster.peak_tflops * 1e12)


def _rank_params(cfg: Config, layout: Layout) -> float:
    """Weights one tensor rank of the largest pipeline stage holds."""
    return float(max(sum(stage_tensors(cfg, layout, s)) for s in range(layout.pipeline)))
