"""Generating speech tokens with a trained VALL-E model: a KV-cached AR pass for RVQ level 0, then one
non-causal NAR pass per level 1..Q-1, for one request or a batch of them.

- `Decoder` runs any causal pass of the model one token at a time (the AR here, `stt` in infer/stt.py): the
  prefix of every row is run once and its keys/values kept in the backbone's cache; each step feeds one token
  per row. Rows are padded on the **left** so every row's next token lands in the same column; a (B, S)
  `valid` mask says which keys are real and `position_ids` count real tokens only, so a row decodes exactly as
  it would alone. `use_cache=False` recomputes the whole sequence every step (what the original does); both
  give the same tokens (tested), the cached one in a fraction of the time.
- `ar_tokens` samples level 0 for a batch, each row with its own `TokenSampler` and its own generator seeded
  with the same seed, so a line's output does not depend on what else is in its batch.
- `nar_fill` fills levels 1..Q-1 for a batch (right-padded, no causal mask): level L reads the sum of the
  embeddings of levels 0..L-1. Frames before `fixed` keep the codes they have (a continuation prefix, or frames
  already streamed), so the same function serves plain, continued and streamed generation.
- A `Request` may carry `prefix` codes that open the response (VALL-E's continuation: the prompt's own codes,
  or the previous sentence with rolling context); they are conditioned on and not returned.
- `beam_width > 1` uses beam search (infer/beam.py) on the AR instead of sampling.
- Pointer models (`model.alignment: pointer`): each AR step also samples whether the next frame moves on to
  the next text symbol (greedy when ar_temp is 0); the symbol under the pointer is added to the next
  input, speech ends when the pointer moves past EOS (no STOP class), and a symbol held for
  `MAX_SYMBOL_FRAMES` frames is left by force. The NAR passes get the same frame-to-symbol map.
- `model.level0: nar` models make level 0 without an AR (`nar_level0`): one pass over the prefix (text and
  prompt, which never see the response) gives every symbol's duration; the frames laid out by them start all
  masked, and `level0_steps` non-causal passes unmask them, the most confident first (MaskGIT's cosine
  schedule: after pass i of n, cos(pi/2 i/n) of the frames are still masked). Tokens are drawn with the AR's
  temperature/top-k/top-p; with temperature 0 they are argmaxes; `level0_noise` > 0 adds Gumbel noise, annealed
  to 0, to the confidences that order the frames (MaskGIT's choice temperature). Then the usual NAR passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from valle_cli.backbones.base import Layout, attention_mask, layout, padded_mask
from valle_cli.errors import ValleError
from valle_cli.infer.sampling import SamplerSettings, TokenSampler, pick
from valle_cli.model.valle import MAX_HELD, VALLE, Sample, frame_symbols, stretch_durations

StepProgress = Callable[
    [str, int, int | None], None
]  # (phase, done, total or None if unknown): "level 0", "levels"


def _check_samplers(s: SamplerSettings, beam_width: int) -> None:
    """Refuse sampler flags that would silently do nothing together."""
    if s.entropix and (s.mirostat_tau > 0 or s.min_temp >= 0):
        raise ValleError(
            "--entropix chooses each step's temperature itself",
            "drop --mirostat-tau and --min-ar-temp, or --entropix",
        )
    if s.entropix and s.temperature <= 0:
        raise ValleError("--entropix needs a temperature to adapt", "give --ar-temp above 0 (0.95 is usual)")
    if s.top_nsigma > 0 and s.mirostat_tau > 0:
        raise ValleError("mirostat chooses its own cut-off", "drop --top-nsigma or --mirostat-tau")
    if beam_width > 1 and (s.entropix or s.top_nsigma > 0 or s.mirostat_tau > 0 or s.min_temp >= 0):
        raise ValleError(
            "beam search keeps the likeliest sequences and draws nothing",
            "drop --entropix, --top-nsigma, --mirostat-tau and --min-ar-temp, or --beam-width",
        )


class SamplingConfig:
    """How to sample: the AR sampler's settings (`SamplerSettings`, named like the original's CLI flags:
    ar_temp, min_ar_temp, top_k, top_p, min_p, top_nsigma, repetition_penalty, ..., ras_threshold, entropix),
    the NAR temperature, the AR step limit, the seed, and beam search (`beam_width` > 1; scores are summed
    log-probabilities divided by length ** `beam_length_norm`). The NAR passes reuse top-k/top-p."""

    def __init__(
        self,
        ar_temp: float = 0.95,
        nar_temp: float = 0.0,
        max_ar_steps: int = 1500,
        seed: int | None = None,
        min_ar_temp: float = -1.0,
        beam_width: int = 1,
        beam_length_norm: float = 1.0,
        level0_steps: int = 8,
        level0_noise: float = 0.0,
        layer_skip: bool = False,
        layer_skip_exit_layer: int = 0,
        layer_skip_min_layer: int = 1,
        layer_skip_entropy: float = 0.1,
        layer_skip_varentropy: float = 0.1,
        **ar_settings,
    ):
        if level0_steps < 1:
            raise ValleError(f"level0_steps must be at least 1, got {level0_steps}")
        tuned = (layer_skip_exit_layer, layer_skip_min_layer, layer_skip_entropy, layer_skip_varentropy) != (
            0,
            1,
            0.1,
            0.1,
        )
        if tuned and not layer_skip:
            raise ValleError("the --layer-skip-* settings tune layer skip, which is off", "add --layer-skip")
        if layer_skip_exit_layer < 0 or layer_skip_entropy < 0 or layer_skip_varentropy < 0:
            raise ValleError(
                "--layer-skip-exit-layer, --layer-skip-entropy and --layer-skip-varentropy cannot be negative"
            )
        self.ar = SamplerSettings(temperature=ar_temp, min_temp=min_ar_temp, **ar_settings)
        _check_samplers(self.ar, beam_width)
        self.nar_temp, self.max_ar_steps, self.seed = nar_temp, max_ar_steps, seed
        self.level0_steps = level0_steps  # level0 nar models: masked passes for level 0
        self.level0_noise = level0_noise  # ... and the Gumbel noise on which frames each pass keeps
        self.beam_width, self.beam_length_norm = beam_width, beam_length_norm
        # layer skip (AR steps): exit after the first layer (up to the exit layer; 0 = the last but one) whose
        # level-0 distribution has entropy and varentropy below these
        self.layer_skip, self.layer_skip_exit_layer = layer_skip, layer_skip_exit_layer
        self.layer_skip_min_layer = layer_skip_min_layer  # the first layer checked
        self.layer_skip_entropy, self.layer_skip_varentropy = layer_skip_entropy, layer_skip_varentropy

    def generator(self) -> torch.Generator | None:
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def __repr__(self) -> str:
        return (
            f"SamplingConfig(ar={self.ar}, nar_temp={self.nar_temp}, max_ar_steps={self.max_ar_steps}, "
            f"seed={self.seed}, beam_width={self.beam_width})"
        )


@dataclass
class Request:
    """What to say and in which voice."""

    phonemes: torch.Tensor  # (Lt,) ids with BOS/EOS
    prompt: torch.Tensor  # (Q, Fp) codes of the reference voice; Fp = 0: no reference (a random voice)
    language: int = 0
    prefix: torch.Tensor | None = None  # (Q, Fc) codes the response continues from; not returned
    # pointer models: frames to hold each symbol (one per phoneme id, BOS/EOS included), in place of the move
    # head's decisions; None = the model decides. Speed control, and the oracle-duration diagnostic.
    durations: torch.Tensor | None = None

    @property
    def prefix_frames(self) -> int:
        return 0 if self.prefix is None else int(self.prefix.shape[1])


@dataclass
class Generated:
    codes: torch.Tensor  # (Q, F) long, without the request's prefix
    stopped: bool  # the AR emitted STOP (False: it hit max_ar_steps)
    ar_steps: int
    frame_symbols: torch.Tensor | None = None  # (F,) the text symbol of each frame (pointer models)


MAX_SYMBOL_FRAMES = 100  # a pointer model leaves a symbol after this many frames even if it would stay


@dataclass
class EarlyExit:
    """Layer skip for a decoder: a step stops after the first layer (from `min_layer` to `max_layer`) where every row's
    level-0 distribution is confident (entropy and varentropy, in nats, below the thresholds); `layers`
    records how many layers each step ran."""

    head: Callable[[torch.Tensor], torch.Tensor]
    min_layer: int
    max_layer: int
    entropy: float
    varentropy: float
    layers: list[int] = field(default_factory=list)

    def confident(self, hidden: torch.Tensor) -> bool:
        """Whether every row's level-0 distribution read from `hidden` (B, T, D) is confident enough to exit
        (`sampling.entropy_varentropy`, for all rows at once: one check, one sync)."""
        logp = self.head(hidden[:, -1]).float().log_softmax(-1)
        p = logp.exp()
        surprise = torch.where(p > 0, -logp, torch.zeros_like(logp))
        h = (p * surprise).sum(-1)
        v = (p * (surprise - h[:, None]) ** 2).sum(-1)
        return bool(((h < self.entropy) & (v < self.varentropy)).all())


def early_exit_for(model: VALLE, sc: SamplingConfig | None) -> EarlyExit | None:
    """The `EarlyExit` a sampling config asks for, or None; refuses models that cannot exit early."""
    if sc is None or not sc.layer_skip:
        return None
    backbone = model.backbone
    if not getattr(backbone, "supports_early_exit", False):
        raise ValleError(
            f"--layer-skip needs a backbone that can stop early; this model's is {type(backbone).name}",
            "use a model with the transformer or bitnet backbone (trained with train.layer_skip), or drop --layer-skip",
        )
    if model.pointer or model.nar0:
        raise ValleError(
            "--layer-skip is for classic autoregressive models (model.alignment: none, model.level0: ar)",
            "drop --layer-skip",
        )
    layers = len(backbone.layers)
    top = sc.layer_skip_exit_layer or layers - 1
    if not 1 <= top < layers:
        raise ValleError(
            f"--layer-skip-exit-layer {sc.layer_skip_exit_layer}: this model has {layers} layers",
            f"give 1..{layers - 1} (0 = {layers - 1})",
        )
    if not 1 <= sc.layer_skip_min_layer <= top:
        raise ValleError(
            f"--layer-skip-min-layer {sc.layer_skip_min_layer} must lie in 1..{top} (the exit layer)",
            "lower it, or raise --layer-skip-exit-layer",
        )
    return EarlyExit(
        model.heads[0], sc.layer_skip_min_layer, top, sc.layer_skip_entropy, sc.layer_skip_varentropy
    )


def left_padded(
    rows: list[torch.Tensor], before: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of several rows (L_b, D), padded on the left to a common length: (x (B, L, D), which
    positions are real (B, L), positions (B, L) counting each row's real ones from `before[b]` (default 0))."""
    first = rows[0]
    b, n = len(rows), max(len(r) for r in rows)
    x = first.new_zeros(b, n, first.shape[-1])
    valid = torch.zeros(b, n, dtype=torch.bool, device=first.device)
    positions = torch.zeros(b, n, dtype=torch.long, device=first.device)
    for row, r in enumerate(rows):
        x[row, n - len(r) :] = r
        valid[row, n - len(r) :] = True
        positions[row, n - len(r) :] = torch.arange(len(r), device=first.device) + (
            before[row] if before else 0
        )
    return x, valid, positions


@dataclass
class Decoder:
    """Token-by-token causal decoding of a batch of rows over the backbone, with or without a KV cache.

    `prefixes` are each row's input embeddings (L_b, D) up to and including the input of the first step;
    `embed` maps tokens (B,) to inputs (B, D) and `head` hidden states (B, D) to logits.
    """

    backbone: torch.nn.Module
    prefixes: list[torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    use_cache: bool = True
    early_exit: EarlyExit | None = None  # layer skip (cached steps after the prefill only)
    # shared-prefix models: text and prompt already run (`SharedPrefix`); `prefixes` are what follows them
    past: SharedPrefix | None = None
    cache: object = None
    x: torch.Tensor = field(init=False)  # (B, L, D): inputs the backbone has not seen (with a cache), or all
    valid: torch.Tensor = field(init=False)  # (B, S) bool: real keys
    positions: torch.Tensor = field(init=False)  # (B, S) long
    past_rows: torch.Tensor | None = field(
        init=False, default=None
    )  # row i continues past's row past_rows[i]

    def __post_init__(self) -> None:
        before = None if self.past is None else self.past.lengths
        self.x, self.valid, self.positions = left_padded(self.prefixes, before)
        b = len(self.prefixes)
        if self.past is not None:
            self.valid = torch.cat([self.past.valid, self.valid], 1)
            self.positions = torch.cat([self.past.positions, self.positions], 1)
            self.past_rows = torch.arange(b, device=self.x.device)
            if self.use_cache:
                self.cache = self.past.fork(self.backbone)

    def logits(self) -> torch.Tensor:
        """Next-token logits (B, V) after everything fed so far."""
        if not self.use_cache and self.past is not None:  # everything after the shared prefix, again
            t = self.x.shape[1]
            mask = padded_mask(self.valid, t, dtype=self.x.dtype)
            cache = self.past.fork(self.backbone, self.past_rows)
            out = self.backbone(self.x, mask, self.positions[:, -t:], cache=cache, use_cache=True)
            return self.head(out.hidden[:, -1])
        if self.use_cache:
            t = self.x.shape[1]
            mask = padded_mask(self.valid, t, dtype=self.x.dtype)
            if self.early_exit is not None and self.cache is not None and t == 1:
                ex = self.early_exit
                out, ran = self.backbone.forward_exit(
                    self.x, mask, self.positions[:, -t:], self.cache, ex.confident, ex.min_layer, ex.max_layer
                )
                ex.layers.append(ran)
            else:
                out = self.backbone(
                    self.x,
                    mask,
                    self.positions[:, -t:],
                    cache=self.cache,
                    use_cache=True,
                    layout=self._layout(t),
                )
            self.cache = out.cache
            self.x = self.x[:, :0]  # the cache holds them now
        else:
            t = self.x.shape[1]
            mask = padded_mask(self.valid, t, dtype=self.x.dtype)
            out = self.backbone(self.x, mask, self.positions, layout=self._layout(t))
        return self.head(out.hidden[:, -1])

    def _layout(self, t: int) -> Layout | None:
        """The last `t` positions, every row causal: for recurrent backbones only (None for the others, so the
        per-step path of attention backbones builds nothing it would drop)."""
        if not getattr(self.backbone, "needs_layout", False):
            return None
        return Layout(self.valid[:, -t:], torch.ones(len(self.valid), dtype=torch.bool, device=self.x.device))

    def feed(self, tokens: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """Append one token (B,) per row; `extra` (B, D) is added to their embeddings."""
        emb = self.embed(tokens.to(self.x.device))[:, None]  # (B, 1, D)
        if extra is not None:
            emb = emb + extra[:, None]
        self.x = torch.cat([self.x, emb], 1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(len(tokens), 1)], 1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], 1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate rows (beam search): row i becomes old row index[i]."""
        index = index.to(self.x.device)
        self.x, self.valid, self.positions = self.x[index], self.valid[index], self.positions[index]
        if self.past_rows is not None:
            self.past_rows = self.past_rows[index]
        if self.cache is not None:
            self.cache.reorder_cache(index)


def refuse_continuation(requests: list[Request], what: str = "pointer models") -> None:
    """Pointer models (AR or level0 nar) and NAR-len models cannot continue audio yet: say so for any request
    with a prefix."""
    if any(r.prefix_frames for r in requests):
        raise ValleError(
            "continuing audio (--prompt-text, --input-prompt-prefix, rolling context) is not available "
            f"for {what} yet",
            "leave those options out: the reference clip still sets the voice",
        )


def request_prefix(model: VALLE, req: Request) -> tuple[torch.Tensor, int]:
    """(the prefix's input embeddings (L, D): header, text, prompt, separators; where its text starts)."""
    dev = model.sep.device
    q = model.n_levels
    empty = torch.zeros(q, 0, dtype=torch.long, device=dev)
    pre, text_start, _ = model.prefix(
        Sample(req.phonemes.to(dev), req.prompt[:q].to(dev), empty, 0, req.language)
    )
    return pre, text_start


@dataclass
class SharedPrefix:
    """Shared-prefix models (`model.prefix: shared`): every request's prefix run once, left-padded to a
    common length P and attending only to itself, as in training. The AR and every NAR pass fork its cache and
    run only their own positions after it."""

    cache: object  # the backbone's cache of the P prefix positions (never grown: passes fork it)
    valid: torch.Tensor  # (B, P) bool: real positions (padding on the left)
    positions: torch.Tensor  # (B, P) long: each row counts its real positions from 0
    hidden: torch.Tensor  # (B, P, D): the prefix's output (durations, lengths of level0-nar models)
    lengths: list[int]  # real prefix length per row
    text_starts: list[int]  # where each row's text starts within its own prefix

    def fork(self, backbone, rows: torch.Tensor | list[int] | None = None):
        """A cache of the prefix for a pass over `rows` of it (all, in order, when None)."""
        cache = backbone.fork_cache(self.cache)
        if rows is not None and [int(r) for r in rows] != list(range(len(self.lengths))):
            cache.reorder_cache(torch.as_tensor(rows, dtype=torch.long, device=self.valid.device))
        return cache

    def hidden_at(self, row: int, start: int, n: int) -> torch.Tensor:
        """(n, D): the prefix outputs of row's own positions start .. start + n - 1."""
        pad = self.valid.shape[1] - self.lengths[row]
        return self.hidden[row, pad + start : pad + start + n]


def shared_prefix(model: VALLE, requests: list[Request]) -> SharedPrefix:
    """Run every request's prefix once (see `SharedPrefix`)."""
    pres = [request_prefix(model, r) for r in requests]
    x, valid, positions = left_padded([p for p, _ in pres])
    mask = padded_mask(valid, x.shape[1], causal=False, dtype=x.dtype)
    out = model.backbone(x, mask, positions, use_cache=True)
    return SharedPrefix(
        out.cache, valid, positions, out.hidden, [len(p) for p, _ in pres], [t for _, t in pres]
    )


def ar_opening(model: VALLE, req: Request) -> torch.Tensor:
    """Input embeddings (L, D) of the AR pass after the prefix up to the first step: (the level marker of
    shared-prefix models,) START, the continuation's codes."""
    dev = model.sep.device
    g = model.group_size
    start = model.level0_embed(torch.full((1, g), model.start_id, device=dev))
    if model.pointer:
        refuse_continuation([req])
        start = start + model.frame_text_emb(req.phonemes[:1].to(dev)) + model.held_emb.weight[:1]
    parts = [model.marker(0), start] if model.shared else [start]
    if (
        req.prefix_frames
    ):  # whole groups, ending where the response begins (a partial first group is left out)
        p0 = req.prefix[0].to(dev)
        parts.append(model.level0_embed(p0[len(p0) % g :].view(-1, g)))
    return torch.cat(parts)


def ar_prefix(model: VALLE, req: Request) -> torch.Tensor:
    """Input embeddings (L, D) of the whole AR pass up to the first step: the prefix, then `ar_opening`."""
    return torch.cat([request_prefix(model, req)[0], ar_opening(model, req)])


def ar_decoder(
    model: VALLE,
    requests: list[Request],
    use_cache: bool = True,
    sc: SamplingConfig | None = None,
    past: SharedPrefix | None = None,
) -> Decoder:
    """The level-0 decoder of a batch. Classic models: `logits()` is (B, G, K + 1) for the G = group_size
    codes of the next step, `feed` takes (B, G) tokens (or (B,) when G is 1); pointer models: `logits()` is
    the hidden state (their two heads are applied by `_pointer_tokens`), `feed` takes (B,). Shared-prefix
    models continue from `past` (run here when not given)."""
    use_cache = use_cache and model.backbone.supports_cache  # a plugin without a cache recomputes
    if model.pointer:
        head, embed = (lambda h: h), model.audio_emb[0]
    else:
        head = model.level0_logits
        embed = lambda t: model.level0_embed(t if t.dim() == 2 else t[:, None])  # noqa: E731
    early = early_exit_for(model, sc)
    if early is not None and not use_cache:
        raise ValleError("--layer-skip skips layers of cached steps", "leave the cache on (no --no-cache)")
    if model.shared:
        past = past if past is not None else shared_prefix(model, requests)
        openings = [ar_opening(model, r) for r in requests]
        return Decoder(model.backbone, openings, embed, head, use_cache, early, past)
    return Decoder(model.backbone, [ar_prefix(model, r) for r in requests], embed, head, use_cache, early)


def ar_tokens(
    model: VALLE,
    requests: list[Request],
    sc: SamplingConfig,
    use_cache: bool = True,
    symbols: list[list[int]] | None = None,
    ends: list[bool] | None = None,
    past: SharedPrefix | None = None,
) -> Iterator[list[int | None]]:
    """Sample level 0 for a batch, one frame at a time: yields each row's new token, None once it stopped (a
    grouped model's decoder step gives G frames, yielded one by one; `max_ar_steps` counts frames).
    For pointer models, `symbols` (one list per row) receives the text symbol of every frame, and `ends`
    (one bool per row) whether the row ended by its own move past EOS (not forced, not at the step limit).
    `past`: shared-prefix models' prefix, when the caller ran it (for the NAR passes too)."""
    if model.pointer:
        yield from _pointer_tokens(model, requests, sc, use_cache, symbols, ends, past)
        return
    dec = ar_decoder(model, requests, use_cache, sc, past)
    samplers = [TokenSampler(sc.ar, model.stop_id, sc.generator()) for _ in requests]
    done = [False] * len(requests)
    g = model.group_size
    frames = 0
    while frames < sc.max_ar_steps:
        logits = dec.logits()  # (B, G, K+1): the next step's G codes (model.group_size)
        fed = [[model.start_id] * g for _ in requests]  # finished rows (and slots after STOP) feed START
        for slot in range(g):  # one yield per frame, so callers never see groups
            step: list[int | None] = []
            for row, sampler in enumerate(samplers):
                token = None if done[row] else sampler(logits[row, slot])
                if token == model.stop_id:
                    done[row], token = True, None
                if token is not None:
                    fed[row][slot] = token
                step.append(token)
            if all(done):
                return
            yield step
            frames += 1
            if frames >= sc.max_ar_steps:
                return
        dec.feed(torch.tensor(fed))


def _pointer_tokens(model, requests, sc, use_cache, symbols, ends, past) -> Iterator[list[int | None]]:
    dec = ar_decoder(model, requests, use_cache, past=past)
    samplers = [TokenSampler(sc.ar, model.stop_id, sc.generator()) for _ in requests]
    gens = [sc.generator() for _ in requests]
    phonemes = [r.phonemes.to(model.sep.device) for r in requests]
    symbols = symbols if symbols is not None else [[] for _ in requests]
    pos = [0] * len(requests)  # the symbol the next frame speaks
    held = [0] * len(requests)  # frames spent on it so far
    expected = [0.0] * len(requests)  # greedy: the expected number of moves since the symbol began
    done = [False] * len(requests)
    ends = ends if ends is not None else [False] * len(requests)
    for _ in range(sc.max_ar_steps):
        hidden = dec.logits()  # (B, D)
        logits = model.heads[0](hidden)
        logits[:, model.stop_id] = float("-inf")  # the end is the pointer's to say
        move = torch.softmax(model.pointer_head(hidden).float(), -1)[:, 1]
        step: list[int | None] = []
        for row, sampler in enumerate(samplers):
            if done[row]:
                step.append(None)
                continue
            step.append(sampler(logits[row]))
            symbols[row].append(pos[row])
            held[row] += 1
            forced = requests[row].durations
            if forced is not None:
                moves = held[row] >= int(forced[pos[row]])
            elif sc.ar.temperature > 0:
                moves = bool(torch.rand((), generator=gens[row]) < move[row])
            else:
                # the move head gives a per-frame hazard (about 1 in 6 frames moves), so "move > 0.5" almost
                # never holds; greedy moves once the expected number of moves since the symbol began reaches
                # one (for a constant hazard p: after 1/p frames, the mean duration)
                expected[row] += float(move[row])
                moves = expected[row] >= 1.0 - 1e-6
            if moves or held[row] >= MAX_SYMBOL_FRAMES:
                pos[row], held[row], expected[row] = pos[row] + 1, 0, 0.0
                done[row] = pos[row] >= len(phonemes[row])
                ends[row] = done[row] and moves
        yield step
        if all(done):
            return
        nxt = torch.stack([phonemes[row][min(pos[row], len(phonemes[row]) - 1)] for row in range(len(pos))])
        counts = torch.tensor([min(h, MAX_HELD - 1) for h in held], device=nxt.device)
        along = model.frame_text_emb(nxt) + model.held_emb(counts)
        dec.feed(torch.tensor([model.start_id if t is None else t for t in step]), along)


def _prefix_pass(model: VALLE, requests: list[Request]) -> tuple[torch.Tensor, list[int], list[int]]:
    """One batched non-causal pass over each request's prefix (header, text, prompt, the last separator):
    (hidden (B, T, D), where each text starts, each prefix's length). What a level0-nar model's text
    positions and last separator see while training, too (the prefix does not see the response)."""
    dev = model.sep.device
    pres, starts = zip(*(request_prefix(model, r) for r in requests), strict=True)
    lengths = torch.tensor([len(p) for p in pres], device=dev)
    x = pres[0].new_zeros(len(pres), int(lengths.max()), pres[0].shape[-1])
    for b, p in enumerate(pres):
        x[b, : len(p)] = p
    pos = torch.arange(x.shape[1], device=dev)[None].expand(len(pres), -1)
    mask = attention_mask(lengths, False, x.shape[1], dtype=x.dtype)
    hidden = model.backbone(x, mask, pos, layout=layout(lengths, False, x.shape[1])).hidden
    return hidden, list(starts), [len(p) for p in pres]


def _prefix_outputs(model: VALLE, requests: list[Request], past: SharedPrefix | None):
    """(row, start, n) -> the prefix outputs (n, D) of a row's own positions: from `past` when the model
    shares its prefix, else from one pass over the prefixes; and each row's text start and prefix length."""
    if past is not None:
        return past.hidden_at, past.text_starts, past.lengths
    hidden, starts, ends = _prefix_pass(model, requests)
    return (lambda row, start, n: hidden[row, start : start + n]), starts, ends


def predict_durations(
    model: VALLE, requests: list[Request], past: SharedPrefix | None = None
) -> list[torch.Tensor]:
    """Level0-nar pointer models: frames per text symbol (Lt,) long, at least 1, for every request."""
    at, starts, _ = _prefix_outputs(model, requests, past)
    out = []
    for b, r in enumerate(requests):
        frames = model.durations(at(b, starts[b], len(r.phonemes)))
        out.append(frames.round().long().clamp(1, MAX_SYMBOL_FRAMES).cpu())
    return out


def predict_lengths(model: VALLE, requests: list[Request], past: SharedPrefix | None = None) -> list[int]:
    """NAR-len models (level0 nar without the pointer): the response's frame count for every request, at
    least one frame per text symbol, read at the separator before the response."""
    at, _, ends = _prefix_outputs(model, requests, past)
    frames = model.length(torch.cat([at(b, n - 1, 1) for b, n in enumerate(ends)]))
    return [max(round(float(f)), len(r.phonemes)) for f, r in zip(frames, requests, strict=True)]


def _laid_out(
    model: VALLE, requests: list[Request], sc: SamplingConfig, past: SharedPrefix | None = None
) -> tuple[list, list[bool]]:
    """Pointer level0-nar models: each request's frame-to-symbol map (its forced durations or predicted
    ones) and whether it fit in `max_ar_steps` frames (else it is squeezed, every symbol keeping a frame)."""
    dev = model.sep.device
    forced = [r.durations for r in requests]
    need = [i for i, d in enumerate(forced) if d is None]
    if past is not None:  # the durations of every row come with the shared prefix: read those needed
        every = predict_durations(model, requests, past)
        predicted = {i: every[i] for i in need}
    else:
        predicted = dict(
            zip(need, predict_durations(model, [requests[i] for i in need]) if need else [], strict=True)
        )
    fs, complete = [], []
    for i in range(len(requests)):
        d = torch.as_tensor(forced[i] if forced[i] is not None else predicted[i], dtype=torch.long).cpu()
        ok = int(d.sum()) <= sc.max_ar_steps
        if not ok:
            d = stretch_durations(d, max(sc.max_ar_steps, len(d)))
        fs.append(frame_symbols(d).to(dev))
        complete.append(ok)
    return fs, complete


def _nar_pass(
    model: VALLE, samples: list[Sample], past: SharedPrefix | None = None, rows: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """One batched non-causal pass (a NAR level, or a masked level-0 pass): (hidden (B, T, D), where each
    row's targets start). Shared-prefix models run only the responses, after rows `rows` of `past`."""
    if past is None:
        batch = model.assemble(samples)
        hidden = model.backbone(
            batch.inputs_embeds, model.attention_mask(batch), batch.position_ids, layout=model.layout(batch)
        ).hidden
        return hidden, [start for _, start, _, _, part in batch.targets if part == "response"]
    rows = list(range(len(samples))) if rows is None else rows
    parts = [model.response_part(s) for s in samples]
    dev = model.sep.device
    n = max(len(p[0]) for p in parts)
    x = parts[0][0].new_zeros(len(parts), n, parts[0][0].shape[-1])
    own = torch.zeros(len(parts), n, dtype=torch.bool, device=dev)
    for i, p in enumerate(parts):
        x[i, : len(p[0])] = p[0]
        own[i, : len(p[0])] = True
    index = torch.tensor(rows, dtype=torch.long, device=dev)
    valid = torch.cat([past.valid[index], own], 1)
    before = torch.tensor([past.lengths[r] for r in rows], device=dev)
    positions = before[:, None] + torch.arange(n, device=dev)[None]
    mask = padded_mask(valid, n, causal=False, dtype=x.dtype)
    out = model.backbone(x, mask, positions, cache=past.fork(model.backbone, rows), use_cache=True)
    return out.hidden, [p[3] for p in parts]


def nar_level0(
    model: VALLE,
    requests: list[Request],
    sc: SamplingConfig,
    progress: StepProgress | None = None,
    past: SharedPrefix | None = None,
) -> list[tuple[list[int], bool, torch.Tensor]]:
    """Level 0 of level0-nar models: (tokens, complete, frame symbols or None) per request. Pointer models lay
    frames out by durations (the request's own or predicted), NAR-len ones by a predicted length; `complete`
    is False when the frames had to be cut to `max_ar_steps`."""
    dev = model.sep.device
    k = model.codebook_size
    if model.shared and past is None:
        past = shared_prefix(model, requests)
    if model.pointer:
        fs, complete = _laid_out(model, requests, sc, past)
        sizes = [len(f) for f in fs]
    else:  # NAR-len: only a length, cut to the step limit
        sizes = predict_lengths(model, requests, past)
        complete = [n <= sc.max_ar_steps for n in sizes]
        sizes = [min(n, sc.max_ar_steps) for n in sizes]
        fs = [None] * len(requests)
    codes = [torch.zeros(model.n_levels, n, dtype=torch.long, device=dev) for n in sizes]
    masked = [torch.ones(n, dtype=torch.bool, device=dev) for n in sizes]
    gens = [sc.generator() for _ in requests]
    n = sc.level0_steps
    for step in range(n):
        samples = [
            Sample(r.phonemes, r.prompt, c, 0, r.language, frame_symbols=f, masked=m)
            for r, c, f, m in zip(requests, codes, fs, masked, strict=True)
        ]
        hidden, starts = _nar_pass(model, samples, past)
        for b in range(len(requests)):
            m = masked[b]
            if not bool(m.any()):
                continue
            f = sizes[b]
            logits = model.heads[0](hidden[b, starts[b] : starts[b] + f])[:, :k].float()
            drawn = pick(
                logits, sc.ar.temperature, sc.ar.top_k, sc.ar.top_p, gens[b], sc.ar.min_p, sc.ar.top_nsigma
            )
            conf = torch.log_softmax(logits, -1).gather(-1, drawn[:, None]).squeeze(-1)
            if sc.level0_noise > 0:  # MaskGIT's choice temperature: Gumbel noise on the order, annealed to 0
                u = torch.rand(f, generator=gens[b]).clamp(1e-9, 1 - 1e-9).to(conf.device)
                conf = conf + sc.level0_noise * (1 - (step + 1) / n) * -torch.log(-torch.log(u))
            conf = conf.masked_fill(~m, float("inf"))  # frames already set stay set
            keep_masked = int(f * math.cos(math.pi / 2 * (step + 1) / n)) if step + 1 < n else 0
            keep_masked = min(keep_masked, int(m.sum()) - 1)  # every pass sets at least one frame
            order = torch.argsort(conf, descending=True)  # set frames first, then the most confident
            now = torch.ones_like(m)
            now[order[: f - keep_masked]] = False  # unmasked after this pass
            newly = m & ~now
            codes[b][0, newly] = drawn[newly]
            masked[b] = now
        if progress:
            progress("level 0", step + 1, n)
    return [
        (c[0].tolist(), ok, None if f is None else f.cpu())
        for c, ok, f in zip(codes, complete, fs, strict=True)
    ]


@dataclass
class NarItem:
    """One row of a NAR pass: the request, its response codes (Q, F) with level 0 set, and how many leading
    frames already hold all their levels (kept as they are)."""

    request: Request
    codes: torch.Tensor
    fixed: int = 0
    frame_symbols: torch.Tensor | None = None  # (F,) pointer models: the text symbol of every frame
    frame_held: torch.Tensor | None = (
        None  # (F,) and how many frames of it came before (None: from the above)
    )


def nar_fill(
    model: VALLE,
    items: list[NarItem],
    sc: SamplingConfig,
    generators: list | None = None,
    progress: StepProgress | None = None,
    past: SharedPrefix | None = None,
) -> list[torch.Tensor]:
    """Fill levels 1..Q-1 of every item's frames from `fixed` on; one batched non-causal pass per level.
    Shared-prefix models run each pass over the responses only, after `past` (one row per item; run here
    when not given)."""
    live = [i for i, it in enumerate(items) if it.codes.shape[1] > it.fixed]
    out = [it.codes.clone() for it in items]
    gens = generators or [sc.generator() for _ in items]
    if model.shared and past is None and live:
        past = shared_prefix(model, [it.request for it in items])
    for level in range(1, model.n_levels):
        if not live:
            break
        samples = [
            Sample(
                items[i].request.phonemes,
                items[i].request.prompt,
                out[i],
                level,
                items[i].request.language,
                frame_symbols=items[i].frame_symbols,
                frame_held=items[i].frame_held,
            )
            for i in live
        ]
        hidden, starts = _nar_pass(model, samples, past, live)  # (B, T, D)
        for b, i in enumerate(live):
            fixed, n = items[i].fixed, out[i].shape[1]
            logits = model.heads[level](hidden[b, starts[b] + fixed : starts[b] + n])  # (n - fixed, K)
            out[i][level, fixed:] = pick(logits, sc.nar_temp, sc.ar.top_k, sc.ar.top_p, gens[i]).to(out[i])
        if progress:
            progress("levels", level, model.n_levels - 1)
    return out


def response_codes(model: VALLE, req: Request, level0: list[int]) -> torch.Tensor:
    """Response codes (Q, Fc + F): the request's prefix (all levels) then the new level-0 tokens."""
    dev = model.sep.device
    fc = req.prefix_frames
    codes = torch.zeros(model.n_levels, fc + len(level0), dtype=torch.long, device=dev)
    if fc:
        codes[:, :fc] = req.prefix[: model.n_levels].to(dev)
    if level0:
        codes[0, fc:] = torch.tensor(level0, device=dev)
    return codes


@torch.inference_mode()
def generate_batch(
    model: VALLE,
    requests: list[Request],
    sampling: SamplingConfig | None = None,
    use_cache: bool = True,
    progress: StepProgress | None = None,
) -> list[Generated]:
    """Codes for every request: AR (sampled, or beam search) for level 0, then the NAR levels, all batched.
    `progress(phase, done, total)` hears every step: "level 0" (the symbols a pointer AR has read, the frames
    of a classic AR with total None, or the parallel passes), then "levels" (one NAR pass per level)."""
    sc = sampling or SamplingConfig()
    say = progress or (lambda phase, done, total: None)
    if not requests:
        return []
    for r in requests:
        if r.durations is not None:
            if not model.pointer:
                raise ValleError(
                    "phoneme durations can only be forced on pointer models (model.alignment: pointer)"
                )
            if r.durations.shape != r.phonemes.shape or int(r.durations.min()) < 1:
                raise ValleError(
                    f"durations must give at least 1 frame for each of the {len(r.phonemes)} symbols "
                    f"(BOS and EOS included); got {tuple(r.durations.shape)} values, the least {int(r.durations.min())}"
                )
    if model.nar0:
        a = sc.ar
        ar_only = {"--entropix": a.entropix, "--mirostat-tau": a.mirostat_tau > 0, "--min-ar-temp": a.min_temp >= 0,
                   "--repetition-penalty": a.repetition_penalty != 1.0, "--length-penalty": a.length_penalty != 0.0,
                   "--dry-multiplier": a.dry_multiplier > 0, "--ras-window": a.ras_window > 0}  # fmt: skip
        if any(ar_only.values()):
            raise ValleError(
                f"{', '.join(k for k, on in ar_only.items() if on)}: these samplers act on an autoregressive level 0; "
                "this model makes it in parallel (level0: nar), where they would do nothing",
                "drop them; --ar-temp, --top-k, --top-p, --min-p, --top-nsigma and --level0-steps apply",
            )
        if sc.beam_width > 1:
            raise ValleError(
                "beam search needs an autoregressive level 0; this model makes it in parallel (level0: nar)",
                "leave --beam-width out",
            )
        refuse_continuation(requests, "pointer models" if model.pointer else "models with a parallel level 0")
        past = shared_prefix(model, requests) if model.shared else None
        made = nar_level0(model, requests, sc, say, past)
        items = [
            NarItem(r, response_codes(model, r, toks), 0, f)
            for r, (toks, _, f) in zip(requests, made, strict=True)
        ]
        filled = nar_fill(model, items, sc, progress=say, past=past)
        return [
            Generated(codes.cpu(), ok, sc.level0_steps, f)
            for codes, (_, ok, f) in zip(filled, made, strict=True)
        ]
    symbols: list[list[int]] = [[] for _ in requests]
    ends = [False] * len(requests)
    past = None
    if sc.beam_width > 1:
        if model.pointer:
            raise ValleError(
                "beam search is not available for pointer models yet", "sample instead (--beam-width 1)"
            )
        from valle_cli.infer.beam import beam_ar

        level0 = [beam_ar(model, r, sc, use_cache) for r in requests]
    else:
        level0 = [([], False) for _ in requests]
        texts = sum(len(r.phonemes) for r in requests)
        past = shared_prefix(model, requests) if model.shared else None  # for the AR and the NAR passes
        for n, step in enumerate(ar_tokens(model, requests, sc, use_cache, symbols, ends, past), 1):
            for row, token in enumerate(step):
                if token is not None:
                    level0[row][0].append(token)
            if model.pointer:  # how far the pointers are through the texts: a total known in advance
                say("level 0", sum(len(r.phonemes) if e else (s[-1] if s else 0) for r, s, e in zip(requests, symbols, ends, strict=True)), texts)  # fmt: skip
            else:  # frames so far: when a classic AR stops is not known in advance
                say("level 0", n, None)
        if model.pointer:  # stopped: the pointer moved past EOS by itself (not forced, not at the limit)
            level0 = [(toks, end) for (toks, _), end in zip(level0, ends, strict=True)]
        else:
            # a row that never yielded None before the loop ended either stopped (fewer tokens) or hit the
            # limit
            level0 = [(toks, len(toks) < sc.max_ar_steps) for toks, _ in level0]
    fs = [torch.tensor(sym, dtype=torch.long) if model.pointer else None for sym in symbols]
    items = [
        NarItem(r, response_codes(model, r, toks), r.prefix_frames, f)
        for r, (toks, _), f in zip(requests, level0, fs, strict=True)
    ]
    filled = nar_fill(model, items, sc, progress=say, past=past)
    return [
        Generated(codes[:, r.prefix_frames :].cpu(), stopped, len(toks), f)
        for r, codes, (toks, stopped), f in zip(requests, filled, level0, fs, strict=True)
    ]


def generate(
    model: VALLE,
    phonemes: torch.Tensor,
    prompt: torch.Tensor,
    language: int = 0,
    sampling: SamplingConfig | None = None,
    use_cache: bool = True,
    prefix: torch.Tensor | None = None,
) -> Generated:
    """phonemes (Lt,) with BOS/EOS, prompt codes (Q, Fp) -> generated codes (Q, F)."""
    return generate_batch(model, [Request(phonemes, prompt, language, prefix)], sampling, use_cache)[0]
