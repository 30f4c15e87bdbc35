"""`valle synth` with a model trained here (the try-me model): memorized text comes back at its length, lines
join into one file, bad input gets one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from .conftest import needs_espeak

pytestmark = needs_espeak
TEXT = "The little boat sailed across the calm blue water."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from valle_cli.train.tryme import try_me

    out = tmp_path_factory.mktemp("tryme")
    report = try_me(out, TEXT, steps=400)
    assert min(report.level_match) > 0.95
    return out, report


def synth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "synth", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
    )


def test_synth_speaks_the_memorized_sentence(trained, tmp_path):
    out, report = trained
    ref = out / "voices" / "try-me" / "speaker" / "utterance.wav"
    wav_path = tmp_path / "a.wav"
    proc = synth(TEXT, "--ref", str(ref), "--model", str(out / "run"), "--ar-temp", "0", "-o", str(wav_path))
    assert proc.returncode == 0, proc.stderr
    wav, sr = sf.read(wav_path)
    assert sr == 24_000 and abs(len(wav) / sr - report.frames / 75) < 0.05  # the utterance's own length
    assert "hit --max-ar-steps" not in proc.stderr
    two = tmp_path / "two.wav"
    proc = synth(
        f"{TEXT}\\n{TEXT}", "--ref", str(ref), "--model", str(out / "run"), "--ar-temp", "0", "-o", str(two)
    )  # a typed \n, what bash passes for "a\nb": a line break
    assert proc.returncode == 0, proc.stderr
    both, _ = sf.read(two)
    assert "2 line(s)" in proc.stderr
    assert abs(len(both) - (2 * len(wav) + 0.25 * sr)) < 10  # both lines and one gap, in one file
    np.testing.assert_allclose(both[: len(wav)], wav, atol=1e-3)


@pytest.mark.parametrize("dtype", ["int8", "int4", "bf16"])
def test_lighter_weights_speak_the_memorized_sentence_too(trained, tmp_path, dtype):
    out, report = trained
    ref = out / "voices" / "try-me" / "speaker" / "utterance.wav"
    wav_path = tmp_path / "a.wav"
    proc = synth(TEXT, "--ref", str(ref), "--model", str(out / "run"), "--ar-temp", "0", "--dtype", dtype,
                 "-o", str(wav_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    wav, sr = sf.read(wav_path)
    assert abs(len(wav) / sr - report.frames / 75) < 0.05  # stopped where the fp32 model stops


@pytest.mark.parametrize(
    "args, message",
    [
        (["   ", "--ref", "REF"], "the text is empty"),
        (["Bonjour", "-l", "fr", "--ref", "REF"], "not trained on language 'fr'"),
        (["!!! ...", "--ref", "REF"], "no pronounceable words"),
        (["Hello", "--ref", "REF", "--stream", "-o", "OUT.mp3"], "unknown audio format"),
        (["Hello", "--ref", "REF", "--input-prompt-length", "0"], "must be positive"),
        (["Hello", "--ref", "REF", "--input-prompt-length", "nan"], "must be positive"),
        (["Hello", "--ref", "REF", "--input-prompt-length", "7200"], "more than this model's context holds"),
        (["Hello", "--prompt-text", "Hi."], "needs a reference clip"),
        (["Hello", "--ref", "REF", "--stream", "--beam-width", "2"], "cannot use beam search"),
        (["Hello", "--ref", "SHORT"], "at least 1 s is needed"),
        (["Hello", "--ref", "REF", "-o", "/no/such/folder/x.wav"], "does not exist"),
        (["Hello", "--ref", "/no/such.wav"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(trained, tmp_path, args, message):
    out, _ = trained
    ref = out / "voices" / "try-me" / "speaker" / "utterance.wav"
    short = tmp_path / "short.wav"
    sf.write(short, (np.sin(np.arange(6000) / 10) * 0.3).astype("float32"), 24_000)
    names = {"REF": str(ref), "SHORT": str(short), "OUT.mp3": str(tmp_path / "o.mp3")}
    args = [names.get(a, a) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "o.wav")]
    proc = synth(*args, "--model", str(out / "run"))
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_reference_is_reported_before_the_model_loads(tmp_path):
    """The model named here does not exist either: the reference, checked first, is what the user hears of."""
    proc = synth(
        "Hello", "--ref", "/no/such.wav", "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "o.wav")
    )
    assert proc.returncode == 1 and "audio file /no/such.wav does not exist" in proc.stderr, proc.stderr


def ref_of(out):
    return out / "voices" / "try-me" / "speaker" / "utterance.wav"


def test_stream_writes_the_same_speech_as_whole_synthesis(trained, tmp_path):
    out, _ = trained
    whole, streamed = tmp_path / "whole.wav", tmp_path / "streamed.wav"
    common = [TEXT, "--ref", str(ref_of(out)), "--model", str(out / "run"), "--ar-temp", "0"]
    assert synth(*common, "-o", str(whole)).returncode == 0
    proc = synth(*common, "--stream", "-o", str(streamed))
    assert proc.returncode == 0, proc.stderr
    assert "first audio after" in proc.stderr
    a, _ = sf.read(whole, dtype="float32")
    b, _ = sf.read(streamed, dtype="float32")
    assert len(a) == len(b)  # the same tokens, so the same length
    from valle_cli.codecs.base import build_codec

    codec = build_codec("mel", "cpu")
    mel = lambda w: codec.log_mel(torch.from_numpy(w)[None, None])[0].numpy()  # noqa: E731
    diff = np.abs(mel(a) - mel(b)).mean(1)  # per frame, nats
    assert np.median(diff) < 0.15 and diff.mean() < 0.3, (np.median(diff), diff.mean())


def test_the_later_samplers_run_from_the_command_line(trained, tmp_path):
    out, _ = trained
    wav = tmp_path / "s.wav"
    proc = synth(TEXT, "--ref", str(ref_of(out)), "--model", str(out / "run"), "--ar-temp", "0.9", "--seed", "1",
                 "--top-nsigma", "2", "--entropix", "-o", str(wav))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sf.info(str(wav)).duration > 0.1


def test_continuing_the_prompt_speaks_the_rest(trained, tmp_path):
    """Continuation: given the start of the utterance as the response prefix, the model that memorized it says
    exactly the rest, at every RVQ level (the prefix's own codes stay fixed in the NAR passes)."""
    from valle_cli.audio.io import load_audio
    from valle_cli.infer.engine import SamplingConfig, generate
    from valle_cli.infer.load import load_model
    from valle_cli.infer.synth import model_codec
    from valle_cli.text import phonemize
    from valle_cli.text.symbols import SymbolMap

    out, report = trained
    loaded = load_model(out / "run")
    codec = model_codec(loaded.meta, loaded.model, "cpu")
    codes = codec.encode(torch.from_numpy(load_audio(ref_of(out), 24_000))[None, None])[0]
    phonemes = torch.tensor(SymbolMap.from_dict(loaded.meta["symbols"]).encode(phonemize(TEXT, "en")))
    rest = generate(
        loaded.model, phonemes, codes, sampling=SamplingConfig(ar_temp=0.0), prefix=codes[:, :120]
    )
    assert rest.stopped and rest.codes.shape[1] == report.frames - 120
    assert (rest.codes == codes[:, 120:]).float().mean() > 0.95
    o = tmp_path / "rest.wav"
    proc = synth(
        TEXT, "--ref", str(ref_of(out)), "--model", str(out / "run"), "--ar-temp", "0",
        "--input-prompt-prefix", "-o", str(o),
    )  # fmt: skip
    # the whole clip is the prefix: nothing is left to say, and the model knows it
    assert proc.returncode == 1 and "produced no audio" in proc.stderr


def test_batch_file_beam_search_and_random_voice(trained, tmp_path):
    out, report = trained
    lines = tmp_path / "lines.txt"
    lines.write_text(f"{TEXT}\n\n{TEXT}\n")
    proc = synth(
        "--batch", str(lines), "--ref", str(ref_of(out)), "--model", str(out / "run"), "--ar-temp", "0",
        "--batch-size", "2", "-o", str(tmp_path / "many"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = sorted((tmp_path / "many").glob("*.wav"))
    assert [f.name for f in files] == ["0001.wav", "0002.wav"]
    for f in files:
        wav, sr = sf.read(f)
        assert abs(len(wav) / sr - report.frames / 75) < 0.05
    assert "hit --max-ar-steps" not in proc.stderr
    capped = synth(
        "--batch", str(lines), "--ref", str(ref_of(out)), "--model", str(out / "run"), "--ar-temp", "0",
        "--max-ar-steps", "10", "-o", str(tmp_path / "capped"),
    )  # fmt: skip
    assert capped.returncode == 0 and "2 line(s) hit --max-ar-steps (line 1, 2)" in capped.stderr, (
        capped.stderr
    )
    beam = tmp_path / "beam.wav"
    proc = synth(
        TEXT, "--ref", str(ref_of(out)), "--model", str(out / "run"), "--beam-width", "3", "-o", str(beam)
    )
    assert proc.returncode == 0, proc.stderr
    wav, sr = sf.read(beam)
    assert abs(len(wav) / sr - report.frames / 75) < 0.05  # the memorized sequence is also the likeliest
    rolled = tmp_path / "rolled.wav"
    proc = synth(
        f"{TEXT} {TEXT}\n{TEXT}", "--ref", str(ref_of(out)), "--model", str(out / "run"), "--ar-temp", "0",
        "--split-sentences", "--rolling-context", "--max-ar-steps", "300", "-o", str(rolled),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 line(s) in 3 segments" in proc.stderr and sf.info(rolled).duration > 2 * 0.25
    rnd = tmp_path / "random.wav"
    proc = synth(TEXT, "--model", str(out / "run"), "--seed", "1", "--max-ar-steps", "150", "-o", str(rnd))
    assert proc.returncode == 0, proc.stderr
    assert "random voice" in proc.stderr and sf.info(rnd).duration > 0


def test_play_fails_clearly_without_an_output_device(trained, tmp_path):
    from valle_cli.audio.play import check_output_device
    from valle_cli.errors import AudioError

    out, _ = trained
    try:
        check_output_device()
    except AudioError:
        proc = synth(
            TEXT,
            "--ref",
            str(ref_of(out)),
            "--model",
            str(out / "run"),
            "--play",
            "-o",
            str(tmp_path / "p.wav"),
        )
        assert (
            proc.returncode == 1
            and "no audio output device" in proc.stderr
            and "Traceback" not in proc.stderr
        )


def test_stt_reads_back_the_phonemes(trained, tmp_path):
    """A model trained on the stt task transcribes the utterance it learned; one trained without it is refused."""
    from valle_cli.config import load_config
    from valle_cli.text import phonemize
    from valle_cli.train.trainer import Trainer
    from valle_cli.train.tryme import SETTINGS

    out, _ = trained
    cfg = load_config(
        "tiny",
        [
            f"data.paths=[{out / 'dataset'}]",
            "train.steps=250",
            "data.max_duration=30",
            *SETTINGS,
            "train.stt_prob=1",
        ],
    )
    Trainer(cfg, tmp_path / "stt-run", lambda kind, payload: None).train()
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "stt", str(ref_of(out)), "--model", str(tmp_path / "stt-run")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import difflib

    want = phonemize(TEXT, "en")
    assert difflib.SequenceMatcher(None, proc.stdout.strip(), want).ratio() > 0.9, (proc.stdout, want)
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "stt", str(ref_of(out)), "--model", str(out / "run")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 1 and "not trained for speech-to-text" in proc.stderr


def test_continuation_uses_the_whole_reference_once(trained):
    """--prompt-text: every segment continues the whole (untrimmed) reference; --input-prompt-prefix: only the
    first segment, whose text holds the transcript; with --split-sentences it is refused."""
    from valle_cli.errors import TextError
    from valle_cli.infer.load import load_model
    from valle_cli.infer.synth import Segment, SynthOptions, _Speaker

    out, report = trained
    loaded = load_model(out / "run")
    seg = [Segment(TEXT, 0, 0.25), Segment("And then some.", 1, 0.0)]
    sp = _Speaker(loaded, [ref_of(out)], SynthOptions(prompt_text=TEXT, prompt_seconds=1.0), "cpu")
    assert sp.prompt.shape[1] == 75  # the prompt slot is trimmed to 1 s ...
    for i, s in enumerate(seg):
        req = sp.request(s, first=i == 0)
        assert req.prefix_frames == report.frames  # ... the continued reference is all of it
    sp = _Speaker(loaded, [ref_of(out)], SynthOptions(prompt_prefix=True), "cpu")
    assert sp.request(seg[0], first=True).prefix_frames == report.frames
    assert sp.request(seg[1], first=False).prefix is None
    with pytest.raises(TextError, match="--prompt-text instead"):
        _Speaker(loaded, [ref_of(out)], SynthOptions(prompt_prefix=True, split_sentences=True), "cpu")


def test_a_prompt_under_a_second_is_cut_from_a_longer_reference(trained, tmp_path):
    """Only the prompt's seconds of a reference are decoded, but the 1-second minimum is the clip's."""
    out, _ = trained
    proc = synth("Hello there.", "--ref", str(ref_of(out)), "--input-prompt-length", "0.5",
                 "-o", str(tmp_path / "o.wav"), "--model", str(out / "run"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sf.info(str(tmp_path / "o.wav")).frames > 0


def test_stt_names_a_missing_file_before_loading_a_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "stt", str(tmp_path / "nope.wav"), "--model", str(tmp_path / "no-run")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 1 and "nope.wav" in proc.stderr and "no-run" not in proc.stderr, proc.stderr
