"""Sampling codes from a ``CodeTransformer``: autoregressive (temperature, top-k, top-p, seeded,
batched, with or without the KV cache) and MaskGIT's iterative parallel decoding (with
classifier-free guidance).

Every random draw comes from the caller's ``torch.Generator`` (CPU), in a fixed order: one
``torch.multinomial`` per generated position for the autoregressive sampler, so the cached and
the uncached paths draw identically and return the same codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lgvq.downstream.transformer import CodeTransformer, KVCache, cosine_mask_ratio


@dataclass
class SamplingOptions:
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax, no draw)
    top_k: int = 0  # keep the k most likely codes (0 = all)
    top_p: float = 1.0  # keep the smallest set of codes with this much probability (1 = all)

    def check(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits [..., K]`` with the codes outside top-k / the top-p nucleus set to -inf (the most
    likely code is always kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # mass before this code already enough
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(logits: torch.Tensor, options: SamplingOptions,
         generator: torch.Generator | None) -> torch.Tensor:
    """One code per row of ``logits [B, K]`` (int64 ``[B]``)."""
    if options.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / options.temperature, options.top_k, options.top_p)
    probabilities = logits.softmax(-1).cpu()
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def sample_autoregressive(model: CodeTransformer, prefix: torch.Tensor,
                          given: torch.Tensor | None = None, *,
                          options: SamplingOptions | None = None,
                          generator: torch.Generator | None = None, use_cache: bool = True,
                          context=None, context_mask=None) -> torch.Tensor:
    """Complete code sequences: int64 ``[B, L]``.

    Args:
        prefix: int64 ``[B, P]`` condition tokens (at least a start token).
        given: int64 ``[B, G]`` the first codes, kept (completion); None = unconditional.
        use_cache: reuse the keys/values of processed positions (one position per step), or
            run the whole sequence again for every code (the reference the cache must equal).
    """
    options = options or SamplingOptions()
    options.check()
    if not model.shape.causal:
        raise ValueError("sample_autoregressive needs a causal model (causal=True)")
    was_training = model.training
    model.eval()
    codes = prefix.new_zeros(prefix.shape[0], 0) if given is None else given
    model.check_inputs(prefix, codes)
    cache = KVCache() if use_cache else None
    pending = model.embed(prefix, codes)  # everything not yet in the cache
    while codes.shape[1] < model.shape.length:
        if cache is None:
            logits = model.run(model.embed(prefix, codes), context, context_mask)
        else:
            logits = model.run(pending, context, context_mask, cache)
        nxt = draw(logits[:, -1], options, generator)
        codes = torch.cat([codes, nxt[:, None]], dim=1)
        if cache is not None:
            pending = model.embed(None, nxt[:, None], start=cache.length)
    model.train(was_training)
    return codes


@torch.no_grad()
def sample_maskgit(model: CodeTransformer, batch: int, *, steps: int = 8,
                   prefix: torch.Tensor | None = None, context=None, context_mask=None,
                   guidance_scale: float = 0.0, options: SamplingOptions | None = None,
                   choice_temperature: float = 4.5,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """MaskGIT decoding: start all-[MASK]; at each of ``steps`` steps draw every masked code,
    keep the most confident ones and re-mask the rest, as many as the cosine schedule says.

    guidance_scale: classifier-free guidance ``logits = uncond + (1 + s) (cond - uncond)``
        (0 = the conditional logits only); needs a model with cross-attention.
    choice_temperature: Gumbel noise on the confidences, annealed linearly to 0 (MaskGIT's
        randomised re-masking; 0 = plain confidence order).
    """
    options = options or SamplingOptions()
    options.check()
    if model.shape.causal:
        raise ValueError("sample_maskgit needs a bidirectional model (causal=False)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if guidance_scale and context is None:
        raise ValueError("guidance_scale needs a text context (cross-attention)")
    was_training = model.training
    model.eval()
    device = model.positions.device
    length = model.shape.length
    codes = torch.full((batch, length), model.mask_id, dtype=torch.long, device=device)
    if guidance_scale:
        null, null_mask = model.null_context_like(context, context_mask)
    for step in range(steps):
        unknown = codes == model.mask_id
        logits = model(prefix, codes, context, context_mask)
        if guidance_scale:
            uncond = model(prefix, codes, null, null_mask)
            logits = uncond + (1.0 + guidance_scale) * (logits - uncond)
        flat = logits.reshape(batch * length, -1)
        drawn = draw(flat, options, generator).reshape(batch, length)
        chosen = flat.float().log_softmax(-1).gather(1, drawn.reshape(-1, 1)).reshape(batch,
                                                                                      length)
        drawn = torch.where(unknown, drawn, codes)
        remaining = math.floor(length * cosine_mask_ratio((step + 1) / steps))
        if remaining == 0:
            codes = drawn
            break
        annealed = choice_temperature * (1.0 - (step + 1) / steps)
        if annealed > 0:
            uniform = torch.rand(batch, length, generator=generator).to(device)
            gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
            chosen = chosen + annealed * gumbel
        confidence = torch.where(unknown, chosen, torch.full_like(chosen, float("inf")))
        # never re-mask more than are still unknown minus one (each step fixes at least one)
        remaining = min(remaining, int(unknown.sum(1).min()) - 1)
        lowest = confidence.topk(max(remaining, 0), dim=1, largest=False).indices
        codes = drawn.scatter(1, lowest, model.mask_id)
    model.train(was_training)
    return codes


__all__ = ["SamplingOptions", "draw", "filter_logits", "sample_autoregressive", "sample_maskgit"]
