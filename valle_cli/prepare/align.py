"""Phoneme durations for any dataset: a small unsupervised aligner, trained on the dataset itself.

Why: frame-wise text conditioning (the phoneme pointer, `model.alignment: pointer`) needs to know which
phoneme symbol every codec frame belongs to. Synthetic speech could report its timings, but a user's own
recordings have none, so `valle prepare` learns them from the dataset it has just made (codes + phonemes),
the way FastPitch and NeMo do (One TTS Alignment To Rule Them All, arXiv 2108.10447):

- a text encoder (symbol embeddings, two convolutions) gives a key per symbol, an audio encoder (the sum of
  the embeddings of the first RVQ levels, two convolutions) a query per frame;
- soft attention of each frame over the symbols is a softmax of minus the squared distance, times a static
  beta-binomial prior that favours the diagonal;
- the forward-sum loss (CTC over the attention, with a blank) makes the attention monotonic without any
  timing labels; it needs only the lengths;
- monotonic alignment search (Viterbi over the log attention) turns it into hard durations: every symbol,
  BOS and EOS included, gets at least one frame, and the durations of an utterance sum to its frame count.
  BOS takes the leading silence and EOS the trailing one.

Durations are stored beside the index (`index/durations.npy`, `index/duration_offsets.npy`; n + 2 per
utterance of n symbols) and the aligner itself as `aligner.safetensors`, with `aligner.json`: a fingerprint of
what it was trained on (the index's utterances, symbols and frame counts, and the steps) and its summary. A
`valle prepare` that adds nothing (a resumed or repeated run) finds the same fingerprint and keeps the
durations instead of training again. An utterance with fewer frames than symbols cannot be aligned; it gets
no durations (length 0) and training with the pointer leaves it out.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from valle_cli.errors import DatasetError
from valle_cli.fsutil import atomic_path

ALIGN_LEVELS = 4  # RVQ levels the audio encoder reads (the coarse ones carry the phonetic content)
BLANK_LOGPROB = -1.0


class Aligner(nn.Module):
    def __init__(self, n_symbols: int, codebook_size: int, levels: int = ALIGN_LEVELS, dim: int = 128):
        super().__init__()
        self.levels, self.dim = levels, dim
        self.text_emb = nn.Embedding(n_symbols, dim)
        self.text_enc = nn.Sequential(
            nn.Conv1d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv1d(dim, dim, 3, padding=1)
        )
        self.audio_emb = nn.ModuleList([nn.Embedding(codebook_size, dim) for _ in range(levels)])
        self.audio_enc = nn.Sequential(
            nn.Conv1d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv1d(dim, dim, 3, padding=1), nn.ReLU(),
            nn.Conv1d(dim, dim, 1),
        )  # fmt: skip

    def forward(self, text: torch.Tensor, codes: torch.Tensor, text_lens, frame_lens) -> torch.Tensor:
        """text (B, N) ids, codes (B, Q, T) -> log attention (B, T, N) of each frame over the symbols, with
        the prior applied; padded symbols get -inf."""
        keys = self.text_enc(self.text_emb(text).transpose(1, 2)).transpose(1, 2)  # (B, N, D)
        q = min(self.levels, codes.shape[1])
        audio = sum(self.audio_emb[k](codes[:, k]) for k in range(q))  # (B, T, D)
        queries = self.audio_enc(audio.transpose(1, 2)).transpose(1, 2)
        # squared distance without the (B, T, N, D) tensor
        dist = (
            (queries**2).sum(-1)[:, :, None]
            + (keys**2).sum(-1)[:, None, :]
            - 2 * queries @ keys.transpose(1, 2)
        )
        logits = -dist / self.dim**0.5
        pad = torch.arange(text.shape[1], device=text.device)[None, None, :] >= text_lens[:, None, None]
        logits = logits.masked_fill(pad, float("-inf"))
        logp = F.log_softmax(logits, dim=-1) + torch.log(
            beta_binomial_prior(text_lens, frame_lens, text.shape[1], codes.shape[2]) + 1e-8
        )
        return logp.masked_fill(pad, float("-inf"))


def beta_binomial_prior(text_lens, frame_lens, n_max: int, t_max: int, scale: float = 1.0) -> torch.Tensor:
    """(B, T, N): for frame t of T, a beta-binomial over the N symbols centred near t/T * N."""
    out = torch.zeros(len(text_lens), t_max, n_max)
    for b, (n, t) in enumerate(zip(text_lens.tolist(), frame_lens.tolist(), strict=True)):
        k = torch.arange(n, dtype=torch.float64)
        a = scale * torch.arange(1, t + 1, dtype=torch.float64)[:, None]
        bb = scale * (t + 1 - torch.arange(1, t + 1, dtype=torch.float64))[:, None]
        m = n - 1
        log_pmf = (
            torch.lgamma(torch.tensor(m + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(m - k + 1)
            + torch.lgamma(k + a) + torch.lgamma(m - k + bb) - torch.lgamma(m + a + bb)
            + torch.lgamma(a + bb) - torch.lgamma(a) - torch.lgamma(bb)
        )  # fmt: skip
        out[b, :t, :n] = log_pmf.exp().float()
    return out.to(text_lens.device)


def forward_sum_loss(logp: torch.Tensor, text_lens, frame_lens) -> torch.Tensor:
    """CTC over the attention (a blank at column 0), averaged over the batch: needs only the lengths."""
    padded = F.pad(logp, (1, 0), value=BLANK_LOGPROB)
    total = logp.new_zeros(())
    for b in range(len(text_lens)):
        n, t = int(text_lens[b]), int(frame_lens[b])
        lp = F.log_softmax(padded[b, :t, : n + 1], dim=-1)[:, None]  # (T, 1, N + 1)
        target = torch.arange(1, n + 1, device=logp.device)[None]
        total = total + F.ctc_loss(lp, target, torch.tensor([t]), torch.tensor([n]), zero_infinity=True)
    return total / len(text_lens)


def monotonic_search(logp: np.ndarray) -> np.ndarray:
    """Hard durations (N,) from log attention (T, N), T >= N: the monotonic path through every symbol, one
    frame or more each, with the highest total log attention (Viterbi)."""
    t_len, n_len = logp.shape
    if t_len < n_len:
        raise ValueError(f"{t_len} frames cannot hold {n_len} symbols")
    score = np.full(n_len, -np.inf)
    score[0] = logp[0, 0]
    moved = np.zeros((t_len, n_len), dtype=bool)  # at frame t, entered symbol n from n - 1
    for t in range(1, t_len):
        stay = score
        advance = np.concatenate([[-np.inf], score[:-1]])
        moved[t] = advance > stay
        score = np.maximum(stay, advance) + logp[t]
    durations = np.zeros(n_len, dtype=np.int64)
    n = n_len - 1
    for t in range(t_len - 1, -1, -1):
        durations[n] += 1
        if t > 0 and moved[t, n]:
            n -= 1
    if n != 0:  # pragma: no cover - the path always starts at symbol 0 when T >= N
        raise RuntimeError("monotonic search did not reach the first symbol")
    return durations


# -- training on a dataset and writing the durations ---------------------------------------------------------


def _batch(ds, idx: list[int], bos: int, eos: int, levels: int):
    texts = [np.concatenate([[bos], ds.phonemes(i).astype(np.int64), [eos]]) for i in idx]
    codes = [ds.codes(i)[:levels].astype(np.int64) for i in idx]
    n_max, t_max = max(len(t) for t in texts), max(c.shape[1] for c in codes)
    text = torch.zeros(len(idx), n_max, dtype=torch.long)
    audio = torch.zeros(len(idx), levels, t_max, dtype=torch.long)
    for b, (t, c) in enumerate(zip(texts, codes, strict=True)):
        text[b, : len(t)] = torch.from_numpy(t)
        audio[b, :, : c.shape[1]] = torch.from_numpy(c)
    return (
        text,
        audio,
        torch.tensor([len(t) for t in texts]),
        torch.tensor([c.shape[1] for c in codes]),
    )


def _alignable(ds) -> np.ndarray:
    frames = np.asarray(ds.columns["frames"], dtype=np.int64)
    n = np.diff(np.asarray(ds.columns["phoneme_offsets"], dtype=np.int64)) + 2
    return np.flatnonzero(frames >= n)


def train_aligner(
    ds,
    steps: int = 1500,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Aligner:
    """Fit an aligner to a dataset's own codes and phonemes (minutes on a CPU for hours of speech)."""
    symbols = ds.header["symbols"]["symbols"]
    torch.manual_seed(seed)
    pool = _alignable(ds)
    if len(pool) == 0:
        raise DatasetError(f"no utterance of {ds.path} has more frames than phonemes: nothing to align")
    levels = min(ALIGN_LEVELS, ds.codes(int(pool[0])).shape[0])  # a 1.5 kbps codec has only 2
    model = Aligner(len(symbols), int(ds.header["codec"]["codebook_size"]), levels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    frames = np.asarray(ds.columns["frames"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    loss_avg = 0.0
    for step in range(steps):
        # similar lengths together (little padding): a random utterance and its neighbours in length
        order = pool[np.argsort(frames[pool], kind="stable")]
        start = int(rng.integers(0, max(len(order) - batch_size, 0) + 1))
        idx = order[start : start + batch_size].tolist()
        text, audio, tl, fl = _batch(ds, idx, 1, 2, model.levels)
        loss = forward_sum_loss(model(text, audio, tl, fl), tl, fl)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100)
        opt.step()
        value = float(loss.detach())
        loss_avg = 0.98 * loss_avg + 0.02 * value if step else value
        if progress:
            progress(step + 1, steps, loss_avg)
    model.eval()
    return model


@torch.no_grad()
def durations_for(model: Aligner, ds, indices, batch_size: int = 16) -> dict[int, np.ndarray]:
    out = {}
    indices = list(indices)
    for s in range(0, len(indices), batch_size):
        idx = indices[s : s + batch_size]
        text, audio, tl, fl = _batch(ds, idx, 1, 2, model.levels)
        logp = model(text, audio, tl, fl)
        for b, i in enumerate(idx):
            out[i] = monotonic_search(logp[b, : int(fl[b]), : int(tl[b])].numpy())
    return out


def auto_steps(utterances: int, batch_size: int = 16) -> int:
    """Aligner training steps for a dataset: about 8 passes over it, at least 100, at most 1500 (1500 steps
    take about 2 minutes on 2 CPU cores and suffice for hours of speech)."""
    return int(min(1500, max(100, 8 * utterances // batch_size)))


def align_dataset(
    root: Path, steps: int | None = None, progress: Callable[[str, int, int], None] | None = None
) -> dict:
    """Train an aligner on the dataset folder at root (`steps`: None = `auto_steps`) and write
    index/durations.npy + duration_offsets.npy and aligner.safetensors. Returns a summary (aligned,
    unaligned, steps, seconds, final loss)."""
    from valle_cli.data.dataset import open_dataset
    from valle_cli.fsutil import save_safetensors

    t0 = time.time()
    ds = open_dataset(root)
    progress = progress or (lambda *_: None)
    last = [0.0]

    def on_step(step: int, total: int, loss: float) -> None:
        last[0] = loss
        progress("align", step, total)

    steps = auto_steps(len(ds)) if steps is None else steps
    key = _fingerprint(root, steps)
    stamp = root / "aligner.json"
    done = [
        root / "aligner.safetensors",
        root / "index" / "durations.npy",
        root / "index" / "duration_offsets.npy",
    ]
    if stamp.is_file() and all(p.is_file() for p in done):
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("key") == key and isinstance(old.get("summary"), dict):
            ds.close()
            return {**old["summary"], "reused": True}
    ok = set(_alignable(ds).tolist())
    model = train_aligner(ds, steps=steps, progress=on_step) if ok else None
    result = durations_for(model, ds, sorted(ok)) if ok else {}
    lengths = [len(result[i]) if i in ok else 0 for i in range(len(ds))]
    offsets = np.zeros(len(ds) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([result[i] for i in range(len(ds)) if i in ok] or [np.zeros(0, np.int64)])
    index = root / "index"
    for name, arr in (("durations", flat.astype(np.uint16)), ("duration_offsets", offsets)):
        with atomic_path(index / f"{name}.npy", DatasetError) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    if model is not None:
        with atomic_path(root / "aligner.safetensors", DatasetError) as tmp:
            save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, {})
    ds.close()
    summary = {
        "aligned": len(ok),
        "unaligned": len(ds) - len(ok),
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
        "loss": round(last[0], 4),
    }
    with atomic_path(stamp, DatasetError) as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "summary": summary}))
    return summary


def _fingerprint(root: Path, steps: int) -> str:
    """What an aligner's durations depend on: the index's utterances (ids), their symbols and frame counts, and
    the training steps."""
    from valle_cli.data.dataset import ALIGNED_COLUMNS

    h = hashlib.sha256(f"aligner v1, {steps} steps, {ALIGN_LEVELS} levels".encode())
    for name in ALIGNED_COLUMNS:
        h.update((root / "index" / f"{name}.npy").read_bytes())
    return h.hexdigest()
