"""Does the AR say the words, and if not, why: teacher-forced against free-running, on held-out utterances.

For each checkpoint, held-out utterances of the voices PocketSphinx reads (mbrola and piper, from the run's own
validation split) are turned into level-0 codes four ways and decoded by the codec from level 0 alone:

- truth: the utterance's own level 0 (the ceiling of this measurement);
- teacher-forced: the model's one-step-ahead predictions with the true previous frames as inputs (argmax, and
  sampled at temperature 0.95); for `model.level0: nar` models, one parallel pass with every frame masked
  over the aligner's durations (there is no previous frame to force);
- free-running: the model generating on its own, prompted with 3 s of another utterance of the same voice,
  with the aligner's phoneme durations forced (oracle timing; pointer models only) and with its own timing.

The word error rate of each says where intelligibility is lost. Teacher-forced close to truth but free-running
far from it is exposure bias: the model knows each frame given the true past and drifts on its own past.

Usage:  python bench/speaking.py --run RUN CHECKPOINT[=LABEL] ... [--n 10] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from report import command, write_section  # bench/ is on sys.path when run as a script

READABLE = ("mbrola/", "piper/")  # voices PocketSphinx transcribes well


def pocketsphinx_importable(site: Path) -> None:
    """Make the pocketsphinx transcriber plugin importable in this process (default_model.py installs it with
    pip --target when the virtualenv lacks it; entry points are read from sys.path at each lookup)."""
    from default_model import pocketsphinx_env

    extra = pocketsphinx_env(site).get("PYTHONPATH")
    if extra and str(site) in extra.split(os.pathsep):
        sys.path.insert(0, str(site))


def measure(run: Path, checkpoint: Path, n: int, asr, temp: float = 0.95, top_k: int = 0, extra=None) -> dict:
    import numpy as np
    import torch

    from valle_cli.config import load_config
    from valle_cli.infer.engine import Request, SamplingConfig, generate_batch
    from valle_cli.infer.synth import _decode, model_codec
    from valle_cli.metrics import wer
    from valle_cli.model.valle import Sample, frame_symbols
    from valle_cli.train.checkpoint import load_checkpoint
    from valle_cli.train.trainer import Trainer

    cfg = load_config(run / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        state = load_checkpoint(checkpoint)
        model = trainer.model
        model.load_state_dict(state["model"])
        model.eval()
        codec = model_codec(state["meta"], model, "cpu")
        ds, sym = trainer.ds, trainer.symbols
        val = [int(i) for i in trainer.val_idx if ds.speaker(int(i)).startswith(READABLE)][:n]
        if not val:
            raise SystemExit(
                f"{run}: no held-out utterance of a voice PocketSphinx reads ({', '.join(READABLE)})"
            )
        sr = codec.sample_rate
        scores: dict[str, list[float]] = {}
        for k, i in enumerate(val):
            text = ds.meta(i).text
            other = next(x for x in range(len(ds)) if ds.speaker(x) == ds.speaker(i) and x not in val)
            prompt = torch.from_numpy(ds.codes(other).astype(np.int64))[:, : int(3 * codec.frame_rate)]
            codes = torch.from_numpy(ds.codes(i).astype(np.int64))[: model.n_levels]
            ph = torch.cat([torch.tensor([sym.bos_id]), torch.from_numpy(ds.phonemes(i).astype(np.int64)),
                            torch.tensor([sym.eos_id])])  # fmt: skip
            dur = ds.phoneme_durations(i)
            fs = frame_symbols(torch.from_numpy(dur)) if model.pointer else None
            with torch.no_grad():
                batch = model.assemble([Sample(ph, prompt, codes, 0, 0, frame_symbols=fs)])
                mask = model.attention_mask(batch)  # level0 nar: every frame masked (one parallel pass)
                h = model.backbone(
                    batch.inputs_embeds, mask, batch.position_ids, layout=model.layout(batch)
                ).hidden[0]
                start = next(st for _, st, _, _, part in batch.targets if part == "response")
                logits = model.heads[0](h[start : start + codes.shape[1]])[:, : model.codebook_size]
                gen = torch.Generator().manual_seed(k)
                probs = torch.softmax(logits / max(temp, 1e-4), -1)
                sampled = torch.multinomial(probs, 1, generator=gen)[:, 0] if temp > 0 else logits.argmax(-1)
            outs = {
                "truth": codes[0],
                "teacher-forced argmax": logits.argmax(-1),
                "teacher-forced sampled": sampled,
            }
            sc = SamplingConfig(seed=k, ar_temp=temp, top_k=top_k, **(extra or {}))
            if model.pointer:
                forced = torch.from_numpy(dur.astype(np.int64))
                for z in (forced == 0).nonzero().flatten().tolist():  # the engine holds a symbol >= 1 frame
                    forced[int(forced.argmax())] -= 1
                    forced[z] = 1
                req = Request(ph, prompt, 0, durations=forced)
                outs["free, oracle durations"] = generate_batch(model, [req], sc)[0].codes[0]
            outs["free, own durations"] = generate_batch(model, [Request(ph, prompt, 0)], sc)[0].codes[0]
            for name, level0 in outs.items():
                heard = asr(_decode(codec, level0[None].cpu()), sr)
                scores.setdefault(name, []).append(wer(text, heard))
            book = getattr(codec, "codebooks", None)  # the mel codec: level 0's centroids are log-mel frames
            if book is not None:
                unrelated = torch.from_numpy(ds.codes(other).astype(np.int64))[0]  # same voice, other words
                f = min(len(unrelated), len(codes[0]))
                gap = (book[0][unrelated[:f]] - book[0][codes[0][:f]]).norm(dim=-1).mean()
                scores.setdefault("mel distance, same voice other words", []).append(float(gap))
                for name in ("teacher-forced argmax", "free, oracle durations"):
                    if name in outs and len(outs[name]) == len(codes[0]):  # frame by frame against the truth
                        gap = (book[0][outs[name].cpu()] - book[0][codes[0]]).norm(dim=-1).mean()
                        scores.setdefault(f"mel distance, {name}", []).append(float(gap))
        return {name: float(np.mean(v)) for name, v in scores.items()} | {"n": len(val)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="The run folder (its config and dataset).")
    ap.add_argument("checkpoints", nargs="+", help="step-* folders (or PATH=LABEL) to compare.")
    ap.add_argument("--n", type=int, default=10, help="Held-out utterances per checkpoint.")
    ap.add_argument("--ar-temp", type=float, default=0.95, help="Sampling temperature (0: greedy).")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument(
        "--sampling", default="{}", help="More sampler settings as JSON, e.g. '{\"ras_window\": 10}'."
    )
    ap.add_argument("--write", action="store_true", help="Write the section into docs/benchmarks.md.")
    args = ap.parse_args()

    import torch

    from valle_cli.eval.judges import Asr

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory() as site:
        pocketsphinx_importable(Path(site))
        asr = Asr("pocketsphinx", "en")
        rows = []
        for spec in args.checkpoints:
            path, _, label = spec.partition("=")
            result = measure(
                args.run, Path(path), args.n, asr, args.ar_temp, args.top_k, json.loads(args.sampling)
            )
            rows.append((label or Path(path).name, result))
            print(label or path, {k: round(v, 3) for k, v in result.items()}, flush=True)
    cols = [c for c in ("truth", "teacher-forced argmax", "teacher-forced sampled", "free, oracle durations",
                        "free, own durations") if any(c in r for _, r in rows)]  # fmt: skip
    dist = [c for c in ("mel distance, teacher-forced argmax", "mel distance, free, oracle durations",
                        "mel distance, same voice other words")
            if any(c in r for _, r in rows)]  # fmt: skip
    body = [
        f"Command: `{command('speaking.py')}`  ",
        f"Machine: {platform.machine()}, CPU, {os.cpu_count()} cores. Level-0 WER (PocketSphinx) on "
        f"{rows[0][1]['n']} held-out utterances of mbrola/piper voices from the run's validation split, each "
        "decoded by the codec from level 0 alone (so 'truth' is the ceiling, not the full-codec WER). Sampling: "
        f"ar_temp {args.ar_temp}, top_k {args.top_k}, {args.sampling}.",
        "",
        "| checkpoint | "
        + " | ".join(cols + [c.replace("mel distance, ", "mel dist. ") for c in dist])
        + " |",
        "|---|" + "---|" * (len(cols) + len(dist)),
        *(
            f"| {label} | "
            + " | ".join(
                [f"{r[c]:.1%}" if c in r else "-" for c in cols]
                + [f"{r[c]:.3f}" if c in r else "-" for c in dist]
            )
            + " |"
            for label, r in rows
        ),
    ]
    print("\n".join(body))
    if args.write:
        write_section("Speaking: teacher-forced against free-running", body)


if __name__ == "__main__":
    main()
