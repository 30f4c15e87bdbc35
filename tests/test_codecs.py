"""Codecs: the protocol (shapes, alignment, batching), EnCodec and Vocos with random weights and their offline
messages, and the offline mel codec (shipped codebooks, round-trip fidelity, fitting, file checks).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from valle_cli.codecs.base import build_codec
from valle_cli.config import CodecConfig
from valle_cli.errors import CodecError, PluginError


@pytest.fixture(scope="module")
def encodec():
    from valle_cli.codecs.encodec_codec import EncodecCodec

    return EncodecCodec(6.0, pretrained=False)


@pytest.fixture(scope="module")
def vocos():
    from valle_cli.codecs.vocos_codec import VocosCodec

    return VocosCodec(6.0, pretrained=False)


@pytest.fixture(scope="module")
def mel():
    return build_codec(CodecConfig(name="mel"), device="cpu")


@pytest.fixture(params=["encodec", "vocos", "mel"])
def codec(request):
    return request.getfixturevalue(request.param)


def test_declared_rates(codec):
    assert codec.sample_rate == 24_000
    assert codec.frame_rate == 75.0
    assert codec.hop_length * codec.frame_rate == codec.sample_rate
    assert codec.n_codebooks == 8 and codec.codebook_size == 1024


@pytest.mark.parametrize("n_samples", [320, 321, 24_000, 24_001, 7_777])
def test_shapes_and_frame_alignment(codec, n_samples):
    wav = torch.randn(2, 1, n_samples) * 0.1
    codes = codec.encode(wav)
    frames = -(-n_samples // 320)
    assert codes.shape == (2, 8, frames) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 1024
    out = codec.decode(codes)
    assert out.shape == (2, 1, frames * 320) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_batched_equals_one_by_one(codec, speech_24k):
    wav, _ = speech_24k
    a = torch.from_numpy(wav[:24_000].copy())
    b = torch.from_numpy(wav[12_000:30_000].copy())
    singles = [codec.encode(x[None, None])[0] for x in (a, b)]
    batched = codec.encode_list([a, b])
    for s, m in zip(singles, batched, strict=True):
        assert s.shape == m.shape
        assert (s == m).float().mean() > 0.97  # padding may flip a code at the very end of the shorter one
    decoded = codec.decode_list(batched)
    assert [d.shape[-1] for d in decoded] == [c.shape[-1] * 320 for c in batched]
    solo = codec.decode(batched[1][None])[0, 0]
    half = solo.shape[-1] // 2  # far from the padding, batching changes nothing audible
    diff, ref = decoded[1][:half] - solo[:half], solo[:half]
    # Griffin-Lim's iterations amplify the last-bit differences of batched matmuls on some CPUs (a peak of
    # 0.009 measured on one machine, 0.002 on another), so compare energies: -34 dB is far below audibility
    assert diff.pow(2).mean().sqrt() < 0.02 * ref.pow(2).mean().sqrt() and diff.abs().max() < 0.02


def test_bad_inputs(codec):
    with pytest.raises(CodecError, match="expects"):
        codec.encode(torch.zeros(24_000))
    with pytest.raises(CodecError, match="zero samples"):
        codec.encode(torch.zeros(1, 1, 0))
    with pytest.raises(CodecError, match="codes must be in"):
        codec.decode(torch.full((1, 8, 5), 1024))
    with pytest.raises(CodecError, match="RVQ levels"):
        codec.decode(torch.zeros(1, 9, 5, dtype=torch.long))


@pytest.mark.parametrize("bandwidth, levels", [(1.5, 2), (3.0, 4), (6.0, 8), (12.0, 16), (24.0, 32)])
def test_encodec_bandwidth_sets_levels(bandwidth, levels):
    from valle_cli.codecs.encodec_codec import EncodecCodec

    c = EncodecCodec(bandwidth, pretrained=False)
    assert c.n_codebooks == levels
    assert c.encode(torch.randn(1, 1, 3200) * 0.1).shape == (1, levels, 10)


def test_encodec_rejects_unknown_bandwidth():
    from valle_cli.codecs.encodec_codec import EncodecCodec

    with pytest.raises(CodecError, match="no 5.0 kbps"):
        EncodecCodec(5.0, pretrained=False)


def test_vocos_decodes_fewer_levels_than_it_has(vocos):
    codes = torch.randint(0, 1024, (1, 4, 10))
    assert vocos.decode(codes).shape == (1, 1, 3200)


def test_vocos_rejects_24kbps():
    from valle_cli.codecs.vocos_codec import VocosCodec

    with pytest.raises(CodecError, match="Vocos decodes"):
        VocosCodec(24.0, pretrained=False)


def _in_subprocess(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env={**os.environ, **env}
    )


def test_encodec_offline_message_names_file_url_and_folder(tmp_path):
    code = (
        "from valle_cli.codecs.base import build_codec\nfrom valle_cli.errors import CodecError\n"
        "try:\n    build_codec('encodec', device='cpu')\nexcept CodecError as e:\n"
        "    print('MSG', e.message); print('FIX', e.remedy)\n"
    )
    # An unreachable proxy makes the download fail at once whether or not this machine has a network.
    env = {
        "TORCH_HOME": str(tmp_path),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    proc = _in_subprocess(code, env)
    assert "MSG EnCodec weights are not downloaded" in proc.stdout, proc.stdout + proc.stderr
    assert "encodec_24khz-d7cc33bc.th" in proc.stdout
    assert "https://dl.fbaipublicfiles.com/encodec/v0/" in proc.stdout
    assert str(tmp_path / "hub" / "checkpoints") in proc.stdout
    assert "codec.name=mel" in proc.stdout


def test_encodec_truncated_weights(tmp_path):
    from valle_cli.codecs.encodec_codec import EncodecCodec

    bad = tmp_path / "encodec.th"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CodecError, match="cannot be read.*truncated"):
        EncodecCodec(6.0, path=str(bad))
    with pytest.raises(CodecError, match="do not exist"):
        EncodecCodec(6.0, path=str(tmp_path / "missing.th"))


def test_encodec_loads_weights_from_a_file(tmp_path, encodec):
    """The real loading path: a state dict file on disk -> same outputs as the model it came from."""
    from valle_cli.codecs.encodec_codec import EncodecCodec

    path = tmp_path / "encodec_24khz-d7cc33bc.th"
    torch.save(encodec.model.state_dict(), path)
    loaded = EncodecCodec(6.0, path=str(path))
    wav = torch.randn(1, 1, 4800) * 0.1
    assert torch.equal(loaded.encode(wav), encodec.encode(wav))


def test_vocos_offline_message(tmp_path):
    code = (
        "from valle_cli.codecs.vocos_codec import VocosCodec\nfrom valle_cli.errors import CodecError\n"
        "try:\n    VocosCodec(6.0, pretrained=True)\nexcept CodecError as e:\n"
        "    print('MSG', e.message); print('FIX', e.remedy)\n"
    )
    # Put EnCodec weights in place so the failure is about Vocos itself.
    from valle_cli.codecs.encodec_codec import EncodecCodec

    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(EncodecCodec(6.0, pretrained=False).model.state_dict(), ckpt / "encodec_24khz-d7cc33bc.th")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    proc = _in_subprocess(code, env)
    assert (
        "MSG Vocos weights (charactr/vocos-encodec-24khz/config.yaml) are not in the Hugging Face cache"
        in (proc.stdout)
    ), proc.stdout + proc.stderr
    assert "codec.path" in proc.stdout and "hf download charactr/vocos-encodec-24khz" in proc.stdout


def test_vocos_local_folder_checks(tmp_path, vocos):
    from valle_cli.codecs.vocos_codec import fetch_vocos_files

    with pytest.raises(CodecError, match="lacks config.yaml, pytorch_model.bin"):
        fetch_vocos_files(str(tmp_path))


def test_vocos_loads_a_checkpoint_folder(tmp_path, vocos, encodec):
    """A folder in the hub's layout (config.yaml + pytorch_model.bin with Vocos' key names) loads and decodes
    exactly like the model it was saved from."""
    import yaml

    from valle_cli.codecs.vocos_codec import DEFAULT_CONFIG, VocosCodec

    enc_path = tmp_path / "encodec.th"
    torch.save(vocos.encoder.model.state_dict(), enc_path)
    state = {"feature_extractor.codebook_weights": vocos.features.codebook_weights.detach()}
    state.update({f"backbone.{k}": v for k, v in vocos.backbone.state_dict().items()})
    state.update({f"head.{k}": v for k, v in vocos.head.state_dict().items()})
    folder = tmp_path / "vocos"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(DEFAULT_CONFIG))
    torch.save(state, folder / "pytorch_model.bin")
    loaded = VocosCodec(6.0, path=str(folder), encodec_path=str(enc_path))
    codes = torch.randint(0, 1024, (1, 8, 20))
    torch.testing.assert_close(loaded.decode(codes), vocos.decode(codes))
    del state["head.out.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CodecError, match="lacks 1 tensors"):
        VocosCodec(6.0, path=str(folder), encodec_path=str(enc_path))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02 truncated")
    with pytest.raises(CodecError, match="truncated"):
        VocosCodec(6.0, path=str(folder), encodec_path=str(enc_path))


def test_unknown_codec_name_lists_available():
    with pytest.raises(PluginError) as info:
        build_codec(CodecConfig(name="mell"))
    assert "did you mean 'mel'" in info.value.remedy


# -- the offline mel codec -------------------------------------------------------------------------------------


def _log_mel_distance(codec, a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b)) // 320 * 320
    fa = codec.features(torch.from_numpy(a[:n].copy())[None, None])
    fb = codec.features(torch.from_numpy(b[:n].copy())[None, None])
    return float((fa - fb).abs().mean())


def test_mel_round_trip_keeps_the_spectrum(mel, speech_24k):
    wav, _ = speech_24k
    codes = mel.encode(torch.from_numpy(wav)[None, None])
    out = mel.decode(codes)[0, 0, : wav.size].numpy()
    rt = _log_mel_distance(mel, wav, out)
    # the same speech shifted by 0.3 s: a wrong decode is at least this far off
    shifted = _log_mel_distance(mel, wav, np.roll(wav, 7200))
    assert rt < 0.5 * shifted, (rt, shifted)
    # more levels, finer detail: 8 levels beat 2 levels
    two = mel.decode(codes[:, :2])[0, 0, : wav.size].numpy()
    assert rt < _log_mel_distance(mel, wav, two)


def test_mel_round_trip_is_intelligible(mel, natural_speech):
    """ASR on the round trip finds nearly the words it finds on the original."""
    pytest.importorskip("pocketsphinx")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plugins", "valle-pocketsphinx", "src"))
    from valle_pocketsphinx import PocketsphinxTranscriber

    from valle_cli.audio.io import resample
    from valle_cli.metrics import wer

    wav, sr, text = natural_speech
    wav = resample(wav, sr, 24_000)
    out = mel.decode(mel.encode(torch.from_numpy(wav)[None, None]))[0, 0].numpy()
    asr = PocketsphinxTranscriber()
    assert wer(text, asr.transcribe_text(out, 24_000)) <= wer(text, asr.transcribe_text(wav, 24_000)) + 0.25


def test_mel_is_deterministic(mel, speech_24k):
    x = torch.from_numpy(speech_24k[0])[None, None]
    codes = mel.encode(x)
    assert torch.equal(codes, mel.encode(x))
    assert torch.equal(mel.decode(codes), mel.decode(codes))


def test_mel_bandwidth_truncates_levels():
    c = build_codec(CodecConfig(name="mel", bandwidth=3.0), device="cpu")
    assert c.n_codebooks == 4
    with pytest.raises(CodecError, match="0.75 kbps each"):
        build_codec(CodecConfig(name="mel", bandwidth=7.0), device="cpu")


def test_mel_shipped_codebooks_describe_their_fitting(mel):
    assert mel.meta.get("recipe") == "scripts/fit_default_codec.py"
    assert "mbrola:us3" not in mel.meta.get("voices", [])  # held out for the benchmark


def test_mel_fit_save_load(tmp_path, speech_24k):
    from valle_cli.codecs.mel_codec import MelCodec
    from valle_cli.codecs.mel_fit import fit_mel_codec

    wav, _ = speech_24k
    codec = fit_mel_codec([wav, wav[::-1].copy()], levels=2, codebook_size=16, iters=3)
    path = codec.save(tmp_path / "cb.safetensors")
    loaded = MelCodec.from_file(path)
    assert loaded.n_codebooks == 2 and loaded.codebook_size == 16
    x = torch.from_numpy(wav)[None, None]
    assert (loaded.encode(x) == codec.encode(x)).float().mean() > 0.95  # fp16 storage may flip a rare tie


def test_fitting_features_of_long_audio_come_in_windows(speech_24k, monkeypatch):
    """A long recording's spectrogram is made a window at a time (bounded memory), each window with an FFT's
    worth of context on both sides: the frames are the whole spectrogram's."""
    from valle_cli.codecs import mel_fit
    from valle_cli.codecs.mel_codec import MelCodec

    wav, _ = speech_24k
    template = MelCodec(
        torch.zeros(1, 1, 100), torch.zeros(100), torch.ones(100)
    )  # as fit_mel_codec makes it
    whole = mel_fit.extract_frames([wav], template)
    for seconds in (0.5, 0.37):  # windows that do and do not divide the length
        monkeypatch.setattr(mel_fit, "WINDOW_SECONDS", seconds)
        torch.testing.assert_close(mel_fit.extract_frames([wav], template), whole, atol=1e-4, rtol=1e-4)


def test_mel_file_errors(tmp_path):
    from safetensors.torch import save_file

    from valle_cli.codecs.mel_codec import MelCodec

    with pytest.raises(CodecError, match="does not exist"):
        MelCodec.from_file(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CodecError, match="not a readable codebook file"):
        MelCodec.from_file(junk)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, other, metadata={"format": "something-else"})
    with pytest.raises(CodecError, match="not a valle mel codec file"):
        MelCodec.from_file(other)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(1)}, newer, metadata={"format": "valle-mel-codec", "version": "99"})
    with pytest.raises(CodecError, match="upgrade valle"):
        MelCodec.from_file(newer)


def test_fit_too_little_audio():
    from valle_cli.codecs.mel_fit import fit_mel_codec

    with pytest.raises(CodecError, match="too few"):
        fit_mel_codec([np.random.default_rng(0).standard_normal(3200).astype(np.float32)], codebook_size=1024)


def test_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CodecError, match="CUDA is not available"):
        build_codec(CodecConfig(name="mel"), device="cuda")


def test_auto_device_is_cpu_here(mel):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert mel.device.type == "cpu"


def test_vocos_conditions_on_the_bandwidth_of_the_codes(vocos):
    """2-level codes decode like a 1.5 kbps Vocos would, not like the configured 6 kbps one."""
    from valle_cli.codecs.vocos_codec import VocosCodec

    low = VocosCodec(1.5, pretrained=False)
    low.load_state_dict(vocos.state_dict())
    codes = torch.randint(0, 1024, (1, 2, 12))
    torch.testing.assert_close(vocos.decode(codes), low.decode(codes))


def test_bad_device_and_empty_decode(mel):
    with pytest.raises(CodecError, match="is not a device"):
        build_codec(CodecConfig(name="mel"), device="gpu0")
    with pytest.raises(CodecError, match="zero frames"):
        mel.decode(torch.zeros(1, 8, 0, dtype=torch.long))


def test_fit_rejects_degenerate_settings(speech_24k):
    from valle_cli.codecs.mel_fit import fit_mel_codec

    with pytest.raises(CodecError, match="at least 1 level"):
        fit_mel_codec([speech_24k[0]], levels=0)
