"""Token samplers. They see logits and token ids only, never text or audio.

Filters and penalties (each a pure function of logits and the token history):

- temperature (0 = greedy), top-k, top-p (nucleus), min-p (keep tokens whose probability is at least min_p times
  the best one's), top-nσ (keep tokens whose logit is within n standard deviations of the logits of the best
  one's: arXiv 2411.07641; the kept set does not change with temperature);
- repetition penalty with decay: a token already generated has its logit divided (if positive) or multiplied
  (if negative) by `penalty ** (decay ** (distance - 1))`, distance 1 being the last token; decay 1 penalizes
  every past occurrence equally, decay < 1 forgets old ones;
- length penalty: the STOP logit is lowered by `length_penalty * log1p(length)` (positive: longer speech;
  negative: shorter);
- DRY ("don't repeat yourself"): a token that would extend a sequence already seen, longer than
  `allowed_length`, loses `multiplier * base ** (match - allowed_length)`;
- dynamic temperature: from `min_temp` (confident, low entropy) to `temp` (uncertain), by normalized entropy;
- mirostat v2: keeps the surprise (-log2 p) of sampled tokens near `tau`, adapting its cut-off `mu` with `eta`;
- repetition-aware sampling (VALL-E 2): sample with the nucleus; if the drawn token already fills more than
  `ras_threshold` of the last `ras_window` tokens, draw again from the whole distribution.
- entropy-adaptive sampling (the original's "entropix", after xjdr's entropix, adapted to speech tokens): the
  entropy H and varentropy V (the variance of -log p) of each step's distribution choose how to draw.
  Confident (low H, low V): the best token. Forked (H not high, V high: likely candidates beside a long
  unlikely tail): a hotter draw (x1.3), to explore. Lost (high H, high V): a cooler draw (x0.7) from the
  nucleus 0.8, to hold on to the likeliest (xjdr's draws hotter there, which for speech means babble). Flat
  (high H, low V): the nucleus 0.9, cutting the long tail. Otherwise the settings as given.
  `entropix_regime` says which.

`TokenSampler` applies them in that order and keeps the per-sequence state (history, mirostat's mu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def filter_logits(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, top_nsigma: float = 0.0
) -> torch.Tensor:
    """(..., V) logits with everything outside top-nσ / top-k / nucleus top-p / min-p set to -inf."""
    out = logits.clone()
    if top_nsigma > 0.0:  # over the logits as they are (finite ones): before any other cut
        finite = torch.isfinite(out)
        vals = torch.where(finite, out, torch.nan)
        mean = vals.nanmean(-1, keepdim=True)
        sigma = ((vals - mean) ** 2).nanmean(-1, keepdim=True).sqrt()
        best = out.max(-1, keepdim=True).values
        out[out < best - top_nsigma * sigma] = float("-inf")
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
    if min_p > 0.0:
        probs = out.softmax(-1)
        out[probs < min_p * probs.max(-1, keepdim=True).values] = float("-inf")
    return out


def pick(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
    top_nsigma: float = 0.0,
) -> torch.Tensor:
    """Sample one token per row of (..., V) logits -> (...) long."""
    if temperature <= 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p, min_p, top_nsigma)
    probs = filtered.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat.cpu(), 1, generator=generator).to(logits.device)
    return drawn.reshape(probs.shape[:-1])


def repetition_penalty(
    logits: torch.Tensor, history: list[int], penalty: float, decay: float = 1.0
) -> torch.Tensor:
    """(V,) logits with past tokens penalized, the most recent occurrence of each counting."""
    if penalty == 1.0 or not history:
        return logits
    out = logits.clone()
    seen: set[int] = set()
    for distance, token in enumerate(reversed(history), start=1):
        if token in seen or token >= out.shape[-1]:
            continue
        seen.add(token)
        p = penalty ** (decay ** (distance - 1))
        out[token] = out[token] / p if out[token] > 0 else out[token] * p
    return out


def length_penalty(logits: torch.Tensor, stop_id: int, length: int, penalty: float) -> torch.Tensor:
    if penalty == 0.0:
        return logits
    out = logits.clone()
    out[stop_id] = out[stop_id] - penalty * math.log1p(length)
    return out


def dry_penalty(
    logits: torch.Tensor, history: list[int], multiplier: float, base: float = 1.75, allowed_length: int = 2
) -> torch.Tensor:
    """Penalize tokens that would continue a repeat of an earlier stretch of `history`."""
    if multiplier <= 0 or len(history) < 2:
        return logits
    out = logits.clone()
    n = len(history)
    best: dict[int, int] = {}
    last = history[-1]
    for i in range(n - 1):  # i: an earlier position holding the last token; history[i + 1] would repeat
        if history[i] != last:
            continue
        match = 1
        while match <= i and history[i - match] == history[n - 1 - match]:
            match += 1
        nxt = history[i + 1]
        best[nxt] = max(best.get(nxt, 0), match)
    for token, match in best.items():
        if match >= allowed_length and token < out.shape[-1]:
            out[token] -= multiplier * base ** (match - allowed_length)
    return out


def dynamic_temperature(logits: torch.Tensor, min_temp: float, max_temp: float) -> float:
    """Temperature between min_temp and max_temp by the normalized entropy of the distribution."""
    probs = logits.float().softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return float(min_temp + (max_temp - min_temp) * entropy / math.log(logits.shape[-1]))


def entropy_varentropy(logits: torch.Tensor) -> tuple[float, float]:
    """(H, V) of the distribution softmax(logits), in nats: H = E[-log p], V = Var[-log p]."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    surprise = torch.where(p > 0, -logp, torch.zeros_like(logp))
    h = (p * surprise).sum()
    v = (p * (surprise - h) ** 2).sum()
    return float(h), float(v)


def entropix_regime(logits: torch.Tensor, s: SamplerSettings) -> tuple[str, float, float]:
    """(regime, temperature, top_p) for one step of entropy-adaptive sampling (see the module's docstring)."""
    h, v = entropy_varentropy(logits)
    low_h, high_h = h < s.entropix_entropy[0], h > s.entropix_entropy[1]
    low_v, high_v = v < s.entropix_varentropy[0], v > s.entropix_varentropy[1]
    if low_h and low_v:
        return "confident", 0.0, s.top_p
    if high_h and high_v:
        return "lost", s.temperature * 0.7, min(s.top_p, 0.8)
    if high_v and not high_h:
        return "forked", s.temperature * 1.3, s.top_p
    if high_h and low_v:
        return "flat", s.temperature, min(s.top_p, 0.9)
    return "plain", s.temperature, s.top_p


@dataclass
class SamplerSettings:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    top_nsigma: float = 0.0  # > 0 turns on top-nσ
    repetition_penalty: float = 1.0
    repetition_penalty_decay: float = 1.0
    length_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    min_temp: float = -1.0  # >= 0 turns on dynamic temperature between min_temp and temperature
    mirostat_tau: float = 0.0  # > 0 turns on mirostat v2
    mirostat_eta: float = 0.1
    ras_window: int = 0  # > 0 turns on repetition-aware sampling
    ras_threshold: float = 0.1
    entropix: bool = False  # entropy-adaptive sampling
    entropix_entropy: tuple[float, float] = (
        0.5,
        3.0,
    )  # H below the first is low, above the second high (nats)
    entropix_varentropy: tuple[float, float] = (1.0, 5.0)  # the same for V (nats squared)


@dataclass
class TokenSampler:
    """Per-sequence sampler: settings plus state (the tokens so far, mirostat's mu)."""

    settings: SamplerSettings
    stop_id: int | None = None
    generator: torch.Generator | None = None
    history: list[int] = field(default_factory=list)
    mu: float | None = None
    regime: str | None = None  # entropix: the last step's regime

    def __call__(self, logits: torch.Tensor) -> int:
        s = self.settings
        x = logits.float()
        x = repetition_penalty(x, self.history, s.repetition_penalty, s.repetition_penalty_decay)
        if self.stop_id is not None:
            x = length_penalty(x, self.stop_id, len(self.history), s.length_penalty)
        x = dry_penalty(x, self.history, s.dry_multiplier, s.dry_base, s.dry_allowed_length)
        top_p = s.top_p
        if s.temperature <= 0:
            token = None
        elif s.entropix:
            self.regime, temp, top_p = entropix_regime(x, s)
            token = None if temp <= 0 else self._draw(x, temp, top_p)
        elif s.mirostat_tau > 0:
            token = self._mirostat(x / s.temperature)
        else:
            temp = dynamic_temperature(x, s.min_temp, s.temperature) if s.min_temp >= 0 else s.temperature
            token = self._draw(x, temp, top_p)
        if token is None:
            token = int(x.argmax())
        self.history.append(token)
        return token

    def _draw(self, x: torch.Tensor, temp: float, top_p: float) -> int:
        s = self.settings
        token = int(pick(x, max(temp, 1e-4), s.top_k, top_p, self.generator, s.min_p, s.top_nsigma))
        if s.ras_window > 0:
            window = self.history[-s.ras_window :]
            if window and window.count(token) / s.ras_window > s.ras_threshold:
                token = int(pick(x, max(temp, 1e-4), 0, 1.0, self.generator))  # the whole distribution
        return token

    def _mirostat(self, logits: torch.Tensor) -> int:
        s = self.settings
        if self.mu is None:
            self.mu = 2 * s.mirostat_tau
        probs = logits.softmax(-1)
        surprise = -probs.clamp_min(1e-12).log2()
        keep = surprise <= self.mu
        keep[probs.argmax()] = True  # never an empty set
        masked = torch.where(keep, logits, torch.full_like(logits, float("-inf")))
        token = int(torch.multinomial(masked.softmax(-1).cpu(), 1, generator=self.generator))
        self.mu -= s.mirostat_eta * (float(surprise[token]) - s.mirostat_tau)
        return token
