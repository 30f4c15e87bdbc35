"""Layer skip on a trained model: how often it exits early, at which layer, what it saves, what it changes.

Takes a model trained with `train.layer_skip` (transformer or bitnet backbone, classic AR) and a prepared
dataset; for held-out-style requests (each utterance's transcript with another utterance of its speaker as
the prompt), decodes level 0 greedily, once with the full model and once per entropy threshold with
`--layer-skip`. Reports, per threshold: the mean number of layers a step ran, the share of steps that exited
early, the level-0 time against the full model's, and how many frames are identical to the full model's
output before the first difference (greedy, so any difference is the exits' doing).

Usage:  python bench/layer_skip.py --model RUN_OR_EXPORT --dataset DATASET [--utterances 8]
                                   [--entropy 0.5,1,2,3] [--write]
"""

from __future__ import annotations

import argparse
import time

import torch
from report import command, machine, write_section  # bench/ is on sys.path when run as a script


def requests(ds, n: int, max_prompt: int = 225):
    """(request, frames) for up to n speakers: an utterance's transcript, another of theirs as the prompt."""
    from valle_cli.infer.engine import Request
    from valle_cli.text.symbols import BOS, EOS

    symbols = ds.header["symbols"]["symbols"]
    bos, eos = symbols.index(BOS), symbols.index(EOS)
    by_speaker: dict[str, list[int]] = {}
    for i in range(len(ds)):
        by_speaker.setdefault(ds.speaker(i), []).append(i)
    out = []
    for items in by_speaker.values():
        if len(items) < 2:
            continue
        target, prompt = items[0], items[1]
        ph = torch.tensor([bos, *ds.phonemes(target).tolist(), eos], dtype=torch.long)
        codes = torch.as_tensor(ds.codes(prompt)[:, :max_prompt].astype("int64"))
        out.append((Request(ph, codes, int(ds.columns["language"][target])), ds.frames(target)))
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def run(model, reqs, sc):
    """Greedy level 0 of every request through the AR decoder: (tokens per request, layers run per step,
    seconds)."""
    from valle_cli.infer.engine import ar_decoder

    tokens, layers, t0 = [], [], time.perf_counter()
    for req, _ in reqs:
        dec = ar_decoder(model, [req], True, sc)
        made: list[int] = []
        while len(made) < sc.max_ar_steps:
            token = int(dec.logits()[0, 0].argmax())
            if token == model.stop_id:
                break
            made.append(token)
            dec.feed(torch.tensor([token]))
        tokens.append(made)
        layers += dec.early_exit.layers if dec.early_exit is not None else []
    return tokens, layers, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--utterances", type=int, default=8)
    ap.add_argument("--entropy", default="0.5,1,2,3")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from valle_cli.data.dataset import open_dataset
    from valle_cli.infer.engine import SamplingConfig
    from valle_cli.infer.load import load_model

    model = load_model(args.model).model
    n_layers = len(model.backbone.layers)
    ds = open_dataset(args.dataset)
    reqs = requests(ds, args.utterances)
    limit = max(f for _, f in reqs) * 2
    full, _, full_s = run(model, reqs, SamplingConfig(ar_temp=0.0, max_ar_steps=limit))
    frames = sum(len(t) for t in full)
    print(f"full model: {frames} frames in {full_s:.2f} s", flush=True)
    rows = []
    for h in [float(x) for x in args.entropy.split(",")]:
        sc = SamplingConfig(ar_temp=0.0, max_ar_steps=limit, layer_skip=True, layer_skip_entropy=h,
                            layer_skip_varentropy=4 * h)  # fmt: skip
        toks, layers, secs = run(model, reqs, sc)
        same = sum(next((k for k, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
                   for x, y in zip(toks, full, strict=True))  # fmt: skip
        mean = sum(layers) / max(len(layers), 1)
        early = sum(1 for n in layers if n < n_layers) / max(len(layers), 1)
        rows.append((h, mean, early, secs, same / frames))
        print(f"entropy < {h:g}: {mean:.2f} of {n_layers} layers per step, {early:.0%} of steps exit early, "
              f"level 0 {secs:.2f} s vs {full_s:.2f} s, {same / frames:.0%} of frames as the full model's "
              "before the first difference", flush=True)  # fmt: skip
    if not args.write:
        return
    lines = [
        f"Command: `{command('layer_skip.py')}`  ",
        machine()
        + f"fp32, greedy, {len(reqs)} utterances ({frames} frames), {n_layers}-layer model trained with "
        "`train.layer_skip`. Varentropy threshold = 4 x the entropy threshold.",
        "",
        "| exit when entropy < | layers per step | steps exiting early | level 0 s | full model s | "
        "frames equal to the full model's |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {h:g} | {mean:.2f} of {n_layers} | {early:.0%} | {secs:.2f} | {full_s:.2f} | {same:.0%} |"
        for h, mean, early, secs, same in rows
    ]
    write_section("Layer skip on a trained model", lines)


if __name__ == "__main__":
    main()
