"""Autoregressive sampling with the model's key/value cache, completions of held-out images, PNG grids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from megapixel.data.images import HIDDEN_GREY, grid, save_png, scale_for, with_caption
from megapixel.data.palette import decode_tokens
from megapixel.errors import ConfigError, DataError
from megapixel.model.igpt import IGPT

# Logits (b, vocab) -> one drawn token per row (b,).
_Draw = Callable[[torch.Tensor], torch.Tensor]


# Fills columns P.. of a (b, n_ctx) token buffer whose first P columns hold the prompt.
_Fill = Callable[[IGPT, torch.Tensor, int, _Draw], None]


def sample(
    model: IGPT,
    n: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    prompt: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """`n` images as (n, n_ctx) tokens, drawn with the KV cache; a (n, P) or (P,) prompt is kept and completed."""
    return _sample(model, n, _fill_cached, temperature, top_k, prompt, seed, batch_size)


def sample_naive(
    model: IGPT,
    n: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    prompt: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """The same draws as `sample`, recomputing the whole prefix at every position (the cache's reference)."""
    return _sample(model, n, _fill_naive, temperature, top_k, prompt, seed, batch_size)


def _sample(
    model: IGPT,
    n: int,
    fill: _Fill,
    temperature: float,
    top_k: int | None,
    prompt: torch.Tensor | None,
    seed: int,
    batch_size: int,
) -> torch.Tensor:
    cfg = model.cfg
    if cfg.objective != "ar":
        raise ConfigError("sampling needs an autoregressive model: this one was trained with the BERT objective")
    if n < 1:
        raise ConfigError(f"the number of samples must be at least 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"the sampling batch size must be at least 1, got {batch_size}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature} (use top_k=1 for greedy decoding)")
    if top_k is not None and not 1 <= top_k <= cfg.n_vocab:
        raise ConfigError(f"top_k must be between 1 and the palette size {cfg.n_vocab}, got {top_k}")
    device = next(model.parameters()).device
    prompt = _check_prompt(prompt, n, cfg.n_ctx, cfg.n_vocab)
    n_prompt = 0 if prompt is None else prompt.shape[1]
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        # Filtering and softmax in fp32 so a bf16 model samples from the distribution it means.
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    was_training = model.training
    model.eval()
    try:
        out = torch.zeros(n, cfg.n_ctx, dtype=torch.long, device=device)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                tokens = out[start : start + batch_size]
                if prompt is not None:
                    tokens[:, :n_prompt] = prompt[start : start + batch_size].to(device)
                fill(model, tokens, n_prompt, draw)
    finally:
        model.train(was_training)
    return out


def _check_prompt(prompt: torch.Tensor | None, n: int, n_ctx: int, n_vocab: int) -> torch.Tensor | None:
    """The prompt as (n, P) long tokens, or None when there is nothing to keep."""
    if prompt is None:
        return None
    prompt = torch.as_tensor(prompt)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0).expand(n, -1)
    if prompt.dim() != 2 or prompt.shape[0] != n:
        raise ConfigError(f"a prompt must be (P,) or ({n}, P) tokens for {n} samples, got shape {tuple(prompt.shape)}")
    if prompt.shape[1] > n_ctx:
        raise ConfigError(f"the prompt has {prompt.shape[1]} tokens but the model's images have only {n_ctx}")
    if prompt.is_floating_point() or prompt.is_complex():
        raise ConfigError(f"a prompt must hold integer palette tokens, got {prompt.dtype}")
    if prompt.numel() and not 0 <= int(prompt.min()) <= int(prompt.max()) < n_vocab:
        raise ConfigError(f"prompt tokens must be palette indices in 0..{n_vocab - 1}")
    return prompt.long() if prompt.shape[1] else None


def _fill_cached(model: IGPT, tokens: torch.Tensor, n_prompt: int, draw: _Draw) -> None:
    """Fill positions n_prompt.. one at a time, each step running only the newest position through the cache."""
    b, n_ctx = tokens.shape
    if n_prompt == n_ctx:
        return
    param = next(model.parameters())
    caches = model.new_caches(b, param.dtype, param.device)
    if n_prompt:
        # The prompt's positions go through in one causal pass; their logits are not needed.
        model(tokens[:, :n_prompt], caches=caches)
    prev = tokens[:, n_prompt - 1] if n_prompt else None
    for pos in range(n_prompt, n_ctx):
        prev = draw(model.decode_step(prev, pos, caches))
        tokens[:, pos] = prev


def _fill_naive(model: IGPT, tokens: torch.Tensor, n_prompt: int, draw: _Draw) -> None:
    """Fill positions n_prompt.. one at a time, each step running the whole prefix through the model."""
    for pos in range(n_prompt, tokens.shape[1]):
        # Position pos's logits see only tokens before it (the input is shifted behind SOS), so the
        # not-yet-drawn token at pos is a placeholder that does not matter.
        tokens[:, pos] = draw(model(tokens[:, : pos + 1]).logits[:, pos])


def write_sample_grid(
    model: IGPT,
    palette: np.ndarray,
    out_png: str | Path,
    *,
    n_uncond: int = 16,
    completions_from: torch.Tensor | None = None,
    per_image: int = 4,
    n_px: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> Path:
    """A PNG of `n_uncond` unconditional samples, then one row per held-out image in `completions_from`:
    the original, its top half (bottom grey), and `per_image` completions of that top half; captioned."""
    n_px = n_px or model.cfg.n_px
    if n_px * n_px != model.cfg.n_ctx:
        raise ConfigError(f"n_px {n_px} does not fit the model's {model.cfg.n_ctx}-token images: use {model.cfg.n_px}")
    if len(palette) < model.cfg.n_vocab:
        raise DataError(f"the palette has {len(palette)} colours but the model draws {model.cfg.n_vocab}: use its own")
    held_out = None if completions_from is None or len(completions_from) == 0 else torch.as_tensor(completions_from)
    if n_uncond < 0:
        raise ConfigError(f"the number of unconditional samples must be >= 0, got {n_uncond}")
    if n_uncond == 0 and held_out is None:
        raise ConfigError("nothing to draw: ask for unconditional samples or give held-out images to complete")
    if held_out is not None and (held_out.dim() != 2 or held_out.shape[1] != model.cfg.n_ctx):
        raise DataError(f"held-out images must be (N, {model.cfg.n_ctx}) tokens, got shape {tuple(held_out.shape)}")
    if held_out is not None and per_image < 1:
        raise ConfigError(f"completions per held-out image must be at least 1, got {per_image}")

    def picture(tokens: torch.Tensor) -> np.ndarray:
        return decode_tokens(tokens.cpu().numpy().reshape(n_px, n_px), palette)

    n_cols = 2 + per_image if held_out is not None else min(n_uncond, 8)
    rows: list[list[np.ndarray]] = []
    if n_uncond >= 1:
        drawn = [picture(t) for t in sample(model, n_uncond, temperature=temperature, top_k=top_k, seed=seed)]
        rows += [drawn[i : i + n_cols] for i in range(0, n_uncond, n_cols)]
    if held_out is not None:
        # The top half of the image rows is given; the completions draw the bottom half.
        n_given = (n_px // 2) * n_px
        prompts = held_out[:, :n_given].repeat_interleave(per_image, dim=0)
        completed = sample(model, len(prompts), temperature=temperature, top_k=top_k, prompt=prompts, seed=seed + 1)
        for i, image in enumerate(held_out):
            half = picture(image)
            half[n_px // 2 :] = HIDDEN_GREY
            rows.append([picture(image), half] + [picture(t) for t in completed[i * per_image : (i + 1) * per_image]])
    caption = f"T={temperature:g} top_k={top_k} seed={seed}"
    if held_out is not None:
        caption += f"; rows: original | top half | {per_image} completions"
    return save_png(with_caption(grid(rows, scale=scale_for(n_px)), caption), out_png)
