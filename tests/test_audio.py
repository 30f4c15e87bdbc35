"""Audio front end: formats, rates, channels, resampling quality, and every bad-file case."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from valle_cli.audio.io import load_audio, resample, save_audio, supported_extensions
from valle_cli.errors import AudioError


def tone(freq: float, sr: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spec) * sr / len(wav))


@pytest.mark.parametrize("sr", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_any_rate_is_resampled_keeping_pitch_and_level(tmp_path, sr):
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, tone(440.0, sr), sr)
    wav = load_audio(path, 24_000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 24_000) <= 2
    assert abs(dominant_freq(wav, 24_000) - 440.0) < 2.0
    mid = wav[2000:-2000]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_downsampling_removes_content_above_nyquist(tmp_path):
    sr = 48_000
    path = tmp_path / "hi.wav"
    sf.write(path, tone(440.0, sr) + tone(15_000.0, sr), sr)  # 15 kHz cannot exist at 24 kHz
    wav = load_audio(path, 24_000)
    spec = np.abs(np.fft.rfft(wav))
    freqs = np.fft.rfftfreq(len(wav), 1 / 24_000)
    assert spec[freqs > 11_000].max() < 0.01 * spec.max()  # no aliasing back into the band


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(300.0, 24_000), tone(500.0, 24_000)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 24_000)
    wav = load_audio(path, 24_000)
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-4)


@pytest.mark.parametrize("ext, fmt, subtype", [(".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS")])
def test_compressed_formats(tmp_path, ext, fmt, subtype):
    path = tmp_path / f"x{ext}"
    sf.write(path, tone(440.0, 16_000), 16_000, format=fmt, subtype=subtype)
    wav = load_audio(path, 24_000)
    assert abs(dominant_freq(wav, 24_000) - 440.0) < 2.0


def test_mp3_where_libsndfile_supports_it(tmp_path):
    if ".mp3" not in supported_extensions():
        pytest.skip("this libsndfile has no MP3 support")
    path = tmp_path / "x.mp3"
    sf.write(path, tone(440.0, 24_000, 2.0), 24_000, format="MP3", subtype="MPEG_LAYER_III")
    wav = load_audio(path, 24_000)
    assert abs(dominant_freq(wav[4000:-4000], 24_000) - 440.0) < 3.0


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "nope.wav", 24_000)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(path, 24_000)


def test_header_without_samples(tmp_path):
    path = tmp_path / "nosamples.wav"
    sf.write(path, np.zeros(0, np.float32), 24_000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(path, 24_000)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage that is not audio" * 3)
    with pytest.raises(AudioError) as info:
        load_audio(path, 24_000)
    assert "cannot read" in info.value.message and "corrupt" in info.value.remedy


def test_truncated_flac(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, tone(440.0, 24_000, 3.0), 24_000, format="FLAC")
    data = path.read_bytes()
    path.write_bytes(data[:60])  # header cut mid-way
    with pytest.raises(AudioError, match="cannot read|no samples"):
        load_audio(path, 24_000)


def test_silent_file(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(24_000, np.float32), 24_000)
    with pytest.raises(AudioError, match="silent"):
        load_audio(path, 24_000)
    assert load_audio(path, 24_000, allow_silent=True).shape == (24_000,)


def test_too_short(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, tone(440.0, 24_000, 0.5), 24_000)
    with pytest.raises(AudioError, match=r"0\.50 s long; at least 3\.00 s"):
        load_audio(path, 24_000, min_duration=3.0)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(AudioError, match="is a folder"):
        load_audio(tmp_path, 24_000)


def test_save_round_trip_and_atomicity(tmp_path):
    wav = tone(440.0, 24_000)
    out = save_audio(tmp_path / "out.wav", wav, 24_000)
    back = load_audio(out, 24_000)
    np.testing.assert_allclose(back, wav, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temporary files left behind


def test_save_clips_and_accepts_tensors(tmp_path):
    import torch

    out = save_audio(tmp_path / "loud.wav", torch.full((1, 100), 3.0), 24_000)
    assert sf.read(out)[0].max() <= 1.0


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        save_audio(tmp_path / "no" / "such" / "out.wav", tone(440.0, 24_000), 24_000)


def test_resample_identity():
    x = tone(100.0, 16_000)
    assert resample(x, 16_000, 16_000) is x


def test_save_one_sample_and_unsupported_extension(tmp_path):
    assert sf.read(save_audio(tmp_path / "one.wav", np.array([0.5], np.float32), 24_000))[0].size == 1
    with pytest.raises(AudioError, match=r"not \.mp3"):
        save_audio(tmp_path / "x.mp3", tone(440.0, 24_000), 24_000)
    assert not (tmp_path / "x.mp3").exists()


def test_save_over_a_folder(tmp_path):
    (tmp_path / "d.wav").mkdir()
    with pytest.raises(AudioError, match="it is a folder"):
        save_audio(tmp_path / "d.wav", tone(440.0, 24_000), 24_000)


@pytest.mark.skipif(__import__("shutil").which("sox") is None, reason="sox not installed")
def test_a_file_whose_header_has_no_length_is_refused_with_the_remedy(tmp_path):
    """A FLAC written to a pipe has total_samples 0: libsndfile then reports about 2**63 frames and cannot
    seek. Every reader refuses it by name (not "384307168202282 s long", not a seek error)."""
    import subprocess

    from valle_cli.audio.io import audio_seconds

    path = tmp_path / "piped.flac"
    with open(path, "wb") as out:
        sox = subprocess.Popen(["sox", "-n", "-r", "24000", "-c", "1", "-t", "flac", "-", "synth", "2", "sine", "440"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        out.write(sox.stdout.read())
        assert sox.wait(timeout=60) == 0
    for read in (lambda: audio_seconds(path), lambda: load_audio(path, 24_000, end=1.0)):
        with pytest.raises(AudioError, match="does not say how long it is") as exc:
            read()
        assert "sox piped.flac fixed.flac" in exc.value.remedy
