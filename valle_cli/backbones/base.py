"""The backbone protocol: a stack of layers driven from outside with embeddings.

    forward(inputs_embeds (B, T, D), attention_mask (B, 1, T, S) additive float or None,
            position_ids (B, T) long, cache=None, use_cache=False[, layout=Layout]) -> BackboneOutput

`S` is the key length: T plus whatever the cache already holds. The mask is additive (0 = attend, a large
negative number = masked) and fully explicit, so one backbone runs the AR pass (causal) and the NAR passes
(no causal mask) and handles padding, with no flag to forget; `attention_mask()` builds it.

A backbone that cannot read an attention mask (a recurrent one: mamba, retnet) sets `needs_layout` and is
also given `layout`, the same facts as structure (`Layout`: which positions are real, which rows are
causal, where a non-causal row's prefix ends). Callers always pass `layout=`; `Backbone.__call__` drops it
for backbones that do not ask for it, so attention backbones written before it existed keep working.

What a backbone declares (class attributes; the model and the decoders read them):
- `supports_cache`: incremental decoding with `cache` (keys/values, or a recurrent state). Without it the
  decoders recompute the whole sequence every step. A cache object has `reorder_cache(index)` (beam search).
- `supports_noncausal`: it can run rows that are not causal (every NAR pass, level0 nar). Without it the
  model refuses any configuration with NAR levels (`model.n_levels > 1` or `model.level0: nar`): a NAR
  pass run causally would silently see half its context.
- `supports_shared_prefix`: `model.prefix: shared` works with it. It reads arbitrary masks (the text and
  prompt attend both ways among themselves while the response after them is causal or not), caches, and its
  `fork_cache(cache)` returns a cache that starts with the same keys and values and grows on its own
  (sharing the tensors is fine if growing replaces them): the decoders compute the prefix once and fork
  it for the AR and for every NAR pass. Others refuse `model.prefix: shared` when the config loads.
- `has_aux_loss`: it may return `aux_loss` (e.g. mixture-of-experts routing), added to the training loss.
  A backbone without it returning one is an error.
- `forward_with_attention` (optional): attention probabilities of every layer, for alignment plots and the
  guided-attention loss; a backbone without attention does not override it, and both refuse with the reason.
- `supports_early_exit`: it offers `forward_layers` (every layer's output through the final norm, for
  the layer-skip training loss) and `forward_exit` (a cached step that stops after the first layer whose
  output (between two layer numbers) a callback finds confident, filling the skipped layers' cache). `train.layer_skip` and
  `valle synth --layer-skip` refuse backbones without it.
- `attention_kinds`: the `model.attention` values it honours (default only "auto": no attention);
  `build_backbone` refuses the others, and sets `attention` on the instance (Backbone.__call__ applies
  torch's kernel choice around every call).
- `Options` (optional): a dataclass of the backbone's own settings, read from `model.backbone_options`. The
  config loader builds it with the same "unknown key, did you mean" errors as the core sections and calls
  its `validate()` if it has one; `from_config` reads it with `options(cfg)`.

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
class Layout:
    """Who sees whom, as structure instead of a mask, for backbones with `needs_layout` (see the module).

    Rows that are not causal are right-padded (their real positions come first)."""

    valid: torch.Tensor  # (B, T) bool: which of this call's T inputs are real (padding on either side)
    causal: torch.Tensor  # (B,) bool: the row sees only the past
    split: torch.Tensor | None = None  # (B,) long, non-causal rows: positions < split do not see >= split

    def __post_init__(self) -> None:
        if self.split is None:
            self.split = torch.zeros_like(self.causal, dtype=torch.long)


def layout(
    lengths: torch.Tensor, causal: torch.Tensor | bool, total: int, split: torch.Tensor | None = None
) -> Layout:
    """The `Layout` of right-padded rows of `lengths` (B,) in `total` positions (what `attention_mask`
    says as a mask); `split` as for level0-nar rows, whose prefix does not see the response."""
    b = lengths.shape[0]
    if isinstance(causal, bool):
        causal = torch.full((b,), causal, dtype=torch.bool, device=lengths.device)
    valid = torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]
    return Layout(valid, causal, split)


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
    supports_shared_prefix: ClassVar[bool] = False  # model.prefix: shared (needs fork_cache)
    has_aux_loss: ClassVar[bool] = False
    needs_layout: ClassVar[bool] = False
    supports_early_exit: ClassVar[bool] = False  # forward_layers and forward_exit (layer skip)
    Options: ClassVar[type | None] = None
    # layers LoRA may adapt (names as in train.lora.targets); None: any linear layer; (): none, and why not
    lora_targets: ClassVar[tuple[str, ...] | None] = None
    # linears (by name) whose `.weight` the backbone reads directly: `--dtype int8/int4` leaves them as they are
    unquantized: ClassVar[tuple[str, ...]] = ()
    lora_refusal: ClassVar[str] = ""
    # the model.attention values it honours ("auto" alone: it has no attention to choose a kernel for)
    attention_kinds: ClassVar[tuple[str, ...]] = ("auto",)
    attention: str = "auto"  # model.attention, set by build_backbone

    def __call__(self, *args, **kwargs):
        if not self.needs_layout:
            kwargs.pop("layout", None)
        kind = self.attention
        if kind in GPU_KERNELS:
            x = args[0] if args else kwargs.get("inputs_embeds")
            if x is not None and x.device.type != "cuda":
                if self.training:
                    raise ConfigError(
                        f"model.attention={kind} is one of torch's CUDA kernels; this model trains on "
                        f"{x.device.type}",
                        "use model.attention=auto (or math) off a GPU",
                    )
                kind = "auto"  # inference off a GPU: the same function with the kernel torch has
        with sdpa_context(kind):
            try:
                return super().__call__(*args, **kwargs)
            except RuntimeError as exc:
                if kind in GPU_KERNELS and "No available kernel" in str(exc):
                    raise ConfigError(
                        f"torch's {kind} attention kernel cannot run this call ({exc})",
                        "it needs fp16/bf16 and a GPU that supports it; use model.attention=auto",
                    ) from None
                raise

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Backbone:  # pragma: no cover - every backbone overrides
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Refuse a model section this backbone cannot run (ConfigError), when the config loads. The base
        checks the declared capabilities; a backbone whose options decide one extends it."""
        noncausal = needs_noncausal(cfg)
        if noncausal and not cls.supports_noncausal:
            raise ConfigError(
                f"the {cfg.backbone} backbone cannot run the non-causal NAR passes that {noncausal} asks for",
                "use model.n_levels=1 with model.level0=ar (an AR-only model), or a backbone that runs "
                "non-causal rows (`valle plugins` lists them)",
            )
        check_attention(cfg, cls)
        if getattr(cfg, "prefix", "classic") == "shared" and not cls.supports_shared_prefix:
            raise ConfigError(
                f"model.prefix: shared computes the text and prompt once and reuses their cache in every pass; "
                f"the {cfg.backbone} backbone cannot (it needs an attention mask and a cache it can fork)",
                "use model.prefix: classic, or an attention backbone (llama, mixtral, transformer, bitnet)",
            )

    def fork_cache(self, cache: Any) -> Any:
        """A cache holding what `cache` holds, whose growth leaves `cache` as it is (`supports_shared_prefix`)."""
        raise NotImplementedError(f"the {self.name} backbone cannot fork its cache")

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


GPU_KERNELS = ("mem_efficient", "cudnn")  # torch's fused kernels that exist only on CUDA
SDPA_KINDS = ("auto", "sdpa", "math", "mem_efficient", "cudnn", "eager")  # what attention backbones honour
# every call passes an explicit mask (padding; causal and non-causal rows side by side): kernels that cannot
# take one are refused with the reason, whatever the backbone
_MASKLESS = {
    "flash": "torch's flash kernel takes no attention mask",
    "flash_attention_2": "flash-attn (transformers' flash_attention_2) takes only causal or padding masks, not "
    "the non-causal rows and prefix masks of the NAR passes",
}


def sdpa_context(kind: str):
    """A context that restricts torch's scaled_dot_product_attention to one kernel (model.attention; auto,
    sdpa and eager: no restriction)."""
    import contextlib

    if kind in ("auto", "sdpa", "eager"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "math": SDPBackend.MATH,
        "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[kind]
    return sdpa_kernel(backend)


def check_attention(cfg: ModelConfig, cls: type) -> None:
    """model.attention must be one the backbone honours; kernels that cannot take valle's masks are refused."""
    kind = cfg.attention
    if kind in _MASKLESS:
        raise ConfigError(
            f"model.attention={kind}: {_MASKLESS[kind]}, and valle passes an explicit mask in every call",
            "use mem_efficient or cudnn (GPU kernels that take masks), or auto",
        )
    kinds = getattr(cls, "attention_kinds", ("auto",))
    if kind not in kinds:
        what = "has no attention" if tuple(kinds) == ("auto",) else f"honours {', '.join(kinds)}"
        raise ConfigError(
            f"model.attention={kind}: the {cfg.backbone} backbone {what}", "use model.attention=auto"
        )


def options(cfg: ModelConfig) -> Any:
    """The backbone's own settings (`model.backbone_options`) as its `Options` dataclass, validated."""
    from valle_cli import plugins
    from valle_cli.config import plugin_options

    cls = plugins.load("backbone", cfg.backbone)
    return plugin_options(cls, cfg.backbone_options, "model.backbone_options", typed=True)


def needs_noncausal(cfg: ModelConfig) -> str | None:
    """What in a model config runs rows that are not causal (None: nothing, an AR-only model)."""
    if cfg.n_levels > 1:
        return f"model.n_levels: {cfg.n_levels} (levels 1..{cfg.n_levels - 1} are NAR passes)"
    if getattr(cfg, "level0", "ar") == "nar":
        return "model.level0: nar"
    return None


def build_backbone(cfg: ModelConfig) -> Backbone:
    from valle_cli import plugins

    cls = plugins.load("backbone", cfg.backbone)
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise ConfigError(f"backbone plugin {cfg.backbone!r} is not a valle Backbone class")
    cls.check_config(cfg)
    backbone = cls.from_config(cfg)
    if not isinstance(backbone, Backbone):
        raise ConfigError(f"backbone plugin {cfg.backbone!r} did not build a valle Backbone")
    backbone.attention = cfg.attention
    return backbone
