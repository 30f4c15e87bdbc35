"""Vocos decoding of EnCodec tokens (charactr/vocos-encodec-24khz): same tokens, better audio.

Vocos has no encoder of its own for this model: encoding goes through `EncodecCodec` at the same bandwidth,
and the tokens are the same as EnCodec's, so a model trained with `encodec` can be decoded with `vocos`.
Decoding embeds the codes with EnCodec's codebooks (summed over levels), runs the Vocos backbone conditioned on
the bandwidth, and an inverse-STFT head.

Weights come from the Hugging Face hub (config.yaml + pytorch_model.bin, cached by huggingface_hub) or from a
local folder holding those two files (`codec.path`). Offline with an empty cache, the error says which files to
put where. `pretrained=False` builds the same architecture from its config with random weights (tests).

We build the modules ourselves instead of calling `Vocos.from_pretrained`, because that constructor downloads
EnCodec weights inside its feature extractor even when only decoding is wanted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from valle_cli.codecs.base import Codec
from valle_cli.codecs.encodec_codec import BANDWIDTH_LEVELS, EncodecCodec, _check_bandwidth
from valle_cli.errors import CodecError
from valle_cli.hub import online

if TYPE_CHECKING:
    from valle_cli.config import CodecConfig

REPO_ID = "charactr/vocos-encodec-24khz"
VOCOS_BANDWIDTHS = [1.5, 3.0, 6.0, 12.0]
# The architecture of charactr/vocos-encodec-24khz (its config.yaml), used to build random-weight models.
DEFAULT_CONFIG = {
    "backbone": {
        "class_path": "vocos.models.VocosBackbone",
        "init_args": {
            "input_channels": 128,
            "dim": 384,
            "intermediate_dim": 1152,
            "num_layers": 8,
            "adanorm_num_embeddings": 4,
        },
    },
    "head": {
        "class_path": "vocos.heads.ISTFTHead",
        "init_args": {"dim": 384, "n_fft": 1280, "hop_length": 320, "padding": "same"},
    },
}


def fetch_vocos_files(path: str | None = None) -> tuple[Path, Path]:
    """(config.yaml, pytorch_model.bin) from a local folder, the hub cache, or a download."""
    if path:
        folder = Path(path)
        cfg, weights = folder / "config.yaml", folder / "pytorch_model.bin"
        missing = [p.name for p in (cfg, weights) if not p.exists()]
        if missing:
            raise CodecError(
                f"Vocos folder {folder} lacks {', '.join(missing)}",
                f"download them from the Hugging Face repo {REPO_ID} into {folder}",
            )
        return cfg, weights
    from huggingface_hub import hf_hub_download

    files = []
    for name in ("config.yaml", "pytorch_model.bin"):
        try:
            files.append(Path(hf_hub_download(REPO_ID, name, local_files_only=True)))
            continue
        except Exception:
            pass
        if not online():
            raise CodecError(
                f"Vocos weights ({REPO_ID}/{name}) are not in the Hugging Face cache and there is no network",
                f"on a machine with internet run `hf download {REPO_ID}` and copy the cache "
                "(~/.cache/huggingface/hub), or put config.yaml and pytorch_model.bin in a folder and set "
                "codec.path to it; or use the offline codec with --set codec.name=mel",
            )
        try:
            files.append(Path(hf_hub_download(REPO_ID, name)))
        except Exception as exc:
            raise CodecError(
                f"cannot download {REPO_ID}/{name}: {type(exc).__name__}: {exc}",
                "check the network, or set codec.path to a folder with config.yaml and pytorch_model.bin",
            ) from None
    return files[0], files[1]


class _CodebookFeatures(torch.nn.Module):
    """EnCodec codebooks stacked as one embedding table: codes of level q index rows [q*1024, (q+1)*1024)."""

    def __init__(self, codebook_weights: torch.Tensor):
        super().__init__()
        self.codebook_weights = torch.nn.Parameter(codebook_weights, requires_grad=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # codes (B, Q, F) -> features (B, 128, F)
        q = codes.shape[1]
        offsets = torch.arange(q, device=codes.device).view(1, q, 1) * 1024
        return (
            torch.nn.functional.embedding(codes + offsets, self.codebook_weights).sum(dim=1).transpose(1, 2)
        )


class VocosCodec(Codec):
    name = "vocos"
    sample_rate = 24_000
    frame_rate = 75.0
    hop_length = 320
    codebook_size = 1024

    def __init__(
        self,
        bandwidth: float = 6.0,
        pretrained: bool = True,
        path: str | None = None,
        encodec_path: str | None = None,
    ):
        super().__init__()
        from vocos.pretrained import instantiate_class

        self.bandwidth = _check_bandwidth(bandwidth)
        if self.bandwidth not in VOCOS_BANDWIDTHS:
            raise CodecError(
                f"Vocos decodes EnCodec at {', '.join(map(str, VOCOS_BANDWIDTHS))} kbps, not {bandwidth}",
                "pick one of those bandwidths or use codec.name=encodec",
            )
        self.n_codebooks = BANDWIDTH_LEVELS[self.bandwidth]
        self.encoder = EncodecCodec(self.bandwidth, pretrained=pretrained, path=encodec_path)
        config = DEFAULT_CONFIG
        state = None
        if pretrained:
            import yaml

            cfg_file, weights_file = fetch_vocos_files(path)
            config = yaml.safe_load(cfg_file.read_text())
            try:
                state = torch.load(weights_file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CodecError(
                    f"Vocos weights {weights_file} cannot be read ({type(exc).__name__}); the file may be truncated",
                    f"delete {weights_file} and run again to download it afresh",
                ) from None
        n_q = BANDWIDTH_LEVELS[max(VOCOS_BANDWIDTHS)]
        quantizer = self.encoder.model.quantizer
        codebooks = torch.cat([layer.codebook for layer in quantizer.vq.layers[:n_q]], dim=0).clone()
        self.features = _CodebookFeatures(codebooks)
        self.backbone = instantiate_class((), config["backbone"])
        self.head = instantiate_class((), config["head"])
        if state is not None:
            self._load_vocos_state(state)

    def _load_vocos_state(self, state: dict) -> None:
        mine = {"features.codebook_weights": state.get("feature_extractor.codebook_weights")}
        mine.update({k: v for k, v in state.items() if k.startswith(("backbone.", "head."))})
        missing = [k for k, v in mine.items() if v is None]
        expected = {k for k in self.state_dict() if not k.startswith("encoder.")}
        missing += sorted(expected - set(mine))
        if missing:
            raise CodecError(
                f"the Vocos checkpoint lacks {len(missing)} tensors (e.g. {missing[0]})",
                f"it is not a {REPO_ID} checkpoint or is damaged; download it again",
            )
        self.load_state_dict(mine, strict=False)

    @classmethod
    def from_config(cls, cfg: CodecConfig) -> VocosCodec:
        return cls(bandwidth=cfg.bandwidth, pretrained=True, path=cfg.path)

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.encoder._encode(wav)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        features = self.features(codes)  # (B, 128, F)
        # condition on the bandwidth the codes actually have (fewer levels = lower bandwidth)
        levels_to_id = {BANDWIDTH_LEVELS[b]: i for i, b in enumerate(VOCOS_BANDWIDTHS)}
        bandwidth_id = torch.tensor([levels_to_id.get(codes.shape[1], 0)], device=codes.device)
        x = self.backbone(features, bandwidth_id=bandwidth_id)
        return self.head(x).unsqueeze(1)  # (B, 1, F * 320)
