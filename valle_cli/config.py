"""Typed configuration: YAML -> validated dataclasses, presets, `--set` overrides, resolved output.

The dataclasses below are the schema. A config file has up to five sections (model, codec, data, train,
inference) and may start from a shipped preset (`preset: small`); whatever the file says overrides the preset,
and `--set section.key=value` overrides the file. Unknown keys are errors that name the closest valid key;
values are checked against the field types and a few cross-field rules. `dump_config` writes the resolved
config that every run folder and checkpoint carries.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from valle_cli.errors import ConfigError

CONFIG_VERSION = 1


@dataclass
class ModelConfig:
    """Shape of the VALL-E transformer (one model for the AR and NAR jobs)."""

    backbone: str = "llama"  # a `valle.backbones` plugin
    d_model: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    ffn_dim: int = 4096
    dropout: float = 0.1
    n_levels: int = 8  # RVQ levels modelled (must not exceed the codec's)
    # how the response finds its place in the text: none = classic VALL-E (attention alone); pointer = every
    # frame also gets the embedding of the symbol it speaks and a head moves a pointer through the text
    # (VALL-E R); needs phoneme durations in the dataset (`valle prepare` makes them)
    alignment: Literal["none", "pointer"] = "none"
    # how RVQ level 0 is made: ar = token by token (VALL-E); nar = masked parallel passes (see model/valle.py),
    # over frames laid out by a per-symbol duration head (alignment: pointer) or, with alignment: none, as
    # many frames as a length head predicts (the original's NAR-len). nar has no previous frame to copy, so it
    # cannot drift from its text the way a small AR does
    level0: Literal["ar", "nar"] = "ar"
    # VALL-E 2's grouped code modeling: each AR step reads and predicts this many level-0 codes (classic
    # layouts: alignment none, level0 ar); G times fewer AR steps per second of audio
    group_size: int = 1
    # what the AR and NAR passes share: classic = the original's layout, the RVQ level marker sits before the
    # text, so every pass recomputes text and prompt; shared = the marker sits after them and the text and
    # prompt attend only to themselves, so their keys and values are computed once per request and reused by
    # the AR and every NAR pass (each NAR pass then costs only the response). Attention backbones only
    prefix: Literal["classic", "shared"] = "classic"
    # auto/sdpa: torch's scaled_dot_product_attention, torch picks the kernel; math, mem_efficient, cudnn: that
    # kernel only (the last two: CUDA); eager: the written-out softmax; flash and flash_attention_2 are refused
    # (they cannot take the masks every call passes). Recurrent backbones have no attention: auto only.
    attention: Literal[
        "auto", "sdpa", "math", "mem_efficient", "flash", "cudnn", "eager", "flash_attention_2"
    ] = "auto"
    max_position: int = 4096
    gradient_checkpointing: bool = False
    # the backbone's own settings (mixtral's experts, mamba's state size, ...), checked by the backbone plugin
    # when the config loads: `valle plugins --options` lists them
    backbone_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _positive(self, "d_model", "n_layers", "n_heads", "ffn_dim", "n_levels", "max_position", "group_size")
        if self.group_size > 16:
            raise ConfigError(
                f"model.group_size {self.group_size} is more codes per step than makes sense (VALL-E 2 uses 2-8)",
                "use a group size from 1 to 16",
            )
        if self.group_size > 1 and (self.alignment != "none" or self.level0 != "ar"):
            raise ConfigError(
                "model.group_size > 1 groups the codes of an autoregressive level 0 (VALL-E 2); this model's "
                f"level 0 is {'parallel' if self.level0 == 'nar' else 'pointer-driven'}",
                "use model.alignment: none and model.level0: ar, or model.group_size: 1",
            )
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) is not divisible by model.n_heads ({self.n_heads})",
                "pick a d_model that is a multiple of n_heads",
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class CodecConfig:
    """Which audio codec turns waveforms into RVQ tokens and back."""

    name: str = "encodec"  # a `valle.codecs` plugin: encodec, vocos, mel, ...
    bandwidth: float = 6.0  # kbps, EnCodec-family codecs: 1.5/3/6/12/24 -> 2/4/8/16/32 levels
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    path: str | None = None  # weights or codebook file; None = the codec's default
    options: dict[str, Any] = field(default_factory=dict)  # the codec's own settings, checked by its plugin

    def validate(self) -> None:
        if self.bandwidth <= 0:
            raise ConfigError(f"codec.bandwidth must be positive, got {self.bandwidth}")


@dataclass
class DataConfig:
    """Where training data comes from and how batches and prompts are drawn."""

    paths: list[str] = field(default_factory=list)  # dataset folders or .h5 files made by `valle prepare`
    language: str = "en"  # default language for text without one
    transcriber: str = "whisper"  # a `valle.transcribers` plugin, for audio without a transcript
    min_duration: float = 1.0  # seconds
    max_duration: float = 20.0
    prompt_duration: list[float] = field(default_factory=lambda: [3.0, 6.0])  # min, max seconds
    similar_prompt_prob: float = 0.5  # take the prompt from the similar-utterance list this often
    sample_by: Literal["utterance", "speaker", "group"] = "speaker"
    batch_size: int = 8
    max_tokens: int = 0  # >0: batches are filled up to this many tokens instead of batch_size
    bucket: bool = True  # batch utterances of similar length together (less padding)
    num_workers: int = 2
    val_fraction: float = 0.02

    def validate(self) -> None:
        _positive(self, "batch_size")
        if self.min_duration < 0 or self.max_duration <= self.min_duration:
            raise ConfigError(
                f"data.min_duration ({self.min_duration}) must be >= 0 and below data.max_duration "
                f"({self.max_duration})"
            )
        if len(self.prompt_duration) != 2 or not 0 < self.prompt_duration[0] <= self.prompt_duration[1]:
            raise ConfigError(
                f"data.prompt_duration must be [min, max] seconds with 0 < min <= max, got {self.prompt_duration}"
            )
        if self.prompt_duration[1] > self.max_duration:
            raise ConfigError(
                f"data.prompt_duration max ({self.prompt_duration[1]} s) exceeds data.max_duration "
                f"({self.max_duration} s): no utterance could give such a prompt"
            )
        for name in ("similar_prompt_prob", "val_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"data.{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.max_tokens < 0:
            raise ConfigError("data.num_workers and data.max_tokens cannot be negative")


@dataclass
class LoraConfig:
    name: str = "lora"  # names the adapter in checkpoints and exports
    rank: int = 0  # 0 = no LoRA (full fine-tuning or training from scratch)
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    """How training runs: backend, optimizer, schedule, checkpoints."""

    backend: Literal["local", "ddp", "deepspeed"] = "local"
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    steps: int = 100_000
    lr: float = 1.0e-4
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 1000
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_accumulation: int = 1
    grad_clip: float = 1.0
    level_weights: list[float] = field(
        default_factory=list
    )  # chance of training each RVQ level; [] = uniform
    # curriculum: every sample trains level 0 (the AR) for the first N steps, then levels follow level_weights.
    # The AR learns to read its text several times sooner when it gets every batch (docs/benchmarks.md).
    ar_only_steps: int = 0
    stt_prob: float = 0.0  # chance a sample trains speech-to-text (audio -> phonemes, `valle stt`) instead
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"text": 0.0, "prompt": 0.0, "response": 1.0}
    )
    # guided-attention loss (DC-TTS) on 2 heads of `guided_attention_layers` (default: the two middle layers):
    # pulls the level-0 attention over the text towards the diagonal; 0 = off. Needs only lengths.
    guided_attention: float = 0.0
    # chance that a level-0 input frame is zeroed while training (Tacotron's prenet dropout): with 0 the AR can
    # predict most frames from the previous one and never learn to read its text
    input_dropout: float = 0.0
    # scheduled sampling (parallel, Duckworth et al. 2019): the chance that a level-0 input frame is the model's
    # own sampled guess (from a teacher-forced pass without gradients) instead of the true previous frame, so
    # the AR learns to recover from its own mistakes; costs one extra forward pass of the level-0 samples
    scheduled_sampling: float = 0.0
    # layer skip (LayerSkip, arXiv 2404.16710): weight of an extra loss that reads level 0 from every earlier
    # layer's output through the final norm and head, so `valle synth --layer-skip` can stop a step early;
    # classic AR models with a backbone that supports it (transformer, bitnet)
    layer_skip: float = 0.0
    guided_attention_sigma: float = 0.4
    guided_attention_layers: list[int] = field(default_factory=list)
    eval_every: int = 1000
    eval_samples: int = 0  # at each evaluation, synthesize this many held-out utterances into run/samples/
    # eval samples say sentences drawn from these (a new draw at each evaluation), in the held-out utterances'
    # voices, instead of their own transcripts (the original's --eval-random-text-prompts; `valle train
    # --random-text-prompts` sets the built-in English ones); read in eval_texts_language, or else in each
    # voice's own language
    eval_texts: list[str] = field(default_factory=list)
    eval_texts_language: str | None = None
    save_every: int = 1000
    keep_last: int = 3
    seed: int = 0
    out_dir: str = "runs/valle"
    init_from: str | None = None  # weights to start from: a run folder, a step-* checkpoint or an export
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over ours
    zero_stage: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        _positive(self, "steps", "grad_accumulation", "keep_last", "eval_every", "save_every")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("train.weight_decay, train.grad_clip and train.warmup_steps cannot be negative")
        if any(w < 0 for w in self.level_weights) or (self.level_weights and sum(self.level_weights) <= 0):
            raise ConfigError(
                f"train.level_weights must be non-negative and not all zero, got {self.level_weights}"
            )
        if self.ar_only_steps < 0:
            raise ConfigError(f"train.ar_only_steps cannot be negative, got {self.ar_only_steps}")
        self.eval_texts = [" ".join(str(t).split()) for t in self.eval_texts]  # one line each (texts.tsv)
        if any(not t for t in self.eval_texts):
            raise ConfigError("train.eval_texts holds an empty sentence", "remove it, or write the sentence")
        if not 0 <= self.scheduled_sampling <= 1:
            raise ConfigError(f"train.scheduled_sampling must be in [0, 1], got {self.scheduled_sampling}")
        if self.layer_skip < 0:
            raise ConfigError(f"train.layer_skip cannot be negative, got {self.layer_skip}")
        if not 0 <= self.input_dropout < 1:
            raise ConfigError(f"train.input_dropout must be in [0, 1), got {self.input_dropout}")
        if self.guided_attention < 0 or self.guided_attention_sigma <= 0:
            raise ConfigError("train.guided_attention must be >= 0 and train.guided_attention_sigma > 0")
        if not 0 <= self.stt_prob <= 1:
            raise ConfigError(f"train.stt_prob must be in [0, 1], got {self.stt_prob}")
        if self.lora.rank < 0 or self.lora.alpha <= 0 or not 0 <= self.lora.dropout < 1:
            raise ConfigError("train.lora needs rank >= 0, alpha > 0 and dropout in [0, 1)")
        if self.lora.rank > 0 and not self.init_from:
            raise ConfigError(
                "train.lora.rank > 0 but there is no base model to adapt",
                "set train.init_from to a trained run folder, checkpoint or export",
            )
        unknown = set(self.loss_weights) - {"text", "prompt", "response", "pointer", "duration", "length"}
        if unknown:
            raise ConfigError(
                f"train.loss_weights has unknown part(s) {sorted(unknown)}",
                "use text, prompt, response, pointer, duration and length",
            )


@dataclass
class InferenceConfig:
    """Defaults for `valle synth` (every one can be overridden on the command line)."""

    device: str = "auto"
    max_ar_steps: int = 1500  # 20 s at 75 frames/s
    ar_temp: float = 0.95
    nar_temp: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    input_prompt_length: float = 6.0  # seconds

    def validate(self) -> None:
        _positive(self, "max_ar_steps", "input_prompt_length")
        if self.ar_temp < 0 or self.nar_temp < 0:
            raise ConfigError("inference.ar_temp and inference.nar_temp cannot be negative (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"inference.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"inference.top_k cannot be negative, got {self.top_k}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.train.level_weights and len(self.train.level_weights) != self.model.n_levels:
            raise ConfigError(
                f"train.level_weights has {len(self.train.level_weights)} entries; model.n_levels is "
                f"{self.model.n_levels}",
                "give one weight per RVQ level, or [] for uniform",
            )
        if self.train.layer_skip > 0 and (self.model.level0 == "nar" or self.model.alignment != "none"):
            raise ConfigError(
                "train.layer_skip trains early exits of a classic autoregressive level 0",
                "use it with model.alignment: none and model.level0: ar, or set train.layer_skip=0",
            )
        if self.model.group_size > 1:
            t = self.train
            per_frame = [k for k, v in (("train.scheduled_sampling", t.scheduled_sampling),
                                        ("train.input_dropout", t.input_dropout), ("train.layer_skip", t.layer_skip),
                                        ("train.loss_weights.prompt", t.loss_weights.get("prompt", 0))) if v > 0]  # fmt: skip
            if per_frame:
                raise ConfigError(
                    f"{', '.join(per_frame)} {'acts' if len(per_frame) == 1 else 'act'} on one level-0 code per "
                    "step; model.group_size is "
                    f"{self.model.group_size}",
                    "leave them at 0, or use model.group_size: 1",
                )
        if self.train.layer_skip > 0 and self.model.n_layers < 2:
            raise ConfigError(
                "train.layer_skip teaches earlier layers to exit, and model.n_layers is 1",
                "use 2 layers or more",
            )
        if self.train.layer_skip > 0 and self.train.guided_attention > 0:
            raise ConfigError(
                "train.layer_skip and train.guided_attention each need their own pass through the layers",
                "use one of them",
            )
        if self.model.prefix == "shared":
            inside = [
                f"train.loss_weights.{k}" for k in ("text", "prompt") if self.train.loss_weights.get(k, 0) > 0
            ]
            if inside:
                raise ConfigError(
                    f"{', '.join(inside)} predict the next token inside the text and prompt; with "
                    "model.prefix: shared they attend to each other both ways, so there is nothing to predict",
                    "leave them at 0, or use model.prefix: classic",
                )
        if self.model.level0 == "nar":
            t = self.train
            useless = [k for k, v in (("train.scheduled_sampling", t.scheduled_sampling),
                                      ("train.input_dropout", t.input_dropout)) if v > 0]  # fmt: skip
            useless += [f"train.loss_weights.{k}" for k in ("text", "prompt") if t.loss_weights.get(k, 0) > 0]
            if useless:
                raise ConfigError(
                    f"{', '.join(useless)} act on an autoregressive level 0; model.level0 is nar",
                    "leave them at 0, or use model.level0: ar",
                )
        _check_plugin("codec", self.codec.name, "codec.name")
        _check_plugin("transcriber", self.data.transcriber, "data.transcriber")
        _check_plugin("backbone", self.model.backbone, "model.backbone")
        self.model.backbone_options = _options_of(
            "backbone", self.model.backbone, self.model.backbone_options
        )
        self.codec.options = _options_of("codec", self.codec.name, self.codec.options)
        _check_backbone(self.model)
        _check_training_with(self)


def _options_of(kind: str, name: str, data: dict) -> dict:
    """A plugin's own settings checked by the plugin (imports it), with every default filled in."""
    from valle_cli import plugins
    from valle_cli.errors import PluginError

    where = "model.backbone_options" if kind == "backbone" else f"{kind}.options"
    try:
        cls = plugins.load(kind, name)
    except PluginError:
        if data:
            raise
        return {}  # a plugin that does not load fails where it is used, with its own message
    return plugin_options(cls, data, where)


def _check_backbone(model: ModelConfig) -> None:
    """The backbone's own checks of the whole model section (`check_config`), when the config loads."""
    from valle_cli import plugins
    from valle_cli.errors import PluginError

    try:
        cls = plugins.load("backbone", model.backbone)
    except PluginError:
        return  # said where it is used, with the plugin's own message
    check = getattr(cls, "check_config", None)
    if callable(check):
        check(model)


def _check_training_with(cfg: Config) -> None:
    """Training options that need something of the backbone, said when the config loads (not at step 0)."""
    from valle_cli import plugins
    from valle_cli.errors import PluginError

    try:
        cls = plugins.load("backbone", cfg.model.backbone)
    except PluginError:
        return
    t, name = cfg.train, cfg.model.backbone
    if t.layer_skip > 0 and not getattr(cls, "supports_early_exit", False):
        raise ConfigError(
            f"train.layer_skip needs a backbone that can exit early, and {name} cannot",
            "use model.backbone=transformer or bitnet, or set train.layer_skip=0",
        )
    from valle_cli.backbones.base import Backbone

    if (
        t.guided_attention > 0
        and getattr(cls, "forward_with_attention", None) is Backbone.forward_with_attention
    ):
        raise ConfigError(
            f"train.guided_attention needs the backbone's attention, and {name} does not report it",
            "set train.guided_attention=0, or use model.backbone=llama, mixtral, transformer or bitnet",
        )
    lora = getattr(cls, "lora_targets", None)
    if t.lora.rank > 0 and lora is not None:
        wrong = [x for x in t.lora.targets if x not in lora]
        if not lora:
            raise ConfigError(
                f"LoRA cannot adapt the {name} backbone: {cls.lora_refusal}",
                "fine-tune it fully (train.lora.rank=0), or use another backbone",
            )
        if wrong:
            raise ConfigError(
                f"train.lora.targets {wrong} cannot be adapted in the {name} backbone: {cls.lora_refusal}",
                f"set train.lora.targets to some of {list(lora)}",
            )


def plugin_options(cls: type, data: dict | None, where: str, typed: bool = False) -> Any:
    """Build a plugin's `Options` dataclass from `data` (errors name `where` and suggest keys), validate it,
    and return it (`typed`) or its dict with the defaults filled in."""
    spec = getattr(cls, "Options", None)
    if spec is None:
        if data:
            raise ConfigError(
                f"{where}: the {getattr(cls, 'name', cls.__name__)} plugin has no options "
                f"(got {', '.join(map(str, data))})",
                f"remove {where}",
            )
        return None if typed else {}
    hints = typing.get_type_hints(spec)
    fields = {f.name for f in dataclasses.fields(spec)}
    for key in data or {}:
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{where}.{close[0]}'?"
                if close
                else f"valid keys here: {', '.join(sorted(fields))}"
            )
            raise ConfigError(f"unknown config key '{where}.{key}'", hint)
    obj = spec(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in (data or {}).items()})
    if hasattr(obj, "validate"):
        obj.validate()
    return obj if typed else dataclasses.asdict(obj)


# mixtral's settings lived in the model section before backbones had their own (configs, runs and exports
# made then still load): moved into backbone_options for mixtral, dropped at their old defaults otherwise
_MOVED_TO_OPTIONS = {"n_experts": 8, "experts_per_token": 2, "router_aux_loss_coef": 0.02}


# attn_implementation + sdpa_kernel, before model.attention said both
_OLD_ATTENTION = {"efficient": "mem_efficient"}


def _upgrade(data: dict) -> dict:
    model = data.get("model")
    if isinstance(model, dict) and ({"attn_implementation", "sdpa_kernel"} & set(model)):
        model = dict(model)
        impl, kernel = model.pop("attn_implementation", "sdpa"), model.pop("sdpa_kernel", "auto")
        if "attention" not in model:
            model["attention"] = impl if impl != "sdpa" else _OLD_ATTENTION.get(kernel, kernel)
        data = {**data, "model": model}
    if not isinstance(model, dict) or not set(model) & set(_MOVED_TO_OPTIONS):
        return data
    model = dict(model)
    mixtral = model.get("backbone") == "mixtral"
    moved = {k: model.pop(k) for k in list(model) if k in _MOVED_TO_OPTIONS}
    if mixtral:
        model["backbone_options"] = {**moved, **(model.get("backbone_options") or {})}
    else:
        odd = {k: v for k, v in moved.items() if v != _MOVED_TO_OPTIONS[k]}
        if odd:
            key = next(iter(odd))
            raise ConfigError(
                f"model.{key} is a setting of the mixtral backbone; model.backbone is "
                f"{model.get('backbone', 'llama')}",
                f"for mixtral write model.backbone_options.{key}; otherwise remove it",
            )
    return {**data, "model": model}


def _check_plugin(kind: str, name: str, key: str) -> None:
    """An unknown plugin name is a config error listing the installed ones (reads metadata only)."""
    from valle_cli import plugins

    available = plugins.names(kind)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{key}: no {kind} plugin named {name!r}",
            f"{hint}installed: {', '.join(available) or 'none'}; `valle plugins` lists them",
        )


def _positive(obj: Any, *names: str) -> None:
    section = _SECTION_OF.get(type(obj), type(obj).__name__)
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {getattr(obj, name)}")


_SECTION_OF = {
    ModelConfig: "model",
    CodecConfig: "codec",
    DataConfig: "data",
    TrainConfig: "train",
    InferenceConfig: "inference",
    LoraConfig: "train.lora",
}

# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that point at the key and suggest a fix.


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], path + "."))
    return keys


def _suggest(key: str, valid: list[str], everywhere: list[str]) -> str:
    """The most likely intended key: the same name in another section, else a near spelling here."""
    leaf = key.rsplit(".", 1)[-1]
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == leaf and k != key]
    if elsewhere:
        return f"did you mean {elsewhere[0]!r}?"
    leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    if close:
        return f"did you mean {leaves[close[0]]!r}?"
    close = difflib.get_close_matches(key, everywhere, n=1, cutoff=0.75)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"valid keys here: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            by_case = [str(a) for a in args if str(a).lower() == str(value).lower()]
            close = by_case or difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{where} must be one of {', '.join(map(str, args))}; got {value!r}",
                f"{hint}".strip() or None,
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    everywhere = _all_keys(Config)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            valid = [f"{where}.{k}" if where else k for k in fields]
            raise ConfigError(f"unknown config key {path!r}", _suggest(path, valid, everywhere))
        kwargs[key] = _coerce(value, hints[key], path)
        if typing.get_origin(hints[key]) is dict and fields[key].default_factory is not dataclasses.MISSING:
            kwargs[key] = {**fields[key].default_factory(), **kwargs[key]}  # a partial mapping keeps the rest
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# Presets, files and overrides.


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("valle_cli.presets").iterdir() if p.name.endswith(".yaml")
    )


def _preset_data(name: str) -> dict:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"no preset named {name!r}", f"{hint}presets: {', '.join(names)}")
    text = resources.files("valle_cli.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", "check the path, or name a preset") from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path} is a folder, not a config file", "give a .yaml file or a preset name"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with sections model, codec, data, train, inference")
    return data


def parse_override(text: str) -> dict:
    """`section.key=value` (value in YAML syntax) -> nested dict."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(
            f"override {text!r} is not of the form section.key=value", "for example --set train.lr=3e-4"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated `Config` from a YAML file or preset name, then apply `section.key=value` overrides.

    `source` is a path to a YAML file, the name of a shipped preset, or None for the defaults (the base shape).
    A file may name a preset to start from with a top-level `preset:` key.
    """
    data: dict = {}
    if source is not None:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.exists():
            data = _read_yaml(path)
        else:
            data = {"preset": str(source)}
    preset = data.pop("preset", None)
    version = data.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"config version {version} is not supported (this valle reads version {CONFIG_VERSION})",
            "upgrade valle, or rewrite the config from `valle config --preset base`",
        )
    if preset is not None:
        data = _deep_merge(_preset_data(str(preset)), data)
    for text in overrides or []:
        data = _deep_merge(data, parse_override(text))
    data = _upgrade(data)
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return {"version": CONFIG_VERSION, **dataclasses.asdict(cfg)}


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The resolved config as YAML; also written to `path` when given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    if path is not None:
        from valle_cli.fsutil import atomic_path

        if Path(path).is_dir():
            raise ConfigError(f"{path} is a folder", "give a file name to write the config to")
        with atomic_path(path, ConfigError) as tmp:
            Path(tmp).write_text(text)
    return text
