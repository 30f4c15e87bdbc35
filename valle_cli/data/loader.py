"""Training data from a prepared dataset: filtering, held-out split, speaker-aware sampling, prompts, batches.

- Utterances outside `data.min_duration`..`data.max_duration` are left out.
- The held-out split takes `data.val_fraction` of the utterances by a hash of their id, so it is stable when
  the dataset grows and never depends on the seed.
- `sample_by`: `utterance` (each utterance once per epoch, shuffled), `speaker` or `group` (each draw picks a
  speaker/group uniformly, then one of its utterances: small speakers are not drowned out). An epoch has as
  many draws as utterances.
- Prompts come from another utterance of the same speaker: from the similar list with probability
  `data.similar_prompt_prob`, otherwise any other one; a random window of `data.prompt_duration` seconds. A
  speaker with a single utterance prompts from that utterance itself.
- Batches hold `data.batch_size` utterances, or, when `data.max_tokens` > 0, as many as fit that many tokens
  (text + prompt + response frames); with `data.bucket` (default) similar lengths share a batch.

Everything is a function of (seed, epoch, position): `state_dict()` is two integers, and a resumed run draws
exactly the batches the uninterrupted run would have drawn. Codes are read in DataLoader worker processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from valle_cli.config import DataConfig
from valle_cli.data.dataset import Dataset
from valle_cli.errors import DatasetError


@dataclass
class Item:
    """One utterance to train on, with the prompt drawn for it (indices into the dataset)."""

    index: int
    prompt_index: int
    prompt_start: int  # frames
    prompt_frames: int


def split_indices(ds: Dataset, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of the utterances within the duration range."""
    dur = ds.durations()
    keep = np.flatnonzero((dur >= cfg.min_duration) & (dur <= cfg.max_duration))
    if len(keep) == 0:
        raise DatasetError(
            f"no utterance of {ds.path} lies within {cfg.min_duration}-{cfg.max_duration} s",
            "widen data.min_duration / data.max_duration",
        )
    cut = int(cfg.val_fraction * 10_000)
    hashes = np.array([zlib.crc32(ds.uid(int(i)).encode()) % 10_000 for i in keep], dtype=np.int64)
    held = hashes < cut
    if cfg.val_fraction > 0 and not held.any() and len(keep) >= 2:  # 2% of 20 rounds to none: keep one
        held[int(np.argmin(hashes))] = True
    train, val = keep[~held], keep[held]
    if len(train) == 0:
        train, val = keep, keep[:0]
    return train, val


class Sampler:
    """Deterministic, resumable stream of batches (lists of `Item`) over some utterances of a dataset."""

    def __init__(
        self,
        ds: Dataset,
        indices: np.ndarray,
        cfg: DataConfig,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
    ):
        self.ds, self.cfg, self.seed = ds, cfg, seed
        self.indices = np.asarray(indices, dtype=np.int64)
        self.rank, self.world = shard
        self.epoch, self.position = 0, 0  # position counts batches handed out in this epoch (this rank)
        speakers = np.asarray(ds.columns["speaker"])[self.indices]
        self.by_speaker: dict[int, np.ndarray] = {
            int(s): self.indices[speakers == s] for s in np.unique(speakers)
        }
        if cfg.sample_by == "speaker":
            self.keys = {k: v for k, v in self.by_speaker.items()}
        elif cfg.sample_by == "group":
            groups: dict[str, list[int]] = {}
            for s, members in self.by_speaker.items():
                groups.setdefault(ds.speakers[s].split("/", 1)[0], []).extend(members.tolist())
            self.keys = {i: np.asarray(v) for i, (_, v) in enumerate(sorted(groups.items()))}
        else:
            self.keys = {}
        self.in_split = np.zeros(len(ds), dtype=bool)
        self.in_split[self.indices] = True
        self.frame_rate = ds.frame_rate
        self.frames = np.asarray(ds.columns["frames"], dtype=np.int64)
        self.text_len = np.diff(np.asarray(ds.columns["phoneme_offsets"], dtype=np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self, epoch: int) -> list[Item]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.indices)
        if self.cfg.sample_by == "utterance":
            picks = self.indices[rng.permutation(n)]
        else:
            keys = list(self.keys)
            chosen = rng.integers(0, len(keys), size=n)
            picks = np.array([self.keys[keys[k]][rng.integers(0, len(self.keys[keys[k]]))] for k in chosen])
        return [self._with_prompt(int(i), rng) for i in picks]

    def _with_prompt(self, i: int, rng: np.random.Generator) -> Item:
        speaker = int(self.ds.columns["speaker"][i])
        others = self.by_speaker[speaker]
        others = others[others != i]
        similar = [
            int(j) for j in self.ds.similar(i) if j != i and self.in_split[j]
        ]  # same speaker by design
        if similar and rng.random() < self.cfg.similar_prompt_prob:
            p = similar[int(rng.integers(0, len(similar)))]
        elif len(others):
            p = int(others[rng.integers(0, len(others))])
        else:
            p = i
        lo, hi = self.cfg.prompt_duration
        want = round(rng.uniform(lo, hi) * self.frame_rate)
        total = int(self.frames[p])
        length = min(want, total)
        start = int(rng.integers(0, total - length + 1))
        return Item(i, p, start, length)

    def _batches(self, items: list[Item], rng: np.random.Generator | None = None) -> list[list[Item]]:
        """Cut the epoch's items into batches. With `data.bucket`, items are sorted by length within windows
        of 50 batches first (so a batch holds similar lengths and little padding), then the batches are
        shuffled, so the order of lengths stays random."""
        if self.cfg.bucket and rng is not None:
            window = 50 * max(self.cfg.batch_size, 1)
            cost = lambda it: int(self.frames[it.index] + it.prompt_frames)  # noqa: E731
            items = [
                it for s in range(0, len(items), window) for it in sorted(items[s : s + window], key=cost)
            ]
        out: list[list[Item]] = []
        cur: list[Item] = []
        tokens = 0
        for it in items:
            cost = int(self.frames[it.index] + it.prompt_frames + self.text_len[it.index] + 6)
            full = (
                len(cur) >= self.cfg.batch_size
                if self.cfg.max_tokens <= 0
                else cur and tokens + cost > self.cfg.max_tokens
            )
            if full:
                out.append(cur)
                cur, tokens = [], 0
            cur.append(it)
            tokens += cost
        if cur:
            out.append(cur)
        if self.cfg.bucket and rng is not None:
            out = [out[i] for i in rng.permutation(len(out))]
        # every rank gets the same number of batches: drop the remainder
        usable = len(out) - len(out) % self.world
        return out[self.rank : usable : self.world]

    def epoch_batches(self) -> list[list[Item]]:
        """This rank's batches of the current epoch (a pure function of seed and epoch)."""
        batches = self._batches(self._order(self.epoch), np.random.default_rng([self.seed, self.epoch, 1]))
        if not batches:
            raise DatasetError("the dataset is too small for one batch per process", "lower data.batch_size")
        return batches


def load_item(ds: Dataset, item: Item) -> dict:
    """Read what one `Item` needs from disk: phonemes with BOS/EOS, prompt and response codes (long), and
    the phoneme durations when the dataset has them."""
    from valle_cli.text.symbols import BOS, EOS

    ph = ds.phonemes(item.index).astype(np.int64)
    bos, eos = ds.header["symbols"]["symbols"].index(BOS), ds.header["symbols"]["symbols"].index(EOS)
    codes = ds.codes(item.index).astype(np.int64)
    durations = ds.phoneme_durations(item.index)
    prompt = ds.codes(item.prompt_index).astype(np.int64)[
        :, item.prompt_start : item.prompt_start + item.prompt_frames
    ]
    return {
        "phonemes": torch.from_numpy(np.concatenate([[bos], ph, [eos]])),
        "prompt": torch.from_numpy(np.ascontiguousarray(prompt)),
        "response": torch.from_numpy(codes),
        "language": int(ds.columns["language"][item.index]),
        "uid": ds.uid(item.index),
        "durations": None if durations is None else torch.from_numpy(durations),  # BOS + phonemes + EOS
    }


class _EpochBatches(torch.utils.data.Dataset):
    """Map-style view of one epoch's batches, loaded in DataLoader workers."""

    def __init__(self, path, batches: list[list[Item]]):
        self.path, self.batches, self.ds = path, batches, None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> list[dict]:
        if self.ds is None:
            from valle_cli.data.dataset import open_dataset

            self.ds = open_dataset(self.path)
        return [load_item(self.ds, it) for it in self.batches[k]]


def _shield_worker(_: int) -> None:
    """In each loader worker: leave the trainer's process group, so Ctrl-C in a terminal or a SIGTERM to the
    group (timeout, Slurm) reaches only the trainer, which saves and then stops its workers; a worker killed
    first would take the run down with "DataLoader worker exited unexpectedly". A worker still notices a
    trainer that died (PyTorch's watchdog) and exits."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_stream(ds: Dataset, sampler: Sampler, workers: int = 0) -> Iterator[list[dict]]:
    """Loaded batches, forever, in the sampler's order, from its saved position on. The sampler's position
    advances as batches are consumed here, so its state_dict is exact even while workers read ahead."""
    while True:
        batches = sampler.epoch_batches()
        todo = range(sampler.position, len(batches))
        if workers <= 0:
            source = ([load_item(ds, it) for it in batches[k]] for k in todo)
        else:
            # spawned, not forked: a fork while another thread (the trainer's stdin reader) holds a lock can
            # deadlock the child (CPython's multiprocessing closes stdin in it); a fresh interpreter cannot
            source = torch.utils.data.DataLoader(
                _EpochBatches(ds.path, batches),
                sampler=list(todo),
                batch_size=None,
                num_workers=workers,
                multiprocessing_context="spawn",
                worker_init_fn=_shield_worker,
            )
        for loaded in source:
            sampler.position += 1
            yield loaded
        sampler.epoch, sampler.position = sampler.epoch + 1, 0
