"""Token samplers. They see logits and token ids only, never text or audio.

`pick(logits, temperature, top_k, top_p, generator)`: temperature 0 is greedy (argmax); otherwise the
distribution is tempered, cut to the top-k tokens and to the smallest set whose probability reaches top-p,
and sampled with the given generator (so a seed makes output reproducible).
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(..., V) logits with everything outside top-k / nucleus top-p set to -inf."""
    out = logits.clone()
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs >= top_p  # keep the token that crosses top_p
        sorted_logits[remove] = float("-inf")
        out = torch.full_like(out, float("-inf")).scatter(-1, order, sorted_logits)
    return out


def pick(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row of (..., V) logits -> (...) long."""
    if temperature <= 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = filtered.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat.cpu(), 1, generator=generator).to(logits.device)
    return drawn.reshape(probs.shape[:-1])
