"""Generating speech tokens with a trained VALL-E model: a KV-cached AR pass for RVQ level 0, then one
non-causal NAR pass per level 1..Q-1.

AR: the prefix (language, task, level, text, prompt) is run once and its keys/values kept in the backbone's
cache; each step then feeds one token. `use_cache=False` recomputes the whole sequence every step (what the
original does); both give the same tokens (tested), the cached one in a fraction of the time.
NAR: level L reads the sum of the embeddings of levels 0..L-1 of the response so far and predicts level L at
every position at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from valle_cli.backbones.base import attention_mask
from valle_cli.infer.sampling import SamplerSettings, TokenSampler, pick
from valle_cli.model.valle import VALLE, Sample


class SamplingConfig:
    """How to sample: the AR sampler's settings (`SamplerSettings`, named like the original's CLI flags:
    ar_temp, min_ar_temp, top_k, top_p, min_p, repetition_penalty, ..., ras_threshold), the NAR temperature,
    the AR step limit and the seed. The NAR passes reuse top-k/top-p."""

    def __init__(
        self,
        ar_temp: float = 0.95,
        nar_temp: float = 0.0,
        max_ar_steps: int = 1500,
        seed: int | None = None,
        min_ar_temp: float = -1.0,
        **ar_settings,
    ):
        self.ar = SamplerSettings(temperature=ar_temp, min_temp=min_ar_temp, **ar_settings)
        self.nar_temp, self.max_ar_steps, self.seed = nar_temp, max_ar_steps, seed

    def __repr__(self) -> str:
        return f"SamplingConfig(ar={self.ar}, nar_temp={self.nar_temp}, max_ar_steps={self.max_ar_steps}, seed={self.seed})"


@dataclass
class Generated:
    codes: torch.Tensor  # (Q, F) long
    stopped: bool  # the AR emitted STOP (False: it hit max_ar_steps)
    ar_steps: int


@torch.inference_mode()
def generate(
    model: VALLE,
    phonemes: torch.Tensor,
    prompt: torch.Tensor,
    language: int = 0,
    sampling: SamplingConfig | None = None,
    use_cache: bool = True,
) -> Generated:
    """phonemes (Lt,) with BOS/EOS, prompt codes (Q, Fp) -> generated codes (Q, F)."""
    sc = sampling or SamplingConfig()
    gen = torch.Generator().manual_seed(sc.seed) if sc.seed is not None else None
    dev = model.sep.device
    q = model.n_levels
    base = Sample(
        phonemes.to(dev), prompt[:q].to(dev), torch.zeros(q, 0, dtype=torch.long, device=dev), 0, language
    )
    prefix, _, _ = model.prefix(base)  # (P, D)
    start = model.audio_emb[0](torch.tensor([model.start_id], device=dev))
    tokens: list[int] = []
    sampler = TokenSampler(sc.ar, stop_id=model.stop_id, generator=gen)
    stopped = False
    cache = None
    x = torch.cat([prefix, start])[None]  # (1, P+1, D)
    past = 0
    for _ in range(sc.max_ar_steps):
        if use_cache:
            t = x.shape[1]
            mask = attention_mask(torch.tensor([t], device=dev), True, t, past=past, dtype=x.dtype)
            pos = torch.arange(past, past + t, device=dev)[None]
            out = model.backbone(x, mask, pos, cache=cache, use_cache=True)
            cache, past = out.cache, past + t
        else:
            full = torch.cat(
                [prefix, start, model.audio_emb[0](torch.tensor(tokens, device=dev, dtype=torch.long))]
            )
            t = full.shape[0]
            mask = attention_mask(torch.tensor([t], device=dev), True, t, dtype=full.dtype)
            out = model.backbone(full[None], mask, torch.arange(t, device=dev)[None])
        logits = model.heads[0](out.hidden[0, -1])  # (K+1,)
        token = sampler(logits)
        if token == model.stop_id:
            stopped = True
            break
        tokens.append(token)
        x = model.audio_emb[0](torch.tensor([[token]], device=dev))  # (1, 1, D)
    codes = torch.zeros(q, len(tokens), dtype=torch.long, device=dev)
    if not tokens:
        return Generated(codes.cpu(), stopped, 0)
    codes[0] = torch.tensor(tokens, device=dev)
    for level in range(1, q):
        s = Sample(base.phonemes, base.prompt, codes, level, language)
        batch = model.assemble([s])
        t = batch.inputs_embeds.shape[1]
        mask = attention_mask(batch.lengths, False, t, dtype=batch.inputs_embeds.dtype)
        hidden = model.backbone(batch.inputs_embeds, mask, batch.position_ids).hidden[0]
        n = codes.shape[1]
        logits = model.heads[level](hidden[t - n :])  # (F, K)
        codes[level] = pick(logits, sc.nar_temp, sc.ar.top_k, sc.ar.top_p, gen)
    return Generated(codes.cpu(), stopped, len(tokens))
