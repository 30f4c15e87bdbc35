"""What a small first chunk and a short lookahead cost in streamed codes: the NAR levels filled chunk by chunk
(`fill_behind`, as `valle synth --stream` does for AR models) against the same levels filled over the whole
utterance, with a trained NAR.

The shipped default model makes level 0 in parallel, but its NAR levels 1..7 are an ordinary trained NAR:
its level 0 for a few held-out sentences (mbrola us2 reference, a voice held out of its training) is fed to
`fill_behind` token by token, exactly as an AR would feed it, for each (first chunk, lookahead) setting;
greedy NAR, so the whole-utterance fill is one fixed answer. Reported: the share of level 1..7 codes equal to
the whole fill's, and the mean absolute log-mel difference (nats per frame) between decoding the streamed
codes and the whole fill's codes (both decoded whole, so codec joins play no part: bench/stream_joins.py
measures those).

Usage:  python bench/stream_lookahead.py [--settings 36/8,12/8,12/4,12/2,12/0] [--write]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from report import command, write_section  # bench/ is on sys.path when run as a script

SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="36/8,12/8,12/4,12/2,12/0")
    ap.add_argument("--voice", default="mbrola:us2")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import soundfile as sf

    from valle_cli.audio.speech import say
    from valle_cli.infer.engine import NarItem, SamplingConfig, generate_batch, nar_fill, shared_prefix
    from valle_cli.infer.load import default_model, load_model
    from valle_cli.infer.stream import StreamSettings, fill_behind
    from valle_cli.infer.synth import Segment, SynthOptions, _Speaker
    from valle_cli.model.valle import held_counts

    loaded = load_model(default_model()[0])
    model = loaded.model.eval()
    wav, sr = say(
        "A large size in stockings is hard to sell, and the rope will bind the seven books.", args.voice
    )
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".wav") as ref:
        sf.write(ref.name, wav, sr)
        sp = _Speaker(loaded, [ref.name], SynthOptions(), "cpu")
    codec = sp.codec
    from valle_cli.audio.io import resample

    speech = torch.from_numpy(resample(wav, sr, codec.sample_rate))[None, None]
    a, b = codec.log_mel(speech)[0].numpy(), codec.log_mel(codec.decode(codec.encode(speech)))[0].numpy()
    n = min(len(a), len(b))
    round_trip = float(np.abs(a[:n] - b[:n]).mean())
    sc = SamplingConfig(seed=0)  # level 0 sampled once, as synth would; the NAR is greedy (nar_temp 0)
    mel = lambda c: codec.log_mel(codec.decode(c[None]))[0].numpy()  # noqa: E731
    cases = []
    for text in SENTENCES:
        req = sp.request(Segment(text, 0, 0.0))
        out = generate_batch(model, [req], sc)[0]
        level0 = out.codes.clone()
        level0[1:] = 0
        fs = out.frame_symbols
        item = NarItem(req, level0, 0, fs, None if fs is None else held_counts(fs))
        whole = nar_fill(model, [item], sc)[0]
        cases.append((req, out, whole, mel(whole)))
    print(f"for scale, the codec's round trip of the reference: {round_trip:.3f}", flush=True)
    rows = []
    for spec in args.settings.split(","):
        chunk, lookahead = map(int, spec.split("/"))
        st = StreamSettings(chunk_frames=chunk, lookahead=lookahead, crossfade=min(4, chunk))
        same = total = 0
        diffs = []
        for req, out, whole, whole_mel in cases:
            symbols: list[int] = []

            def source(out=out, symbols=symbols):
                for i, token in enumerate(out.codes[0].tolist()):
                    if out.frame_symbols is not None:
                        symbols.append(int(out.frame_symbols[i]))
                    yield token

            past = shared_prefix(model, [req]) if model.shared else None
            streamed = torch.cat(
                [c.codes for c in fill_behind(model, req, sc, st, source(), symbols, past)], 1
            )
            assert torch.equal(streamed[0], whole[0])
            same += int((streamed[1:] == whole[1:]).sum())
            total += whole[1:].numel()
            diffs.append(np.abs(mel(streamed) - whole_mel).mean())
        rows.append((chunk, lookahead, chunk + lookahead, same / total, float(np.mean(diffs))))
        print("first chunk {}, lookahead {} ({} AR steps before the first chunk): codes equal {:.3f}, "
              "log-mel difference {:.3f}".format(*rows[-1]), flush=True)  # fmt: skip
    if args.write:
        frames = sum(c[1].codes.shape[1] for c in cases)
        lines = [
            f"Command: `{command('stream_lookahead.py')}`  ",
            f"The shipped default model's NAR (levels 1-7), {len(cases)} held-out sentences ({frames} frames), "
            f"reference {args.voice}; greedy NAR; nar_context {st.nar_context}, growth {st.growth:g}. Codes "
            "equal: share of level 1-7 codes the same as filling the whole utterance at once; log-mel: mean "
            "absolute difference (nats per frame) between the two decoded whole. For scale: the codec's own "
            f"round trip (encode, decode) of the reference speech differs from it by {round_trip:.3f}.",
            "",
            "| first chunk frames | lookahead frames | AR steps before the first chunk | codes equal | log-mel difference |",
            "|---|---|---|---|---|",
            *("| {} | {} | {} | {:.3f} | {:.3f} |".format(*r) for r in rows),
        ]
        write_section("Streaming: first chunk and lookahead", lines)


if __name__ == "__main__":
    main()
