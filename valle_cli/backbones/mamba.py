"""The `mamba` backbone: transformers' Mamba (selective state spaces, arXiv 2312.00752) driven by valle.

The layers are transformers' `MambaBlock`s (RMSNorm -> `MambaMixer`) run by our own loop, so that:

- the AR pass and speech-to-text are a left-to-right scan; incremental decoding keeps each layer's
  convolution window and SSM state (transformers' cache), so a step costs the same at frame 10 and frame
  1000 (`MambaState`). Rows padded on the left (batched decoding) are exact: padded inputs are zeroed in
  every mixer and leave the state at zero.
- the NAR passes, which must see the whole sequence, get a second mixer per layer that reads each row
  backwards (as bidirectional Mamba encoders do, e.g. Vision Mamba, arXiv 2401.09417); its output is
  added to the forward one. A level0-nar row's prefix is read backwards on its own, so the text never sees
  the response (the same rule the attention mask states for attention backbones). With
  `backbone_options.bidirectional: false` there is no backward mixer and the model is AR-only.

A mamba backbone reads no attention mask: it asks for the `Layout` (see backbones/base.py). Positions are
implicit in the scan (position_ids are not used).

On CPU transformers runs the reference PyTorch scan (a loop over time); on a GPU it uses the `mamba_ssm`
and `causal_conv1d` kernels when they are installed (`pip install mamba-ssm causal-conv1d`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from valle_cli.backbones.base import Backbone, BackboneOutput, Layout, needs_noncausal, options
from valle_cli.errors import ConfigError

if TYPE_CHECKING:
    from valle_cli.config import ModelConfig


@dataclass
class MambaOptions:
    """model.backbone_options of the mamba backbone (the shape comes from model.d_model and n_layers)."""

    state_size: int = 16  # SSM state per channel (N in the paper)
    conv_kernel: int = 4  # width of the causal depthwise convolution
    expand: int = 2  # inner width = expand * d_model
    bidirectional: bool = True  # a backward mixer per layer for the NAR passes (false: AR-only model)

    def validate(self) -> None:
        for key in ("state_size", "conv_kernel", "expand"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.backbone_options.{key} must be positive, got {getattr(self, key)}")


def reverse_index(layout: Layout) -> torch.Tensor:
    """(B, T) gather index that reads each non-causal row backwards: its prefix [0, split) and the rest
    [split, length) each reversed in place, so a backward scan over the gathered row lets the prefix see only
    the prefix. Causal rows and padding map to themselves. The index is its own inverse."""
    b, t = layout.valid.shape
    pos = torch.arange(t, device=layout.valid.device)[None].expand(b, t)
    n = layout.valid.sum(1, keepdim=True)
    s = torch.minimum(layout.split[:, None], n)
    idx = torch.where(pos < s, s - 1 - pos, pos)
    idx = torch.where((pos >= s) & (pos < n), s + n - 1 - pos, idx)
    return torch.where(layout.causal[:, None], pos, idx)


def _check_right_padded(layout: Layout) -> None:
    rows = ~layout.causal
    if not bool(rows.any()):
        return
    v = layout.valid[rows].long()
    if bool((v[:, 1:] > v[:, :-1]).any()):
        raise ValueError("non-causal rows must be right-padded (their real positions first)")


class MambaState:
    """The incremental-decoding state: transformers' cache (per layer: the convolution window and the SSM
    state, both of fixed size) and how many positions it has read."""

    def __init__(self, config):
        from transformers import DynamicCache

        self.inner = DynamicCache(config=config)
        self.seen = 0

    def get_seq_length(self) -> int:
        return self.seen

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows (beam search)."""
        self.inner.reorder_cache(index)


class MambaBackbone(Backbone):
    name = "mamba"
    needs_layout = True
    supports_noncausal = True  # through the backward mixers (refused when options.bidirectional is false)
    Options = MambaOptions
    lora_targets = ("in_proj",)
    unquantized = ("dt_proj",)  # transformers' mixer multiplies dt_proj.weight itself
    lora_refusal = (
        "transformers' Mamba reads the weights of x_proj, dt_proj and out_proj directly, so an adapter there "
        "would be bypassed; in_proj is called as a layer"
    )

    def __init__(self, config, bidirectional: bool = True, gradient_checkpointing: bool = False):
        super().__init__()
        from transformers import MambaModel
        from transformers.models.mamba.modeling_mamba import MambaMixer

        self.config = config
        self.model = MambaModel(config)
        self.model.embeddings = nn.Embedding(1, 1)  # unused: valle feeds inputs_embeds
        self.model.embeddings.weight.requires_grad_(False)
        self.backward_mixers = (
            nn.ModuleList(MambaMixer(config, layer_idx=i) for i in range(config.num_hidden_layers))
            if bidirectional
            else None
        )
        self.gradient_checkpointing = gradient_checkpointing

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        noncausal = needs_noncausal(cfg)
        if noncausal and not options(cfg).bidirectional:
            raise ConfigError(
                f"model.backbone_options.bidirectional is false, so mamba reads only forwards and cannot run "
                f"the non-causal NAR passes {noncausal} asks for",
                "set bidirectional: true, or make the model AR-only (model.n_levels=1, model.level0=ar)",
            )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MambaBackbone:
        from transformers import MambaConfig

        opts = options(cfg)
        config = MambaConfig(
            vocab_size=1,
            hidden_size=cfg.d_model,
            state_size=opts.state_size,
            num_hidden_layers=cfg.n_layers,
            expand=opts.expand,
            conv_kernel=opts.conv_kernel,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        return cls(config, opts.bidirectional, cfg.gradient_checkpointing)

    def forward(
        self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False, layout=None
    ) -> BackboneOutput:
        if layout is None:
            raise ValueError("the mamba backbone reads a Layout, not a mask: pass layout=")
        if use_cache and cache is None:
            cache = MambaState(self.config)
        if cache is not None:
            if not bool(layout.causal.all()):
                raise ValueError("a mamba state is for causal rows only")
            if (
                cache.seen and inputs_embeds.shape[1] > 1
            ):  # transformers' scan restarts from zero: step instead
                outs = [
                    self._run(
                        inputs_embeds[:, i : i + 1], Layout(layout.valid[:, i : i + 1], layout.causal), cache
                    )
                    for i in range(inputs_embeds.shape[1])
                ]
                return BackboneOutput(torch.cat(outs, 1), cache)
        return BackboneOutput(self._run(inputs_embeds, layout, cache), cache if use_cache else None)

    def _run(self, x: torch.Tensor, layout: Layout, cache: MambaState | None) -> torch.Tensor:
        valid = layout.valid.to(torch.long)
        noncausal = ~layout.causal
        rows = idx = None
        if self.backward_mixers is not None and bool(noncausal.any()):
            _check_right_padded(layout)
            rows = noncausal.nonzero().squeeze(1)
            idx = reverse_index(layout)[rows][..., None].expand(-1, -1, x.shape[-1])
        inner = cache.inner if cache is not None else None

        def layer(h: torch.Tensor, i: int) -> torch.Tensor:
            block = self.model.layers[i]
            n = block.norm(h)
            y = block.mixer(n, cache=inner, attention_mask=valid)
            if rows is not None:
                back = self.backward_mixers[i](n[rows].gather(1, idx), attention_mask=valid[rows])
                y = y.index_add(0, rows, back.gather(1, idx))
            return h + y

        h = x
        for i in range(len(self.model.layers)):
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, i, use_reentrant=False)
            else:
                h = layer(h, i)
        if cache is not None:
            cache.seen += x.shape[1]
        return self.model.norm_f(h)
