"""The search for the fastest layout that fits a cluster, cfg's own layout, and the planner's report.

Each layout is costed by megapixel/planning/estimate.py; the rejections and the ranking are described in
docs/scaling.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megapixel.config import Config
from megapixel.errors import ConfigError
from megapixel.parallel.groups import check_world, validate_layout
from megapixel.planning.counts import parameter_counts
from megapixel.planning.estimate import (
    DS_PERSISTENCE_THRESHOLD,
    DS_REDUCE_BUCKET,
    GB,
    Cluster,
    Estimate,
    Layout,
    estimate,
)


@dataclass
class Search:
    """Every layout tried on `gpus` GPUs: those that fit, fastest first, and why the others were rejected."""

    gpus: int
    batch: int
    fits: list[Estimate]
    rejected: list[tuple[Layout, str]]

    @property
    def best(self) -> Estimate | None:
        """The fastest layout that fits, or None."""
        return self.fits[0] if self.fits else None


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: Config, gpus: int, batch: int, flash: bool = True) -> list[Layout]:
    """Every layout of `gpus` GPUs for a global batch of `batch` images that megapixel can run or refuses."""
    out = []
    for t in _divisors(gpus):
        for p in _divisors(gpus // t):
            d = gpus // (t * p)
            for micro in (1, 2, 4, 8, 16, 32, 64):
                if batch % (micro * d):
                    continue
                for zero in range(4):
                    offloads = [(False, False)] + [(True, False)] * (zero > 0) + [(True, True)] * (zero == 3)
                    for opt, params in offloads:
                        for ckpt in (False, True):
                            out.append(
                                Layout(t, p, d, zero, opt, params, ckpt, micro, batch // (micro * d), flash=flash)
                            )
    return out


def rejection(cfg: Config, layout: Layout, cluster: Cluster, est: Estimate | None) -> str | None:
    """Why `layout` cannot run cfg's model on `cluster` (None: it can)."""
    m = cfg.model
    if m.n_head % layout.tensor or m.n_vocab % layout.tensor:
        return f"tensor size must divide the {m.n_head} heads and {m.n_vocab} colours"
    if layout.tensor > cluster.gpus_per_node:
        return "a tensor group would span nodes (two all-reduces a block over the slow network)"
    if layout.pipeline > m.n_layer:
        return "more pipeline stages than blocks"
    if layout.pipeline > 1 and layout.zero_stage > 1:
        return "megapixel refuses ZeRO-2/3 with a pipeline (DeepSpeed cannot partition gradients across stages)"
    if layout.pipeline > 1 and layout.grad_accum < layout.pipeline:
        return "fewer micro-batches than pipeline stages (bubble over half the step)"
    if est is None:
        return None
    usable = cluster.usable_fraction * cluster.gpu_memory_gb * GB
    if est.peak > usable:
        return f"does not fit: {est.peak / GB:.1f} GB a GPU > {usable / GB:.1f} GB usable"
    host = cluster.host_memory_gb * GB * cluster.usable_fraction
    per_node = min(cluster.gpus_per_node, layout.gpus)
    if est.cpu * per_node > host:
        return f"offloaded state {est.cpu * per_node / GB:.0f} GB a node > {host / GB:.0f} GB usable host memory"
    if est.build > usable:
        return f"building its fp32 weights takes {est.build / GB:.1f} GB > {usable / GB:.1f} GB usable"
    return None


def search(cfg: Config, gpus: int, cluster: Cluster, batch: int | None = None, flash: bool = True) -> Search:
    """Try every layout of `gpus` GPUs; rank those that fit by tokens/s (then by memory)."""
    batch = batch or cfg.train.batch_size
    if gpus < 1 or batch < 1:
        raise ConfigError(f"a plan needs at least one GPU and one image a step, got {gpus} GPUs and batch {batch}")
    fits, rejected = [], []
    for layout in candidate_layouts(cfg, gpus, batch, flash):
        reason = rejection(cfg, layout, cluster, None)
        est = None
        if reason is None:
            est = estimate(cfg, layout, cluster)
            reason = rejection(cfg, layout, cluster, est)
        if reason is None:
            fits.append(est)
        else:
            rejected.append((layout, reason))
    fits.sort(key=lambda e: (-e.tokens_per_s, e.peak))
    return Search(gpus, batch, fits, rejected)


def format_estimate(est: Estimate, cluster: Cluster) -> str:
    """A per-GPU breakdown of memory and step time, one item a line."""
    lay = est.layout
    lines = [
        f"  layout: {lay.describe()}",
        f"  memory a GPU (worst pipeline stage), GB: bf16 weights {est.params / GB:.2f}, bf16 gradients "
        f"{est.grads / GB:.2f}, fp32 master + Adam {est.optimizer / GB:.2f}, fp32 step gradients "
        f"{est.step_grads / GB:.2f}, DeepSpeed buffers {est.buffers / GB:.2f} (+{est.working / GB:.2f} in forward and "
        f"backward), activations {est.activations / GB:.2f}",
        f"  peak {est.peak / GB:.1f} GB of {cluster.gpu_memory_gb:.0f} GB; building its fp32 weights "
        f"{est.build / GB:.1f} GB" + (f"; host memory {est.cpu / GB:.1f} GB a GPU" if est.cpu else ""),
        "  step " + f"{est.step_s:.3f} s = " + " + ".join(f"{k} {v:.3f}" for k, v in est.times.items() if v),
        f"  {est.tokens_per_s:,.0f} tokens/s ({est.tokens_per_s / lay.gpus:,.0f} a GPU), "
        f"MFU {100 * est.mfu:.1f}% of {cluster.peak_tflops:.0f} TFLOP/s"
        f" (assumed {100 * cluster.mfu:.0f}% in the matmuls)",
    ]
    return "\n".join(lines)


def format_search(result: Search, cluster: Cluster, explain: bool = False, top: int = 8) -> str:
    """The recommended layout for one GPU count; with `explain`, the runners-up and the rejection reasons."""
    head = f"{result.gpus} GPUs, global batch {result.batch}: "
    if result.best is None:
        lines = [head + "no layout fits"]
    else:
        lines = [head + "recommended", format_estimate(result.best, cluster)]
    if explain:
        lines.append(f"  tried {len(result.fits) + len(result.rejected)} layouts, {len(result.fits)} fit; fastest:")
        lines.append(f"    {'tokens/s':>10} {'MFU':>6} {'peak GB':>8}  layout")
        for est in result.fits[:top]:
            lines.append(
                f"    {est.tokens_per_s:>10,.0f} {100 * est.mfu:>5.1f}% {est.peak / GB:>8.1f}  {est.layout.describe()}"
            )
        reasons: dict[str, list[Layout]] = {}
        for layout, reason in result.rejected:
            key = reason.split(":")[0]
            reasons.setdefault(key, []).append(layout)
        lines.append("  rejected:")
        for layouts in sorted(reasons.values(), key=len, reverse=True):
            example = next(r for lay, r in result.rejected if lay == layouts[0])
            lines.append(f"    {len(layouts):>5} x {example}  [e.g. {layouts[0].describe()}]")
    return "\n".join(lines)


def config_layout(cfg: Config, gpus: int, batch: int | None = None, flash: bool = True) -> Layout:
    """The layout cfg itself asks for on `gpus` GPUs: its parallel section, micro-batch and DeepSpeed offload."""

    validate_layout(cfg, gpus)
    data = check_world(cfg.parallel, gpus)
    batch = batch or cfg.train.batch_size
    micro = cfg.train.micro_batch or batch // data
    if micro < 1 or batch % (micro * data):
        raise ConfigError(
            f"a global batch of {batch} does not split into micro-batches of {micro} on {data} data-parallel ranks: "
            "change train.batch_size or train.micro_batch"
        )
    zero = cfg.deepspeed.get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device") in ("cpu", "nvme")

    return Layout(
        tensor=cfg.parallel.tensor,
        pipeline=cfg.parallel.pipeline,
        data=data,
        zero_stage=cfg.parallel.zero_stage,
        offload_optimizer=offloaded("offload_optimizer"),
        offload_params=offloaded("offload_param"),
        checkpointing=cfg.parallel.activation_checkpointing,
        micro_batch=micro,
        grad_accum=batch // (micro * data),
        flash=flash,
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD)),
        reduce_bucket=int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
    )


def plan_report(
    cfg: Config,
    name: str,
    gpu_counts: list[int],
    cluster: Cluster,
    batch: int | None = None,
    explain: bool = False,
    own_layout: bool = False,
    flash: bool = True,
) -> tuple[str, dict]:
    """The planner's text for cfg's model on each GPU count (a search, or cfg's own layout), and its data."""

    total = sum(parameter_counts(cfg).values())
    m = cfg.model
    lines = [
        f"{name}: {total / 1e9:.2f}B parameters, {m.n_layer} x {m.n_embd}, {m.n_head} heads, {m.n_ctx} tokens; "
        f"{cluster.gpus_per_node} x {cluster.gpu_memory_gb:.0f} GB GPUs a node at {cluster.peak_tflops:.0f} TFLOP/s "
        f"peak (bf16 dense), MFU {100 * cluster.mfu:.0f}% assumed; links {cluster.intra_node_gbps:.0f} GB/s in a "
        f"node, {cluster.inter_node_gbps:.0f} GB/s between nodes, {cluster.host_gbps:.0f} GB/s to the host",
    ]
    data: dict = {"model": name, "parameters": total, "cluster": dataclasses.asdict(cluster), "plans": []}
    for gpus in gpu_counts:
        if own_layout:
            layout = config_layout(cfg, gpus, batch, flash)
            est = estimate(cfg, layout, cluster)
            reason = rejection(cfg, layout, cluster, est)
            verdict = "fits" if reason is None else f"rejected: {reason}"
            lines += [f"{gpus} GPUs, the config's layout: {verdict}", format_estimate(est, cluster)]
            data["plans"].append({"gpus": gpus, "estimate": est.to_dict(), "rejected": reason})
            continue
        result = search(cfg, gpus, cluster, batch, flash)
        lines.append(format_search(result, cluster, explain))
        best = result.best.to_dict() if result.best else None
        data["plans"].append({"gpus": gpus, "batch": result.batch, "best": best, "fitting": len(result.fits)})
    return "\n".join(lines), data
