"""Offline codec quality: word error rate and voice similarity of round trips, and coding speed.

For each held-out sentence (never used to fit the shipped codebooks) spoken by each test voice (by default
mbrola us3, a voice not used for fitting, and the espeak-ng voice as a harder case for ASR), the script encodes
and decodes the audio with the codec and reports:

- WER of the original and of the round trip (PocketSphinx, through the valle-pocketsphinx transcriber plugin),
- speaker similarity of round trip to original (cosine of Resemblyzer embeddings),
- encode and decode speed as a real-time factor on one CPU thread.

Usage:  python bench/codec_quality.py [--codec mel] [--path FILE] [--voices mbrola:us3,...] [--write]
`--write` replaces the "Offline codec" section of docs/benchmarks.md with the figures and this command.
Needs the dev extra (pocketsphinx, resemblyzer) and `pip install ./plugins/valle-pocketsphinx`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from report import command, write_section  # bench/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default="mel")
    ap.add_argument("--path", default=None, help="codebook file (mel) or weights (others)")
    ap.add_argument("--voices", default="mbrola:us3,piper:joe")
    ap.add_argument("--limit", type=int, default=20, help="number of held-out sentences")
    ap.add_argument("--write", action="store_true", help="write the figures to docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from resemblyzer import VoiceEncoder, preprocess_wav

    from valle_cli import plugins
    from valle_cli.assets import sentences
    from valle_cli.audio import speech
    from valle_cli.audio.io import resample
    from valle_cli.codecs.base import build_codec
    from valle_cli.config import CodecConfig
    from valle_cli.metrics import cosine, wer

    codec = build_codec(CodecConfig(name=args.codec, path=args.path), device="cpu")
    asr = plugins.load("transcriber", "pocketsphinx")()
    encoder = VoiceEncoder("cpu", verbose=False)
    texts = sentences("held-out")[: args.limit]
    rows = []
    for voice in args.voices.split(","):
        refs, hyp_orig, hyp_rt, sims = [], [], [], []
        seconds = enc_time = dec_time = 0.0
        for text in texts:
            wav, sr = speech.say(text, voice)
            wav = resample(wav, sr, codec.sample_rate)
            x = torch.from_numpy(wav)[None, None]
            t0 = time.perf_counter()
            codes = codec.encode(x)
            t1 = time.perf_counter()
            out = codec.decode(codes)[0, 0, : wav.size].numpy()
            t2 = time.perf_counter()
            enc_time, dec_time, seconds = (
                enc_time + t1 - t0,
                dec_time + t2 - t1,
                seconds + wav.size / codec.sample_rate,
            )
            refs.append(text)
            hyp_orig.append(asr.transcribe_text(wav, codec.sample_rate))
            hyp_rt.append(asr.transcribe_text(out, codec.sample_rate))
            e1 = encoder.embed_utterance(preprocess_wav(wav, source_sr=codec.sample_rate))
            e2 = encoder.embed_utterance(preprocess_wav(out, source_sr=codec.sample_rate))
            sims.append(cosine(e1, e2))
        row = {
            "voice": voice,
            "utterances": len(texts),
            "seconds": seconds,
            "wer_original": wer(refs, hyp_orig),
            "wer_roundtrip": wer(refs, hyp_rt),
            "similarity_mean": float(np.mean(sims)),
            "similarity_min": float(np.min(sims)),
            "encode_rtf": enc_time / seconds,
            "decode_rtf": dec_time / seconds,
        }
        rows.append(row)
        print(
            f"{voice:14s} WER original {row['wer_original']:.3f}  round trip {row['wer_roundtrip']:.3f} "
            f"(+{row['wer_roundtrip'] - row['wer_original']:.3f})  similarity mean {row['similarity_mean']:.3f} "
            f"min {row['similarity_min']:.3f}  encode RTF {row['encode_rtf']:.3f} decode RTF {row['decode_rtf']:.3f}",
            flush=True,
        )
    if args.write:
        write_figures(args, rows, codec)


def write_figures(args, rows, codec) -> None:
    import platform

    fitted = set(getattr(codec, "meta", {}).get("voices", []))
    cmd = command("codec_quality.py")
    lines = [
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, one CPU thread; "
        f"codec `{args.codec}` ({codec.n_codebooks} levels x {codec.codebook_size} codes, "
        f"{codec.frame_rate:g} frames/s). Sentences: the held-out list, never used for fitting. "
        "Voices marked 'no' under 'fitted on' were not in the fitting corpus either.",
        "",
        "| voice | fitted on | utterances | audio s | WER original | WER round trip | WER increase | similarity mean | similarity min | encode RTF | decode RTF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['voice']} | {'yes' if r['voice'] in fitted else 'no'} | {r['utterances']} | {r['seconds']:.1f} | {r['wer_original']:.3f} | "
            f"{r['wer_roundtrip']:.3f} | {r['wer_roundtrip'] - r['wer_original']:+.3f} | {r['similarity_mean']:.3f} | "
            f"{r['similarity_min']:.3f} | {r['encode_rtf']:.4f} | {r['decode_rtf']:.4f} |"
        )
    lines += [
        "",
        "Targets (issue 2): WER increase at most +0.10, similarity at least 0.85, encode + decode RTF below 1 "
        "on one core. RTF = processing time / audio duration. PocketSphinx is the ASR (English model shipped "
        "in its wheel); similarity is the cosine of Resemblyzer embeddings of original and round trip. Piper "
        "samples its durations at random, so its originals differ a little from run to run.",
        "",
    ]
    write_section("Offline codec (mel) round trips", lines)


if __name__ == "__main__":
    main()
