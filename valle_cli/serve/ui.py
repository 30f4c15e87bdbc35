"""The web UI of `valle serve`, at /ui: the original's tabs (text to speech with basic and sampler settings and
a reference clip to upload, record and trim; speech to text; a dataset browser; settings to switch models).

Built with Gradio (the field's habit, and what the original used): its audio component uploads, records,
trims and plays clips in the browser, its assets ship inside the wheel (the UI works offline), and it mounts
on our FastAPI app, so the UI and the API share one port, one API key, one set of limits and one generation
queue. Analytics are off; Gradio keeps uploads in HOME/tmp/gradio and serves no other files.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import os
from pathlib import Path

import numpy as np

from valle_cli.errors import ValleError
from valle_cli.serve.jobs import JobQueue, QueueClosed, QueueFull
from valle_cli.serve.models import Registry
from valle_cli.serve.settings import ServeSettings
from valle_cli.serve.voices import RANDOM, VoiceStore

UI_PATH = "/ui"
LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "nl", "ja", "zh"]


def _message(exc: BaseException, limits) -> str:
    from valle_cli.serve.api import ApiError

    if isinstance(exc, QueueFull):
        return "busy: other generations are waiting; try again in a few seconds"
    if isinstance(exc, QueueClosed):
        return "the server is shutting down"
    if isinstance(exc, TimeoutError):
        return f"generation took longer than {limits.timeout_seconds:g} s and was stopped"
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, ValleError):
        return exc.message + (f"; {exc.remedy}" if exc.remedy else "")
    return "internal error (details are in the server's log)"


def _threadsafe(progress):
    """`progress((done, total), what)` for the generation thread. Gradio finds the event a progress bar belongs
    to through context variables, which a worker thread lacks, so each update runs on the event loop in the
    handler's context."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()

    def report(what: str, done: int, total: int) -> None:
        update = functools.partial(progress, (done, total), desc=what, unit="steps")
        loop.call_soon_threadsafe(context.run, update)

    return report


def build_ui(settings: ServeSettings, registry: Registry, voices: VoiceStore, queue: JobQueue):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    uploads = settings.home / "tmp" / "gradio"
    uploads.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    import gradio as gr

    from valle_cli.serve.api import SpeechRequest, _synthesize, _transcribe

    limits = settings.limits

    def fail(exc: BaseException):
        import logging

        if not isinstance(exc, ValleError | QueueFull | QueueClosed | TimeoutError):
            logging.getLogger("valle.serve").exception("UI handler failed")
        return gr.Error(_message(exc, limits))

    def own_upload(path: str | None) -> Path | None:
        """A clip Gradio received (it lives under our uploads folder; anything else is refused)."""
        if not path:
            return None
        p = Path(path).resolve()
        if uploads.resolve() not in p.parents:
            raise gr.Error("that file is not an upload of this page")
        return p

    def voice_names() -> list[str]:
        return [RANDOM, *(v.name for v in voices.list())]

    def refresh_voices(current):
        """The voices as they are now (the API may have added or deleted some since the page loaded). The
        choice is left alone (the user may have changed it meanwhile) unless its voice is gone."""
        names = voice_names()
        return gr.update(choices=names) if current in names else gr.update(choices=names, value=RANDOM)

    async def synthesize(text, voice, reference, language, seed, ar_temp, nar_temp, top_k, top_p, min_p, penalty,
                         split, progress=gr.Progress()):  # fmt: skip
        if not text or not text.strip():
            raise gr.Error("type some text to speak")
        if len(text) > limits.max_text_chars:
            raise gr.Error(
                f"the text is {len(text)} characters; this server takes at most {limits.max_text_chars}"
            )
        try:
            req = SpeechRequest(
                input=text, voice=voice or RANDOM, language=language, seed=None if seed in (None, "") else int(seed),
                ar_temp=ar_temp, nar_temp=nar_temp, top_k=int(top_k) or None, top_p=top_p, min_p=min_p or None,
                repetition_penalty=penalty, split_sentences=bool(split), response_format="wav",
            )  # fmt: skip
            ref = own_upload(reference)
            if ref is not None:
                import soundfile as sf

                if sf.info(str(ref)).duration > limits.max_reference_seconds:
                    raise gr.Error(f"trim the reference to at most {limits.max_reference_seconds:g} s")
                refs, speaker = [ref], "the uploaded clip"
            else:
                refs = [] if req.voice == RANDOM else [voices.audio_path(req.voice)]
                speaker = "a random voice" if req.voice == RANDOM else f"voice {req.voice!r}"
            model_id = registry.default
            report = _threadsafe(progress)
            if registry.loaded_id != model_id:
                progress((0, None), desc=f"loading {model_id}")
            audio, sr = await queue.run(
                lambda job: _synthesize(job, registry, model_id, text, refs, req, limits, report)
            )
        except gr.Error:
            raise
        except Exception as exc:
            raise fail(exc) from None
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        return (sr, pcm), f"{len(audio) / sr:.1f} s of audio from **{model_id}** in {speaker}"

    def save_voice(name, reference, transcript):
        ref = own_upload(reference)
        if ref is None:
            raise gr.Error("upload or record a reference clip first")
        try:
            voice = voices.add((name or "").strip(), ref.read_bytes(), transcript)
        except Exception as exc:
            raise fail(exc) from None
        gr.Info(f"saved voice {voice.name!r} ({voice.seconds:.1f} s)")
        return gr.update(choices=voice_names(), value=voice.name)

    async def transcribe(audio, language, progress=gr.Progress()):
        path = own_upload(audio)
        if path is None:
            raise gr.Error("upload or record some speech first")
        data = path.read_bytes()
        try:
            model_id = registry.default
            report = _threadsafe(progress)
            result = await queue.run(
                lambda job: _transcribe(job, registry, model_id, data, language, settings, report)
            )
        except Exception as exc:
            raise fail(exc) from None
        return result.ipa

    # -- dataset browser ---------------------------------------------------------------------------------------

    datasets = {Path(p).name: Path(p) for p in settings.datasets}

    def dataset_rows(name, query):
        from valle_cli.data.dataset import open_dataset

        if not name:
            return []
        ds = open_dataset(datasets[name])
        try:
            rows = []
            q = (query or "").lower()
            for i in range(len(ds)):
                meta = ds.meta(i)
                if q and q not in meta.text.lower() and q not in meta.speaker.lower():
                    continue
                rows.append([meta.uid, meta.speaker, meta.language, round(meta.duration, 2), meta.text])
                if len(rows) >= 500:
                    break
            return rows
        finally:
            ds.close()

    async def play_row(name, rows, evt: gr.SelectData):
        from valle_cli.data.dataset import open_dataset

        uid = rows.iloc[evt.index[0], 0] if hasattr(rows, "iloc") else rows[evt.index[0]][0]

        def decode(job):
            import torch

            from valle_cli.codecs.base import codec_from_header

            ds = open_dataset(datasets[name])
            try:
                i = ds.uids().index(uid)
                codec = codec_from_header(ds.header["codec"], "cpu")
                with torch.inference_mode():
                    wav = codec.decode(torch.from_numpy(np.asarray(ds.codes(i), dtype=np.int64))[None])[0, 0]
                return codec.sample_rate, wav.numpy()
            finally:
                ds.close()

        try:
            sr, wav = await queue.run(decode)
        except Exception as exc:
            raise fail(exc) from None
        return sr, (np.clip(wav, -1, 1) * 32767).astype(np.int16)

    # -- settings ----------------------------------------------------------------------------------------------

    def model_info() -> str:
        loaded = registry.loaded_id
        return f"default model: **{registry.default}**; loaded: **{loaded or 'none'}**"

    def refresh_settings():
        """What is loaded now (a request through the API or another page may have loaded or switched it)."""
        return model_info(), gr.update(choices=list(registry.entries))

    async def use_model(model_id):
        try:
            await queue.run(lambda job: registry.get(model_id))
            registry.set_default(model_id)
        except Exception as exc:
            raise fail(exc) from None
        return model_info()

    # -- layout ------------------------------------------------------------------------------------------------

    play_row.__annotations__["evt"] = gr.SelectData  # gradio finds the event argument by its (real) type
    player = gr.WaveformOptions(show_recording_waveform=False)  # results play in the browser's own <audio>

    with gr.Blocks(title="valle", analytics_enabled=False) as ui:
        gr.Markdown(
            "# valle\nZero-shot text-to-speech with VALL-E. The same server answers the API at `/v1`."
        )
        with gr.Tabs():
            with gr.Tab("Text to speech", id="tts"):
                with gr.Row():
                    with gr.Column():
                        text = gr.Textbox(
                            label="Text", lines=4, max_length=limits.max_text_chars, elem_id="tts-text"
                        )
                        with gr.Row():
                            voice = gr.Dropdown(
                                voice_names(), value=RANDOM, label="Voice", elem_id="tts-voice"
                            )
                            language = gr.Dropdown(
                                LANGUAGES, value="en", label="Language", allow_custom_value=True
                            )
                        reference = gr.Audio(
                            label="Or a reference clip (upload or record; trim it with the scissors)",
                            sources=["upload", "microphone"], type="filepath", editable=True, elem_id="tts-ref",
                        )  # fmt: skip
                        with gr.Row():
                            voice_name = gr.Textbox(label="Save the clip as voice", placeholder="name")
                            transcript = gr.Textbox(label="Its transcript (optional)")
                            save = gr.Button("Save voice")
                        with gr.Accordion("Sampler", open=False):
                            with gr.Row():
                                seed = gr.Number(label="Seed (empty: random)", value=None, precision=0)
                                split = gr.Checkbox(label="Split sentences", value=True)
                            with gr.Row():
                                ar_temp = gr.Slider(0.0, 2.0, value=0.95, step=0.05, label="AR temperature")
                                nar_temp = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="NAR temperature")
                            with gr.Row():
                                top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0: off)")
                                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                            with gr.Row():
                                min_p = gr.Slider(0.0, 0.5, value=0.0, step=0.01, label="min-p (0: off)")
                                penalty = gr.Slider(
                                    1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty"
                                )
                        speak = gr.Button("Synthesize", variant="primary", elem_id="tts-go")
                    with gr.Column():
                        out = gr.Audio(
                            label="Speech", type="numpy", interactive=False, elem_id="tts-out",
                            waveform_options=player, buttons=["download"],
                        )  # fmt: skip
                        status = gr.Markdown(elem_id="tts-status")
                speak.click(
                    synthesize,
                    [text, voice, reference, language, seed, ar_temp, nar_temp, top_k, top_p, min_p, penalty, split],
                    [out, status],
                )  # fmt: skip
                save.click(save_voice, [voice_name, reference, transcript], [voice])
                voice.focus(refresh_voices, [voice], [voice], show_progress="hidden")
                ui.load(refresh_voices, [voice], [voice], show_progress="hidden")
            with gr.Tab("Speech to text", id="stt"):
                heard = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath")
                stt_language = gr.Dropdown(LANGUAGES, value="en", label="Language", allow_custom_value=True)
                go = gr.Button("Transcribe", variant="primary")
                ipa = gr.Textbox(label="IPA phonemes (the model's own speech-to-text)")
                go.click(transcribe, [heard, stt_language], [ipa])
            with gr.Tab("Dataset", id="dataset"):
                if datasets:
                    which = gr.Dropdown(list(datasets), value=next(iter(datasets)), label="Dataset")
                    query = gr.Textbox(label="Search text or speaker")
                    table = gr.Dataframe(
                        headers=["uid", "speaker", "language", "seconds", "text"],
                        interactive=False,
                        wrap=True,
                    )
                    heard_row = gr.Audio(
                        label="Selected utterance (decoded from its codes)",
                        type="numpy",
                        waveform_options=player,
                        buttons=["download"],
                    )
                    which.change(dataset_rows, [which, query], [table])
                    query.submit(dataset_rows, [which, query], [table])
                    table.select(play_row, [which, table], [heard_row])
                    ui.load(dataset_rows, [which, query], [table])
                else:
                    gr.Markdown("No dataset to browse: start the server with `--dataset DIR` (repeatable).")
            with gr.Tab("Settings", id="settings") as settings_tab:
                info = gr.Markdown(model_info(), elem_id="settings-info")
                choose = gr.Dropdown(list(registry.entries), value=registry.default, label="Model")
                load = gr.Button("Use this model")
                load.click(use_model, [choose], [info])
                settings_tab.select(refresh_settings, None, [info, choose], show_progress="hidden")
                ui.load(refresh_settings, None, [info, choose], show_progress="hidden")
                gr.Markdown(
                    f"Limits: {limits.max_text_chars} characters per text, references up to "
                    f"{limits.max_reference_seconds:g} s, {limits.max_output_seconds:g} s of audio per sentence, "
                    f"{limits.queue_size} generations at once."
                )
    return ui


def mount(app, ui, settings: ServeSettings):
    """Mount the UI at /ui (with the API key as its password, when one is set) and send / there."""
    import gradio as gr
    from fastapi.responses import RedirectResponse

    auth = None
    if settings.api_key:
        key = settings.api_key.encode()

        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest((password or "").encode(), key)

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse(UI_PATH + "/")

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # fmt: skip  (no web fonts: offline)
    return gr.mount_gradio_app(
        app, ui, path=UI_PATH, auth=auth, auth_message="Password: the server's API key.",
        max_file_size=settings.limits.max_upload_bytes, theme=theme, footer_links=[], ssr_mode=False,
    )  # fmt: skip
