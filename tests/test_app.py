"""The web app end to end through ``gradio_client`` on loopback: encode, decode (streamed, and
the final wav), resynthesise, every bad input answered with a clear message while the server keeps
serving, eight clients at once, and a served process that never imports torch."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from app.__main__ import main as app_main
from app.pictures import codes_image, spectrogram_image
from tests.conftest import APP_MAX_FILE_SIZE, DATA, free_port
from vqwavenet.audio import to_int16
from vqwavenet.codes_file import CodesFile

ROOT = Path(__file__).resolve().parent.parent
# Gradio's queue calls pandas APIs that pandas 3 deprecates: its noise, not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated"
)
FROM_FILE = "(the file's speaker)"


def client(url: str, tmp_path: Path) -> Client:
    return Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)


def encode(c: Client, path, speaker="Allison"):
    return c.predict(handle_file(str(path)), speaker, api_name="/encode")


def decode(c: Client, path, speaker=FROM_FILE, seed=0):
    """The decoded wav's path (``/decode`` returns (player, wav); the player may be a stream)."""
    return c.predict(handle_file(str(path)), speaker, seed, api_name="/decode")[1]


def assert_serves(c: Client, app_inputs) -> None:
    """A good request after bad ones gets a good answer."""
    codes_path = encode(c, app_inputs.clip)[0]
    np.testing.assert_array_equal(CodesFile.read(codes_path).codes, app_inputs.clip_codes)


def test_app_encode_decode_resynthesize_end_to_end(app_server, app_inputs, tmp_path):
    url, service = app_server
    c = client(url, tmp_path)
    n = sf.info(app_inputs.clip).frames

    codes_path, picture, summary, decode_input = encode(c, app_inputs.clip, "Carlo")
    cf = CodesFile.read(codes_path, expected_model=service.model_ref)
    np.testing.assert_array_equal(cf.codes, app_inputs.clip_codes)
    assert Path(codes_path).name == "clip.vqwc" and cf.speaker_name == "Carlo"
    assert Path(decode_input).read_bytes() == Path(codes_path).read_bytes()  # Decode tab filled
    assert f"**frames**: {cf.num_frames} " in summary
    assert f"{cf.duration:.2f} s" in summary and f"{service.bitrate:g} bit/s" in summary
    assert Path(picture).stat().st_size > 0

    wav_path = decode(c, codes_path)
    wave, sr = sf.read(wav_path, dtype="int16")
    assert sr == service.sample_rate and wave.shape == (n,) and np.any(wave)
    again, _ = sf.read(decode(c, codes_path), dtype="int16")
    np.testing.assert_array_equal(again, wave)  # seeded: reproducible
    other, _ = sf.read(decode(c, codes_path, "IvrvoiceRU", 0), dtype="int16")
    assert other.shape == (n,) and not np.array_equal(other, wave)  # another voice

    original, player, spec_in, spec_out, resynth = c.predict(
        handle_file(str(app_inputs.clip)), "IvrvoiceRU", 3, api_name="/resynthesize"
    )
    x, _ = sf.read(original, dtype="int16")
    np.testing.assert_array_equal(x, sf.read(app_inputs.clip, dtype="int16")[0])
    y, sr = sf.read(resynth, dtype="int16")
    assert sr == service.sample_rate and y.shape == (n,)
    want = service.resynthesize(str(app_inputs.clip), "IvrvoiceRU", 3)[1]
    np.testing.assert_array_equal(y, to_int16(want))  # the streamed wave, exactly
    assert player == {"__type__": "update"}  # streamed (ffmpeg is here), left as it is
    assert Path(spec_in).stat().st_size > 0 and Path(spec_out).stat().st_size > 0


def long_codes(service, tmp_path: Path, seconds: float = 1.9) -> Path:
    """A codes file of ``seconds`` of speech (two test clips back to back), for streaming."""
    waves = [
        sf.read(DATA / name, dtype="int16")[0] for name in ("activated.wav", "auth-incorrect.wav")
    ]
    wave = np.concatenate(waves)[: int(seconds * 16000)]
    assert len(wave) == int(seconds * 16000)
    path = tmp_path / "long.vqwc"
    service.encode((16000, wave)).codes.write(path)
    return path


def fetch(url: str) -> bytes:
    r = httpx.get(url, timeout=60)
    r.raise_for_status()
    return r.content


def streamed_pcm(playlist_url: str) -> tuple[np.ndarray, int, int]:
    """Samples of a finished HLS audio stream as Gradio serves it (ADTS AAC segments), decoded
    by ffmpeg; returns (float samples, sample rate, number of segments)."""
    lines = fetch(playlist_url).decode().splitlines()
    assert lines[-1] == "#EXT-X-ENDLIST", lines  # the stream is complete
    segments = [line for line in lines if line and not line.startswith("#")]
    base = playlist_url.rsplit("/", 1)[0]
    adts = b"".join(fetch(f"{base}/{name}") for name in segments)
    wav = subprocess.run(  # at the rate the ADTS headers declare
        ["ffmpeg", "-v", "error", "-f", "aac", "-i", "pipe:0", "-f", "wav", "pipe:1"],
        input=adts,
        capture_output=True,
        check=True,
    ).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float64")
    assert audio.ndim == 1
    return audio, sr, len(segments)


def all_outputs(job, timeout: float = 30) -> list:
    """Every update ``job`` streamed. The client can return a generator's result before its
    listener thread has recorded the updates that preceded it; the FINISHED status comes
    after them."""
    deadline = time.monotonic() + timeout
    while job.status().code != Status.FINISHED and time.monotonic() < deadline:
        time.sleep(0.05)
    return job.outputs()


def best_correlation(x: np.ndarray, y: np.ndarray, max_lag: int) -> float:
    """Largest normalised correlation of ``x`` against ``y`` delayed by 0..max_lag samples
    (an AAC encoder delays its output by its priming samples)."""
    best = -1.0
    for lag in range(max_lag + 1):
        a, b = x[lag : lag + len(y)], y[: len(x) - lag]
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        best = max(best, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
    return best


def test_app_streams_decoded_audio_then_offers_the_exact_wav(app_server, tmp_path, monkeypatch):
    url, service = app_server
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg missing (Gradio streams audio through it): `apt-get install -y ffmpeg`")
    # Eighth-second segments (the export wrote a primer), two at a time: several chunks from
    # 1.9 s (fifteen segments), paced as a trained model's would be (the random tiny one
    # makes them all in well under a second, and Gradio may then send them as one update).
    monkeypatch.setattr(service.codec, "playback_rows", 2)
    engine = service.codec.decode_stream

    def paced(*args, **kwargs):
        for i, chunk in enumerate(engine(*args, **kwargs)):
            time.sleep(0.5 if i else 0)
            yield chunk

    monkeypatch.setattr(service.codec, "decode_stream", paced)
    codes_path = long_codes(service, tmp_path)
    cf = CodesFile.read(codes_path)
    c = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    job = c.submit(handle_file(str(codes_path)), "Carlo", 5, api_name="/decode")
    player, wav = job.result(timeout=120)

    # The wav is exactly the engine's output for the same codes, speaker and seed.
    want = service.codec.decode(
        cf.codes, service.speaker_index("Carlo"), 5, n_samples=cf.num_samples
    )
    got, sr = sf.read(io.BytesIO(fetch(wav["url"])), dtype="int16")
    assert sr == service.sample_rate and wav["orig_name"] == "long.decoded.wav"
    np.testing.assert_array_equal(got, to_int16(want))

    # The player got a stream (fed over several chunks: the HLS segments below), not one value
    # at the end. How many of the updates before the last the client records varies (in 1 of
    # about 8 runs only the last, even with the chunks half a second apart), so they are not
    # counted.
    outputs = all_outputs(job)
    streamed = [out[0] for out in outputs if isinstance(out[0], dict) and out[0].get("is_stream")]
    assert streamed, outputs
    assert player == {"__type__": "update"}  # the last update leaves the stream as it is
    audio, stream_sr, segments = streamed_pcm(streamed[-1]["url"])
    assert segments >= 2
    # Lossy (AAC), so not the same samples: the same rate, the duration up to the encoder's
    # priming and last frame (1024 samples each), and the same waveform.
    assert stream_sr == service.sample_rate
    assert len(want) <= len(audio) <= len(want) + 3 * 1024, (len(audio), len(want))
    assert best_correlation(audio, want, 3 * 1024) > 0.9
    # Negative control: another seed's audio (same codes and voice) does not pass for it.
    other = service.codec.decode(
        cf.codes, service.speaker_index("Carlo"), 6, n_samples=cf.num_samples
    )
    assert best_correlation(audio, other, 3 * 1024) < 0.5


def test_app_without_ffmpeg_plays_the_whole_wav_instead(app_model_dir, app_inputs, tmp_path):
    """Gradio needs ffmpeg to stream audio: without it the player gets the wav at the end."""
    from app.service import CodecService
    from app.ui import serve

    service = CodecService(app_model_dir, max_seconds=2.0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(shutil, "which", lambda name, *args, **kwargs: None)  # no ffmpeg anywhere
        for stream in (None, True):  # None: the app's own choice; True: a forced stream
            demo = serve(service, port=free_port(), block=False, stream=stream)
            try:
                c = client(demo.local_url, tmp_path / f"stream-{stream}")
                if stream:  # negative control: the stream itself fails without ffmpeg
                    with pytest.raises(AppError, match="requires ffmpeg"):
                        decode(c, app_inputs.codes)
                    continue
                player, wav = c.predict(
                    handle_file(str(app_inputs.codes)), FROM_FILE, 0, api_name="/decode"
                )
                *_, res_player, _, _, res_wav = c.predict(
                    handle_file(str(app_inputs.clip)), "Carlo", 1, api_name="/resynthesize"
                )
            finally:
                demo.close()
    cf = CodesFile.read(app_inputs.codes)
    want = to_int16(service.codec.decode(cf.codes, cf.speaker_index, 0, n_samples=cf.num_samples))
    resynth = to_int16(service.resynthesize(str(app_inputs.clip), "Carlo", 1)[1])
    for path, expected in ((player, want), (wav, want), (res_player, resynth), (res_wav, resynth)):
        got, sr = sf.read(path, dtype="int16")
        assert sr == service.sample_rate
        np.testing.assert_array_equal(got, expected)


def test_app_accepts_odd_but_valid_formats(app_server, app_inputs, tmp_path):
    c = client(app_server[0], tmp_path)
    for name, (path, lossless) in app_inputs.odd.items():
        cf = CodesFile.read(encode(c, path)[0])
        info = sf.info(path)
        assert abs(cf.num_samples - round(info.frames * 16000 / info.samplerate)) <= 1, name
        if lossless:
            np.testing.assert_array_equal(cf.codes, app_inputs.clip_codes, err_msg=name)


def test_app_reports_each_bad_audio_and_keeps_serving(app_server, app_inputs, tmp_path):
    c = client(app_server[0], tmp_path)
    for name, (path, phrase) in app_inputs.bad_audio.items():
        for api in ("/encode", "/resynthesize"):
            args = (handle_file(str(path)), "Allison") + ((0,) if api == "/resynthesize" else ())
            with pytest.raises(AppError) as e:
                c.predict(*args, api_name=api)
            message = str(e.value)
            assert phrase in message, (name, api, message)
            assert "/tmp" not in message  # the server's upload path is not shown
    with pytest.raises(AppError, match="no audio given"):
        c.predict(None, "Allison", api_name="/encode")
    assert_serves(c, app_inputs)


def test_app_reports_each_bad_codes_file_and_keeps_serving(app_server, app_inputs, tmp_path):
    c = client(app_server[0], tmp_path)
    for name, (path, phrase) in app_inputs.bad_codes.items():
        job = c.submit(handle_file(str(path)), FROM_FILE, 0, api_name="/decode")
        with pytest.raises(AppError) as e:
            job.result()
        assert phrase in str(e.value), (name, str(e.value))
        assert job.outputs() == [], name  # refused before any audio was streamed
    with pytest.raises(AppError, match="no codes file given"):
        c.predict(None, FROM_FILE, 0, api_name="/decode")
    with pytest.raises(AppError, match="seed|less than minimum"):
        decode(c, app_inputs.codes, seed=-1)
    assert_serves(c, app_inputs)


def test_app_refuses_uploads_over_the_size_limit(app_server, app_inputs, tmp_path):
    url, _ = app_server
    big = tmp_path / "big.wav"
    noise = np.random.default_rng(0).integers(-3000, 3000, APP_MAX_FILE_SIZE // 2 + 1000)
    sf.write(big, noise.astype(np.int16), 16000)  # about 1.03 MiB
    # The server itself refuses it (gradio_client would refuse before sending: bypass it).
    with open(big, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.wav", f)}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:500])
    assert "size" in r.text.lower()
    c = client(url, tmp_path)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        encode(c, big)
    assert_serves(c, app_inputs)


def test_app_serves_eight_concurrent_clients(app_server, app_inputs, tmp_path):
    url, _ = app_server
    n = sf.info(app_inputs.clip).frames

    def session(i: int):
        c = client(url, tmp_path / f"client{i}")
        codes_path = encode(c, app_inputs.clip, ["Allison", "Carlo"][i % 2])[0]
        wave, _ = sf.read(decode(c, codes_path, seed=i), dtype="int16")
        return CodesFile.read(codes_path).codes, wave

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(session, range(8)))
    for codes, wave in results:
        np.testing.assert_array_equal(codes, app_inputs.clip_codes)
        assert wave.shape == (n,)


def test_served_app_never_imports_torch(app_model_dir, app_inputs, tmp_path):
    """Build, launch and use the app in a fresh process, then look at its sys.modules."""
    script = textwrap.dedent(
        f"""
        import sys
        from gradio_client import Client, handle_file
        from app.service import CodecService
        from app.ui import serve
        demo = serve(CodecService({str(app_model_dir)!r}), port=None, block=False)
        c = Client(demo.local_url, verbose=False, download_files={str(tmp_path)!r})
        codes = c.predict(handle_file({str(app_inputs.clip)!r}), "Allison", api_name="/encode")
        c.predict(handle_file(codes[0]), "Carlo", 0, api_name="/decode")
        c.predict(handle_file({str(app_inputs.clip)!r}), "Carlo", 0, api_name="/resynthesize")
        torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH_MODULES", torch)
        demo.close()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH_MODULES []" in proc.stdout, proc.stdout[-2000:]


def test_app_main_fails_clearly_without_a_model(tmp_path, capsys):
    assert app_main(["--model", str(tmp_path / "none"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "no model" in err and "python -m export" in err
    with pytest.raises(SystemExit) as e:
        app_main(["--max-seconds", "0"])
    assert e.value.code == 2


def test_app_reports_an_engine_failure_and_keeps_serving(
    app_server, app_inputs, tmp_path, monkeypatch
):
    url, service = app_server

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxruntime failure")

    def broken_midway(*args, **kwargs):
        yield np.zeros(160, np.float32)  # some audio streams, then the engine fails
        raise RuntimeError("simulated onnxruntime failure")

    c = client(url, tmp_path)
    for failure, streamed in ((broken, 0), (broken_midway, 1)):
        with monkeypatch.context() as m:
            m.setattr(service.codec, "decode_stream", failure)
            job = c.submit(handle_file(str(app_inputs.codes)), FROM_FILE, 0, api_name="/decode")
            with pytest.raises(AppError, match="internal error.*simulated onnxruntime failure"):
                job.result()
            # What `job.outputs()` shows of a failed run (also the control of the bad codes
            # test's "nothing streamed"): the audio that came before the failure.
            assert len(job.outputs()) == streamed, failure
    wave, _ = sf.read(decode(c, app_inputs.codes), dtype="int16")
    assert wave.shape == (sf.info(app_inputs.clip).frames,)


def test_codes_picture_marks_each_frame_at_its_code():
    codes = np.array([0, 15, 3, 3, 9])
    image = codes_image(codes, 16, height=64)  # [64, W, 3], code 0 at the bottom
    brightness = image.astype(float).sum(-1)  # [64, W]
    width = image.shape[1]
    for j, code in enumerate(codes):
        column = brightness[:, int((j + 0.5) * width / len(codes))]
        row = int(np.argmax(column))
        assert (63 - row) // 4 == code  # 4 pixel rows per code, counted from the bottom


def test_spectrogram_picture_shows_a_tone_at_its_frequency():
    sr, hz = 16000, 2000
    tone = 0.5 * np.sin(2 * np.pi * hz * np.arange(sr) / sr)
    image = spectrogram_image(tone, sr, height=200)  # 0..8 kHz bottom to top
    row = int(np.argmax(image.astype(float).sum(-1).mean(1)))
    assert abs((199 - row) / 200 * sr / 2 - hz) < 100


def test_each_tab_offers_bundled_examples(app_model_dir):
    """The Encode and Resynthesise tabs offer the shipped clips, the Decode tab their codes
    (written for this model), so a first visit can try each with one click."""
    import gradio as gr

    from app.service import CodecService
    from app.ui import EXAMPLES_DIR, build_demo

    service = CodecService(app_model_dir, max_seconds=60)
    demo = build_demo(service, stream=False)
    datasets = [b for b in demo.blocks.values() if isinstance(b, gr.Dataset)]
    assert len(datasets) == 3
    clips = sorted(str(p) for p in EXAMPLES_DIR.glob("*.wav"))
    assert len(clips) >= 2
    codes = datasets[1].raw_samples[0][0]
    assert CodesFile.read(codes).model_id == service.model_ref.model_id
