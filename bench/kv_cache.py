"""The KV cache of the transformers backbones: a buffer with room to grow (`GrowingLayer`, what valle uses)
against transformers' `DynamicCache`, which concatenates the whole cache again at every step.

For each preset, batch size and context length: a random-weight llama backbone fills a cache with L tokens,
then decodes 40 single-token steps; reports the median step per cache kind (interleaved rounds, one process)
and the ratio. The batch of 8 is what `valle serve` runs when eight requests wait together.

Usage:  python bench/kv_cache.py [--presets small,base] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from report import command, write_section  # bench/ is on sys.path when run as a script

SHAPES = [(1, 300), (1, 900), (8, 300), (8, 600)]  # (batch, context length)


def step_ms(backbone, kind: str, batch: int, length: int, steps: int = 40) -> float:
    from transformers import DynamicCache

    from valle_cli.backbones.hf import growing_cache

    d = backbone.model.config.hidden_size
    cache = (
        growing_cache(backbone.model.config)
        if kind == "growing"
        else DynamicCache(config=backbone.model.config)
    )
    pos = torch.arange(length)[None].expand(batch, length)
    out = backbone(torch.randn(batch, length, d), None, pos, cache=cache, use_cache=True)
    cache, times = out.cache, []
    for k in range(steps):
        t0 = time.perf_counter()
        out = backbone(
            torch.randn(batch, 1, d), None, torch.full((batch, 1), length + k), cache=cache, use_cache=True
        )
        cache = out.cache
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE

    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        backbone = VALLE(load_config(preset).model, 100, 1024).eval().backbone
        for batch, length in SHAPES:
            got: dict[str, list[float]] = {"dynamic": [], "growing": []}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for kind in got:
                        got[kind].append(step_ms(backbone, kind, batch, length))
            dyn, grow = statistics.median(got["dynamic"]), statistics.median(got["growing"])
            rows.append(f"| {preset} | {batch} | {length} | {dyn:.2f} | {grow:.2f} | {dyn / grow:.2f}x |")
            print(rows[-1], flush=True)
    body = [
        f"Command: `{command('kv_cache.py')}`  ",
        f"Machine: {platform.machine()}, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"fp32, random weights; one cached decoding step of the backbone (median of 35 steps after 5, median of "
        f"{args.rounds} interleaved rounds).",
        "",
        "| preset | batch | context | DynamicCache ms | growing buffer ms | speed-up |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(body))
    if args.write:
        write_section("KV cache: a buffer with room against concatenation", body)


if __name__ == "__main__":
    main()
