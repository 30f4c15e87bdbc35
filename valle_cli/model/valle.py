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

Per-level classifier heads (level 0 has one extra class, STOP), a text head. The loss is cross-entropy on the
response (weight `response`) plus, for causal passes, next-token prediction inside the text and prompt
segments (weights `text`, `prompt`; 0 by default), plus the backbone's auxiliary loss (MoE routing).
Accuracy is reported per level. Padding (right side) is masked everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from valle_cli.backbones.base import attention_mask, build_backbone
from valle_cli.config import ModelConfig

TASKS = {"tts": 0, "stt": 1}
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


@dataclass
class Batch:
    inputs_embeds: torch.Tensor  # (B, T, D)
    lengths: torch.Tensor  # (B,)
    causal: torch.Tensor  # (B,) bool
    position_ids: torch.Tensor  # (B, T)
    # (batch row, start position, targets (n,), head) for each part with a loss: head is a level or "text"
    targets: list[tuple[int, int, torch.Tensor, int | str, str]] = field(default_factory=list)


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
        self.text_head = nn.Linear(d, n_symbols)
        for emb in [self.text_emb, self.lang_emb, self.task_emb, self.level_emb, *self.audio_emb]:
            nn.init.normal_(emb.weight, std=0.02)

    # -- embeddings ------------------------------------------------------------------------------------------

    def embed_audio(self, codes: torch.Tensor, levels: int) -> torch.Tensor:
        """Sum of the embeddings of levels 0..levels-1 of codes (Q, F) -> (F, D)."""
        return torch.stack([self.audio_emb[q](codes[q]) for q in range(levels)], 0).sum(0)

    def header(self, language: int, task: str, level: int, device) -> torch.Tensor:
        ids = lambda v: torch.tensor([v], device=device)  # noqa: E731
        return torch.cat(
            [
                self.lang_emb(ids(language)),
                self.task_emb(ids(TASKS[task])),
                self.level_emb(ids(level)),
                self.sep[:1],
            ]
        )  # (4, D)

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
        if s.level == 0:
            inp = torch.cat([torch.tensor([self.start_id], device=dev), r[0]])
            tgt = torch.cat([r[0], torch.tensor([self.stop_id], device=dev)])
            return self.audio_emb[0](inp), tgt, 0
        return self.embed_audio(r, s.level), r[s.level], s.level

    def assemble(self, samples: list[Sample]) -> Batch:
        rows, targets = [], []
        weights = self.loss_weights
        for b, s in enumerate(samples):
            if s.task not in TASKS:
                raise ValueError(f"unknown task {s.task!r}")
            if not 0 <= s.level < self.n_levels:
                raise ValueError(f"level {s.level} outside 0..{self.n_levels - 1}")
            pre, text_start, prompt_start = self.prefix(s)
            resp, tgt, head = self.response_in(s)
            causal = s.task == "stt" or s.level == 0
            targets.append((b, len(pre), tgt, head, "response"))
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
        return Batch(x, lengths, causal, pos, targets)

    # -- training forward ---------------------------------------------------------------------------------------

    def forward(self, samples: list[Sample], return_hidden: bool = False) -> ModelOutput:
        batch = self.assemble(samples)
        mask = attention_mask(
            batch.lengths, batch.causal, batch.inputs_embeds.shape[1], dtype=batch.inputs_embeds.dtype
        )
        out = self.backbone(batch.inputs_embeds, mask, batch.position_ids)
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
            logits = (self.text_head if head == "text" else self.heads[head])(h[b, idx])
            loss = F.cross_entropy(logits.float(), tgt, reduction="sum")
            by_part.setdefault(part, []).append(
                torch.stack([loss, torch.tensor(float(len(tgt)), device=h.device)])
            )
            if part == "response":
                key = "stt" if head == "text" else f"l{head}"
                hits = int((logits.argmax(-1) == tgt).sum())
                counts[key] = counts.get(key, 0) + len(tgt)
                accuracy[key] = accuracy.get(key, 0.0) + hits
                level_loss[key] = level_loss.get(key, 0.0) + loss.detach()
        for part, items in by_part.items():
            s = torch.stack(items).sum(0)
            mean = s[0] / s[1].clamp_min(1)
            losses[part] = float(mean.detach())
            total = total + self.loss_weights.get(part, 1.0) * mean
        if out.aux_loss is not None:
            total = total + out.aux_loss
            losses["aux"] = float(out.aux_loss.detach())
        accuracy = {k: v / counts[k] for k, v in accuracy.items()}
        per_level = {k: float(v) / counts[k] for k, v in level_loss.items()}
        return ModelOutput(total, losses, accuracy, counts, per_level, h if return_hidden else None)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
