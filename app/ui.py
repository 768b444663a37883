"""The Gradio Blocks app: Encode, Decode and Resynthesise tabs over one `CodecService`.

Every handler turns a refusal (`InputError`) into ``gr.Error`` with the service's message, so the
user sees what is wrong and the server goes on serving; an unexpected failure is logged with its
traceback and reported as an internal error, never as a dead worker. Endpoints (for
``gradio_client``): ``/encode``, ``/decode``, ``/resynthesize``.

All model work (the three endpoints together) shares one concurrency group, so ``concurrency``
bounds the model runs at once, not each endpoint's. Decodes run in the engine's shared step
batches (one scheduler per codec, `vqwavenet.steps.Scheduler`), so concurrent decodes share
steps instead of competing for the cores; the group's limit is what that scheduler holds at
once (`Codec.max_requests`), and requests beyond it wait in Gradio's queue. A decode whose
client has gone (nobody reads its results, `app.guard`) frees its rows at the engine's next
step block instead of using cores others wait for. Results and uploads live in private
temporary folders (owner-only), removed when the process ends, including on SIGTERM
(`app.__main__`).

Decoding streams: the Decode and Resynthesise tabs' players start on the first audio the
engine has final, once it can play on to the end without a gap (`CodecService.decode_stream`;
later chunks are generated while it plays) while a progress bar runs, and the complete
16-bit wav is offered as a file at the end. Gradio streams audio output as AAC through ffmpeg,
so the players stream only where ffmpeg is on PATH; without it they get the whole wav at the
end. Either way ``/decode`` returns (player, wav file) and ``/resynthesize`` (original, player,
original spectrogram, spectrogram, wav file): the wav holds exactly the engine's samples, and
the player's last value is that wav, or a no-change update when it was streamed (the stream's
chunks come before it).
"""

from __future__ import annotations

import atexit
import html
import io
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image
from starlette.middleware import Middleware

from app.guard import DEFAULT_GRACE_S, Guard, Listeners
from app.pictures import codes_image, spectrogram_image
from app.scratch import Scratch, private_gradio_cache
from app.service import CodecService, InputError, codes_name
from vqwavenet import Busy
from vqwavenet.audio import save_wav
from vqwavenet.safe_text import printable, show_path

log = logging.getLogger(__name__)
FROM_FILE = "(the file's speaker)"
CACHE_MAX_AGE_S = 3600
MODEL_WORK = "model"  # the one concurrency group of every endpoint that runs the model
# Multipart framing and form fields around one upload of the largest allowed size.
UPLOAD_OVERHEAD = 1 << 20
# Output players: the browser's own <audio controls> (keyboard accessible, plays any length at
# once) rather than a drawn waveform; the spectrogram pictures show the signal.
PLAYER = {"waveform_options": gr.WaveformOptions(show_recording_waveform=False)}
# Clips a first visit can try with one click (shipped with the package).
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


class Abandoned(Exception):
    """Nobody reads the request's results any more: its work stops."""


def _audio_out(service: CodecService, scratch: Scratch, wave: np.ndarray, name: str) -> str:
    """A 16-bit wav of ``wave [n]`` for an output Audio component.

    Outputs go to Gradio as files of ours, never as arrays: Gradio caches an array under the
    hash of its content and writes it in place, so two requests with the same result (two
    users encoding one file) race on one cache file and a download can come back truncated;
    files are copied into the cache atomically."""
    path = scratch.path(name)
    save_wav(path, wave, service.sample_rate)
    return scratch.seal(path)


def _wav_bytes(service: CodecService, wave: np.ndarray) -> bytes:
    """A 16-bit wav of ``wave [n]`` in memory: one chunk of a streamed output (Gradio passes
    bytes to its stream encoder as they are; an array would be cached and peak-normalised)."""
    buffer = io.BytesIO()
    save_wav(buffer, wave, service.sample_rate)
    return buffer.getvalue()


def can_stream_audio() -> bool:
    """Whether Gradio can stream an audio output here: it encodes the stream with ffmpeg and
    fails at the first chunk when ffmpeg is not on PATH."""
    return shutil.which("ffmpeg") is not None


def _image_out(scratch: Scratch, image: np.ndarray, name: str) -> str:
    """A PNG of ``image [H, W, 3]`` uint8 for an output Image component (see `_audio_out`)."""
    path = scratch.path(name)
    Image.fromarray(image).save(path, format="PNG")
    return scratch.seal(path)


def _generated_player(label: str, elem_id: str, stream: bool) -> gr.Audio:
    """The player of generated speech: streamed (the browser's own player, Gradio's choice for
    streams, starting by itself; a wav file output beside it is the download) or, without
    ffmpeg, a plain player that gets the whole wav at the end."""
    if stream:
        return gr.Audio(
            label=f"{label} (plays as it is generated)",
            streaming=True,
            autoplay=True,
            buttons=[],
            elem_id=elem_id,
        )
    return gr.Audio(label=label, elem_id=elem_id, **PLAYER)


# An absolute path of two or more parts: a server path, shown by its last part only.
_SERVER_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def safe_message(message: str, upload=None) -> str:
    """``message`` as a user may see it: server paths cut to their file name (``upload``, the
    server-side path of the user's file, and any other absolute path), characters that cannot
    travel as UTF-8 (lone surrogates from file contents) escaped, and HTML escaped."""
    if isinstance(upload, str) and upload:
        for shown in (upload, show_path(upload)):  # as given, and as messages escape it
            message = message.replace(shown, os.path.basename(shown))
    message = _SERVER_PATH.sub(r"\1", message)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(message, quote=False)


def _fail(e: Exception, upload=None):
    """Map an exception to the error the user sees (``upload``: a server-side path that is
    shown by its file name only)."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, Abandoned):
        return gr.Error(safe_message(str(e)), print_exception=False)
    if isinstance(e, InputError | Busy):
        return gr.Error(safe_message(str(e), upload), print_exception=False)
    log.exception("unexpected failure")
    message = f"internal error ({type(e).__name__}: {e}); the server keeps running"
    return gr.Error(safe_message(message, upload))


def _progress_callback(progress: gr.Progress, desc: str, wanted=lambda: True):
    """The engine's progress callback: moves the bar, and stops the work (raises `Abandoned`
    at the engine's next step block) once nobody reads the results (``wanted``)."""

    def update(done: int, total: int) -> None:
        if not wanted():
            raise Abandoned("stopped: nobody was reading the results any more")
        progress(done / max(total, 1), desc=desc)

    return update


def _summary(service: CodecService, enc, path: Path) -> str:
    cf = enc.codes
    size = path.stat().st_size
    return (
        f"- **duration**: {cf.duration:.2f} s ({cf.num_samples} samples at {cf.sample_rate} Hz)\n"
        f"- **frames**: {cf.num_frames} ({service.frame_rate:g} per second)\n"
        f"- **bitrate**: {service.bitrate:g} bit/s of codes ({service.bits_per_code:g} bits per "
        f"frame); the file is {size} bytes, {8 * size / cf.duration:.0f} bit/s with its header\n"
        f"- **default speaker**: {html.escape(printable(cf.speaker_name))}"
    )


def build_demo(
    service: CodecService,
    *,
    scratch: Scratch | None = None,
    stream: bool | None = None,
    listeners: Listeners | None = None,
    concurrency: int | None = None,
) -> gr.Blocks:
    """The app's Blocks, not launched and without a queue (`serve` does both).

    ``stream``: whether the Decode and Resynthesise tabs stream their audio (default: where
    `can_stream_audio`); ``listeners``: who reads which session's results (`serve` counts
    them; without it every request is wanted to the end); ``concurrency``: model runs at once,
    all endpoints together (default: the queue's default; `serve` passes what the decoder's
    scheduler holds)."""
    private_gradio_cache()
    scratch = scratch or Scratch()
    listeners = listeners or Listeners()
    stream = can_stream_audio() if stream is None else stream
    speakers = service.speakers

    def watch(request: gr.Request | None):
        return listeners.watch(getattr(request, "session_hash", None))

    def encode(audio, speaker):
        try:
            enc = service.encode(audio, speaker)
            name = codes_name(os.path.basename(audio)) if isinstance(audio, str) else "codes.vqwc"
            path = scratch.path(name)
            enc.codes.write(path)
            scratch.seal(path)
            picture = codes_image(enc.codes.codes, enc.codes.codebook_size)
            picture = _image_out(scratch, picture, Path(name).stem + ".codes.png")
            return str(path), picture, _summary(service, enc, path), str(path)
        except Exception as e:
            raise _fail(e, audio) from None

    def decode(codes_path, speaker, seed, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        try:
            cf = service.read_codes(codes_path)
            choice = None if speaker in (None, FROM_FILE) else speaker
            cb = _progress_callback(progress, "generating", watch(request))
            chunks = service.decode_stream(cf, choice, seed, cb)  # refusals raise here
            parts = []
            for chunk in chunks:  # [k] float32 each
                parts.append(chunk)
                if stream:
                    yield _wav_bytes(service, chunk), gr.skip()
            name = Path(codes_path).stem + ".decoded.wav"
            path = _audio_out(service, scratch, np.concatenate(parts), name)
            yield (gr.skip() if stream else path), path
        except Exception as e:
            raise _fail(e, codes_path) from None

    def resynthesize(audio, speaker, seed, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        """Encode, show the original, then decode as the Decode tab does (streamed)."""
        try:
            enc = service.encode(audio, speaker)
            sr = service.sample_rate
            stem = Path(audio).stem if isinstance(audio, str) else "speech"
            cb = _progress_callback(progress, "generating", watch(request))
            chunks = service.decode_stream(enc.codes, speaker, seed, cb)  # refusals raise here
            original = _audio_out(service, scratch, enc.wave, f"{stem}.wav")
            picture = _image_out(scratch, spectrogram_image(enc.wave, sr), f"{stem}.png")
            yield original, gr.skip(), picture, gr.skip(), gr.skip()
            parts = []
            for chunk in chunks:
                parts.append(chunk)
                if stream:
                    yield gr.skip(), _wav_bytes(service, chunk), gr.skip(), gr.skip(), gr.skip()
            wave = np.concatenate(parts)
            path = _audio_out(service, scratch, wave, f"{stem}.resynth.wav")
            out_picture = _image_out(scratch, spectrogram_image(wave, sr), f"{stem}.resynth.png")
            # The last update is what an API client gets: every output but a streamed player.
            yield original, (gr.skip() if stream else path), picture, out_picture, path
        except Exception as e:
            raise _fail(e, audio) from None

    limit = f"{service.max_seconds:g} s"
    limit_runs = "default" if concurrency is None else concurrency
    with gr.Blocks(
        title="vqwavenet speech codec",
        analytics_enabled=False,
        delete_cache=(CACHE_MAX_AGE_S, CACHE_MAX_AGE_S),  # uploads and results, hourly
    ) as demo:
        gr.Markdown(
            "# vqwavenet speech codec\n"
            f"Speech to {service.bitrate:g} bit/s of codes and back with a WaveNet decoder, in "
            f"any of {len(speakers)} voices. Audio up to {limit}; any common format, rate and "
            "channel count (mixed to mono, resampled to "
            f"{service.sample_rate} Hz)."
        )
        if service.notice:
            gr.Markdown(f"**Note:** {service.notice}", elem_id="model-notice")
        clips = example_clips(service)
        with gr.Tabs():
            with gr.Tab("Encode", id="encode"):
                with gr.Row():
                    with gr.Column():
                        enc_audio = gr.Audio(
                            sources=["upload", "microphone"],
                            type="filepath",
                            label=f"Speech (up to {limit})",
                            elem_id="encode-audio",
                        )
                        enc_speaker = gr.Dropdown(
                            speakers,
                            value=speakers[0],
                            label="Default speaker stored in the file",
                        )
                        enc_button = gr.Button("Encode", variant="primary", elem_id="encode-btn")
                    with gr.Column():
                        enc_file = gr.File(label="Codes file (.vqwc)", elem_id="encode-file")
                        enc_info = gr.Markdown(elem_id="encode-info")
                enc_picture = gr.Image(
                    label="Code sequence (time ->, code index ^)", elem_id="encode-picture"
                )
                if clips:
                    gr.Examples([[c, speakers[0]] for c in clips], [enc_audio, enc_speaker])
            with gr.Tab("Decode", id="decode"):
                with gr.Row():
                    with gr.Column():
                        dec_file = gr.File(label="Codes file (.vqwc)", elem_id="decode-file")
                        dec_speaker = gr.Dropdown(
                            [FROM_FILE, *speakers], value=FROM_FILE, label="Speaker"
                        )
                        dec_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                        dec_button = gr.Button("Decode", variant="primary", elem_id="decode-btn")
                    with gr.Column():
                        dec_audio = _generated_player("Decoded speech", "decode-audio", stream)
                        dec_wav = gr.File(label="Decoded speech (.wav)", elem_id="decode-wav")
                if clips:
                    gr.Examples(
                        [[example_codes(service, clips[0]), speakers[-1], 0]],
                        [dec_file, dec_speaker, dec_seed],
                    )
            with gr.Tab("Resynthesise", id="resynthesize"):
                with gr.Row():
                    with gr.Column():
                        res_in = gr.Audio(
                            sources=["upload", "microphone"],
                            type="filepath",
                            label=f"Speech (up to {limit})",
                            elem_id="resynth-audio",
                        )
                        res_speaker = gr.Dropdown(
                            speakers, value=speakers[0], label="Target speaker"
                        )
                        res_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                        res_button = gr.Button(
                            "Resynthesise", variant="primary", elem_id="resynth-btn"
                        )
                with gr.Row():
                    with gr.Column():
                        res_orig = gr.Audio(
                            label="Original (as encoded)", elem_id="resynth-original", **PLAYER
                        )
                        res_orig_spec = gr.Image(label="Original spectrogram")
                    with gr.Column():
                        res_out = _generated_player("Resynthesised", "resynth-output", stream)
                        res_out_spec = gr.Image(label="Resynthesised spectrogram")
                        res_wav = gr.File(label="Resynthesised (.wav)", elem_id="resynth-wav")
                if clips:
                    gr.Examples(
                        [[c, speakers[-1], 0] for c in clips], [res_in, res_speaker, res_seed]
                    )

        enc_button.click(
            encode,
            [enc_audio, enc_speaker],
            [enc_file, enc_picture, enc_info, dec_file],
            api_name="encode",
            concurrency_id=MODEL_WORK,
            concurrency_limit=limit_runs,
        )
        dec_button.click(
            decode,
            [dec_file, dec_speaker, dec_seed],
            [dec_audio, dec_wav],
            api_name="decode",
            concurrency_id=MODEL_WORK,
            concurrency_limit=limit_runs,
            show_progress_on=dec_wav,  # not over the player while it plays
        )
        res_button.click(
            resynthesize,
            [res_in, res_speaker, res_seed],
            [res_orig, res_out, res_orig_spec, res_out_spec, res_wav],
            api_name="resynthesize",
            concurrency_id=MODEL_WORK,
            concurrency_limit=limit_runs,
            show_progress_on=res_wav,  # not over the player while it plays
        )
    return demo


def example_clips(service: CodecService) -> list[str]:
    """The example clips the model accepts (within the deployment's length limit)."""
    clips = []
    for path in sorted(EXAMPLES_DIR.glob("*.wav")):
        try:
            service.load_audio(str(path))
        except InputError:
            continue
        clips.append(str(path))
    return clips


def example_codes(service: CodecService, clip: str) -> str:
    """The codes of ``clip`` for the Decode tab's example, written once per process into a
    folder of its own (codes files belong to one model, so none is shipped)."""
    folder = Path(tempfile.mkdtemp(prefix="vqwavenet-example-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / codes_name(Path(clip).name)
    service.encode(clip).codes.write(path)
    return str(path)


def serve(
    service: CodecService,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    concurrency: int | None = None,
    queue_size: int = 64,
    max_file_size: str | int | None = "50mb",
    block: bool = True,
    stream: bool | None = None,
    auth: list[tuple[str, str]] | None = None,
    listen_grace: float = DEFAULT_GRACE_S,
    **launch_kwargs,
) -> gr.Blocks:
    """Build, queue and launch the app; ``block=False`` returns once it is serving (tests).

    ``concurrency``: model runs at once, all endpoints together; the decoder's scheduler takes
    as many requests at once (`Codec.max_requests`; default: what it takes already), so a
    request Gradio starts is never refused as busy. ``port=None`` lets Gradio pick a free port
    (``demo.local_url`` says which); ``stream``: see
    `build_demo`; ``auth``: (user, password) pairs for Gradio's login (none: open to whoever
    reaches the port); ``listen_grace``: seconds a decode runs on with nobody reading it."""
    listeners = Listeners(grace=listen_grace)
    if concurrency is None:
        concurrency = service.codec.max_requests
    service.codec.max_requests = concurrency
    demo = build_demo(service, stream=stream, listeners=listeners, concurrency=concurrency)
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    limit = _parse_size(max_file_size)

    def session_of(event_id: str) -> str | None:
        event = demo._queue.event_ids_to_events.get(event_id)
        return getattr(event, "session_hash", None)

    guard = Middleware(
        Guard,
        listeners=listeners,
        max_body=None if limit is None else limit + UPLOAD_OVERHEAD,
        session_of=session_of,
    )
    app_kwargs = launch_kwargs.pop("app_kwargs", {}) or {}
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), guard]
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth or None,
        app_kwargs=app_kwargs,
        max_file_size=max_file_size,
        show_error=True,
        allowed_paths=[str(EXAMPLES_DIR), *launch_kwargs.pop("allowed_paths", [])],
        prevent_thread_lock=not block,
        quiet=not block,
        **launch_kwargs,
    )
    return demo


def _parse_size(size: str | int | None) -> int | None:
    """Bytes of a size such as ``50mb`` (Gradio's own parser, so both agree)."""
    if size is None:
        return None
    return gr.utils._parse_file_size(size)
