"""The backbone protocol: a stack of transformer layers driven from outside with embeddings.

    forward(inputs_embeds (B, T, D), attention_mask (B, 1, T, S) additive float or None,
            position_ids (B, T) long, cache=None, use_cache=False) -> BackboneOutput

`S` is the key length: T plus whatever the cache already holds. The mask is additive (0 = attend, a large
negative number = masked) and fully explicit, so one backbone runs the AR pass (causal) and the NAR passes
(no causal mask) and handles padding, with no flag to forget; `attention_mask()` builds it. A backbone
declares what it supports: `supports_cache` (incremental decoding with `cache`), `supports_noncausal` (an
arbitrary mask), `has_aux_loss` (mixture-of-experts router loss, returned in `aux_loss`). `attention_maps`
(optional) returns every layer's attention probabilities, for alignment plots.

Backbones are plugins (`valle.backbones` entry points); `build_backbone(model_config)` calls
`cls.from_config(model_config)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from valle_cli.errors import ConfigError

if TYPE_CHECKING:
    from valle_cli.config import ModelConfig


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # (B, T, D)
    cache: Any = None  # the backbone's KV cache after this call, when use_cache
    aux_loss: torch.Tensor | None = None  # e.g. MoE load balancing; already scaled by its coefficient


def attention_mask(
    lengths: torch.Tensor,
    causal: torch.Tensor | bool,
    total: int,
    past: int = 0,
    past_lengths: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask (B, 1, T, past + T) for right-padded sequences.

    `lengths` (B,) are the real lengths of the new tokens (the rest of `total` is padding); `causal` (B,) or a
    bool says per sequence whether position i may see only positions <= i. Keys from a cache (`past` of them,
    of which `past_lengths` (B,) are real, default all) come first. Padding keys are masked; a padding query
    also sees itself, so no row is empty (padding outputs are ignored).
    """
    b = lengths.shape[0]
    device = lengths.device
    if isinstance(causal, bool):
        causal = torch.full((b,), causal, dtype=torch.bool, device=device)
    q = torch.arange(total, device=device)
    k = torch.arange(past + total, device=device)
    key_real = torch.cat(
        [
            k[None, :past]
            < (past_lengths if past_lengths is not None else torch.full((b,), past, device=device))[:, None],
            k[None, past:] - past < lengths[:, None],
        ],
        dim=1,
    )  # (B, S)
    allowed = key_real[:, None, :].expand(b, total, past + total).clone()  # (B, T, S)
    after = k[None, :] > (q[:, None] + past)  # key after query (in absolute positions)
    allowed &= ~(causal[:, None, None] & after[None])
    self_pos = k[None, :] == (q[:, None] + past)
    allowed |= self_pos[None]  # every query sees itself: no empty row, even for padding
    mask = torch.zeros(b, 1, total, past + total, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def padded_mask(
    key_valid: torch.Tensor, total: int, causal: bool = True, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive attention mask (B, 1, T, S) for the last `total` of S positions, padding anywhere.

    `key_valid` (B, S) says which keys are real: batched decoding pads on the left (so every row's next token
    lands in the same column) and keeps finished rows going, which `attention_mask` (right padding) cannot say.
    Queries are the last `total` positions; with `causal` each sees only keys at or before itself. Every query
    sees itself, so a padding query has no empty row.
    """
    b, s = key_valid.shape
    device = key_valid.device
    k = torch.arange(s, device=device)
    q = torch.arange(s - total, s, device=device)
    allowed = key_valid[:, None, :].expand(b, total, s)
    if causal:
        allowed = allowed & (k[None, :] <= q[:, None])[None]
    allowed = allowed | (k[None, :] == q[:, None])[None]
    mask = torch.zeros(b, 1, total, s, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class Backbone(torch.nn.Module):
    name: ClassVar[str] = "backbone"
    supports_cache: ClassVar[bool] = True
    supports_noncausal: ClassVar[bool] = True
    has_aux_loss: ClassVar[bool] = False
    sdpa_kernel: str = "auto"  # model.sdpa_kernel: restrict torch's attention kernel choice

    def __call__(self, *args, **kwargs):
        with sdpa_context(self.sdpa_kernel):
            return super().__call__(*args, **kwargs)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Backbone:  # pragma: no cover - every backbone overrides
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Any = None,
        use_cache: bool = False,
    ) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError

    def forward_with_attention(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> tuple[BackboneOutput, list[torch.Tensor]]:
        """`forward` (no cache) plus the attention probabilities of every layer, [(B, H, T, T)], with
        gradients: for alignment plots and the guided-attention loss. Optional: a backbone without it cannot
        be plotted or trained with train.guided_attention (both say so)."""
        raise NotImplementedError(f"the {self.name} backbone does not report its attention")

    def attention_maps(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> list[torch.Tensor]:
        """Attention probabilities of every layer, [(B, H, T, T)] (see `forward_with_attention`)."""
        return self.forward_with_attention(inputs_embeds, attention_mask, position_ids)[1]


def sdpa_context(kind: str):
    """A context that restricts torch's scaled_dot_product_attention to one kernel ('auto': no restriction)."""
    import contextlib

    if kind == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "math": SDPBackend.MATH,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[kind]
    return sdpa_kernel(backend)


def build_backbone(cfg: ModelConfig) -> Backbone:
    from valle_cli import plugins

    cls = plugins.load("backbone", cfg.backbone)
    backbone = cls.from_config(cfg)
    if not isinstance(backbone, Backbone):
        raise ConfigError(f"backbone plugin {cfg.backbone!r} did not build a valle Backbone")
    if cfg.sdpa_kernel != "auto":
        backbone.sdpa_kernel = cfg.sdpa_kernel
    return backbone
