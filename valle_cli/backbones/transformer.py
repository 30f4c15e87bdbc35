"""A native torch transformer backbone (the `transformer` plugin): pre-norm, RoPE, SwiGLU, its own KV cache.

No dependency beyond torch, every line readable: RMSNorm -> multi-head attention (rotary positions,
`scaled_dot_product_attention` with the explicit additive mask) -> residual -> RMSNorm -> SwiGLU -> residual.
The KV cache is an explicit object holding (B, H, S, Dh) keys and values per layer.

`bitnet` is the same stack with every projection a `BitLinear`: BitNet b1.58 (Ma et al. 2024, arXiv
2402.17764) weights in {-1, 0, +1} times one scale per matrix (the mean absolute value), inputs quantized to
8 bits per token (absmax), trained through the rounding with the straight-through estimator. The weights
are kept and exported in full precision (what training updates); the forward pass always uses the
quantized ones, so what you train is what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from valle_cli.backbones.base import SDPA_KINDS, Backbone, BackboneOutput

if TYPE_CHECKING:
    from valle_cli.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of every layer seen so far: lists of (B, H, S, Dh) tensors."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def fork(self) -> KVCache:
        """The same keys and values, growing on its own (`update` replaces the tensors, never writes them)."""
        return KVCache(list(self.keys), list(self.values))

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows (beam search); named like transformers' `Cache.reorder_cache`."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)


def rotary(x: torch.Tensor, position_ids: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Apply rotary position embedding to (B, H, T, Dh) using positions (B, T)."""
    dh = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh))
    angles = position_ids.float()[:, None, :, None] * inv  # (B, 1, T, Dh/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class BitLinear(nn.Linear):
    """A linear layer with ternary weights and 8-bit inputs (BitNet b1.58), trained with straight-through
    gradients; `nn.Linear`'s parameters, so LoRA, checkpoints and exports treat it as one."""

    _frozen: tuple | None = (
        None  # ((version, address, dtype) of the weight, its rounding): reused without grad
    )

    def ternary(self) -> torch.Tensor:
        """The weight as used: {-1, 0, +1} times its mean absolute value (straight-through when training)."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            scale = w.abs().mean().clamp_min(1e-5)
            return w + ((w / scale).round().clamp(-1, 1) * scale - w).detach()
        key = (w._version, w.data_ptr(), w.dtype)
        if self._frozen is None or self._frozen[0] != key:
            scale = w.abs().mean().clamp_min(1e-5)
            self._frozen = (key, (w / scale).round().clamp(-1, 1) * scale)
        return self._frozen[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wq = self.ternary()
        xs = 127.0 / x.abs().amax(-1, keepdim=True).clamp_min(1e-5)
        xq = x + ((x * xs).round().clamp(-128, 127) / xs - x).detach()
        return F.linear(xq, wq, self.bias)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = linear(d_model, d_model, bias=False)
        self.k_proj = linear(d_model, d_model, bias=False)
        self.v_proj = linear(d_model, d_model, bias=False)
        self.o_proj = linear(d_model, d_model, bias=False)
        self.dropout = dropout
        self.eager = False  # set from model.attention by the backbone

    def forward(self, x, mask, position_ids, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, d = x.shape

        def heads(p: torch.Tensor) -> torch.Tensor:
            return p.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

        q = rotary(heads(self.q_proj(x)), position_ids)
        k = rotary(heads(self.k_proj(x)), position_ids)
        v = heads(self.v_proj(x))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        p = self.dropout if self.training else 0.0
        if self.eager:  # model.attention=eager: the softmax written out
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask.to(scores.dtype)
            out = F.dropout(torch.softmax(scores.float(), -1).to(q.dtype), p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask.to(q.dtype), dropout_p=p
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))

    def fill_cache(self, x, position_ids, cache: KVCache, layer: int) -> None:
        """Append keys and values made from `x` (B, T, D) without attending: a layer skipped by an early exit
        still leaves this position's keys for later steps (CALM's state propagation, arXiv 2207.07061)."""
        b, t, _ = x.shape
        k = rotary(self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2), position_ids)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        cache.update(layer, k, v)


class Block(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, ffn_dim: int, dropout: float, linear: type[nn.Linear] = nn.Linear
    ):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, linear)
        self.ffn_norm = RMSNorm(d_model)
        self.gate_proj = linear(d_model, ffn_dim, bias=False)
        self.up_proj = linear(d_model, ffn_dim, bias=False)
        self.down_proj = linear(ffn_dim, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, position_ids, cache, layer):
        x = x + self.drop(self.attn(self.attn_norm(x), mask, position_ids, cache, layer))
        h = self.ffn_norm(x)
        return x + self.drop(self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)))


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2's initialization: N(0, 0.02) matrices, the ones writing into the residual stream scaled down by
    sqrt(2 * layers)."""
    for name, p in module.named_parameters():
        if p.dim() == 2:
            deep = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, std=0.02 / (math.sqrt(2 * n_layers) if deep else 1))


class TransformerBackbone(Backbone):
    name = "transformer"
    attention_kinds = SDPA_KINDS
    supports_early_exit = True
    supports_shared_prefix = True
    linear: type[nn.Linear] = nn.Linear

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(d_model, n_heads, ffn_dim, dropout, self.linear) for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model)
        self.gradient_checkpointing = gradient_checkpointing
        init_weights(self, n_layers)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> TransformerBackbone:
        bb = cls(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.dropout, cfg.gradient_checkpointing)
        for layer in bb.layers:
            layer.attn.eager = cfg.attention == "eager"
        return bb

    def forward(
        self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False
    ) -> BackboneOutput:
        if use_cache and cache is None:
            cache = KVCache()
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, attention_mask, position_ids, None, i, use_reentrant=False)
            else:
                x = layer(
                    x, attention_mask, position_ids, cache if use_cache or cache is not None else None, i
                )
        return BackboneOutput(self.norm(x), cache if use_cache else None)

    def fork_cache(self, cache: KVCache) -> KVCache:
        return cache.fork()

    def forward_layers(self, inputs_embeds, attention_mask, position_ids) -> tuple[BackboneOutput, list]:
        """`forward` (no cache) plus every earlier layer's output through the final norm, [(B, T, D)] for
        layers 1..L-1: what an early exit after that layer would read (the layer-skip training loss)."""
        x, early = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attention_mask, position_ids, None, i, use_reentrant=False)
            else:
                x = layer(x, attention_mask, position_ids, None, i)
            early.append(self.norm(x))
        return BackboneOutput(early[-1]), early[:-1]

    def forward_exit(
        self, inputs_embeds, attention_mask, position_ids, cache, confident, min_layer: int, max_layer: int
    ):
        """One cached decoding call that may stop early: after each layer n (1-based) in min..max_layer,
        `confident(hidden (B, T, D) through the final norm)` decides; on an exit, the skipped layers get this
        position's keys and values from the exit layer's state (`Attention.fill_cache`). Returns the output
        and how many layers ran."""
        x = inputs_embeds
        last = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, attention_mask, position_ids, cache, i)
            if min_layer <= i + 1 <= max_layer and i + 1 < last:
                h = self.norm(x)
                if confident(h):
                    for j in range(i + 1, last):
                        self.layers[j].attn.fill_cache(self.layers[j].attn_norm(x), position_ids, cache, j)
                    return BackboneOutput(h, cache), i + 1
        return BackboneOutput(self.norm(x), cache), last

    def forward_with_attention(self, inputs_embeds, attention_mask, position_ids):
        """`forward` plus every layer's attention probabilities (B, H, T, T), recomputed from its queries and
        keys (the forward itself keeps torch's fused kernel)."""
        maps = []
        x = inputs_embeds
        for layer in self.layers:
            att = layer.attn
            h = layer.attn_norm(x)
            b, t, _ = h.shape
            q = rotary(att.q_proj(h).view(b, t, att.n_heads, att.head_dim).transpose(1, 2), position_ids)
            k = rotary(att.k_proj(h).view(b, t, att.n_heads, att.head_dim).transpose(1, 2), position_ids)
            scores = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)
            if attention_mask is not None:
                scores = scores + attention_mask.to(scores.dtype)
            maps.append(torch.softmax(scores.float(), -1))
            x = layer(x, attention_mask, position_ids, None, 0)
        return BackboneOutput(self.norm(x)), maps


class BitNetBackbone(TransformerBackbone):
    """The `bitnet` backbone: the native transformer with 1.58-bit projections (see the module)."""

    name = "bitnet"
    linear = BitLinear
    lora_targets = ()
    lora_refusal = "its weights are ternary, and an adapter merged into them for export would be rounded away"
