"""The Descript Audio Codec (Kumar et al. 2023, arXiv 2306.06546): `dac`, 24 kHz or 44.1 kHz.

The network is transformers' port (`DacModel`), which loads Descript's released weights from the Hugging
Face hub (`descript/dac_24khz`, `descript/dac_44khz`, `descript/dac_16khz`: config.json +
model.safetensors, cached by huggingface_hub on first use). We use the port rather than the
`descript-audio-codec` package because that package imports `descript-audiotools`, which pins
protobuf < 3.20 and so cannot live beside onnxruntime (piper) or recent tensorboard; the network and the
weights are the same.

`codec.options.model_type` picks the model (24khz by default); `codec.bandwidth` (kbps) picks how many of
its RVQ levels are used: each level carries 10 bits per frame, so a level is 0.75 kbps at 24 kHz (75
frames/s: 6 kbps = 8 levels, the 32 levels are 24 kbps) and 0.86 kbps at 44.1 kHz (86.13 frames/s: its 9
levels are 7.75 kbps, "8 kbps"). The bandwidth is rounded down to whole levels.

`codec.path` may name a local folder with config.json and model.safetensors. Offline with an empty cache,
the error names the repo, the files and where to put them. `pretrained=False` builds the same architecture
from the configs below with random weights (tests).

The original notes that VALL-E models on DAC tokens converge worse than on EnCodec's (24 kHz at 8 kbps not
at all); DAC is here for those who want to try, EnCodec stays the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from valle_cli.codecs.base import Codec
from valle_cli.errors import CodecError, ConfigError

if TYPE_CHECKING:
    from valle_cli.config import CodecConfig

# The architectures of Descript's released models (their DAC configs, in transformers' names).
CONFIGS = {
    "24khz": {"sampling_rate": 24_000, "hop_length": 320, "downsampling_ratios": [2, 4, 5, 8],
              "upsampling_ratios": [8, 5, 4, 2], "n_codebooks": 32},
    "44khz": {"sampling_rate": 44_100, "hop_length": 512, "downsampling_ratios": [2, 4, 8, 8],
              "upsampling_ratios": [8, 8, 4, 2], "n_codebooks": 9},
    "16khz": {"sampling_rate": 16_000, "hop_length": 320, "downsampling_ratios": [2, 4, 5, 8],
              "upsampling_ratios": [8, 5, 4, 2], "n_codebooks": 12},
}  # fmt: skip
COMMON = {"encoder_hidden_size": 64, "decoder_hidden_size": 1536, "hidden_size": 1024, "codebook_size": 1024,
          "codebook_dim": 8}  # fmt: skip
FILES = ("config.json", "model.safetensors")


@dataclass
class DacOptions:
    """codec.options of the dac codec."""

    model_type: Literal["24khz", "44khz", "16khz"] = "24khz"


def repo_id(model_type: str) -> str:
    return f"descript/dac_{model_type}"


def levels_for(model_type: str, bandwidth: float) -> int:
    """RVQ levels for a bandwidth (kbps): 10 bits per level per frame, rounded down to whole levels."""
    cfg = CONFIGS[model_type]
    per_level = cfg["sampling_rate"] / cfg["hop_length"] * 10 / 1000  # kbps
    n = math.floor(bandwidth / per_level + 1e-6)
    if not 1 <= n <= cfg["n_codebooks"]:
        top = cfg["n_codebooks"] * per_level
        raise CodecError(
            f"DAC {model_type} has no {bandwidth} kbps setting: a level is {per_level:.2f} kbps and it has "
            f"{cfg['n_codebooks']} ({top:.2f} kbps)",
            f"set codec.bandwidth between {per_level:.2f} and {top:.2f}",
        )
    return n


def fetch_dac_folder(model_type: str, path: str | None = None) -> Path:
    """The folder holding config.json and model.safetensors: `path`, the hub cache, or a download."""
    from valle_cli import hub

    repo = repo_id(model_type)
    if path:
        folder = Path(path)
        if not folder.is_dir():
            raise CodecError(
                f"DAC folder {folder} (codec.path) does not exist",
                f"point codec.path at a folder with config.json and model.safetensors from {repo}",
            )
        missing = [name for name in FILES if not (folder / name).exists()]
        if missing:
            raise CodecError(
                f"DAC folder {folder} lacks {', '.join(missing)}",
                f"download them from the Hugging Face repo {repo} into {folder}",
            )
        return folder
    found = hub.cached_snapshot(repo, allow_patterns=list(FILES))
    if found is not None and all((found / name).exists() for name in FILES):
        return found
    try:
        return hub.download(repo, allow_patterns=list(FILES))
    except hub.HubOffline:
        raise CodecError(
            f"DAC weights ({repo}: {', '.join(FILES)}) are not in the Hugging Face cache and there is no network",
            f"on a machine with internet run `hf download {repo}` and copy the cache ({hub.cache_dir()}), or "
            "put config.json and model.safetensors in a folder and set codec.path to it; or use the offline "
            "codec with --set codec.name=mel",
        ) from None
    except Exception as exc:
        raise CodecError(
            f"cannot download {repo}: {type(exc).__name__}: {exc}",
            "check the network, or set codec.path to a folder with config.json and model.safetensors",
        ) from None


class DacCodec(Codec):
    name = "dac"
    codebook_size = 1024
    Options = DacOptions

    def __init__(
        self,
        model_type: str = "24khz",
        bandwidth: float = 6.0,
        pretrained: bool = True,
        path: str | None = None,
    ):
        super().__init__()
        from transformers import DacConfig, DacModel

        if model_type not in CONFIGS:
            raise ConfigError(
                f"codec.options.model_type: DAC has no {model_type!r} model",
                f"use one of {', '.join(CONFIGS)}",
            )
        cfg = CONFIGS[model_type]
        self.model_type = model_type
        self.sample_rate = cfg["sampling_rate"]
        self.hop_length = cfg["hop_length"]
        self.frame_rate = self.sample_rate / self.hop_length
        self.n_codebooks = levels_for(model_type, bandwidth)
        if pretrained:
            folder = fetch_dac_folder(model_type, path)
            try:
                model = DacModel.from_pretrained(str(folder))
            except Exception as exc:
                raise CodecError(
                    f"DAC weights in {folder} cannot be read ({type(exc).__name__}: {exc}); they may be truncated",
                    f"delete {folder} and run again to download them afresh",
                ) from None
            if model.config.hop_length != self.hop_length or model.config.sampling_rate != self.sample_rate:
                raise CodecError(
                    f"the DAC model in {folder} is not the {model_type} model "
                    f"({model.config.sampling_rate} Hz, hop {model.config.hop_length})",
                    "set codec.options.model_type to match it, or point codec.path at the right folder",
                )
        else:
            model = DacModel(DacConfig(**COMMON, **cfg))
        self.model = model.eval()

    @classmethod
    def from_config(cls, cfg: CodecConfig) -> DacCodec:
        from valle_cli.config import plugin_options

        opts = plugin_options(cls, cfg.options, "codec.options", typed=True)
        return cls(opts.model_type, cfg.bandwidth, pretrained=True, path=cfg.path)

    def describe(self) -> dict:
        return {**super().describe(), "model_type": self.model_type}

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model.encode(wav, n_quantizers=self.n_codebooks).audio_codes[:, : self.n_codebooks]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(audio_codes=codes).audio_values  # (B, T'), T' a few samples short of F * hop
        want = codes.shape[-1] * self.hop_length
        return torch.nn.functional.pad(out, (0, max(0, want - out.shape[-1])))[:, None, :want]
