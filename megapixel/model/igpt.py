"""The iGPT network, as openai/image-gpt's src/model.py defines it, readable top to bottom.

Pre-norm GPT-2 blocks with an RMS-style norm (gain, no bias), quick GELU, no biases anywhere,
learned positions, a learned start-of-sequence vector for the autoregressive objective, an
untied zero-initialised output head and an optional classification head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megapixel.config import ModelConfig
from megapixel.model import ops
from megapixel.model.init import initial_value

NORM_EPS = 1e-5


class Norm(nn.Module):
    """iGPT's "layer norm": x * rsqrt(mean(x^2) + eps) * g, with no mean subtraction and no bias."""

    def __init__(self, n_embd: int, kernels: str = "torch") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, NORM_EPS, self.kernels)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The reference's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


@dataclass
class LayerCache:
    """Keys and values of one block for the positions decoded so far."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.n_embd
        # Heads are counted from the projections' width, so a tensor-parallel layout that gives
        # each rank a slice of q/k/v holds a slice of the heads with the code unchanged.
        self.head_dim = cfg.head_dim
        self.causal = cfg.objective == "ar"
        self.kernels = cfg.kernels
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        causal = self.causal
        if cache is not None:
            end = cache.length + t
            cache.k[:, :, cache.length : end] = k
            cache.v[:, :, cache.length : end] = v
            # A single new query attends to every cached position; a prompt written into an empty
            # cache is an ordinary causal pass.
            assert cache.length == 0 or t == 1, "after the prompt, decode one position at a time"
            causal = causal and cache.length == 0
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
            cache.length = end
        y = ops.attention(q, k, v, causal=causal, kernels=self.kernels)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class Block(nn.Module):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = Norm(cfg.n_embd, cfg.kernels)
        self.attn = Attention(cfg)
        self.norm2 = Norm(cfg.n_embd, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


@dataclass
class Output:
    """What a forward pass returns: per-position logits, and class logits when the head exists."""

    logits: torch.Tensor
    clf_logits: torch.Tensor | None = None


class IGPT(nn.Module):
    """Image GPT over palette tokens of shape (batch, n_ctx), raster order."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Drawn first, from torch's global generator on the host, so that a model built on the meta device
        # (megapixel.model.init.materialize gives it values later) starts from the same weights as one built here.
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))
        d = cfg.n_embd
        self.wte = nn.Embedding(cfg.n_vocab, d)
        self.wpe = nn.Embedding(cfg.n_ctx, d)
        self.sos = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = Norm(d, cfg.kernels)
        self.head = nn.Linear(d, cfg.n_vocab, bias=False)
        self.clf = nn.Linear(d, cfg.n_classes, bias=False) if cfg.n_classes else None
        if not self.sos.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference init (megapixel.model.init): q/k/v 1/sqrt(d), attention out 1/sqrt(d*L), MLP and wte
        0.02, wpe 0.01, sos 0.02, output and classification heads zero, norm gains one; each weight drawn
        from its own generator, seeded by init_seed and its name."""
        for name, param in self.named_parameters():
            param.copy_(initial_value(name, tuple(param.shape), self.cfg, self.init_seed, param.device))

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: AR shifts right behind the SOS vector; BERT zeroes masked positions."""
        b, t = tokens.shape
        h = self.wte(tokens)
        if self.cfg.objective == "ar":
            h = torch.cat([self.sos.expand(b, 1, -1).to(h.dtype), h[:, :-1]], dim=1)
        elif mask is not None:
            h = h * (~mask).unsqueeze(-1).to(h.dtype)
        return h + self.wpe.weight[:t]

    def hidden(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, caches: list[LayerCache] | None = None
    ) -> torch.Tensor:
        """The final normed hidden states (batch, seq, width) that the heads read."""
        h = self.embed(tokens, mask)
        for i, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[i])
        return self.ln_f(h)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, caches: list[LayerCache] | None = None
    ) -> Output:
        """Logits for every position (for AR, position i predicts token i from tokens before it)."""
        h = self.hidden(tokens, mask, caches)
        clf_logits = self.clf(h.mean(dim=1)) if self.clf is not None else None
        return Output(self.head(h), clf_logits)

    def token_nll(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each token (batch, seq) under the head, from final states `h`."""
        logits = self.head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none").view_as(
            tokens
        )

    def loss(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        token_nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's generative loss in nats per token (plus the classification loss when labels and a
        head are given); returns (total, parts). `token_nll` replaces the head's cross-entropy (a
        tensor-parallel layout computes it on vocabulary shards)."""
        mask = self.bert_mask(tokens.shape, tokens.device, generator) if self.cfg.objective == "bert" else None
        h = self.hidden(tokens, mask)
        per_token = (token_nll or self.token_nll)(h, tokens)
        gen = per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum().clamp(min=1)
        parts = {"gen": gen}
        total = gen
        if labels is not None and self.clf is not None:
            parts["clf"] = F.cross_entropy(self.clf(h.mean(dim=1)).float(), labels)
            total = total + parts["clf"]
        return total, parts

    def bert_mask(
        self, shape: torch.Size, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Each position masked independently with probability bert_mask_prob."""
        return torch.rand(shape, device=device, generator=generator) < self.cfg.bert_mask_prob

    @torch.no_grad()
    def features(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Linear-probe features: block l's normed attention input, mean-pooled over positions,
        for each l in `layers` (0-based; order kept), concatenated. BERT models see no mask."""
        if not layers:
            raise ValueError("features needs at least one layer")
        for layer in layers:
            if not 0 <= layer < self.cfg.n_layer:
                raise ValueError(f"layer {layer} is out of range: the model has blocks 0..{self.cfg.n_layer - 1}")
        wanted = {layer: None for layer in layers}
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            if i in wanted:
                wanted[i] = block.norm1(h).float().mean(dim=1)
            h = block(h)
        return torch.cat([wanted[layer] for layer in layers], dim=-1)

    def new_caches(self, batch: int, dtype: torch.dtype, device: torch.device) -> list[LayerCache]:
        """Empty key/value caches for incremental decoding of up to n_ctx positions."""
        heads = self.blocks[0].attn.q_proj.weight.shape[0] // self.cfg.head_dim  # this rank's heads
        shape = (batch, heads, self.cfg.n_ctx, self.cfg.head_dim)
        return [
            LayerCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in self.blocks
        ]

    def decode_step(self, prev: torch.Tensor | None, pos: int, caches: list[LayerCache]) -> torch.Tensor:
        """AR logits for position `pos` given the token at pos-1 (None at pos 0: the SOS vector)."""
        assert self.cfg.objective == "ar", "decoding needs an autoregressive model"
        b = caches[0].k.shape[0]
        h = self.sos.expand(b, -1) if prev is None else self.wte(prev)
        h = (h + self.wpe.weight[pos]).unsqueeze(1)
        for block, cache in zip(self.blocks, caches, strict=True):
            h = block(h, cache)
        return self.head(self.ln_f(h))[:, 0]

    def num_parameters(self) -> int:
        """Parameters in the model (each counted once)."""
        return sum(p.numel() for p in self.parameters())
