"""The two judges of `valle eval`: an ASR transcriber (intelligibility: word error rate) and a speaker verifier
(voice similarity: cosine of speaker embeddings).

- Transcriber: any `valle.transcribers` plugin; `auto` picks whisper when its model is in the Hugging Face
  cache, else the offline `pocketsphinx` plugin (English).
- Verifier: `wavlm` (microsoft/wavlm-base-plus-sv, an x-vector head on WavLM: the WavLM/ECAPA-style verifier
  papers use) when cached, else `resemblyzer` (a GE2E speaker encoder shipped inside its wheel: offline).
"""

from __future__ import annotations

import numpy as np

from valle_cli.errors import PluginError, ValleError

WAVLM = "microsoft/wavlm-base-plus-sv"


class EvalError(ValleError):
    pass


class Asr:
    def __init__(self, name: str, language: str):
        from valle_cli.transcribe import build_transcriber

        self.language = language
        if name == "auto":
            from valle_cli.hub import cached_snapshot
            from valle_cli.transcribers.whisper import DEFAULT_MODEL

            name = "whisper" if cached_snapshot(DEFAULT_MODEL) is not None else "pocketsphinx"
        self.name = name
        try:
            self.impl = build_transcriber(name)
        except PluginError as exc:
            raise EvalError(
                f"the {name} transcriber is not available: {exc.message}",
                "install the offline one with `pip install ./plugins/valle-pocketsphinx` (English), "
                "or cache a Whisper model",
            ) from None

    def __call__(self, wav: np.ndarray, sr: int) -> str:
        return " ".join(seg.text.strip() for seg in self.impl.transcribe(wav, sr, self.language)).strip()


class Resemblyzer:
    name = "resemblyzer"

    def __init__(self, device: str = "cpu"):
        import warnings

        try:
            with warnings.catch_warnings():
                # its webrtcvad dependency imports pkg_resources, which warns about its own deprecation
                warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
                from resemblyzer import VoiceEncoder
        except ImportError:
            raise EvalError(
                "the resemblyzer speaker encoder is not installed",
                "pip install resemblyzer (valle's dev extra)",
            ) from None
        self.encoder = VoiceEncoder(device, verbose=False)

    def embed(self, wav: np.ndarray, sr: int) -> np.ndarray:
        from resemblyzer import preprocess_wav

        return self.encoder.embed_utterance(preprocess_wav(np.asarray(wav, dtype=np.float32), source_sr=sr))


class WavLM:
    name = "wavlm"

    def __init__(self, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, WavLMForXVector

        from valle_cli.hub import HubOffline, snapshot

        try:
            folder = snapshot(WAVLM)
        except (HubOffline, OSError) as exc:
            raise EvalError(
                f"cannot get {WAVLM}: {exc}", "connect once, or use --verifier resemblyzer"
            ) from None
        self.extractor = AutoFeatureExtractor.from_pretrained(folder)
        self.model = WavLMForXVector.from_pretrained(folder).to(device).eval()
        self.device = device

    def embed(self, wav: np.ndarray, sr: int) -> np.ndarray:
        import torch

        from valle_cli.audio.io import resample

        x = self.extractor(resample(wav, sr, 16000), sampling_rate=16000, return_tensors="pt")
        with torch.inference_mode():
            return self.model(**{k: v.to(self.device) for k, v in x.items()}).embeddings[0].cpu().numpy()


def build_verifier(name: str = "auto", device: str = "cpu"):
    if name == "auto":
        from valle_cli.hub import cached_snapshot

        name = "wavlm" if cached_snapshot(WAVLM) is not None else "resemblyzer"
    if name == "wavlm":
        return WavLM(device)
    if name == "resemblyzer":
        return Resemblyzer(device)
    raise EvalError(f"unknown verifier {name!r}", "use auto, wavlm or resemblyzer")
