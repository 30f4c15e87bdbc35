"""`valle prepare` end to end on a generated multi-speaker corpus with the offline codec: index, metadata,
similar lists, transcript layouts, skipped files, resume after kill -9, shards + merge, HDF5 equality."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from valle_cli.config import CodecConfig
from valle_cli.data.dataset import open_dataset
from valle_cli.errors import DatasetError
from valle_cli.prepare.pipeline import PrepareOptions, prepare

from .conftest import default_sigint, group_members, needs_espeak
from .corpus import build_corpus

pytestmark = needs_espeak


def options(voices: Path, out: Path, **kw) -> PrepareOptions:
    return PrepareOptions(voices=voices, output=out, codec=CodecConfig(name="mel"), device="cpu", **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("voices")
    expected = build_corpus(root)
    return root, expected


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    voices, _ = corpus
    out = tmp_path_factory.mktemp("ds") / "dataset"
    report = prepare(options(voices, out, workers=2, batch_size=4, top_k=3))
    return out, report


def test_every_good_file_becomes_an_utterance_with_its_transcript(corpus, prepared):
    _, expected = corpus
    out, report = prepared
    ds = open_dataset(out)
    assert sorted(ds.uids()) == sorted(expected)
    for i in range(len(ds)):
        meta = ds.meta(i)
        assert meta.text == expected[meta.uid]
        assert meta.uid == ds.uid(i) and ds.speaker(i) == f"{meta.group}/{meta.speaker}"
        assert meta.phonemes and "ˈ" in meta.phonemes
        assert meta.duration == pytest.approx(ds.frames(i) / 75.0, abs=1 / 75)
        assert ds.codes(i).dtype == np.uint16 and ds.codes(i).shape == (8, ds.frames(i))
        assert report.utterances == len(expected)


def test_layouts_pick_the_right_transcripts(prepared):
    ds = open_dataset(prepared[0])
    by_uid = {ds.uid(i): ds.meta(i) for i in range(len(ds))}
    lj = by_uid["ljspeech/lj/wavs__LJ001-0000"]
    assert (
        lj.text == "She wrote her name at the top of the page."
    )  # normalized column, not the upper-case one
    libri = by_uid["libritts/1034/121119__1034_121119_000000_000000"]
    assert libri.text == "The city lights were bright against the dark sky."  # .normalized.txt, not .original
    de = by_uid["misc/klaus/k0"]  # "Der alte Bäcker öffnet seinen Laden.", phonemized as German
    assert de.language == "de" and "œ" in de.phonemes


def test_german_speaker_language_from_language_txt(prepared):
    ds = open_dataset(prepared[0])
    langs = {ds.uid(i): ds.language(i) for i in range(len(ds))}
    assert langs["misc/klaus/k1"] == "de"
    assert langs["espeak/anna/anna0"] == "en"
    assert set(ds.languages) == {"de", "en"}


def test_bad_files_are_skipped_and_reported(prepared):
    out, report = prepared
    reasons = {Path(src).name: why for src, why in report.skipped}
    assert "cannot read" in reasons["corrupt.wav"]
    assert "empty" in reasons["empty.wav"]
    assert "outside the duration range" in reasons["short.wav"]
    on_disk = json.loads((out / "report.json").read_text())
    assert len(on_disk["skipped"]) == 3


def test_similar_lists_are_same_speaker_and_exclude_self(prepared):
    ds = open_dataset(prepared[0])
    assert ds.header["similar_k"] == 3
    for i in range(len(ds)):
        sim = ds.similar(i)
        assert i not in sim
        assert all(ds.speaker(int(j)) == ds.speaker(i) for j in sim)
        peers = sum(ds.speaker(j) == ds.speaker(i) for j in range(len(ds))) - 1
        assert len(sim) == min(3, peers)
        assert ds.meta(i).similar == [ds.uid(int(j)) for j in sim]


def test_index_and_header(prepared):
    out, _ = prepared
    ds = open_dataset(out)
    h = ds.header
    assert h["format"] == "valle-dataset" and h["version"] == 1
    assert h["codec"]["name"] == "mel" and h["codec"]["n_codebooks"] == 8
    assert h["symbols"]["version"] == 1
    assert h["utterances"] == len(ds)
    assert h["seconds"] == pytest.approx(float(ds.durations().sum()), abs=0.5)
    from valle_cli.text import default_symbol_map

    sm = default_symbol_map()
    for i in range(len(ds)):
        assert sm.decode(ds.phonemes(i)) == ds.meta(i).phonemes
    assert isinstance(ds.columns["frames"], np.memmap)  # memory-mapped, not read eagerly


def test_rerun_does_nothing_new(corpus, prepared):
    voices, _ = corpus
    out, first = prepared
    again = prepare(options(voices, out, workers=1, top_k=3))
    assert again.new == 0 and again.resumed == first.utterances


def test_resume_after_kill_matches_a_clean_run(corpus, prepared, tmp_path):
    """kill -9 in the middle of `valle prepare`, rerun, and get exactly the clean run's dataset."""
    voices, _ = corpus
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "valle_cli.cli.app",
        "prepare",
        str(voices),
        "-o",
        str(out),
        "--codec",
        "mel",
        "--workers",
        "1",
        "--batch-size",
        "1",
        "--top-k",
        "3",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*.json"))) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((out / "utterances").rglob("*.json")))
    assert written >= 3 and not (out / "dataset.json").exists(), "the kill came too late to test anything"
    with pytest.raises(DatasetError, match="unfinished"):
        open_dataset(out)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stderr
    a, b = open_dataset(prepared[0]), open_dataset(out)
    assert a.uids() == b.uids()
    for i in range(len(a)):
        assert np.array_equal(a.codes(i), b.codes(i))
        assert a.meta(i).similar == b.meta(i).similar
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_process_group_stops_cleanly_and_says_what_is_kept(
    corpus, prepared, tmp_path, sig, code
):
    """Ctrl-C in a terminal, and `timeout` or a scheduler's SIGTERM, reach the whole group, loader workers
    included: one line that counts what was kept, 130 or 143, no traceback from any worker, no process left,
    and the rerun goes on from there."""
    voices, _ = corpus
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "valle_cli.cli.app", "prepare", str(voices), "-o", str(out), "--codec", "mel",
           "--workers", "2", "--batch-size", "1", "--top-k", "3", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)  # fmt: skip
    try:
        deadline = time.time() + 600
        while len(list((out / "utterances").rglob("*.json"))) < 3 and proc.poll() is None:
            assert time.time() < deadline, "no utterance written: hung?"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=600)
        deadline = time.time() + 60
        while group_members(proc.pid) and time.time() < deadline:  # the workers go too
            time.sleep(0.1)
        assert not group_members(proc.pid), "a process of the interrupted prepare is still running"
    finally:
        for pid in group_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    said = re.search(rf"interrupted \({sig.name}\); stopped while ([a-z ]+): (\d+) encoded utterance", err)
    assert said and f"are kept in {out}; the same command goes on from there" in err, err
    kept = len(list((out / "utterances").rglob("*.json")))
    assert int(said[2]) == kept, err  # what the line counts is what is on disk
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and f"{kept} already done" in rerun.stderr, rerun.stderr
    assert open_dataset(out).uids() == open_dataset(prepared[0]).uids()


def test_shards_merge_into_the_full_dataset(corpus, prepared, tmp_path, monkeypatch):
    from valle_cli.data.merge import merge_datasets

    voices, _ = corpus
    parts = []
    for i in range(2):
        part = tmp_path / f"shard{i}"
        prepare(options(voices, part, workers=1, top_k=3, shard=(i, 2)))
        parts.append(part)
    n0, n1 = len(open_dataset(parts[0])), len(open_dataset(parts[1]))
    full = open_dataset(prepared[0])
    assert n0 > 0 and n1 > 0 and n0 + n1 == len(full)
    merged = tmp_path / "merged"
    assert merge_datasets(parts, merged, top_k=3) == len(full)
    m = open_dataset(merged)
    assert m.uids() == full.uids()
    for i in range(len(m)):
        assert np.array_equal(m.codes(i), full.codes(i))
        assert list(m.similar(i)) == list(full.similar(i))
    # a merge that fails leaves no half a dataset: not at its checks, not late (here: while indexing)
    with pytest.raises(DatasetError, match="is in both"):
        merge_datasets([parts[0], parts[0]], tmp_path / "twice")
    with pytest.raises(DatasetError, match="already exists and is not empty"):
        merge_datasets(parts, merged)

    def fails(*args, **kwargs):
        raise DatasetError("no space left")

    monkeypatch.setattr("valle_cli.data.merge.reindex", fails)
    with pytest.raises(DatasetError, match="no space left"):
        merge_datasets(parts, tmp_path / "late")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "late").exists()
    assert not list(tmp_path.glob(".*merging")) and len(open_dataset(merged)) == len(full)


def test_hdf5_matches_the_folder(prepared, tmp_path):
    from valle_cli.data.hdf5 import folder_to_hdf5

    out, _ = prepared
    h5 = folder_to_hdf5(out, tmp_path / "ds.h5")
    a, b = open_dataset(out), open_dataset(h5)
    try:
        assert a.header == b.header
        assert len(a) == len(b) and a.uids() == b.uids()
        for i in range(len(a)):
            assert np.array_equal(a.codes(i), b.codes(i))
            assert np.array_equal(a.phonemes(i), b.phonemes(i))
            assert np.array_equal(a.similar(i), b.similar(i))
            assert a.meta(i) == b.meta(i)
            assert a.speaker(i) == b.speaker(i) and a.language(i) == b.language(i)
    finally:
        b.close()


def test_other_codec_in_the_same_folder_is_refused(corpus, prepared):
    voices, _ = corpus
    opts = options(voices, prepared[0])
    opts.codec = CodecConfig(name="mel", bandwidth=3.0)
    with pytest.raises(DatasetError, match="was prepared with codec"):
        prepare(opts)


def test_cli_stats_and_errors(prepared, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "valle_cli.cli.app", *a], capture_output=True, text=True, timeout=120, env=env
    )
    proc = run("dataset", "stats", str(prepared[0]), "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    ds = open_dataset(prepared[0])
    assert stats["utterances"] == len(ds)
    assert set(stats["hours_per_group"]) == {u.split("/")[0] for u in ds.uids()}
    assert sum(stats["duration_counts"]) == len(ds)
    assert stats["unknown_symbols"] == 0 and stats["symbols_used"] > 20
    proc = run("dataset", "stats", str(prepared[0]))
    assert "hours per group" in proc.stdout and "phoneme coverage" in proc.stdout
    proc = run("prepare", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x"), "--codec", "mel")
    assert proc.returncode == 1 and "nowhere does not exist" in proc.stderr and not (tmp_path / "x").exists()
    proc = run("dataset", "stats", str(tmp_path))
    assert proc.returncode == 1 and "not a valle dataset" in proc.stderr
    proc = run("prepare", str(tmp_path), "-o", str(tmp_path / "x"), "--codec", "mel", "--shard", "3/2")
    assert proc.returncode == 1 and "bad --shard" in proc.stderr


def test_removed_source_leaves_the_index(tmp_path):
    import soundfile as sf

    from valle_cli.audio.speech import say

    voices = tmp_path / "v" / "g" / "s"
    voices.mkdir(parents=True)
    for i, text in enumerate(
        ["The first sentence is here.", "The second one follows it.", "A third closes."]
    ):
        wav, sr = say(text, "espeak:en-us")
        sf.write(voices / f"{i}.wav", wav, sr)
        (voices / f"{i}.txt").write_text(text)
    out = tmp_path / "ds"
    assert prepare(options(tmp_path / "v", out, workers=1)).utterances == 3
    (voices / "1.wav").unlink()
    report = prepare(options(tmp_path / "v", out, workers=1))
    assert report.utterances == 2 and report.new == 0
    assert open_dataset(out).uids() == ["g/s/0", "g/s/2"]


def test_cli_hdf5_merge_and_reindex(tmp_path):
    import soundfile as sf

    from valle_cli.audio.speech import say

    voices = tmp_path / "v"
    for spk, voice in (("a", "espeak:en-us+f4"), ("b", "espeak:en-us+m2")):
        (voices / "g" / spk).mkdir(parents=True)
        for i, text in enumerate(
            [
                "One small step for a man.",
                "The rain in Spain stays mainly.",
                "Good night and sleep well, my friend.",
            ]
        ):
            wav, sr = say(text, voice)
            sf.write(voices / "g" / spk / f"{i}.wav", wav, sr)
            (voices / "g" / spk / f"{i}.txt").write_text(text)
    env = {**os.environ, "COLUMNS": "200"}

    def valle(*a):
        proc = subprocess.run(
            [sys.executable, "-m", "valle_cli.cli.app", *a],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    out = tmp_path / "ds"
    proc = valle("prepare", str(voices), "-o", str(out), "--codec", "mel", "--hdf5", "--workers", "1")
    assert "6 utterances" in proc.stderr and "ds.h5" in proc.stderr
    h5 = open_dataset(tmp_path / "ds.h5")
    assert h5.uids() == open_dataset(out).uids()
    h5.close()
    for i in range(2):
        valle(
            "prepare",
            str(voices),
            "-o",
            str(tmp_path / f"s{i}"),
            "--codec",
            "mel",
            "--shard",
            f"{i}/2",
            "--workers",
            "1",
        )
    valle("dataset", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "m"))
    assert open_dataset(tmp_path / "m").uids() == open_dataset(out).uids()
    for f in (out / "utterances" / "g" / "a").glob("1.*"):
        f.unlink()
    valle("dataset", "reindex", str(out))
    assert "g/a/1" not in open_dataset(out).uids() and len(open_dataset(out)) == 5
