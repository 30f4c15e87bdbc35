"""The Descript Audio Codec (`dac`) with random weights built from its released configs: the codec protocol
at 24 kHz and 44.1 kHz, bandwidth to levels, its own settings (`codec.options.model_type`), loading a
weights folder, the offline message, and rebuilding it from a dataset header."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from valle_cli.codecs.base import build_codec, codec_from_header
from valle_cli.config import CodecConfig, load_config
from valle_cli.errors import CodecError, ConfigError

from .conftest import needs_espeak
from .conftest import valle_cli as valle


@pytest.fixture(scope="module")
def dac24():
    from valle_cli.codecs.dac_codec import DacCodec

    torch.manual_seed(0)
    return DacCodec("24khz", 6.0, pretrained=False)


@pytest.fixture(scope="module")
def dac44():
    from valle_cli.codecs.dac_codec import DacCodec

    torch.manual_seed(0)
    return DacCodec("44khz", 8.0, pretrained=False)


@pytest.mark.parametrize(
    ("name", "rate", "hop", "levels"), [("dac24", 24_000, 320, 8), ("dac44", 44_100, 512, 9)]
)
def test_rates_shapes_and_frame_alignment(request, name, rate, hop, levels):
    codec = request.getfixturevalue(name)
    assert (codec.sample_rate, codec.hop_length, codec.n_codebooks) == (rate, hop, levels)
    assert codec.frame_rate * codec.hop_length == codec.sample_rate
    for n in (hop, hop + 1, 5_000):
        wav = torch.randn(2, 1, n) * 0.1
        codes = codec.encode(wav)
        frames = -(-n // hop)
        assert codes.shape == (2, levels, frames) and int(codes.min()) >= 0 and int(codes.max()) < 1024
        out = codec.decode(codes)
        assert out.shape == (2, 1, frames * hop) and torch.isfinite(out).all()
    assert codec.decode(codes[:, :2]).shape == (2, 1, frames * hop)  # fewer levels decode too


def test_batched_encoding_equals_one_by_one(dac24):
    """Padding the shorter clip in a batch changes only its last frames (the encoder's receptive field)."""
    a, b = torch.randn(16_000) * 0.1, torch.randn(9_600) * 0.1
    singles = [dac24.encode(x[None, None])[0] for x in (a, b)]
    batched = dac24.encode_list([a, b])
    assert torch.equal(singles[0], batched[0])
    assert singles[1].shape == batched[1].shape == (8, 30)
    assert torch.equal(singles[1][:, :24], batched[1][:, :24])


def test_bandwidth_picks_whole_levels():
    from valle_cli.codecs.dac_codec import levels_for

    assert [levels_for("24khz", bw) for bw in (1.5, 6.0, 24.0)] == [2, 8, 32]
    assert levels_for("44khz", 8.0) == 9 and levels_for("44khz", 6.0) == 6
    with pytest.raises(CodecError, match="DAC 24khz has no 30.0 kbps setting"):
        levels_for("24khz", 30.0)
    with pytest.raises(CodecError, match="between 0.86 and 7.75"):
        levels_for("44khz", 0.5)


def test_model_type_is_the_codecs_own_setting():
    cfg = load_config("tiny", ["codec.name=dac", "codec.options.model_type=44khz", "codec.bandwidth=8"])
    assert cfg.codec.options == {"model_type": "44khz"}
    with pytest.raises(ConfigError, match="did you mean 'codec.options.model_type'"):
        load_config("tiny", ["codec.name=dac", "codec.options.model_typ=44khz"])
    with pytest.raises(ConfigError, match="must be one of 24khz, 44khz, 16khz"):
        load_config("tiny", ["codec.name=dac", "codec.options.model_type=48khz"])
    with pytest.raises(ConfigError, match="the mel plugin has no options"):
        load_config("tiny", ["codec.options.model_type=44khz"])


def test_a_weights_folder_loads_and_decodes_the_same(dac44, tmp_path):
    folder = tmp_path / "dac44"
    dac44.model.save_pretrained(folder)
    cfg = CodecConfig(name="dac", bandwidth=8.0, path=str(folder), options={"model_type": "44khz"})
    loaded = build_codec(cfg, device="cpu")
    codes = torch.randint(0, 1024, (1, 9, 12))
    torch.testing.assert_close(loaded.decode(codes), dac44.decode(codes))
    # a dataset header carries the options: the same codec comes back
    header = {**loaded.describe(), "bandwidth": 8.0, "path": str(folder), "options": {"model_type": "44khz"}}
    again = codec_from_header(header, "cpu")
    assert again.sample_rate == 44_100 and again.n_codebooks == 9
    with pytest.raises(CodecError, match="not the 24khz model"):
        build_codec(CodecConfig(name="dac", path=str(folder)), device="cpu")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CodecError, match="may be truncated"):
        build_codec(cfg, device="cpu")
    (folder / "config.json").unlink()
    with pytest.raises(CodecError, match="lacks config.json"):
        build_codec(cfg, device="cpu")


def test_offline_message_names_repo_files_and_remedy(tmp_path):
    code = (
        "from valle_cli.codecs.base import build_codec\nfrom valle_cli.errors import CodecError\n"
        "try:\n    build_codec('dac', device='cpu')\nexcept CodecError as e:\n"
        "    print('MSG', e.message); print('FIX', e.remedy)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "MSG DAC weights (descript/dac_24khz: config.json, model.safetensors)" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    assert "hf download descript/dac_24khz" in proc.stdout and "codec.path" in proc.stdout


@needs_espeak
def test_prepare_train_and_speak_with_dac_44khz(dac44, tmp_path):
    """The whole path on DAC tokens at 44.1 kHz (86.13 frames/s): prepare, train, export, synthesize."""
    import soundfile as sf

    from valle_cli.audio.speech import say

    folder = tmp_path / "dac44"
    dac44.model.save_pretrained(folder)
    for spk, voice in (("ann", "espeak:en-us+f3"), ("bo", "espeak:en-gb+m3")):
        d = tmp_path / "voices" / "g" / spk
        d.mkdir(parents=True)
        for i, text in enumerate(
            ["The sun is warm today.", "We walked along the river.", "A cat sat on the mat."]
        ):
            wav, sr = say(text, voice, speed=170)
            sf.write(d / f"{i}.wav", wav, sr)
            (d / f"{i}.txt").write_text(text)
    codec = ["--set", "codec.name=dac", "--set", f"codec.path={folder}", "--set", "codec.options.model_type=44khz",
             "--set", "codec.bandwidth=8"]  # fmt: skip
    proc = valle("prepare", str(tmp_path / "voices"), "-o", str(tmp_path / "ds"), *codec, "--workers", "1",
                 "--align-steps", "0", "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    sets = [f"data.paths=[{tmp_path / 'ds'}]", "data.batch_size=2", "data.val_fraction=0.2", "train.steps=2",
            "train.warmup_steps=1", f"train.out_dir={run}", "model.n_levels=9", "data.prompt_duration=[0.5,1.0]",
            "data.min_duration=0.5"]  # fmt: skip
    proc = valle("train", "tiny", *codec, *[x for s in sets for x in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert valle("export", str(run), "-o", str(tmp_path / "m.safetensors")).returncode == 0
    out = tmp_path / "hello.wav"
    ref = next((tmp_path / "voices" / "g" / "ann").glob("*.wav"))
    proc = valle("synth", "Hello there.", "--model", str(tmp_path / "m.safetensors"), "--ref", str(ref), "-o",
                 str(out), "--max-ar-steps", "30", "--seed", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = sf.info(out)
    assert info.samplerate == 44_100 and 0 < info.frames <= 30 * 512 * 4
