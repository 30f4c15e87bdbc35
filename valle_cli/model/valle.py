"""The VALL-E model: one transformer for the AR job (RVQ level 0, causal) and the NAR jobs (levels 1..Q-1,
non-causal), plus speech-to-text (audio -> phonemes, causal) on the same weights.

Sequence layout of one sample (every segment is a run of D-dim embeddings, summed where several RVQ levels
meet at one frame):

    [language] [task] [level] <sep0> text... <sep1> prompt... <sep2> response...      (tts)
    [language] [task] [level] <sep0> audio...  <sep1> text-in...                      (stt)

- text: phoneme ids with BOS/EOS; prompt: all Q levels of the prompt codes, embeddings summed per frame.
- AR (level 0): response-in = START, r0[0..F-1]; targets r0[0..F-1], STOP. Causal mask.
- NAR level L >= 1: response-in = sum of the embeddings of levels 0..L-1 (all of them: the original drops
  level L-1); targets rL. No causal mask: every position sees the whole sequence (the original masks it).
- stt: text-in = BOS, p[0..]; targets p[0..], EOS, through the text head. Causal.

With `model.alignment: pointer` (VALL-E R, arXiv 2406.07855) every response frame also knows which text
symbol it speaks: the embedding of that symbol (`frame_text_emb`, indexed by the sample's `frame_symbols`,
from the dataset's phoneme durations) and of how many frames of it came before (`held_emb`) are added to the
frame's input, in the AR and in every NAR pass, and a pointer head predicts at each AR position whether the
next frame moves on to the next symbol. Level 0 then has F inputs (START, r0[0..F-2]) for F targets: the end
of speech is the pointer moving past EOS, not a STOP class. The text segment of the prefix stays.
`alignment: none` is classic VALL-E, unchanged.

With `model.level0: nar` (pointer models only) level 0 is not autoregressive either: it is a masked,
non-causal pass (MaskGIT, arXiv 2202.04200; SoundStorm, arXiv 2305.09636 does the same for all levels).
Level-0 inputs are the frame's symbol embeddings plus, for the frames not masked, their true code (a masked
frame gets the MASK embedding, the START row of the level-0 table); a training sample masks a share
cos(pi/2 u), u ~ U(0, 1), of its frames and is scored on those only; in eval mode every frame is masked. A
duration head on the text positions predicts each symbol's frame count (log(1 + frames), squared error);
those rows use a mask in which the text and prompt do not see the response, so at inference one pass over the
prefix gives the durations (infer/engine.py). No previous frame is ever an input: a model that cannot lean on
it has to read its text, and there is no exposure bias to drift with.

`model.level0: nar` without the pointer (`alignment: none`) is the original's NAR-len: level-0 frames get no
symbol embedding (only MASK or their code, and their position), and instead of per-symbol durations a
length head at the last prefix position (the separator before the response, which sees text and prompt
only) predicts the response's frame count, log(1 + frames), squared error ("len": within 10%).

With `model.group_size: G > 1` (VALL-E 2's grouped code modeling, arXiv 2406.05370; classic layouts only)
one AR position reads and predicts G level-0 codes: its input is the sum of G slot embeddings (slot 0 is the
level-0 table, slots 1..G-1 have their own, `group_emb`: the sum of per-slot tables is a linear map of the
concatenated one-hot codes, as in the paper's concatenation) and G heads (slot 0: `heads[0]`, then
`group_heads`) predict the next group. F frames take F // G + 1 positions: inputs START (every slot) and
the full groups before the last; targets the frames, then STOP in the slot after the last frame, then
ignored slots. `level0_embed` and `level0_logits` are the one place that knows the group size; the AR
decoder, samplers and beam search go through them (infer/engine.py, infer/beam.py).

With `model.prefix: shared` the level marker moves from the header to the start of the response, and the
prefix (header, text, prompt, the separators) attends only to itself, both ways, in every row:

    [language] [task] <sep0> text... <sep1> prompt... <sep2> | [level] response...

The response rows are causal (AR) or not (NAR) as before and see the whole prefix. The prefix is then the
same in the AR and in every NAR pass, so inference computes its keys and values once per request and each
pass runs only the response (infer/engine.py: `SharedPrefix`). `classic` is the original's layout above.

Training options for autoregressive layouts: `input_dropout` (level-0 inputs zeroed at random) and `guided`
(the guided-attention loss, `GuidedAttention`).

Per-level classifier heads (level 0 has one extra class, STOP), a text head. The loss is cross-entropy on the
response (weight `response`) plus, for causal passes, next-token prediction inside the text and prompt
segments (weights `text`, `prompt`; 0 by default), plus the backbone's auxiliary loss (MoE routing).
Accuracy is reported per level. Padding (right side) is masked everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from valle_cli.backbones.base import Layout, attention_mask, build_backbone, layout
from valle_cli.config import ModelConfig

TASKS = {"tts": 0, "stt": 1}
IGNORE = -100  # a target that is not scored (level0 nar: frames given, not masked)
MAX_HELD = 64  # pointer models: frames-on-this-symbol counts embedded (longer holds share the last one)
N_LANGUAGES = 32  # language-token table size; ids index the dataset's language list


@dataclass
class Sample:
    """One training example. Codes are (Q, F) long; phonemes include BOS and EOS."""

    phonemes: torch.Tensor  # (Lt,)
    prompt: torch.Tensor  # (Q, Fp)
    response: torch.Tensor  # (Q, Fr)
    level: int = 0  # RVQ level this sample trains (0 = AR)
    language: int = 0
    task: str = "tts"
    frame_symbols: torch.Tensor | None = None  # (Fr,) index into phonemes of each response frame (pointer)
    frame_held: torch.Tensor | None = (
        None  # (Fr,) frames of its symbol before each frame; None: from the above
    )
    # level 0: the tokens fed as "the previous frame" in place of the response's own (scheduled sampling);
    # the targets stay the response's
    ar_inputs: torch.Tensor | None = None  # (Fr,)
    # level0 "nar" models: which level-0 frames are masked (True) and predicted; None = drawn while training,
    # all frames in eval mode
    masked: torch.Tensor | None = None  # (Fr,) bool


@dataclass
class Batch:
    inputs_embeds: torch.Tensor  # (B, T, D)
    lengths: torch.Tensor  # (B,)
    causal: torch.Tensor  # (B,) bool
    position_ids: torch.Tensor  # (B, T)
    # (batch row, start position, targets (n,), head) for each part with a loss: head is a level or "text"
    targets: list[tuple[int, int, torch.Tensor, int | str, str]] = field(default_factory=list)
    # (B,) rows whose first n positions (the prefix) must not see the rest (level0 "nar" rows); 0 = no limit
    prefix_only: torch.Tensor | None = None


@dataclass
class ModelOutput:
    loss: torch.Tensor
    losses: dict[str, float]  # detached parts: "response", "text", "prompt", "aux"
    accuracy: dict[str, float]  # "l0" ... "l7", "stt"
    counts: dict[str, int]  # tokens scored per accuracy key
    level_loss: dict[str, float]  # mean response cross-entropy per accuracy key
    hidden: torch.Tensor | None = None  # (B, T, D), when asked for


class VALLE(nn.Module):
    def __init__(
        self, cfg: ModelConfig, n_symbols: int, codebook_size: int = 1024, loss_weights: dict | None = None
    ):
        super().__init__()
        self.loss_weights = {"text": 0.0, "prompt": 0.0, "response": 1.0, **(loss_weights or {})}
        d, q, k = cfg.d_model, cfg.n_levels, codebook_size
        self.cfg, self.n_levels, self.codebook_size = cfg, q, k
        self.start_id = k  # level-0 input token before the first response frame
        self.stop_id = k  # level-0 class meaning "end of speech"
        self.text_emb = nn.Embedding(n_symbols, d)
        self.lang_emb = nn.Embedding(N_LANGUAGES, d)
        self.task_emb = nn.Embedding(len(TASKS), d)
        self.level_emb = nn.Embedding(q, d)
        self.sep = nn.Parameter(torch.randn(3, d) * 0.02)
        self.audio_emb = nn.ModuleList([nn.Embedding(k + 1, d)] + [nn.Embedding(k, d) for _ in range(q - 1)])
        self.backbone = build_backbone(cfg)
        self.heads = nn.ModuleList([nn.Linear(d, k + 1)] + [nn.Linear(d, k) for _ in range(q - 1)])
        self.group_size = getattr(cfg, "group_size", 1)
        if self.group_size > 1:  # VALL-E 2: level-0 slots 1..G-1 of each AR position
            self.group_emb = nn.ModuleList(nn.Embedding(k + 1, d) for _ in range(self.group_size - 1))
            self.group_heads = nn.ModuleList(nn.Linear(d, k + 1) for _ in range(self.group_size - 1))
        self.text_head = nn.Linear(d, n_symbols)
        self.pointer = getattr(cfg, "alignment", "none") == "pointer"
        self.nar0 = getattr(cfg, "level0", "ar") == "nar"
        self.shared = getattr(cfg, "prefix", "classic") == "shared"
        if self.nar0 and not self.pointer:  # NAR-len: frames per utterance, read at the last prefix position
            self.length_head = nn.Linear(d, 1)
        self.guided: GuidedAttention | None = None  # set by the trainer with train.guided_attention > 0
        self.input_dropout = 0.0  # set by the trainer: train.input_dropout
        self.scheduled_sampling = 0.0  # set by the trainer: train.scheduled_sampling
        self.layer_skip = 0.0  # set by the trainer: train.layer_skip (early-exit loss weight)
        extra = []
        if self.pointer:
            self.frame_text_emb = nn.Embedding(n_symbols, d)
            self.held_emb = nn.Embedding(MAX_HELD, d)  # how many frames of this symbol came before this one
            if self.nar0:  # frames per symbol, as log(1 + n), read at the symbol's text position
                self.duration_head = nn.Linear(d, 1)
            else:
                self.pointer_head = nn.Linear(d, 2)  # 0: the next frame stays on this symbol, 1: it moves on
            extra += [self.frame_text_emb, self.held_emb]
        if self.group_size > 1:
            extra += list(self.group_emb)
        for emb in [self.text_emb, self.lang_emb, self.task_emb, self.level_emb, *self.audio_emb, *extra]:
            nn.init.normal_(emb.weight, std=0.02)

    # -- embeddings ------------------------------------------------------------------------------------------

    def embed_audio(self, codes: torch.Tensor, levels: int) -> torch.Tensor:
        """Sum of the embeddings of levels 0..levels-1 of codes (Q, F) -> (F, D)."""
        return torch.stack([self.audio_emb[q](codes[q]) for q in range(levels)], 0).sum(0)

    def header(self, language: int, task: str, level: int, device) -> torch.Tensor:
        """(4, D): language, task, level, sep0; (3, D) without the level for shared-prefix models."""
        ids = lambda v: torch.tensor([v], device=device)  # noqa: E731
        level_part = [] if self.shared else [self.level_emb(ids(level))]
        return torch.cat(
            [self.lang_emb(ids(language)), self.task_emb(ids(TASKS[task])), *level_part, self.sep[:1]]
        )

    @property
    def text_start(self) -> int:
        """Where a tts row's text begins: after language, task, (level,) sep0."""
        return 3 if self.shared else 4

    def marker(self, level: int) -> torch.Tensor:
        """(1, D): the level marker that opens a shared-prefix model's response."""
        return self.level_emb.weight[level : level + 1]

    def response_part(self, s: Sample) -> tuple[torch.Tensor, torch.Tensor, int | str, int]:
        """`response_in` as laid out after the prefix: (embeddings, targets, head, offset of the first
        target's position): shared-prefix models open a tts response with its level marker."""
        resp, tgt, head = self.response_in(s)
        if self.shared and s.task == "tts":
            return torch.cat([self.marker(s.level), resp]), tgt, head, 1
        return resp, tgt, head, 0

    def prefix(self, s: Sample) -> tuple[torch.Tensor, int, int]:
        """Embeddings of everything before the response/text-in, with the start of the text and prompt parts."""
        dev = self.sep.device
        head = self.header(s.language, s.task, s.level, dev)
        if s.task == "stt":
            audio = self.embed_audio(s.prompt.to(dev), min(self.n_levels, s.prompt.shape[0]))
            return torch.cat([head, audio, self.sep[1:2]]), len(head), -1
        text = self.text_emb(s.phonemes.to(dev))
        prompt = self.embed_audio(s.prompt.to(dev), self.n_levels) if s.prompt.shape[-1] else self.sep[:0]
        text_start = len(head)
        prompt_start = text_start + len(text) + 1
        return torch.cat([head, text, self.sep[1:2], prompt, self.sep[2:3]]), text_start, prompt_start

    def response_in(self, s: Sample) -> tuple[torch.Tensor, torch.Tensor, int | str]:
        """(response input embeddings (n, D), targets (n,), head) of a sample."""
        dev = self.sep.device
        if s.task == "stt":
            ids = s.phonemes.to(dev)
            return self.text_emb(ids[:-1]), ids[1:], "text"
        r = s.response.to(dev)
        fed = r[0] if s.ar_inputs is None else s.ar_inputs.to(dev)  # level 0's "previous frames"
        if s.level == 0 and self.nar0:
            masked = self.level0_mask(s)
            inp = self.audio_emb[0](torch.where(masked, torch.full_like(r[0], self.start_id), r[0]))
            if self.pointer:
                inp = inp + self.frame_text(s)
            return inp, torch.where(masked, r[0], IGNORE), 0
        if self.pointer:
            along = self.frame_text(s)
            if s.level == 0:
                inp = torch.cat([torch.tensor([self.start_id], device=dev), fed[:-1]])
                return self.ar_inputs(inp) + along, r[0], 0
            return self.embed_audio(r, s.level) + along, r[s.level], s.level
        if s.level == 0 and self.group_size > 1:
            return *self.grouped_level0(r[0]), 0
        if s.level == 0:
            inp = torch.cat([torch.tensor([self.start_id], device=dev), fed])
            tgt = torch.cat([r[0], torch.tensor([self.stop_id], device=dev)])
            return self.ar_inputs(inp), tgt, 0
        return self.embed_audio(r, s.level), r[s.level], s.level

    # -- grouped level 0 (model.group_size) -----------------------------------------------------------------

    def grouped_level0(self, r0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (n, D) and targets (n, G) of a grouped AR level 0 for frames r0 (F,): n = F // G + 1."""
        g, dev = self.group_size, r0.device
        n = len(r0) // g + 1
        tgt = torch.full((n * g,), IGNORE, dtype=torch.long, device=dev)
        tgt[: len(r0)] = r0
        tgt[len(r0)] = self.stop_id
        start = torch.full((1, g), self.start_id, dtype=torch.long, device=dev)
        inp = torch.cat([start, r0[: (n - 1) * g].view(n - 1, g)])
        return self.level0_embed(inp), tgt.view(n, g)

    def level0_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """AR level-0 inputs: tokens (..., G) -> (..., D), the slots' embeddings summed."""
        out = self.audio_emb[0](tokens[..., 0])
        for slot, emb in enumerate(getattr(self, "group_emb", []), 1):
            out = out + emb(tokens[..., slot])
        return out

    def level0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """AR level-0 logits of every slot: hidden (..., D) -> (..., G, K + 1)."""
        heads = [self.heads[0], *(self.group_heads if self.group_size > 1 else [])]
        return torch.stack([h(hidden) for h in heads], -2)

    def level0_mask(self, s: Sample) -> torch.Tensor:
        """(Fr,) bool: the level-0 frames a `level0: nar` sample predicts (see the module's docstring)."""
        n = s.response.shape[-1]
        dev = self.sep.device
        if s.masked is not None:
            return s.masked.to(dev)
        if not self.training:
            return torch.ones(n, dtype=torch.bool, device=dev)
        share = math.cos(math.pi / 2 * float(torch.rand(())))
        k = min(n, max(1, math.ceil(share * n)))
        masked = torch.zeros(n, dtype=torch.bool, device=dev)
        masked[torch.randperm(n, device=dev)[:k]] = True
        return masked

    def duration_targets(self, s: Sample) -> torch.Tensor:
        """(Lt,) log(1 + frames) of every text symbol of a sample (BOS and EOS included)."""
        fs = s.frame_symbols.to(self.sep.device)
        return torch.log1p(torch.bincount(fs, minlength=len(s.phonemes)).float())

    def durations(self, hidden: torch.Tensor) -> torch.Tensor:
        """Duration head: hidden states of text positions (..., D) -> frames (...,) as floats >= 0."""
        return torch.expm1(self.duration_head(hidden).squeeze(-1).float()).clamp_min(0)

    def length(self, hidden: torch.Tensor) -> torch.Tensor:
        """NAR-len's length head: the last prefix position's hidden state (..., D) -> frames (...,) >= 0."""
        return torch.expm1(self.length_head(hidden).squeeze(-1).float()).clamp_min(0)

    def attention_mask(self, batch: Batch) -> torch.Tensor:
        """The additive mask of a batch: causal rows, padding, and prefix-only rows (level0 nar)."""
        t = batch.inputs_embeds.shape[1]
        mask = attention_mask(batch.lengths, batch.causal, t, dtype=batch.inputs_embeds.dtype)
        if batch.prefix_only is not None and bool((batch.prefix_only > 0).any()):
            pos = torch.arange(t, device=mask.device)
            n = batch.prefix_only[:, None, None]  # (B, 1, 1)
            hide = (pos[None, :, None] < n) & (pos[None, None, :] >= n)  # prefix query, response key
            mask = mask.masked_fill(hide[:, None], torch.finfo(mask.dtype).min)
            if self.shared:  # ... and sees all of itself, in causal rows too
                both = (pos[None, :, None] < n) & (pos[None, None, :] < n)
                mask = mask.masked_fill(both[:, None], 0.0)
        return mask

    def layout(self, batch: Batch) -> Layout:
        """The same facts as `attention_mask`, as structure, for recurrent backbones (`Layout`)."""
        return layout(batch.lengths, batch.causal, batch.inputs_embeds.shape[1], batch.prefix_only)

    def ar_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Level-0 input embeddings; while training with `input_dropout` p, each one after START is zeroed
        with probability p (Tacotron's prenet dropout: the previous frame stops being enough to predict the
        next one, so the model has to read its text)."""
        emb = self.audio_emb[0](tokens)
        if self.training and self.input_dropout > 0:
            keep = torch.rand(len(tokens), device=emb.device) >= self.input_dropout
            keep[0] = True
            emb = emb * keep[:, None].to(emb.dtype)
        return emb

    def frame_text(self, s: Sample) -> torch.Tensor:
        """(Fr, D): the embedding of the text symbol each response frame speaks (pointer models)."""
        if s.frame_symbols is None or len(s.frame_symbols) != s.response.shape[-1]:
            raise ValueError(
                "a pointer model needs frame_symbols for every response frame "
                f"(got {None if s.frame_symbols is None else len(s.frame_symbols)} for {s.response.shape[-1]})"
            )
        ph = s.phonemes.to(self.sep.device)
        fs = s.frame_symbols.to(self.sep.device)
        held = held_counts(fs) if s.frame_held is None else s.frame_held.to(fs.device).clamp_max(MAX_HELD - 1)
        return self.frame_text_emb(ph[fs]) + self.held_emb(held)

    def pointer_targets(self, s: Sample) -> torch.Tensor:
        """(Fr,) 1 where the next frame speaks the next symbol (the last frame moves past EOS)."""
        fs = s.frame_symbols.to(self.sep.device)
        return torch.cat([(fs[1:] > fs[:-1]).long(), torch.ones(1, dtype=torch.long, device=fs.device)])

    def assemble(self, samples: list[Sample]) -> Batch:
        rows, targets, prefix_only = [], [], []
        weights = self.loss_weights
        for b, s in enumerate(samples):
            if s.task not in TASKS:
                raise ValueError(f"unknown task {s.task!r}")
            if not 0 <= s.level < self.n_levels:
                raise ValueError(f"level {s.level} outside 0..{self.n_levels - 1}")
            pre, text_start, prompt_start = self.prefix(s)
            resp, tgt, head, offset = self.response_part(s)
            causal = s.task == "stt" or (s.level == 0 and not self.nar0)
            targets.append((b, len(pre) + offset, tgt, head, "response"))
            # the prefix sees only itself: shared-prefix tts rows, and level0-nar rows (so one pass over it
            # gives the durations / length at inference)
            own = s.task == "tts" and (self.shared or (self.nar0 and s.level == 0))
            prefix_only.append(len(pre) if own else 0)
            if self.nar0 and s.task == "tts" and s.level == 0:
                if self.pointer:
                    targets.append((b, text_start, self.duration_targets(s), "duration", "duration"))
                else:  # NAR-len: the frame count, at the separator before the response
                    n = torch.tensor([math.log1p(s.response.shape[-1])], device=self.sep.device)
                    targets.append((b, len(pre) - 1, n, "length", "length"))
            if self.pointer and not self.nar0 and s.task == "tts" and s.level == 0 and len(tgt):
                targets.append((b, len(pre) + offset, self.pointer_targets(s), "pointer", "pointer"))
            if causal and s.task == "tts":
                # next-token prediction inside text and prompt (weights default 0: skipped)
                if weights.get("text", 0) > 0:
                    ph = s.phonemes.to(self.sep.device)
                    targets.append((b, text_start, ph[1:], "text", "text"))
                if weights.get("prompt", 0) > 0 and s.prompt.shape[-1] > 1:
                    targets.append((b, prompt_start, s.prompt[0, 1:].to(self.sep.device), 0, "prompt"))
            rows.append((torch.cat([pre, resp]), causal))
        lengths = torch.tensor([len(r) for r, _ in rows], device=self.sep.device)
        t = int(lengths.max())
        x = torch.zeros(len(rows), t, self.cfg.d_model, device=self.sep.device, dtype=rows[0][0].dtype)
        for b, (r, _) in enumerate(rows):
            x[b, : len(r)] = r
        causal = torch.tensor([c for _, c in rows], device=self.sep.device)
        pos = torch.arange(t, device=self.sep.device)[None].expand(len(rows), t)
        limit = torch.tensor(prefix_only, device=self.sep.device) if any(prefix_only) else None
        return Batch(x, lengths, causal, pos, targets, limit)

    def head_for(self, head: int | str) -> nn.Module:
        if head == "text":
            return self.text_head
        if head == "pointer":
            return self.pointer_head
        if head == "duration":
            return self.duration_head
        if head == "length":
            return self.length_head
        if head == 0 and self.group_size > 1:
            return self.level0_logits
        return self.heads[head]

    # -- training forward ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def own_inputs(
        self, samples: list[Sample], p: float, generator: torch.Generator | None = None
    ) -> list[Sample]:
        """Scheduled sampling in parallel (Duckworth et al. 2019, arXiv 1906.04331): a teacher-forced pass
        predicts every level-0 frame; each level-0 sample then gets, with probability p per frame, its own
        sampled prediction as the input "previous frame" instead of the true one. Training on its own
        guesses is what keeps a free-running AR from drifting away from its text (teacher forcing alone
        never shows it a wrong previous frame). Other samples are returned as they are."""
        rows = [k for k, s in enumerate(samples) if s.task == "tts" and s.level == 0 and s.response.shape[-1]]
        if not rows or p <= 0 or self.nar0:
            return samples
        sub = [samples[k] for k in rows]
        batch = self.assemble(sub)
        mask = self.attention_mask(batch)
        h = self.backbone(batch.inputs_embeds, mask, batch.position_ids, layout=self.layout(batch)).hidden
        out = list(samples)
        starts = {b: start for b, start, _, head, part in batch.targets if part == "response"}
        for b, k in enumerate(rows):
            s = samples[k]
            r0 = s.response[0].to(h.device)
            logits = self.heads[0](h[b, starts[b] : starts[b] + len(r0)]).float()[:, : self.codebook_size]
            guess = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
            swap = torch.rand(len(r0), device=h.device, generator=generator) < p
            out[k] = replace(s, ar_inputs=torch.where(swap, guess, r0))
        return out

    def early_exit_loss(self, early: list[torch.Tensor], batch: Batch, samples: list[Sample]) -> torch.Tensor:
        """Layer skip: the mean over the earlier layers (outputs through the final norm) of the level-0
        cross-entropy read from each one by the level-0 head, on the AR rows."""
        per_layer = []
        for h in early:
            total, count = h.new_zeros(()), 0
            for b, start, tgt, head, part in batch.targets:
                if part != "response" or head != 0 or samples[b].task != "tts":
                    continue
                idx = torch.arange(len(tgt), device=h.device) + start
                total = total + F.cross_entropy(self.heads[0](h[b, idx]).float(), tgt, reduction="sum")
                count += len(tgt)
            per_layer.append(total / max(count, 1))
        return torch.stack(per_layer).mean()

    def forward(self, samples: list[Sample], return_hidden: bool = False) -> ModelOutput:
        if self.training and self.scheduled_sampling > 0:
            samples = self.own_inputs(samples, self.scheduled_sampling)
        batch = self.assemble(samples)
        mask = self.attention_mask(batch)
        rows = [
            (b, start, len(tgt), len(samples[b].phonemes))
            for b, start, tgt, head, part in batch.targets
            if part == "response" and head == 0 and samples[b].task == "tts"
        ]
        guided = self.guided if self.training and self.guided is not None and rows else None
        early: list[torch.Tensor] = []
        if guided is not None:
            out, maps = self.backbone.forward_with_attention(batch.inputs_embeds, mask, batch.position_ids)
        elif self.training and self.layer_skip > 0 and rows:
            out, early = self.backbone.forward_layers(batch.inputs_embeds, mask, batch.position_ids)
        else:
            out = self.backbone(batch.inputs_embeds, mask, batch.position_ids, layout=self.layout(batch))
        h = out.hidden
        total = h.new_zeros(())
        losses: dict[str, float] = {}
        accuracy: dict[str, float] = {}
        counts: dict[str, int] = {}
        by_part: dict[str, list[torch.Tensor]] = {}
        level_loss: dict[str, torch.Tensor] = {}  # summed cross-entropy per RVQ level (and stt), for the logs
        for b, start, tgt, head, part in batch.targets:
            # inputs are already shifted (START / BOS first), so target i is read at position start + i
            idx = torch.arange(len(tgt), device=h.device) + start
            logits = self.head_for(head)(h[b, idx])
            if part in ("duration", "length"):
                pred = logits.squeeze(-1).float()
                loss = F.mse_loss(pred, tgt, reduction="sum")
                by_part.setdefault(part, []).append(
                    torch.stack([loss, torch.tensor(float(len(tgt)), device=h.device)])
                )
                frames, want = torch.expm1(pred.detach()), torch.expm1(tgt)
                if part == "duration":  # "acc.dur": symbols whose predicted frame count, rounded, is right
                    key, hits = "dur", int((frames.round() == want.round()).sum())
                else:  # "acc.len": utterances whose predicted length is within 10%
                    key, hits = "len", int(((frames - want).abs() <= 0.1 * want).sum())
                counts[key] = counts.get(key, 0) + len(tgt)
                accuracy[key] = accuracy.get(key, 0.0) + hits
                level_loss[key] = level_loss.get(key, 0.0) + loss.detach()
                continue
            if logits.dim() == 3:  # grouped level 0: (n, G, V) against (n, G)
                logits, tgt = logits.flatten(0, 1), tgt.flatten()
            scored = tgt != IGNORE  # level0 nar: only the masked frames; grouped: slots after STOP
            n_scored = int(scored.sum())
            loss = F.cross_entropy(logits.float(), tgt, reduction="sum", ignore_index=IGNORE)
            by_part.setdefault(part, []).append(
                torch.stack([loss, torch.tensor(float(n_scored), device=h.device)])
            )
            if part == "pointer":
                hits = int((logits.argmax(-1) == tgt).sum())
                counts["ptr"] = counts.get("ptr", 0) + len(tgt)
                accuracy["ptr"] = accuracy.get("ptr", 0.0) + hits
            if part == "response":
                key = "stt" if head == "text" else f"l{head}"
                hits = int((logits.argmax(-1) == tgt).sum())
                counts[key] = counts.get(key, 0) + n_scored
                accuracy[key] = accuracy.get(key, 0.0) + hits
                level_loss[key] = level_loss.get(key, 0.0) + loss.detach()
        for part, items in by_part.items():
            s = torch.stack(items).sum(0)
            mean = s[0] / s[1].clamp_min(1)
            losses[part] = float(mean.detach())
            total = total + self.loss_weights.get(part, 1.0) * mean
        if guided is not None:
            g = guided.loss(maps, rows, self.text_start)
            losses["guided"] = float(g.detach())
            total = total + guided.weight * g
        if early:
            e = self.early_exit_loss(early, batch, samples)
            losses["early_exit"] = float(e.detach())
            total = total + self.layer_skip * e
        if out.aux_loss is not None:
            if not self.backbone.has_aux_loss:
                raise ValueError(f"the {self.backbone.name} backbone returned aux_loss without has_aux_loss")
            total = total + out.aux_loss
            losses["aux"] = float(out.aux_loss.detach())
        accuracy = {k: v / max(counts[k], 1) for k, v in accuracy.items()}
        per_level = {k: float(v) / max(counts[k], 1) for k, v in level_loss.items()}
        # "dur" (level0 nar): the duration head's squared error of log(1 + frames) and exact-count accuracy
        if "pointer" in losses:  # the pointer's loss and accuracy sit beside the levels' ("ptr")
            per_level["ptr"] = losses["pointer"]
        return ModelOutput(total, losses, accuracy, counts, per_level, h if return_hidden else None)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class GuidedAttention:
    """The guided-attention loss (DC-TTS, arXiv 1710.08969), for classic layouts: on some heads of some
    layers, the attention of each level-0 response position t (of T) over the text symbols n (of N),
    renormalized over the text, is penalized by 1 - exp(-(n/N - t/T)^2 / (2 sigma^2)): it pushes those heads
    towards the diagonal. Needs only the lengths; `weight` scales it into the loss."""

    weight: float
    sigma: float = 0.4
    layers: tuple[int, ...] = (2, 3)
    heads: int = 2

    def loss(
        self, maps: list[torch.Tensor], rows: list[tuple[int, int, int, int]], text_start: int = 4
    ) -> torch.Tensor:
        parts = []
        for b, start, f, n in rows:
            dev = maps[0].device
            t_pos = (torch.arange(f, device=dev, dtype=torch.float32) / f)[:, None]
            n_pos = (torch.arange(n, device=dev, dtype=torch.float32) / n)[None, :]
            w = 1 - torch.exp(-((n_pos - t_pos) ** 2) / (2 * self.sigma**2))  # (F, N)
            for layer in self.layers:
                a = maps[layer][b, : self.heads, start : start + f, text_start : text_start + n].float()
                a = a / a.sum(-1, keepdim=True).clamp_min(1e-6)
                parts.append((a * w).sum(-1).mean())
        return torch.stack(parts).mean()


def held_counts(frame_symbols: torch.Tensor) -> torch.Tensor:
    """(F,) for each frame, how many frames of its symbol came before it, capped at MAX_HELD - 1."""
    fs = frame_symbols
    if not len(fs):
        return fs
    starts = torch.ones_like(fs, dtype=torch.bool)
    starts[1:] = fs[1:] != fs[:-1]
    idx = torch.arange(len(fs), device=fs.device)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
    return (idx - first).clamp_max(MAX_HELD - 1)


def frame_symbols(durations: torch.Tensor) -> torch.Tensor:
    """Durations (frames per symbol, (Lt,)) -> the symbol index of every frame ((sum,) long)."""
    d = torch.as_tensor(durations, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(d)), d)


def stretch_durations(durations: torch.Tensor, frames: int) -> torch.Tensor:
    """Durations rescaled to sum to `frames`, each at least 1 (needs frames >= len): a transcript's timing
    laid over audio of another length (the text gap's wrong transcripts)."""
    d = torch.as_tensor(durations, dtype=torch.float64)
    n = len(d)
    if frames < n:
        raise ValueError(f"{frames} frames cannot hold {n} symbols")
    edges = torch.round(torch.cumsum(d, 0) / d.sum() * (frames - n)).long()
    out = torch.diff(edges, prepend=torch.zeros(1, dtype=torch.long)) + 1
    return out


def wrong_text(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(right, wrong): the samples, and each with the next sample's transcript instead (a cyclic shift; for
    pointer models that transcript's durations are stretched over this sample's frames). A sample whose
    frames cannot hold the other transcript is left out of both. The text gap is the level-0 loss of the
    wrong ones minus the right ones'."""
    right, wrong = [], []
    n = len(samples)
    for k, s in enumerate(samples):
        other = samples[(k + 1) % n]
        fs = None
        if s.frame_symbols is not None and other.frame_symbols is not None:
            d = torch.bincount(other.frame_symbols.cpu(), minlength=len(other.phonemes))
            frames = s.response.shape[-1]
            if frames < len(d):
                continue
            fs = frame_symbols(stretch_durations(d, frames))
        right.append(s)
        wrong.append(Sample(other.phonemes, s.prompt, s.response, s.level, s.language, s.task, fs))
    return right, wrong


def swapped_text(samples: list[Sample]) -> list[Sample]:
    """Pointer models' control for the text gap: each sample keeps its own phoneme boundaries (frame_symbols,
    frame_held) but its phonemes' identities are the next sample's, resampled to the same count (BOS and EOS
    kept). The loss against these minus the right one's is the part of the gap that comes from which
    phoneme is spoken, not from where one ends. Empty for classic models."""
    out = []
    n = len(samples)
    for k, s in enumerate(samples):
        if s.frame_symbols is None or n < 2:
            continue
        other = samples[(k + 1) % n].phonemes
        inner, count = other[1:-1], len(s.phonemes) - 2
        if len(inner) == 0 or count < 1:
            continue
        pick = torch.arange(count, device=inner.device) * len(inner) // count
        phonemes = torch.cat([s.phonemes[:1], inner[pick], s.phonemes[-1:]])
        out.append(replace(s, phonemes=phonemes))
    return out
