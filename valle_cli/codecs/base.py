"""The codec protocol: waveforms <-> RVQ token grids.

A codec declares `sample_rate` (Hz), `frame_rate` (frames/s), `hop_length` (samples per frame, so
`sample_rate == frame_rate * hop_length`), `n_codebooks` (RVQ levels) and `codebook_size`. Then:

    encode(wav)   (B, 1, T) float in [-1, 1]  ->  (B, Q, F) long,  F = ceil(T / hop_length)
    decode(codes) (B, Q, F) long              ->  (B, 1, F * hop_length) float

Frames are aligned to samples: frame f covers samples [f * hop, (f + 1) * hop). Codecs are batched and
device-aware (`.to(device)`); they run under `torch.inference_mode`. `encode_list`/`decode_list` handle
utterances of different lengths by padding and trimming.

Codecs are plugins (`valle.codecs` entry points) built with `build_codec(config.codec)`; the class is
called as `cls.from_config(codec_config)`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

from valle_cli.errors import CodecError

if TYPE_CHECKING:
    from valle_cli.config import CodecConfig


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when available, else cpu. Raises CodecError for a CUDA device on a machine without one."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CodecError(f"{device!r} is not a device", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CodecError(
            f"device {device!r} was asked for but CUDA is not available", "use --device cpu or auto"
        )
    return dev


class Codec(torch.nn.Module):
    """Base class of every codec. Subclasses set the rate attributes and implement `_encode`/`_decode`."""

    name: ClassVar[str] = "codec"
    sample_rate: int
    frame_rate: float
    hop_length: int
    n_codebooks: int
    codebook_size: int

    @classmethod
    def from_config(cls, cfg: CodecConfig) -> Codec:  # pragma: no cover - every codec overrides
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def n_frames(self, n_samples: int) -> int:
        return math.ceil(n_samples / self.hop_length)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
        }

    # -- the protocol ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) float -> (B, Q, ceil(T / hop)) long."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise CodecError(f"{self.name}.encode expects (batch, 1, samples), got {tuple(wav.shape)}")
        if wav.shape[-1] == 0:
            raise CodecError(f"{self.name}.encode got zero samples")
        n_frames = self.n_frames(wav.shape[-1])
        pad = n_frames * self.hop_length - wav.shape[-1]
        wav = torch.nn.functional.pad(wav.to(self.device, torch.float32), (0, pad))
        codes = self._encode(wav)  # (B, Q, F')
        return codes[..., :n_frames].long()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, Q, F) long -> (B, 1, F * hop) float."""
        if codes.dim() != 3:
            raise CodecError(f"{self.name}.decode expects (batch, levels, frames), got {tuple(codes.shape)}")
        if codes.shape[-1] == 0:
            raise CodecError(f"{self.name}.decode got zero frames")
        if codes.shape[1] > self.n_codebooks or codes.shape[1] == 0:
            raise CodecError(
                f"{self.name} has {self.n_codebooks} RVQ levels; got codes with {codes.shape[1]}",
                "encode with the same codec and bandwidth the model was trained with",
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise CodecError(
                f"{self.name} codes must be in [0, {self.codebook_size}); got [{int(codes.min())}, {int(codes.max())}]"
            )
        wav = self._decode(codes.to(self.device).long())
        return wav[..., : codes.shape[-1] * self.hop_length].float()

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- conveniences --------------------------------------------------------------------------------------

    def encode_list(self, wavs: list[torch.Tensor], batch_size: int = 16) -> list[torch.Tensor]:
        """Encode 1-D waveforms of different lengths in padded batches. Returns one (Q, F_i) per input."""
        out: list[torch.Tensor] = []
        order = sorted(range(len(wavs)), key=lambda i: -wavs[i].shape[-1])  # similar lengths share a batch
        results: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            longest = max(wavs[i].shape[-1] for i in idx)
            batch = torch.zeros(len(idx), 1, longest)
            for row, i in enumerate(idx):
                batch[row, 0, : wavs[i].shape[-1]] = wavs[i].reshape(-1)
            codes = self.encode(batch).cpu()
            for row, i in enumerate(idx):
                results[i] = codes[row, :, : self.n_frames(wavs[i].shape[-1])].clone()
        out = [results[i] for i in range(len(wavs))]
        return out

    def decode_list(self, codes: list[torch.Tensor], batch_size: int = 16) -> list[torch.Tensor]:
        """Decode (Q, F_i) grids of different lengths. Returns one 1-D waveform per input."""
        results: dict[int, torch.Tensor] = {}
        order = sorted(range(len(codes)), key=lambda i: -codes[i].shape[-1])
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            longest = max(codes[i].shape[-1] for i in idx)
            q = codes[idx[0]].shape[0]
            batch = torch.zeros(len(idx), q, longest, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, :, : codes[i].shape[-1]] = codes[i]
            wav = self.decode(batch).cpu()
            for row, i in enumerate(idx):
                results[i] = wav[row, 0, : codes[i].shape[-1] * self.hop_length].clone()
        return [results[i] for i in range(len(codes))]


def codec_from_header(header: dict, device: str | None = None) -> Codec:
    """The codec a dataset header or model metadata names (`{"name", "bandwidth", "path", "options"}`),
    codebook or weights path and the codec's own settings included: tokens only decode right with the exact
    codec that made them."""
    from valle_cli.config import CodecConfig

    cfg = CodecConfig(
        name=header["name"],
        bandwidth=float(header.get("bandwidth", 6.0)),
        path=header.get("path"),
        options=dict(header.get("options") or {}),
    )
    return build_codec(cfg, device)


def build_codec(cfg: CodecConfig | str, device: str | None = None) -> Codec:
    """Build the codec a config names (a `valle.codecs` plugin) and move it to its device."""
    from valle_cli import plugins
    from valle_cli.config import CodecConfig, plugin_options

    if isinstance(cfg, str):
        cfg = CodecConfig(name=cfg)
    cls = plugins.load("codec", cfg.name)
    plugin_options(cls, cfg.options, "codec.options")  # checked here too: headers bypass load_config
    codec = cls.from_config(cfg)
    if not isinstance(codec, Codec):
        raise CodecError(
            f"codec plugin {cfg.name!r} did not build a valle Codec (got {type(codec).__name__})"
        )
    codec.eval()
    return codec.to(resolve_device(device or cfg.device))
