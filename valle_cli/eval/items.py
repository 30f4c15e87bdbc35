"""What `valle eval` synthesizes: (voice, text, prompt clip, other clips of the voice, ground truth).

- From files: `--texts FILE` (one held-out sentence per line) and `--refs DIR` laid out as DIR/VOICE/*.wav,
  each clip optionally with a same-named .txt transcript. A clip whose transcript is the sentence is that
  sentence's ground truth in that voice; the prompt is another clip of the voice (rotating over the clips),
  and the remaining clips are what the output's voice is compared with (never the prompt, never the truth).
- From a prepared dataset: its utterances (decoded from their codes: the ground truth as the codec gives it,
  the best a model can do) with prompts and comparison clips from the same speaker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from valle_cli.eval.judges import EvalError
from valle_cli.metrics import normalize_text

MAX_OTHERS = 5


@dataclass
class Item:
    voice: str
    text: str
    prompt: Path
    others: list[Path] = field(default_factory=list)
    truth: Path | None = None


def read_texts(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(
            f"cannot read {path}: {exc}", "give a UTF-8 text file, one sentence per line"
        ) from None
    texts = [line for line in lines if line and not line.startswith("#")]
    if not texts:
        raise EvalError(f"{path} holds no sentences", "one sentence per line")
    return texts


def _clips(folder: Path) -> list[tuple[Path, str | None]]:
    from valle_cli.audio.io import supported_extensions

    exts = set(supported_extensions())
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in exts:
            txt = p.with_suffix(".txt")
            out.append((p, txt.read_text(encoding="utf-8").strip() if txt.is_file() else None))
    return out


def _voice_clips(folder: Path) -> dict[str, list[tuple[Path, str | None]]]:
    """{voice: [(clip, transcript or None)]} of DIR/VOICE/*.wav (+ .txt beside each clip), or of the
    voices/{group}/{speaker}/ layout `valle prepare` reads (voice "group/speaker", with every transcript form
    prepare knows: .txt or .lab beside the clip, metadata.csv, transcripts.tsv, ...)."""
    folder = Path(folder)
    subs = (
        sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if folder.is_dir()
        else []
    )
    if subs and not any(_clips(d) for d in subs):  # no clips one level down: {group}/{speaker}/
        from valle_cli.errors import ValleError
        from valle_cli.prepare.discover import discover

        out: dict[str, list[tuple[Path, str | None]]] = {}
        try:
            for src in discover(folder):
                out.setdefault(f"{src.group}/{src.speaker}", []).append((src.path, src.text))
        except ValleError as exc:
            raise EvalError(exc.message, exc.remedy) from None
        return out
    return {d.name: _clips(d) for d in subs}


def voices(folder: Path) -> dict[str, list[Path]]:
    """DIR/VOICE/*.wav or DIR/{group}/{speaker}/ -> {voice: clips} (impostor voices)."""
    return {name: [p for p, _ in clips] for name, clips in _voice_clips(folder).items() if clips}


def from_refs(texts: list[str], refs: Path) -> list[Item]:
    refs = Path(refs)
    voices = _voice_clips(refs)
    if not voices:
        raise EvalError(
            f"{refs} has no voice folders",
            "lay references out as DIR/VOICE/*.wav (+ .txt transcripts), or as valle prepare's "
            "DIR/{group}/{speaker}/",
        )
    items = []
    for name, clips in voices.items():
        folder = refs / name
        if not clips:
            raise EvalError(f"{folder} holds no audio clips")
        by_text = {" ".join(normalize_text(t)): p for p, t in clips if t}
        for k, text in enumerate(texts):
            truth = by_text.get(" ".join(normalize_text(text)))
            candidates = [p for p, _ in clips if p != truth]
            if not candidates:
                raise EvalError(f"{folder} has no clip to use as a prompt for {text!r}", "add another clip")
            prompt = candidates[k % len(candidates)]
            others = [p for p in candidates if p != prompt][:MAX_OTHERS]
            items.append(Item(name, text, prompt, others, truth))
    return items


def from_dataset(path: Path, limit: int, work: Path) -> list[Item]:
    """Up to `limit` utterances (spread over speakers), decoded to WAV files under `work`."""
    import torch

    from valle_cli.audio.io import save_audio
    from valle_cli.codecs.base import codec_from_header
    from valle_cli.data.dataset import open_dataset

    ds = open_dataset(path)
    try:
        by_speaker: dict[str, list[int]] = {}
        for i in range(len(ds)):
            by_speaker.setdefault(ds.speaker(i), []).append(i)
        speakers = {s: list(idx) for s, idx in by_speaker.items() if len(idx) >= 2}  # copies: popped below
        if not speakers:
            raise EvalError(
                f"{path} has no speaker with two utterances", "a prompt must differ from the target"
            )
        order = []  # round-robin over speakers
        while len(order) < limit and any(speakers.values()):
            for s in list(speakers):
                if speakers[s] and len(order) < limit:
                    order.append((s, speakers[s].pop(0)))
        codec = codec_from_header(ds.header["codec"], "cpu")
        work.mkdir(parents=True, exist_ok=True)
        decoded: dict[int, Path] = {}

        def wav(i: int) -> Path:
            if i not in decoded:
                with torch.inference_mode():
                    audio = codec.decode(torch.as_tensor(ds.codes(i), dtype=torch.long)[None])[0, 0]
                decoded[i] = save_audio(
                    work / f"{ds.uid(i).replace('/', '__')}.wav", audio, codec.sample_rate
                )
            return decoded[i]

        items = []
        for speaker, i in order:
            rest = [j for j in by_speaker[speaker] if j != i]
            prompt = rest[len(items) % len(rest)]
            others = [j for j in rest if j != prompt][:MAX_OTHERS]
            items.append(Item(speaker, ds.meta(i).text, wav(prompt), [wav(j) for j in others], wav(i)))
        return items
    finally:
        ds.close()
