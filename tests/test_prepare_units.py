"""Pieces of `valle prepare`: transcript lookup order, language mapping, similarity ranking."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from valle_cli.errors import DatasetError
from valle_cli.prepare.discover import discover, find_transcript, parse_language_map
from valle_cli.prepare.similar import code_embedding, top_k_similar


def _wav(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(100, np.float32), 16_000)


def test_transcript_lookup_order(tmp_path):
    spk = tmp_path / "g" / "s"
    _wav(spk / "a.wav")
    (spk / "transcripts.tsv").write_text("a.wav\tfrom tsv\n")
    assert find_transcript(spk / "a.wav", spk) == ("from tsv", "transcripts.tsv")
    (spk / "a.normalized.txt").write_text("from normalized")
    assert find_transcript(spk / "a.wav", spk)[1] == "normalized.txt"
    (spk / "a.lab").write_text("from  lab\n")
    assert find_transcript(spk / "a.wav", spk) == ("from lab", "lab")
    (spk / "a.txt").write_text("from txt")
    assert find_transcript(spk / "a.wav", spk) == ("from txt", "sidecar")
    _wav(spk / "b.wav")
    assert find_transcript(spk / "b.wav", spk) == (None, "transcriber")


def test_metadata_csv_is_found_from_a_subfolder(tmp_path):
    spk = tmp_path / "g" / "s"
    _wav(spk / "wavs" / "x1.wav")
    (spk / "metadata.csv").write_text("x1|Raw Text|normalized text\nx2|only raw\n")
    assert find_transcript(spk / "wavs" / "x1.wav", spk) == ("normalized text", "metadata.csv")


def test_discover_ids_and_languages(tmp_path):
    _wav(tmp_path / "g1" / "s1" / "ch" / "u.wav")
    _wav(tmp_path / "g2" / "s2" / "v.flac")
    (tmp_path / "g2" / "language.txt").write_text("fr")
    (tmp_path / "g1" / "s1" / "notes.md").write_text("not audio")
    srcs = list(discover(tmp_path, "en", {"g1/s1": "de"}))
    assert [(s.uid, s.language) for s in srcs] == [("g1/s1/ch__u", "de"), ("g2/s2/v", "fr")]


def test_unreadable_entries_are_skipped_with_their_reason(tmp_path):
    """Non-UTF-8 transcripts (sidecar or table), broken links, FIFOs and folders named like audio are each
    reported, never read as something else."""
    import os

    spk = tmp_path / "g" / "s"
    _wav(spk / "good.wav")
    (spk / "good.txt").write_text("Café au lait.", encoding="utf-8")
    _wav(spk / "bom.wav")
    (spk / "bom.txt").write_bytes("\ufeffWith a BOM.".encode())
    _wav(spk / "wide.wav")
    (spk / "wide.txt").write_text("Windows Unicode.", encoding="utf-16")
    _wav(spk / "latin.wav")
    (spk / "latin.txt").write_bytes("Café au lait.".encode("latin-1"))
    _wav(spk / "sub" / "t1.wav")
    (spk / "sub" / "metadata.csv").write_bytes("t1|Déjà vu.\n".encode("cp1252"))
    _wav(spk / "tab" / "t2.wav")  # a bad sidecar gives way to a readable table row
    (spk / "tab" / "t2.txt").write_bytes("Caf\xe9".encode("latin-1"))
    (spk / "tab" / "metadata.csv").write_text("t2|From the table.\n", encoding="utf-8")
    (spk / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    _wav(spk / "lost.wav")  # transcripts that are a broken link, a FIFO, a folder, or binary
    (spk / "lost.txt").symlink_to(tmp_path / "nowhere.txt")
    _wav(spk / "piped.wav")
    os.mkfifo(spk / "piped.txt")
    _wav(spk / "boxed.wav")
    (spk / "boxed.txt").mkdir()
    _wav(spk / "nul.wav")
    (spk / "nul.txt").write_bytes(b"A loud\x00 bell rang.")
    _wav(spk / "rows" / "r1.wav")
    _wav(spk / "rows" / "r2.wav")
    (spk / "rows" / "metadata.csv").write_bytes(b"r1|Fine text.\nr2|Bell\x07 rang.\n")  # one bad row only
    _wav(spk / "linked" / "l1.wav")  # a table that is a broken link
    (spk / "linked" / "metadata.csv").symlink_to(tmp_path / "nowhere.csv")
    os.mkfifo(spk / "pipe.flac")
    (spk / "folder.wav").mkdir()
    _wav(spk / "folder.wav" / "inner.wav")
    skipped: list[tuple[str, str]] = []
    srcs = list(discover(tmp_path, skipped=skipped))
    assert {s.uid: s.text for s in srcs} == {
        "g/s/good": "Café au lait.", "g/s/folder.wav__inner": None, "g/s/bom": "With a BOM.",
        "g/s/wide": "Windows Unicode.", "g/s/tab__t2": "From the table.", "g/s/rows__r1": "Fine text.",
    }  # fmt: skip
    why = {os.path.relpath(p, spk): reason for p, reason in skipped}
    assert "latin.txt is not UTF-8 (byte 0xe9" in why["latin.wav"] and "iconv" in why["latin.wav"]
    assert "metadata.csv is not UTF-8" in why["sub/t1.wav"]
    assert "broken symbolic link" in why["gone.wav"]
    assert "FIFO" in why["pipe.flac"]
    assert "folder named like an audio file" in why["folder.wav"]
    assert "lost.txt is a broken link" in why["lost.wav"]
    assert "piped.txt is not a regular file" in why["piped.wav"]
    assert "boxed.txt is not a regular file" in why["boxed.wav"]
    assert "nul.txt holds a control character (0x00" in why["nul.wav"]
    assert "metadata.csv holds a control character (0x07" in why["rows/r2.wav"]
    assert "metadata.csv is a broken link" in why["linked/l1.wav"]
    assert len(why) == 11


def test_discover_errors(tmp_path):
    with pytest.raises(DatasetError, match="no group folders"):
        list(discover(tmp_path))
    with pytest.raises(DatasetError, match="missing does not exist"):
        list(discover(tmp_path / "missing"))
    (tmp_path / "file.wav").write_bytes(b"RIFF")
    with pytest.raises(DatasetError, match="file.wav is not a folder"):
        list(discover(tmp_path / "file.wav"))


def test_language_map():
    assert parse_language_map(["de", "news=en", "news/anna=fr"], "en") == (
        "de",
        {"news": "en", "news/anna": "fr"},
    )
    with pytest.raises(DatasetError):
        parse_language_map(["=fr"], "en")


def test_top_k_similar_ranks_by_cosine():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 16))
    emb = np.concatenate(
        [base + 0.01 * rng.standard_normal((3, 16)), base + 0.3 * rng.standard_normal((3, 16))]
    )
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    best = top_k_similar(emb, 2, block=2)
    for i in range(3):
        assert best[i, 0] == i + 3  # its noisy twin first
        assert best[i + 3, 0] == i
    assert top_k_similar(emb[:1], 5).shape == (1, 0)


def test_code_embedding_is_a_unit_vector_of_histograms():
    codes = np.array([[0, 0, 1, 3], [2, 2, 2, 2]])
    e = code_embedding(codes, codebook_size=4)
    assert e.shape == (8,) and np.linalg.norm(e) == pytest.approx(1.0)
    assert e[2] == 0 and e[4 + 2] > e[0]


def test_output_folder_lock_and_stale_temporaries(tmp_path):
    """One prepare per output folder; the temporaries a killed run left are removed, live files are not."""
    from valle_cli.errors import DatasetError
    from valle_cli.fsutil import lock_folder, remove_stale_temporaries

    held = lock_folder(tmp_path / "out", "valle prepare", DatasetError)
    with pytest.raises(DatasetError, match="another valle prepare is writing"):
        lock_folder(tmp_path / "out", "valle prepare", DatasetError)
    held.close()
    lock_folder(tmp_path / "out", "valle prepare", DatasetError).close()  # free again once released
    (tmp_path / "out" / "u").mkdir()
    (tmp_path / "out" / "u" / ".a.npy.x1y2.tmp").write_bytes(b"half")
    (tmp_path / "out" / "u" / "a.npy").write_bytes(b"whole")
    assert remove_stale_temporaries(tmp_path / "out") == 1
    assert [p.name for p in (tmp_path / "out" / "u").iterdir()] == ["a.npy"]


def test_a_bad_voices_folder_is_named_before_the_codec_loads_and_leaves_nothing(tmp_path):
    """A typo in the path, or a folder with no audio, is said before the codec is built (EnCodec here, whose
    weights are not on this machine: its error would come first otherwise), and no output folder is left."""
    from valle_cli.config import CodecConfig
    from valle_cli.prepare.pipeline import PrepareOptions, prepare

    def opts(voices):
        return PrepareOptions(
            voices=voices, output=tmp_path / "ds", codec=CodecConfig(name="encodec"), device="cpu"
        )

    with pytest.raises(DatasetError, match="voicez does not exist"):
        prepare(opts(tmp_path / "voicez"))
    (tmp_path / "v" / "g" / "s").mkdir(parents=True)
    (tmp_path / "v" / "g" / "s" / "notes.txt").write_text("no audio here")
    with pytest.raises(DatasetError, match="no audio files under"):
        prepare(opts(tmp_path / "v"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_files_without_transcripts_and_no_transcriber_stop_before_any_work(tmp_path):
    """No transcript and no usable transcriber (Whisper not downloaded, here a plugin that does not exist): it
    stops at once, counts the files that need one, names the first and the ways out; no folder is left."""
    from valle_cli.config import CodecConfig
    from valle_cli.prepare.pipeline import PrepareOptions, prepare

    speaker = tmp_path / "v" / "g" / "s"
    speaker.mkdir(parents=True)
    for name in ("a", "b", "c"):
        sf.write(speaker / f"{name}.wav", np.zeros(24_000, np.float32), 24_000)
    (speaker / "c.txt").write_text("This one has its transcript.")
    opts = PrepareOptions(voices=tmp_path / "v", output=tmp_path / "ds", codec=CodecConfig(name="mel"),
                          device="cpu", transcriber="nonexistent-asr")  # fmt: skip
    with pytest.raises(DatasetError) as exc:
        prepare(opts)
    assert exc.value.message.startswith("2 file(s) have no transcript (the first: ")
    assert "a.wav" in exc.value.message and "nonexistent-asr" in exc.value.message
    assert "put each file's transcript beside it (a.txt)" in exc.value.remedy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]
