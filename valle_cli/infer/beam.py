"""Beam search over AR (level-0) token sequences.

A real beam: `width` hypotheses advance together as the rows of one batched, KV-cached decoder. At each step
every hypothesis is extended by every token; the `2 * width` best extensions by total log-probability are
looked at in order: one ending in STOP becomes a finished hypothesis (scored by its total log-probability
divided by `length ** length_norm`, so longer speech is not punished just for being longer), the others fill
the next beam. The decoder's rows and cache are reordered to follow their parents. Search ends when `width`
hypotheses have finished and the best live one, scored as if it stopped now, would not beat the worst of them
(transformers' default stopping rule), or at `max_steps`.

The repetition and length penalties of the sampler settings apply to each hypothesis's logits; temperature and
the truncation filters do not (beam search does not sample).
"""

from __future__ import annotations

import torch

from valle_cli.infer.sampling import SamplerSettings, length_penalty, repetition_penalty


def beam_search(
    decoder,
    width: int,
    max_steps: int,
    stop_id: int,
    length_norm: float = 1.0,
    settings: SamplerSettings | None = None,
) -> tuple[list[int], bool]:
    """Best token sequence (without STOP) and whether it ended with STOP.

    `decoder` starts with one row and offers `logits() -> (B, V)`, `feed(tokens (B,))` and
    `reorder(index (B',))` (infer.engine.Decoder does).
    """
    s = settings or SamplerSettings()
    norm = lambda seq_len: max(seq_len, 1) ** length_norm  # noqa: E731
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_steps):
        logits = decoder.logits().float().cpu()  # (B, V)
        rows = []
        for i, seq in enumerate(beams):
            x = repetition_penalty(logits[i], seq, s.repetition_penalty, s.repetition_penalty_decay)
            rows.append(length_penalty(x, stop_id, len(seq), s.length_penalty))
        logp = torch.stack(rows).log_softmax(-1)  # (B, V)
        total = (scores[:, None] + logp).flatten()
        v = logp.shape[1]
        best = torch.topk(total, min(2 * width, total.numel()))
        parents, tokens, new_scores = [], [], []
        for score, idx in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            parent, token = divmod(idx, v)
            if token == stop_id:
                finished.append((score / norm(len(beams[parent]) + 1), beams[parent]))
            elif len(parents) < width:
                parents.append(parent)
                tokens.append(token)
                new_scores.append(score)
            if len(parents) == width:
                break
        finished = sorted(finished, key=lambda f: -f[0])[:width]
        if not parents:
            break
        beams = [[*beams[p], t] for p, t in zip(parents, tokens, strict=True)]
        scores = torch.tensor(new_scores)
        if len(finished) >= width and max(new_scores) / norm(len(beams[0]) + 1) <= finished[-1][0]:
            break  # the best live beam, scored at its present length, cannot beat the finished ones
        decoder.reorder(torch.tensor(parents))
        decoder.feed(torch.tensor(tokens))
    if finished:
        return finished[0][1], True
    return beams[int(scores.argmax())], False


def beam_ar(model, request, sc, use_cache: bool = True) -> tuple[list[int], bool]:
    """Beam search for the level-0 tokens of one request."""
    from valle_cli.infer.engine import ar_decoder

    return beam_search(
        ar_decoder(model, [request], use_cache, sc),
        sc.beam_width,
        sc.max_ar_steps,
        model.stop_id,
        sc.beam_length_norm,
        sc.ar,
    )
