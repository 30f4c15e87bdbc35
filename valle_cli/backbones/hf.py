"""transformers backbones: `llama` (LlamaModel) and `mixtral` (MixtralModel, mixture of experts).

We drive the decoder stack with `inputs_embeds`, an explicit 4D additive mask (transformers passes a 4D mask
through unchanged, so one model runs causal AR and non-causal NAR passes), explicit `position_ids`, and
transformers' `DynamicCache` for incremental decoding (with `GrowingLayer`s: room to grow, not a copy per step). Sampling stays in valle's code; `generate()` is not
used. `model.attention` eager is transformers' eager attention; everything else is its sdpa attention,
with torch's kernel restricted as asked (see backbones/base.py; flash and flash_attention_2 cannot take the
arbitrary masks the NAR passes need, so they are refused with that reason).

The token embedding table transformers creates is unused (valle has its own embeddings), so it is built with
a vocabulary of one row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from valle_cli.backbones.base import SDPA_KINDS, Backbone, BackboneOutput, options
from valle_cli.errors import ConfigError

if TYPE_CHECKING:
    from valle_cli.config import ModelConfig


def _attn(cfg: ModelConfig) -> str:
    return "eager" if cfg.attention == "eager" else "sdpa"


def _shape(cfg: ModelConfig) -> dict:
    """The decoder-stack settings shared by the Llama and Mixtral configs (no token ids: we feed embeddings)."""
    return {
        "vocab_size": 1,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_position,
        "attention_dropout": cfg.dropout,
        "attn_implementation": _attn(cfg),
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def growing_layer_class():
    """`GrowingLayer`, defined on first use (transformers is imported lazily)."""
    global _GROWING
    if _GROWING is not None:
        return _GROWING
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values live in a buffer with room to grow: a decoding step writes its
        token into the room instead of concatenating the whole cache again (which copied the cache every step:
        61% of a batch-of-8 AR step of the small preset). `keys`/`values` are views of the buffer's filled part.
        The buffer doubles when full. A layer writes into a buffer only if it made it: a fork (a copy of the
        layer, `fork_cache`) or a layer whose tensors were replaced (beam search's `reorder_cache`, `crop`)
        copies what it holds into a buffer of its own on its next update, so shared tensors are never
        written."""

        ROOM = 256  # tokens of room a new buffer gets beyond what it holds first

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            mine = getattr(self, "_owner", None) is self and self.keys is self._view_k
            n, t = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
            if not mine or n + t > self._kbuf.shape[-2]:
                room = max(2 * (n + t), n + t + self.ROOM) if mine else n + t + self.ROOM
                shape = (*key_states.shape[:-2], room, key_states.shape[-1])
                kbuf, vbuf = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    kbuf[..., :n, :] = self.keys
                    vbuf[..., :n, :] = self.values
                self._kbuf, self._vbuf, self._owner = kbuf, vbuf, self
            self._kbuf[..., n : n + t, :] = key_states
            self._vbuf[..., n : n + t, :] = value_states
            self.keys, self.values = self._kbuf[..., : n + t, :], self._vbuf[..., : n + t, :]
            self._view_k = self.keys
            return self.keys, self.values

    _GROWING = GrowingLayer
    return GrowingLayer


_GROWING = None


def growing_cache(config):
    """A transformers `DynamicCache` of `GrowingLayer`s (one per decoder layer)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    layer = growing_layer_class()
    cache.layers = [layer() for _ in cache.layers]
    return cache


class HFBackbone(Backbone):
    """Common driver for transformers decoder stacks."""

    attention_kinds = SDPA_KINDS
    supports_shared_prefix = True

    def __init__(self, model: torch.nn.Module, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        model.embed_tokens.weight.requires_grad_(False)  # unused: valle feeds inputs_embeds
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def _call(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, **extra):
        if use_cache and cache is None:
            cache = growing_cache(self.model.config)
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=None if attention_mask is None else attention_mask.to(inputs_embeds.dtype),
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **extra,
        )
        return out, (cache if use_cache else None)

    def fork_cache(self, cache):
        """A cache with its own layer objects over the same tensors: a fork's first step copies them into its
        own buffer (`GrowingLayer`), so the original and its other forks stay as they were."""
        fork = copy.copy(cache)
        fork.layers = [copy.copy(layer) for layer in cache.layers]
        return fork

    def forward_with_attention(self, inputs_embeds, attention_mask, position_ids, **extra):
        """`forward` plus every layer's attention probabilities (B, H, T, T), computed with the eager kernel
        (sdpa does not return them); the model's own kernel is restored afterwards."""
        kind = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            out, _ = self._call(
                inputs_embeds, attention_mask, position_ids, None, False, output_attentions=True, **extra
            )
        finally:
            self.model.set_attn_implementation(kind)
        return BackboneOutput(out.last_hidden_state, None, self._aux(out)), list(out.attentions)

    def _aux(self, out) -> torch.Tensor | None:
        """The backbone's auxiliary loss from a transformers output (none here; mixtral's router loss)."""
        return None


class LlamaBackbone(HFBackbone):
    name = "llama"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> LlamaBackbone:
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(**_shape(cfg))
        return cls(LlamaModel(config), cfg.gradient_checkpointing)

    def forward(
        self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False
    ) -> BackboneOutput:
        out, cache = self._call(inputs_embeds, attention_mask, position_ids, cache, use_cache)
        return BackboneOutput(out.last_hidden_state, cache)


@dataclass
class MixtralOptions:
    """model.backbone_options of the mixtral backbone."""

    n_experts: int = 8  # feed-forward experts per layer
    experts_per_token: int = 2  # experts each token is routed to
    router_aux_loss_coef: float = 0.02  # weight of the load-balancing loss

    def validate(self) -> None:
        if self.n_experts < 1 or not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(
                f"model.backbone_options: mixtral needs n_experts >= 1 and 1 <= experts_per_token <= n_experts "
                f"(got {self.n_experts} and {self.experts_per_token})"
            )
        if self.router_aux_loss_coef < 0:
            raise ConfigError("model.backbone_options.router_aux_loss_coef cannot be negative")


class MixtralBackbone(HFBackbone):
    name = "mixtral"
    has_aux_loss = True
    Options = MixtralOptions

    def __init__(self, model, gradient_checkpointing: bool = False, aux_coef: float = 0.02):
        super().__init__(model, gradient_checkpointing)
        self.aux_coef = aux_coef

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MixtralBackbone:
        from transformers import MixtralConfig, MixtralModel

        opts = options(cfg)
        config = MixtralConfig(
            **_shape(cfg),
            num_local_experts=opts.n_experts,
            num_experts_per_tok=opts.experts_per_token,
            router_aux_loss_coef=opts.router_aux_loss_coef,
        )
        return cls(MixtralModel(config), cfg.gradient_checkpointing, opts.router_aux_loss_coef)

    def forward(
        self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False
    ) -> BackboneOutput:
        out, cache = self._call(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, output_router_logits=self.training
        )
        return BackboneOutput(out.last_hidden_state, cache, self._aux(out))

    def fork_cache(self, cache):
        return HFBackbone.fork_cache(self, cache)

    def forward_with_attention(self, inputs_embeds, attention_mask, position_ids, **extra):
        return super().forward_with_attention(
            inputs_embeds, attention_mask, position_ids, output_router_logits=self.training
        )

    def _aux(self, out) -> torch.Tensor | None:
        """The router's load-balancing loss (training only), scaled by its coefficient."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        if not (self.training and getattr(out, "router_logits", None)):
            return None
        cfg = self.model.config
        return self.aux_coef * load_balancing_loss_func(
            out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok
        )
