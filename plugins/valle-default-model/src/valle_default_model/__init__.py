"""valle's shipped default model, as a `valle.models` plugin.

The entry point `valle-default` is `model_path()`: the path of the model file (valle's export format:
safetensors with the config, symbol map and codec in its metadata). valle loads it with
`valle synth --model valle-default`, and uses it by itself when no model is named and the hub default cannot
be had. `reference()` is a 3-second clip of a voice the model never heard in training (mbrola us2), for trying
zero-shot cloning with no recording at hand. How the model was made and how good it is: README.md.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.3.0"

_HERE = Path(__file__).resolve().parent


def model_path() -> Path:
    return _HERE / "valle-default.safetensors"


def reference() -> Path:
    return _HERE / "reference-us2.flac"
