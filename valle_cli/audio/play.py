"""Playing audio through the sound card with sounddevice (PortAudio), for `valle synth --play`.

`Player` opens an output stream at the audio's rate and takes chunks as they come (streaming synthesis plays
while the model is still generating). Opening it checks up front, before any generation, that PortAudio is
installed and that there is an output device, so a machine without one (a server, an SSH session, CI) gets a
plain sentence saying so rather than a PortAudio traceback after a long synthesis.
"""

from __future__ import annotations

import numpy as np

from valle_cli.errors import AudioError


def _sounddevice():
    try:
        import sounddevice
    except OSError:  # the module imports, then fails to find libportaudio
        raise AudioError(
            "cannot play audio: the PortAudio library is not installed",
            "install it (Debian/Ubuntu: apt-get install libportaudio2), or drop --play and open the -o file",
        ) from None
    return sounddevice


def check_output_device() -> str:
    """The default output device's name; AudioError when there is none."""
    sd = _sounddevice()
    try:
        info = sd.query_devices(kind="output")
    except Exception:  # PortAudioError: no default output device
        info = None
    if not info or int(info.get("max_output_channels", 0)) < 1:
        raise AudioError(
            "cannot play audio: this machine has no audio output device",
            "drop --play and listen to the -o file elsewhere (over SSH, copy it to your machine)",
        )
    return str(info.get("name", "default"))


class Player:
    """Plays mono float chunks in order from a background thread, so generation goes on while audio plays
    (a blocking write would stall the next chunk's generation until the last one had nearly finished, leaving
    a gap at every join). `close()` waits until everything has been heard; `abort()` stops at once."""

    def __init__(self, sample_rate: int):
        import queue
        import threading

        check_output_device()
        sd = _sounddevice()
        self.stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32")
        self.stream.start()
        self.queue: queue.Queue[np.ndarray | None] = queue.Queue()
        self.thread = threading.Thread(target=self._play, name="valle-player", daemon=True)
        self.thread.start()

    def _play(self) -> None:
        while (chunk := self.queue.get()) is not None:
            self.stream.write(chunk.reshape(-1, 1))

    def write(self, chunk: np.ndarray) -> None:
        if chunk.size:
            self.queue.put(np.ascontiguousarray(chunk, dtype=np.float32))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.stream.stop()  # stop() lets the buffered audio finish
        self.stream.close()

    def abort(self) -> None:
        self.stream.abort()  # unblocks a pending write; the thread then ends on the sentinel
        self.queue.put(None)
        self.thread.join(timeout=2)
        self.stream.close()

    def __enter__(self) -> Player:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
