"""The `retnet` backbone: a Retentive Network (Sun et al. 2023, arXiv 2307.08621) in plain torch.

Each layer: RMSNorm -> multi-scale retention -> residual -> RMSNorm -> SwiGLU -> residual (the native
transformer's block with retention in place of attention). Retention in one
head is attention without the softmax and with a fixed decay: position n reads position m with weight
(q_n . k_m) * gamma^|n - m|, gamma = 1 - 2^(-5 - h) for head h, so heads look over windows from ~32 to
~2^(4 + H) positions. Queries and keys are rotated by their positions (as torchscale does), values pass a
per-head RMS norm (the paper's GroupNorm), a swish gate and an output projection.

The same weights run three ways, all equal (tested):
- parallel: the (T, S) weight matrix at once, with the additive attention mask applied as 0/1, so the AR
  pass (causal rows) and the NAR passes (non-causal rows: the decay is symmetric, gamma^|n - m|) use the
  masks every attention backbone uses; this is training.
- recurrent: one state per head, S <- gamma S + k^T v, read as q S; a decoding step costs the same at
  frame 10 as at frame 1000 (`RetentionState`).
- chunkwise: a run of new positions against the state of everything before them (prefill, several tokens
  at once).

The paper's normalizations of the decay matrix and of the retention scores are scalings per query and head,
which the value norm undoes, so they are left out; that is what makes the three forms equal to rounding.

Why not torchscale's RetNet: it pins timm 0.6.13 (which pulls torchvision) and fairscale 0.4.0 (built from
source against torch), and its recurrent mode reads one token at a time from the start, with no padding; a
batched, beam-searched, left-padded decoder needs all three here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from valle_cli.backbones.base import Backbone, BackboneOutput, options
from valle_cli.backbones.transformer import Block, RMSNorm, init_weights, rotary
from valle_cli.errors import ConfigError

if TYPE_CHECKING:
    from valle_cli.config import ModelConfig


@dataclass
class RetNetOptions:
    """model.backbone_options of the retnet backbone."""

    value_factor: int = 1  # value (and gate) width = value_factor * d_model; the paper uses 2
    decay_start: float = 5.0  # head h decays with gamma = 1 - 2^-(decay_start + h)

    def validate(self) -> None:
        if self.value_factor < 1:
            raise ConfigError(f"model.backbone_options.value_factor must be >= 1, got {self.value_factor}")
        if self.decay_start <= 0:
            raise ConfigError(f"model.backbone_options.decay_start must be positive, got {self.decay_start}")


@dataclass
class RetentionState:
    """Per layer, the retention state of every head (B, H, Dk, Dv), and how many positions it has read."""

    states: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0

    def get_seq_length(self) -> int:
        return self.seen

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows (beam search)."""
        self.states = [s.index_select(0, index) for s in self.states]


class MultiScaleRetention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, value_factor: int, decay_start: float):
        super().__init__()
        self.n_heads, self.key_dim = n_heads, d_model // n_heads
        self.value_dim = d_model * value_factor // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model * value_factor, bias=False)
        self.g_proj = nn.Linear(d_model, d_model * value_factor, bias=False)
        self.o_proj = nn.Linear(d_model * value_factor, d_model, bias=False)
        gamma = 1 - 2.0 ** (-decay_start - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_gamma", gamma.log().float(), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor | None,
        position_ids: torch.Tensor,
        state: RetentionState | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.n_heads
        q = rotary(self.q_proj(x).view(b, t, h, self.key_dim).transpose(1, 2), position_ids)
        k = rotary(self.k_proj(x).view(b, t, h, self.key_dim).transpose(1, 2), position_ids)
        k = k / math.sqrt(self.key_dim)
        v = self.v_proj(x).view(b, t, h, self.value_dim).transpose(1, 2)  # (B, H, T, Dv)
        log_g = self.log_gamma.to(q.dtype)[:, None, None]  # (H, 1, 1)
        past = state.seen if state is not None else 0
        new = allowed[:, :, :, past:] if allowed is not None else None  # (B, 1, T, T) among the new positions
        n = torch.arange(t, device=x.device, dtype=q.dtype)
        decay = torch.exp((n[:, None] - n[None, :]).abs() * log_g)  # (H, T, T): gamma^|n - m|
        weights = (q @ k.transpose(-1, -2)) * decay
        if new is not None:
            weights = weights * new.to(weights.dtype)
        out = weights @ v  # (B, H, T, Dv)
        if state is not None:
            prev = state.states[layer] if layer < len(state.states) else None
            if prev is not None:  # everything before, decayed to each new position
                out = out + (q * torch.exp((n + 1)[None, None, :, None] * log_g[None])) @ prev
            # the state after the last new position; keys it may read are those the last query may see
            key_ok = new[:, :, -1, :].to(k.dtype)[..., None] if new is not None else 1.0  # (B, 1, T, 1)
            tail = torch.exp((t - 1 - n)[None, None, :, None] * log_g[None])  # (1, H, T, 1)
            nxt = (k * tail * key_ok).transpose(-1, -2) @ v  # (B, H, Dk, Dv)
            if prev is not None:
                nxt = nxt + torch.exp(t * log_g)[None] * prev
            if layer < len(state.states):
                state.states[layer] = nxt
            else:
                state.states.append(nxt)
        out = out * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(out.dtype)
        out = out.transpose(1, 2).reshape(b, t, h * self.value_dim)
        return self.o_proj(F.silu(self.g_proj(x)) * out)


class RetNetBlock(Block):
    """The transformer's block (RMSNorm, SwiGLU, residuals) with retention in place of attention."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float, opts: RetNetOptions):
        super().__init__(d_model, n_heads, ffn_dim, dropout)
        self.attn = MultiScaleRetention(d_model, n_heads, opts.value_factor, opts.decay_start)


class RetNetBackbone(Backbone):
    name = "retnet"
    Options = RetNetOptions

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        opts: RetNetOptions | None = None,
    ):
        super().__init__()
        opts = opts or RetNetOptions()
        self.layers = nn.ModuleList(
            RetNetBlock(d_model, n_heads, ffn_dim, dropout, opts) for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model)
        self.gradient_checkpointing = gradient_checkpointing
        init_weights(self, n_layers)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RetNetBackbone:
        return cls(
            cfg.d_model,
            cfg.n_layers,
            cfg.n_heads,
            cfg.ffn_dim,
            cfg.dropout,
            cfg.gradient_checkpointing,
            options(cfg),
        )

    def forward(
        self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False
    ) -> BackboneOutput:
        if use_cache and cache is None:
            cache = RetentionState()
        allowed = (
            None if attention_mask is None else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, allowed, position_ids, None, i, use_reentrant=False)
            else:
                x = layer(x, allowed, position_ids, cache, i)
        if cache is not None:
            cache.seen += inputs_embeds.shape[1]
        return BackboneOutput(self.norm(x), cache if use_cache else None)
