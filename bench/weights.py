"""Lighter weights for CPU decoding: what bf16 and int8 / int4 weight-only linears (`valle synth --dtype`) cost
in quality and gain in speed.

Quality: a trained model's teacher-forced cross-entropy per RVQ level (the loss it was trained on, eval mode,
nothing sampled) on `--n` utterances of a dataset prepared with the model's symbol map, each against the
same utterance's fp32 figure (int8/int4: every position through the quantized kernels; the many-row passes
in use compute the same rounded weights in bf16); and the share of argmax predictions that equal fp32's. Differences far below
the spread between levels, and argmax agreement near 100%, mean the outputs are the same model's.
Speed: the cached AR step and the 7 NAR passes of that model and of random-weight models of the `--presets`
shapes (4 s after a 3 s prompt), medians.

Usage:  python bench/weights.py [--model valle-default] --data DATASET [--n 40] [--presets small,base] [--write]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from realtime import timed  # bench/ is on sys.path when run as a script
from report import command, machine, write_section

DTYPES = ("fp32", "bf16", "int8", "int4")


def cast(model, dtype: str):
    from valle_cli.model.quant import set_dtype

    set_dtype(model, dtype)
    return model


def load(source: str, dtype: str):
    from valle_cli.infer.load import load_model

    loaded = load_model(source, "cpu")
    loaded.model.eval()
    cast(loaded.model, dtype)
    return loaded


def samples(loaded, data: str, n: int) -> list:
    from valle_cli.data.dataset import open_dataset
    from valle_cli.model.valle import Sample, frame_symbols

    ds = open_dataset(data)
    model = loaded.model
    if ds.header["symbols"] != loaded.meta["symbols"]:
        raise SystemExit(
            f"{data} was prepared with another symbol map than the model's: prepare it for this model"
        )
    from valle_cli.text.symbols import SymbolMap

    sym = SymbolMap.from_dict(ds.header["symbols"])
    bos, eos = sym.bos_id, sym.eos_id
    out = []
    g = np.random.default_rng(0)
    for i in g.permutation(len(ds))[: n * 3]:
        i = int(i)
        codes = torch.from_numpy(ds.codes(i).astype(np.int64))[: model.n_levels]
        other = next(x for x in range(len(ds)) if ds.speaker(x) == ds.speaker(i) and x != i)
        prompt = torch.from_numpy(ds.codes(other).astype(np.int64))[: model.n_levels, :225]
        ph = torch.tensor([bos, *ds.phonemes(i).astype(np.int64).tolist(), eos])
        fs = None
        if model.pointer:
            dur = ds.phoneme_durations(i)
            if dur is None:
                continue
            fs = frame_symbols(torch.from_numpy(dur))
        for level in range(model.n_levels):
            out.append(Sample(ph, prompt, codes, level, frame_symbols=fs, masked=None))
        if len(out) >= n * model.n_levels:
            break
    return out


@torch.inference_mode()
def quality(model, items: list) -> dict:
    """Per level: mean cross-entropy and the argmax of every scored position."""
    from valle_cli.model.quant import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.force_kernel = True
    try:
        return _quality(model, items)
    finally:
        for m in layers:
            m.force_kernel = False


def _quality(model, items: list) -> dict:
    torch.manual_seed(0)
    losses: dict[str, list[float]] = {}
    argmax: dict[str, list[torch.Tensor]] = {}
    for s in items:
        batch = model.assemble([s])
        out = model([s], return_hidden=True)
        for key, value in out.level_loss.items():
            losses.setdefault(key, []).append(value)
        _, start, tgt, head, _ = next(t for t in batch.targets if t[4] == "response")
        h = out.hidden[0, start : start + len(tgt)]
        argmax.setdefault(f"l{head}", []).append(model.head_for(head)(h).float().argmax(-1))
    return {"loss": {k: float(np.mean(v)) for k, v in losses.items()}, "argmax": argmax}


@torch.inference_mode()
def speed(model) -> dict:
    from valle_cli.infer.engine import NarItem, Request, SamplingConfig, ar_tokens, nar_fill

    g = torch.Generator().manual_seed(0)
    q = model.n_levels
    req = Request(torch.tensor([1, *range(10, 60), 2]), torch.randint(0, 1024, (q, 225), generator=g))
    if model.pointer or model.nar0:
        step = None
    else:
        with torch.no_grad():
            bias = model.heads[0].bias[model.stop_id].clone()
            model.heads[0].bias[model.stop_id] = -1e4
        gen = ar_tokens(model, [req], SamplingConfig(ar_temp=0.0, max_ar_steps=10_000))
        for _ in range(4):
            next(gen)
        step, _ = timed(lambda: next(gen), 30)
        with torch.no_grad():
            model.heads[0].bias[model.stop_id] = bias
    codes = torch.zeros(q, 300, dtype=torch.long)
    fs = None
    if model.pointer:  # the NAR passes read each frame's symbol: spread the symbols evenly
        from valle_cli.model.valle import frame_symbols, stretch_durations

        fs = frame_symbols(stretch_durations(torch.ones(len(req.phonemes), dtype=torch.long), 300))
    nar, _ = timed(lambda: nar_fill(model, [NarItem(req, codes, 0, fs)], SamplingConfig(ar_temp=0.0)), 2)
    return {"step": step, "nar": nar}


def random_model(preset: str, dtype: str):
    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE

    torch.manual_seed(0)
    return cast(VALLE(load_config(preset).model, n_symbols=623).eval(), dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="valle-default")
    ap.add_argument("--data", required=True, help="a dataset prepared with the model's symbol map")
    ap.add_argument("--n", type=int, default=40, help="utterances")
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    results = {}
    for dtype in DTYPES:
        loaded = load(args.model, dtype)
        items = samples(loaded, args.data, args.n)
        results[dtype] = quality(loaded.model, items)
        results[dtype]["speed"] = speed(loaded.model)
        print(
            dtype,
            {k: round(v, 4) for k, v in results[dtype]["loss"].items()},
            results[dtype]["speed"],
            flush=True,
        )
    ref = results["fp32"]
    levels = sorted(ref["loss"], key=lambda k: (len(k), k))
    agree = {}
    for dtype in DTYPES:
        agree[dtype] = {
            k: float(
                torch.cat(
                    [
                        (a == b).float()
                        for a, b in zip(results[dtype]["argmax"][k], ref["argmax"][k], strict=True)
                    ]
                ).mean()
            )
            for k in ref["argmax"]
        }
    shapes = []
    for preset in [p for p in args.presets.split(",") if p]:
        row = {dtype: speed(random_model(preset, dtype)) for dtype in DTYPES}
        shapes.append((preset, row))
        print(preset, row, flush=True)
    if not args.write:
        return
    lines = [
        f"Command: `{command('weights.py')}`  ",
        machine()
        + f"model `{args.model}`, {args.n} utterances of `{args.data}` x every level, teacher-forced, "
        "eval mode. bf16: weights and activations bf16; int8: weight-only int8 linears (per-row absmax "
        "scales), int4: weight-only int4 linears (a scale and zero per 64 inputs; int8 where the kernel's shape "
        "rules exclude it), bf16 activations (`valle synth --dtype int8|int4`, valle_cli/model/quant.py); the "
        "losses put every position through the quantized kernels (in use, passes of more than 16 rows compute "
        "the same rounded weights as a bf16 matmul).",
        "",
        "| level | "
        + " | ".join(f"{d} loss" for d in DTYPES)
        + " | "
        + " | ".join(f"{d} argmax = fp32" for d in DTYPES[1:])
        + " |",
        "|---|" + "---|" * (2 * len(DTYPES) - 1),
    ]
    for k in levels:
        cells = [f"{results[d]['loss'][k]:.4f}" for d in DTYPES]
        cells += [f"{100 * agree[d][k]:.1f}%" if k in agree[d] else "-" for d in DTYPES[1:]]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Speed (median; cached AR step after a 3 s prompt and ~50 phonemes; the 7 NAR passes for 4 s):",
        "",
        "| model | "
        + " | ".join(f"{d} step ms" for d in DTYPES)
        + " | "
        + " | ".join(f"{d} NAR s" for d in DTYPES)
        + " |",
        "|---|" + "---|" * (2 * len(DTYPES)),
    ]
    rows = [
        (args.model, {d: results[d]["speed"] for d in DTYPES}),
        *[(f"{p} (random weights)", r) for p, r in shapes],
    ]
    for name, row in rows:
        steps = [f"{row[d]['step'] * 1e3:.1f}" if row[d]["step"] else "-" for d in DTYPES]
        nars = [f"{row[d]['nar']:.2f}" for d in DTYPES]
        lines.append(f"| {name} | " + " | ".join(steps + nars) + " |")
    write_section("Lighter weights: bf16, int8 and int4 for CPU decoding", lines)


if __name__ == "__main__":
    main()
