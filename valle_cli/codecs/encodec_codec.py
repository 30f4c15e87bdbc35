"""EnCodec 24 kHz (Défossez et al.), the codec VALL-E was built on.

75 frames/s, 1024-entry codebooks; the bandwidth picks the number of RVQ levels: 1.5/3/6/12/24 kbps ->
2/4/8/16/32. Pretrained weights come through the encodec package's own URL into torch.hub's checkpoint folder
(`~/.cache/torch/hub/checkpoints/encodec_24khz-d7cc33bc.th`) on first use. With no network, and no file there
or at `codec.path`, the error names the file, the URL and the folder to put it in. `pretrained=False` builds
random weights (tests, smoke runs).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from valle_cli.codecs.base import Codec
from valle_cli.errors import CodecError

if TYPE_CHECKING:
    from valle_cli.config import CodecConfig

ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th"
ENCODEC_FILE = "encodec_24khz-d7cc33bc.th"
# encodec (and vocos) still call the deprecated weight_norm; the warning is for them, not our users.
warnings.filterwarnings("ignore", message=".*torch.nn.utils.weight_norm.*", category=FutureWarning)
BANDWIDTH_LEVELS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}


def _check_bandwidth(bandwidth: float) -> float:
    bw = float(bandwidth)
    if bw not in BANDWIDTH_LEVELS:
        raise CodecError(
            f"EnCodec 24 kHz has no {bandwidth} kbps setting",
            f"use one of {', '.join(str(b) for b in BANDWIDTH_LEVELS)} (kbps)",
        )
    return bw


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_encodec_state(path: str | os.PathLike | None = None) -> dict:
    """The pretrained EnCodec 24 kHz state dict, from `path`, torch.hub's cache, or a download."""
    target = Path(path) if path else hub_checkpoint_dir() / ENCODEC_FILE
    if not target.exists():
        if path:
            raise CodecError(
                f"EnCodec weights {target} do not exist", "fix codec.path or remove it to download"
            )
        try:
            torch.hub.load_state_dict_from_url(
                ENCODEC_URL, map_location="cpu", check_hash=True, progress=False
            )
        except Exception as exc:
            raise CodecError(
                f"EnCodec weights are not downloaded and cannot be fetched ({type(exc).__name__}: {exc})",
                f"on a machine with internet, download {ENCODEC_URL} and put it at {target} "
                "(or set codec.path to it); or use the offline codec with --set codec.name=mel",
            ) from None
    try:
        return torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CodecError(
            f"EnCodec weights at {target} cannot be read ({type(exc).__name__}); the file may be truncated",
            f"delete {target} and run again to download it afresh",
        ) from None


class EncodecCodec(Codec):
    name = "encodec"
    sample_rate = 24_000
    frame_rate = 75.0
    hop_length = 320
    codebook_size = 1024

    def __init__(self, bandwidth: float = 6.0, pretrained: bool = True, path: str | None = None):
        super().__init__()
        from encodec import EncodecModel

        self.bandwidth = _check_bandwidth(bandwidth)
        self.n_codebooks = BANDWIDTH_LEVELS[self.bandwidth]
        model = EncodecModel.encodec_model_24khz(pretrained=False)
        if pretrained:
            model.load_state_dict(load_encodec_state(path))
        model.set_target_bandwidth(self.bandwidth)
        self.model = model.eval()

    @classmethod
    def from_config(cls, cfg: CodecConfig) -> EncodecCodec:
        return cls(bandwidth=cfg.bandwidth, pretrained=True, path=cfg.path)

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        frames = self.model.encode(wav)  # the 24 kHz model is unsegmented: one frame (codes, scale=None)
        return frames[0][0]  # (B, Q, F)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode([(codes, None)])  # (B, 1, F * 320)
