"""What a config describes: the architecture, its parameter count and its cost per token."""

from __future__ import annotations

from megapixel.config import Config


def parameter_counts(cfg: Config) -> dict[str, int]:
    """Parameters by part, computed from the config alone (no model is built)."""
    m = cfg.model
    d = m.n_embd
    per_block = 4 * d * d + 8 * d * d + 2 * d  # q, k, v, out; MLP in and out; two norm gains
    counts = {
        "embeddings (wte, wpe, sos)": m.n_vocab * d + m.n_ctx * d + d,
        f"blocks ({m.n_layer} x {per_block:,})": m.n_layer * per_block,
        "final norm": d,
        "output head": d * m.n_vocab,
    }
    if m.n_classes:
        counts["classification head"] = d * m.n_classes
    return counts


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 L d T for attention scores."""
    m = cfg.model
    n = sum(parameter_counts(cfg).values()) - m.n_ctx * m.n_embd  # position lookups cost no matmul
    return 6 * n + 12 * m.n_layer * m.n_embd * m.n_ctx


def describe(cfg: Config, name: str) -> str:
    """A human-readable summary of the model a config builds."""
    m = cfg.model
    counts = parameter_counts(cfg)
    total = sum(counts.values())
    lines = [
        f"{name}: iGPT, {m.objective.upper()} objective",
        f"  layers {m.n_layer}, width {m.n_embd}, heads {m.n_head} (head dim {m.head_dim}), MLP {4 * m.n_embd}",
        f"  image {m.n_px}x{m.n_px} -> sequence {m.n_ctx}, palette {m.n_vocab} colours",
        f"  parameters {total:,} ({total / 1e6:.1f}M)",
    ]
    lines += [f"    {part:<32} {count:>15,}" for part, count in counts.items()]
    lines += [
        f"  training cost {flops_per_token(cfg) / 1e9:.2f} GFLOP per token,"
        f" {flops_per_token(cfg) * m.n_ctx / 1e12:.3f} TFLOP per image",
        f"  weights {total * 2 / 2**30:.2f} GiB in bf16; fp32 Adam training state {total * 16 / 2**30:.2f} GiB",
    ]
    return "\n".join(lines)
