"""Alignment plots: where the response frames look in the text.

For one utterance (teacher-forced codes, or what the model has just generated) the AR pass is run once more
with the backbone's `attention_maps`, and each layer's attention of the response frames over the text
symbols (the mean of its heads, renormalized over the text) is drawn as an image: frames on x, symbols on y.
A model that reads its text draws a monotonic diagonal; one that ignores it draws vertical smears or nothing.
The frame-to-symbol path is drawn over it in red when there is one: the aligner's durations of a dataset
utterance, or what a pointer model generated. Each panel is titled with its
layer's *focus*: the mean over frames of the largest attention weight on one symbol (1 = sharp).

Used at every evaluation of `valle train` (RUN/alignment/step-N.png) and by `valle plot --alignment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from valle_cli.errors import ValleError


@dataclass
class AlignmentMaps:
    maps: np.ndarray  # (layers, frames, symbols): attention of each response position over the text
    symbols: list[str]  # the text's symbols, BOS and EOS included
    frame_symbols: np.ndarray | None  # (frames,) the pointer's path, for pointer models

    def focus(self) -> np.ndarray:
        """(layers,) mean over frames of the largest weight on one symbol."""
        return self.maps.max(-1).mean(-1)


def check_reports_attention(model) -> None:
    """Refuse a model whose backbone has no attention to draw (mamba, retnet), before any work."""
    from valle_cli.backbones.base import Backbone

    kind = type(model.backbone)
    if (
        not hasattr(model.backbone, "attention_maps")
        or kind.forward_with_attention is Backbone.forward_with_attention
    ):
        raise ValleError(
            f"the {model.backbone.name} backbone does not report its attention, so there is no alignment plot",
            "alignment plots need an attention backbone (llama, mixtral, transformer, bitnet)",
        )


@torch.no_grad()
def alignment_maps(model, sample, symbols: list[str]) -> AlignmentMaps:
    """Attention of the response positions over the text symbols of one AR (level-0) sample."""
    check_reports_attention(model)
    was_training = model.training
    model.eval()
    try:
        batch = model.assemble([sample])
        mask = model.attention_mask(batch)
        try:
            layers = model.backbone.attention_maps(batch.inputs_embeds, mask, batch.position_ids)
        except NotImplementedError as exc:
            raise ValleError(f"{exc}, so there is no alignment plot") from None
    finally:
        model.train(was_training)
    start = next(s for b, s, _, _, part in batch.targets if part == "response")
    text_start = model.text_start
    n_text = len(sample.phonemes)
    maps = []
    for att in layers:
        a = att[0].float().mean(0)[start:, text_start : text_start + n_text]  # (frames, symbols)
        maps.append((a / a.sum(-1, keepdim=True).clamp_min(1e-9)).cpu().numpy())
    ids = sample.phonemes.tolist()
    names = [symbols[i] if 0 <= i < len(symbols) else "?" for i in ids]
    names = [{"<bos>": "BOS", "<eos>": "EOS", " ": "_"}.get(n, n) for n in names]
    fs = None if sample.frame_symbols is None else sample.frame_symbols.cpu().numpy()
    return AlignmentMaps(np.stack(maps), names, fs)


def render_alignment(am: AlignmentMaps, path: Path, title: str = "") -> Path:
    """Draw every layer's map (frames x symbols) into one PNG/SVG/PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = am.maps.shape[0]
    cols = min(3, n)
    rows = -(-n // cols)
    n_sym = am.maps.shape[2]
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols + 1, max(3.0, 0.11 * n_sym) * rows + 0.6), squeeze=False
    )
    focus = am.focus()
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(am.maps[k].T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
        if am.frame_symbols is not None:
            ax.plot(np.arange(len(am.frame_symbols)), am.frame_symbols, color="red", lw=0.7, alpha=0.8)
        ax.set_title(f"layer {k}  focus {focus[k]:.2f}", fontsize=9)
        ax.set_xlabel("response frame", fontsize=8)
        if k % cols == 0:
            step = max(1, n_sym // 40)
            ax.set_yticks(range(0, n_sym, step))
            ax.set_yticklabels(am.symbols[::step], fontsize=6)
        else:
            ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
