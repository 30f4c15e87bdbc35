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

Grouped models (VALL-E 2, `model.group_size` G) make G codes per decoder step, each from its own head over the
same hidden state, so a step's log-probability is the sum of its slots'. A hypothesis is extended slot by
slot, keeping its `2 * width` best partial groups after each slot (exact for a sum of independent terms); a
STOP in slot s ends it after s codes. With G = 1 this is the search described above.
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

    `decoder` starts with one row and offers `logits() -> (B, G, V)` (G codes per step), `feed(tokens (B, G))`
    and `reorder(index (B',))` (`infer.engine.ar_decoder` makes one). `max_steps` counts codes.
    """
    s = settings or SamplerSettings()
    norm = lambda seq_len: max(seq_len, 1) ** length_norm  # noqa: E731
    keep = 2 * width
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1)
    finished: list[tuple[float, list[int]]] = []
    while len(beams[0]) < max_steps:
        logits = decoder.logits().float().cpu()  # (B, G, V)
        # candidates: (total log-probability, parent, the step's codes, whether it ends in STOP)
        candidates: list[tuple[float, int, list[int], bool]] = []
        for i, seq in enumerate(beams):
            partial = [(float(scores[i]), [])]
            for slot in range(logits.shape[1]):
                grown = []
                for score, codes in partial:
                    history = seq + codes
                    x = repetition_penalty(
                        logits[i, slot], history, s.repetition_penalty, s.repetition_penalty_decay
                    )
                    logp = length_penalty(x, stop_id, len(history), s.length_penalty).log_softmax(-1)
                    top = torch.topk(logp, min(keep, logp.numel()))
                    for lp, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                        if token == stop_id:
                            candidates.append((score + lp, i, codes, True))
                        else:
                            grown.append((score + lp, [*codes, token]))
                partial = sorted(grown, key=lambda c: -c[0])[:keep]
                if len(seq) + slot + 1 >= max_steps:  # the step limit falls inside this group
                    break
            candidates += [(score, i, codes, False) for score, codes in partial]
        parents, steps, new_scores = [], [], []
        for score, parent, codes, stops in sorted(candidates, key=lambda c: -c[0])[:keep]:
            if stops:
                finished.append((score / norm(len(beams[parent]) + len(codes) + 1), beams[parent] + codes))
            elif len(parents) < width:
                parents.append(parent)
                steps.append(codes)
                new_scores.append(score)
            if len(parents) == width:
                break
        finished = sorted(finished, key=lambda f: -f[0])[:width]
        if not parents:
            break
        beams = [beams[p] + codes for p, codes in zip(parents, steps, strict=True)]
        scores = torch.tensor(new_scores)
        if len(finished) >= width and max(new_scores) / norm(len(beams[0]) + 1) <= finished[-1][0]:
            break  # the best live beam, scored at its present length, cannot beat the finished ones
        if len(beams[0]) >= max_steps or len(steps[0]) < logits.shape[1]:
            break
        decoder.reorder(torch.tensor(parents))
        decoder.feed(torch.tensor(steps))
    if finished:
        return finished[0][1], True
    return beams[int(scores.argmax())][:max_steps], False


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
