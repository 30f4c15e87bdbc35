"""`valle eval`: the metric math on known inputs, the judges on real speech, and a whole run on a tiny model
(report structure: per voice and overall, ground-truth ceilings, the model's own stt, impostor voices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from valle_cli.eval.items import from_refs, read_texts
from valle_cli.eval.judges import EvalError
from valle_cli.eval.report import markdown
from valle_cli.eval.run import Report, Scored, summarize
from valle_cli.metrics import cosine, word_errors

from .conftest import needs_espeak

SENTENCES = ["The cat sat on the warm mat.", "We walked home before the rain.", "Open the window, please."]


def row(voice, errors, words, sim, truth_errors=None, truth_sim=None, closest=None):
    return Scored(voice, "t", "h", errors, words, sim, 2.0, 1.0, "h" if truth_errors is not None else None,
                  truth_errors, truth_sim, None, None, closest)  # fmt: skip


def test_metric_math_on_known_inputs():
    assert word_errors("Open the window, please.", "open the window please") == (0, 4)
    assert word_errors("the cat sat", "the bat sat down") == (2, 3)
    v = np.array([0.3, -1.0, 2.0])
    assert cosine(v, v) == pytest.approx(1.0) and cosine(v, -v) == pytest.approx(-1.0)
    rows = [row("a", 1, 4, 0.8, 0, 0.9, True), row("a", 3, 6, 0.6, 1, 0.7, False), row("b", 0, 5, 0.5)]
    s = summarize(rows)
    assert s.n == 3 and s.wer == pytest.approx(4 / 15)  # corpus WER: errors over words
    assert s.truth_wer == pytest.approx(1 / 10)  # over the items that have a ground truth
    assert s.similarity == pytest.approx(0.6333, abs=1e-4) and s.truth_similarity == pytest.approx(0.8)
    assert s.closest_to_own == pytest.approx(0.5) and s.rtf == pytest.approx(0.5) and s.per is None
    report = Report("m", "asr", "ver", s, {"a": summarize(rows[:2]), "b": summarize(rows[2:])}, rows)
    md = markdown(report, "valle eval m")
    assert "| **all** | 3 | 26.7% | 10.0% | 0.633 | 0.800 | 50% | 100% | 0.50 |" in md
    assert "| b | 1 | 0.0% | - | 0.500 | - | - | 100% | 0.50 |" in md and "PER" not in md  # no stt: no column
    assert "duration error" not in md  # no item has it
    rows[0].duration_error, rows[1].duration_error, rows[2].stopped = -0.2, 0.1, False
    s = summarize(rows)
    assert s.duration_error == pytest.approx(0.15) and s.stopped == pytest.approx(2 / 3)  # mean |error|
    assert "| duration error | stopped by itself |" in markdown(Report("m", "a", "v", s, {}, rows))
    assert json.loads(json.dumps(report.to_dict()))["voices"]["a"]["n"] == 2


def voices(root, spec: dict[str, str], texts: list[str]):
    from valle_cli.audio.speech import say

    for name, voice in spec.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i, text in enumerate(texts):
            wav, sr = say(text, voice, speed=165)
            sf.write(folder / f"{i}.wav", wav, sr)
            (folder / f"{i}.txt").write_text(text)
    return root


@needs_espeak
def test_items_pair_prompts_truths_and_other_clips(tmp_path):
    refs = voices(tmp_path / "refs", {"ann": "espeak:en-us+f3"}, SENTENCES)
    (tmp_path / "texts.txt").write_text(
        "# held out\nThe cat sat on the warm mat.\nSomething never recorded.\n"
    )
    items = from_refs(read_texts(tmp_path / "texts.txt"), refs)
    assert [i.text for i in items] == ["The cat sat on the warm mat.", "Something never recorded."]
    first, second = items
    assert first.truth.name == "0.wav" and first.prompt != first.truth and first.truth not in first.others
    assert first.prompt not in first.others and second.truth is None and len(second.others) == 2
    with pytest.raises(EvalError, match="no voice folders"):
        from_refs(["x"], tmp_path / "texts.txt")


@needs_espeak
def test_refs_may_use_the_layout_prepare_reads(tmp_path):
    """`--refs voices/` on valle prepare's voices/{group}/{speaker}/ layout: voices are group/speaker, and
    transcripts come from any form prepare reads (here .lab files beside the clips)."""
    from valle_cli.eval.items import voices as impostor_voices

    refs = voices(
        tmp_path / "voices" / "robots", {"ann": "espeak:en-us+f3", "bob": "espeak:en-us+m3"}, SENTENCES
    )
    for txt in refs.rglob("*.txt"):
        txt.rename(txt.with_suffix(".lab"))
    items = from_refs(["The cat sat on the warm mat."], tmp_path / "voices")
    assert [i.voice for i in items] == ["robots/ann", "robots/bob"]
    assert all(i.truth is not None and i.truth.name == "0.wav" and i.prompt != i.truth for i in items)
    assert sorted(impostor_voices(tmp_path / "voices")) == ["robots/ann", "robots/bob"]


@needs_espeak
def test_resemblyzer_judges_same_and_different_voices():
    from valle_cli.audio.speech import say
    from valle_cli.eval.judges import build_verifier

    judge = build_verifier("resemblyzer")
    a, sr = say(SENTENCES[0], "espeak:en-us+f3")
    b, _ = say(SENTENCES[1], "espeak:en-us+f3")
    c, sr2 = say(SENTENCES[1], "espeak:en-gb+m3")
    same_audio = cosine(judge.embed(a, sr), judge.embed(a.copy(), sr))
    same_voice = cosine(judge.embed(a, sr), judge.embed(b, sr))
    other_voice = cosine(judge.embed(a, sr), judge.embed(c, sr2))
    assert same_audio == pytest.approx(1.0, abs=1e-5)
    assert same_voice > other_voice


@needs_espeak
def test_eval_a_tiny_model_end_to_end(tiny_model, pocketsphinx_site, tmp_path):
    refs = voices(tmp_path / "refs", {"ann": "espeak:en-us+f3", "bo": "espeak:en-gb+m3"}, SENTENCES)
    impostors = voices(tmp_path / "imp", {"cy": "espeak:en-us+m7"}, SENTENCES[:1])
    (tmp_path / "texts.txt").write_text("We walked home before the rain.\nA sentence nobody recorded.\n")
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli", "eval", str(tiny_model), "--texts", str(tmp_path / "texts.txt"),
         "--refs", str(refs), "--impostors", str(impostors), "--transcriber", "pocketsphinx",
         "--verifier", "resemblyzer", "--device", "cpu", "-o", str(out)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(pocketsphinx_site)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["transcriber"] == "pocketsphinx" and report["verifier"] == "resemblyzer"
    assert report["overall"]["n"] == 4 and set(report["voices"]) == {"ann", "bo"}
    items = report["items"]
    assert [i["truth_errors"] is not None for i in items] == [
        True,
        False,
        True,
        False,
    ]  # truth where recorded
    for i in items:
        assert i["errors"] >= 0 and i["words"] > 0 and -1 <= i["similarity"] <= 1 and i["audio_seconds"] > 0
        assert i["phonemes"] > 0 and i["closest_to_own"] in (True, False)  # stt model: PER; impostors given
        assert (out / "audio" / i["output"]).is_file()
    assert report["overall"]["per"] is not None and report["overall"]["rtf"] > 0
    # free-running duration error where there is a ground truth; whether the AR stopped by itself
    assert [i["duration_error"] is not None for i in items] == [i["truth_errors"] is not None for i in items]
    assert report["overall"]["duration_error"] >= 0 and 0 <= report["overall"]["stopped"] <= 1
    md = (out / "report.md").read_text()
    assert "| voice | n | WER | WER, ground truth | SIM | SIM, ground truth | PER" in md and "| ann |" in md
    assert "Command: `valle eval" in md


def test_eval_needs_one_source(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli", "eval", "x", "--texts", str(tmp_path / "t.txt")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0 and "give either --texts FILE and --refs DIR, or --dataset DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_speaker_encoder_loads_without_a_deprecation_warning():
    """resemblyzer's webrtcvad imports pkg_resources, whose deprecation warning leaked into `valle eval`."""
    pytest.importorskip("resemblyzer")
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", "from valle_cli.eval.judges import Resemblyzer; Resemblyzer()"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pkg_resources" not in proc.stderr


def test_a_ground_truth_of_minutes_is_refused_before_any_synthesis(tmp_path):
    """A truth file is read whole by the judges: one of minutes is refused from its header, before the model,
    the recognizer or the speaker encoder is touched (all None here)."""
    from valle_cli.eval.items import Item
    from valle_cli.eval.run import MAX_TRUTH_SECONDS, evaluate

    long = tmp_path / "long.flac"
    sf.write(long, np.zeros(int(8000 * (MAX_TRUTH_SECONDS + 5)), np.float32), 8000)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(8000, np.float32), 8000)
    items = [Item("v", "one", short, truth=short), Item("v", "two", short, truth=long)]
    with pytest.raises(EvalError, match=r"long\.flac is 125 s long.*at most 120 s") as exc:
        evaluate(None, items, None, None)
    assert "its own recording" in exc.value.remedy
