"""Audio loading: every input the app and CLI may receive, checked against an analytic sine, and
one specific error per bad input."""

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vqwavenet.audio import AudioError, load_audio, save_wav, to_int16

DATA = Path(__file__).resolve().parent / "data"
FREQ = 440.0
EDGE = 300  # samples at each end where resampling sees the signal's abrupt start and stop


def sine(sr: int, seconds: float = 1.0, amp: float = 0.5, freq: float = FREQ) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(round(sr * seconds)) / sr)


def write(path, data, sr, subtype="PCM_16", fmt="WAV"):
    sf.write(path, data, sr, subtype=subtype, format=fmt)
    return path


def dominant_frequency(wave: np.ndarray, sr: int) -> float:
    """Peak of the Hann-windowed spectrum, refined by parabolic interpolation (Hz)."""
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / len(wave)


def assert_sine(wave, sr=16000, amp=0.5, atol=2e-3, n=None):
    """Mono float32 in [-1, 1] at ``sr`` that matches the analytic sine away from the edges."""
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert np.abs(wave).max() <= 1.0
    if n is not None:
        assert abs(len(wave) - n) <= 1
    assert abs(dominant_frequency(wave, sr) - FREQ) < 0.5
    ref = amp * np.sin(2 * np.pi * FREQ * np.arange(len(wave)) / sr)
    np.testing.assert_allclose(wave[EDGE:-EDGE], ref[EDGE:-EDGE], atol=atol)


@pytest.mark.parametrize(
    "subtype, atol",
    [
        ("PCM_U8", 1 / 128),
        ("PCM_16", 1 / 32768),
        ("PCM_24", 1e-6),
        ("PCM_32", 1e-6),
        ("FLOAT", 1e-6),
        ("DOUBLE", 1e-6),
    ],
)
def test_load_audio_reads_every_wav_subtype(tmp_path, subtype, atol):
    path = write(tmp_path / "a.wav", sine(16000), 16000, subtype)
    wave = load_audio(path)
    assert len(wave) == 16000
    np.testing.assert_allclose(wave, sine(16000), atol=atol)
    assert_sine(wave, atol=atol)


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 44100, 48000])
def test_load_audio_resamples_to_target_rate(tmp_path, sr):
    seconds = 0.77  # not a whole number of samples at every rate
    path = write(tmp_path / "a.wav", sine(sr, seconds), sr)
    assert_sine(load_audio(path), n=len(sine(sr, seconds)) * 16000 / sr)


@pytest.mark.parametrize("target_sr", [8000, 22050, 24000])
def test_load_audio_honours_other_target_rates(tmp_path, target_sr):
    path = write(tmp_path / "a.wav", sine(16000), 16000)
    assert_sine(load_audio(path, target_sr=target_sr), sr=target_sr, n=target_sr)


@pytest.mark.parametrize(
    "fmt, subtype, sr, atol",
    [
        ("FLAC", "PCM_16", 44100, 2e-3),
        ("FLAC", "PCM_24", 16000, 1e-6),
        ("OGG", "VORBIS", 48000, 0.05),
        ("OGG", "OPUS", 16000, 0.1),  # opus overshoots past full scale: clipped, not rescaled
        ("MP3", "MPEG_LAYER_III", 22050, 0.1),
    ],
)
def test_load_audio_reads_compressed_formats(tmp_path, fmt, subtype, sr, atol):
    path = write(tmp_path / f"a.{fmt.lower()}", sine(sr), sr, subtype, fmt)
    assert_sine(load_audio(path), n=16000, atol=atol)


def test_load_audio_mixes_channels_to_their_mean(tmp_path):
    left, right = sine(44100, amp=0.6), sine(44100, amp=0.2)
    path = write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 44100)
    assert_sine(load_audio(path), amp=0.4, n=16000)
    quad = np.stack([sine(16000, amp=a) for a in (0.1, 0.2, 0.3, 0.4)], axis=1)
    path = write(tmp_path / "quad.wav", quad, 16000, "FLOAT")
    np.testing.assert_allclose(load_audio(path), sine(16000, amp=0.25), atol=1e-6)


def test_load_audio_accepts_bytes_and_file_objects_like_paths(tmp_path):
    path = write(tmp_path / "a.wav", sine(22050), 22050)
    from_path = load_audio(path)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), from_path)
    np.testing.assert_array_equal(load_audio(bytearray(path.read_bytes())), from_path)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), from_path)
    np.testing.assert_array_equal(load_audio(str(path)), from_path)


def test_load_audio_keeps_int16_speech_exact_at_its_own_rate():
    path = DATA / "activated.wav"
    pcm, sr = sf.read(path, dtype="int16")
    assert sr == 16000
    np.testing.assert_array_equal(to_int16(load_audio(path)), pcm)
    np.testing.assert_array_equal(to_int16(load_audio((sr, pcm))), pcm)


@pytest.mark.parametrize(
    "dtype, scale, offset",
    [
        (np.int16, 32768, 0),
        (np.int32, 2**31, 0),
        (np.int8, 128, 0),
        (np.uint8, 128, 128),
        (np.float32, 1, 0),
        (np.float64, 1, 0),
    ],
)
def test_load_audio_accepts_gradio_tuples_of_any_dtype(dtype, scale, offset):
    def as_dtype(ref):
        return (np.round(ref * scale) + offset).astype(dtype) if scale > 1 else ref.astype(dtype)

    wave = load_audio((16000, as_dtype(sine(16000))))
    np.testing.assert_allclose(wave, sine(16000), atol=1.0 / scale + 1e-7)
    resampled = load_audio((48000, as_dtype(sine(48000))))
    assert_sine(resampled, n=16000, atol=max(2e-3, 2.0 / scale))


def test_load_audio_accepts_gradio_stereo_either_orientation():
    stereo = (np.stack([sine(48000, amp=0.6), sine(48000, amp=0.2)], axis=1) * 32767).astype(
        np.int16
    )
    samples_first = load_audio((48000, stereo))
    assert_sine(samples_first, amp=0.4, n=16000)
    np.testing.assert_array_equal(load_audio((48000, stereo.T)), samples_first)


def test_load_audio_clips_overshoot_and_rescales_data_on_another_scale():
    hot = sine(16000, amp=1.5)
    np.testing.assert_allclose(load_audio((16000, hot)), np.clip(hot, -1, 1), atol=1e-7)
    int_scale = (sine(16000) * 32767).astype(np.float32)  # int16 values stored as floats
    np.testing.assert_allclose(load_audio((16000, int_scale)), sine(16000) / 0.5, atol=1e-4)


# --- bad inputs: one specific message each ---------------------------------------------------


def test_load_audio_rejects_data_that_is_not_audio(tmp_path):
    with pytest.raises(AudioError, match=r"uploaded data: not audio or unreadable \(Format not"):
        load_audio(b"just some text, definitely not a wav file")
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(AudioError, match=r"noise\.wav: not audio or unreadable"):
        load_audio(path)


def test_load_audio_rejects_missing_empty_and_odd_sources(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: no such file"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"zero\.wav: not audio: the file is empty \(zero bytes\)"):
        load_audio(tmp_path / "zero.wav")
    with pytest.raises(AudioError, match="the upload is empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="no audio given"):
        load_audio(None)
    with pytest.raises(AudioError, match="cannot load audio from a int"):
        load_audio(16000)


def test_load_audio_rejects_zero_length_audio(tmp_path):
    path = write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav: audio is empty \(zero samples\)"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"audio is empty \(zero samples\)"):
        load_audio((16000, np.zeros(0, np.int16)))
    with pytest.raises(AudioError, match=r"audio is empty \(zero channels\)"):
        load_audio((16000, np.zeros((100, 0), np.int16)))


def test_load_audio_rejects_audio_too_short_to_resample():
    with pytest.raises(AudioError, match="1 sample.* at 48000 Hz resample to none at 16000 Hz"):
        load_audio((48000, np.array([0.5])))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_audio_rejects_nan_and_inf_samples(tmp_path, bad):
    data = np.stack([sine(16000), sine(16000)], axis=1)
    data[123, 1] = bad
    path = write(tmp_path / "bad.wav", data, 16000, "FLOAT")
    with pytest.raises(AudioError, match=r"NaN or infinite samples \(1 of 32000\)"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"NaN or infinite samples \(1 of 32000\)"):
        load_audio((16000, data))


def test_load_audio_rejects_audio_over_the_duration_limit(tmp_path):
    path = write(tmp_path / "long.wav", sine(8000, seconds=61.5), 8000)
    with pytest.raises(AudioError, match=r"long\.wav: audio is 61\.5 s long, over the 60 s limit"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"audio is 61\.5 s long, over the 2\.5 s limit"):
        load_audio((8000, sine(8000, seconds=61.5)), max_seconds=2.5)
    assert len(load_audio(path, max_seconds=None)) == 16000 * 61.5


def test_load_audio_accepts_silence(tmp_path):
    """Silence is audio: digital silence, unsigned 8-bit zero and channels that cancel out
    load as zeros; one LSB stays one LSB."""
    silent = load_audio(write(tmp_path / "silence.wav", np.zeros(8000), 8000))
    assert silent.shape == (16000,) and not silent.any()
    assert not load_audio((16000, np.full(500, 128, np.uint8))).any()  # unsigned 8-bit zero
    stereo = np.stack([sine(16000), -sine(16000)], axis=1)
    assert not load_audio((16000, stereo)).any()
    quiet = np.zeros(16000)
    quiet[5000] = 1 / 32768
    assert load_audio((16000, quiet)).any()


def test_load_audio_rejects_absurd_sample_rates(tmp_path):
    path = write(tmp_path / "slow.wav", sine(100), 100)
    with pytest.raises(
        AudioError, match=r"slow\.wav: sample rate 100 Hz is outside the supported range 4000"
    ):
        load_audio(path)
    with pytest.raises(AudioError, match="sample rate 1000000 Hz is outside the supported range"):
        load_audio((1_000_000, sine(16000)))
    with pytest.raises(AudioError, match="sample rate must be a whole number of Hz, got 16000.5"):
        load_audio((16000.5, sine(16000)))
    with pytest.raises(AudioError, match="target sample rate 0 Hz is outside"):
        load_audio((16000, sine(16000)), target_sr=0)


def test_load_audio_rejects_malformed_gradio_tuples():
    with pytest.raises(AudioError, match=r"must be \(sample_rate, numpy array\)"):
        load_audio((sine(16000), 16000))
    with pytest.raises(AudioError, match=r"\[samples\] or \[samples, channels\], got shape"):
        load_audio((16000, np.zeros((2, 3, 400))))
    with pytest.raises(AudioError, match="at most 64 supported"):
        load_audio((16000, np.ones((1000, 100))))
    with pytest.raises(AudioError, match="not audio: an array of dtype complex128"):
        load_audio((16000, sine(16000).astype(complex)))


# --- writing ---------------------------------------------------------------------------------


def test_save_wav_writes_16_bit_pcm_that_loads_back(tmp_path):
    wave = sine(16000).astype(np.float32)
    path = tmp_path / "out.wav"
    save_wav(path, wave, 16000)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    pcm, _ = sf.read(path, dtype="int16")
    np.testing.assert_array_equal(pcm, to_int16(wave))
    np.testing.assert_allclose(load_audio(path), wave, atol=1 / 32768)
    buf = io.BytesIO()
    save_wav(buf, pcm, 16000)  # int16 and file objects work too
    assert buf.getvalue() == path.read_bytes()


def test_save_wav_rejects_multichannel_and_bad_rates(tmp_path):
    with pytest.raises(AudioError, match=r"mono audio \[samples\], got shape \(10, 2\)"):
        save_wav(tmp_path / "x.wav", np.zeros((10, 2)), 16000)
    with pytest.raises(AudioError, match="sample rate 10 Hz is outside"):
        save_wav(tmp_path / "x.wav", np.zeros(10), 10)


def test_to_int16_rounds_clips_and_refuses_nan():
    np.testing.assert_array_equal(
        to_int16(np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 1 / 32768])),
        np.array([0, 16384, -16384, 32767, -32768, 32767, -32768, 1], np.int16),
    )
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    np.testing.assert_array_equal(to_int16(pcm.astype(np.float32) / 32768), pcm)
    with pytest.raises(AudioError, match="NaN or infinite"):
        to_int16(np.array([0.0, np.nan]))
    with pytest.raises(AudioError, match="float or int16 waveform, got dtype int32"):
        to_int16(np.zeros(3, np.int32))


def test_resampling_keeps_the_passband_and_removes_what_would_alias():
    """48 kHz -> 16 kHz: a 7 kHz tone survives at full amplitude, an 11 kHz tone (which would
    alias to 5 kHz) is filtered out, as a high-quality resampler must."""
    t = np.arange(48000) / 48000
    data = 0.4 * np.sin(2 * np.pi * 7000 * t) + 0.4 * np.sin(2 * np.pi * 11000 * t)
    wave = load_audio((48000, data))
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave)))) / (len(wave) / 4)  # 1 Hz bins
    assert spec[7000] == pytest.approx(0.4, rel=0.01)
    assert spec[4990:5011].max() < 0.4e-4  # the alias, at least 80 dB down


# --- streams of unknown length, and file names that are not UTF-8 -----------------------------


def unknown_length_flac(data: np.ndarray, sr: int, blocks: int = 1) -> bytes:
    """A FLAC file whose STREAMINFO states no length (total samples 0), as a FLAC written to a
    pipe has: ``data`` repeated ``blocks`` times."""
    import struct

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, 1, "PCM_16", format="FLAC") as f:
        for _ in range(blocks):
            f.write(data)
    raw = bytearray(buf.getvalue())
    assert raw[:4] == b"fLaC" and raw[4] & 0x7F == 0  # STREAMINFO comes first
    # STREAMINFO from byte 8: block sizes (4 bytes), frame sizes (6), then 64 bits holding
    # rate (20), channels - 1 (3), bits - 1 (5) and total samples (36).
    (fields,) = struct.unpack_from(">Q", raw, 18)
    assert fields & ((1 << 36) - 1) == len(data) * blocks
    struct.pack_into(">Q", raw, 18, fields & ~((1 << 36) - 1))
    with sf.SoundFile(io.BytesIO(bytes(raw))) as f:
        assert f.frames == 2**63 - 1  # libsndfile's "unknown"
    return bytes(raw)


def test_load_audio_reads_a_flac_stream_of_unknown_length(tmp_path):
    """A valid FLAC whose header does not state its length loads like the same audio with it,
    from bytes, a file object or a path, and with or without a length limit."""
    pcm = to_int16(sine(16000, seconds=1.3))
    data = unknown_length_flac(pcm, 16000)
    expected = load_audio((16000, pcm))
    path = tmp_path / "stream.flac"
    path.write_bytes(data)
    for source in (data, io.BytesIO(data), path):
        np.testing.assert_array_equal(load_audio(source), expected)
    np.testing.assert_array_equal(load_audio(path, max_seconds=None), expected)
    with pytest.raises(AudioError, match=r"stream\.flac: audio is over the 1\.2 s limit"):
        load_audio(path, max_seconds=1.2)


def test_load_audio_refuses_a_long_stream_of_unknown_length_early(tmp_path):
    """Twenty minutes of silence compress to a few kilobytes of FLAC that states no length: the
    limit is enforced while decoding, so the refusal comes after about a second of audio with
    memory to match, not after decoding everything (over 70 MB as float64)."""
    import tracemalloc

    data = unknown_length_flac(np.zeros(8000 * 60, np.int16), 8000, blocks=20)
    assert len(data) < 50_000
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match="audio is over the 1 s limit") as e:
            load_audio(data, max_seconds=1.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "s long" not in str(e.value)  # no length made up from libsndfile's "unknown"
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB while refusing"


@pytest.fixture
def non_utf8_dir(tmp_path):
    """``tmp_path`` as a str on which Linux file names that are not UTF-8 can be built."""
    import os
    import sys

    if sys.platform == "win32" or sys.getfilesystemencoding() != "utf-8":
        pytest.skip("file names that are not UTF-8 are a POSIX matter")
    try:
        probe = os.fsdecode(os.fsencode(tmp_path) + b"/\xff")
        Path(probe).write_bytes(b"")
        Path(probe).unlink()
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    return tmp_path


def test_load_and_save_audio_with_file_names_that_are_not_utf8(non_utf8_dir):
    """Linux hands a name like b'caf\\xe9.wav' to Python as 'caf\\udce9.wav': such a file loads
    and saves, and a message naming it is printable (the byte shows as \\xe9)."""
    import os

    name = os.fsdecode(os.fsencode(non_utf8_dir) + b"/caf\xe9.wav")
    save_wav(name, sine(16000), 16000)
    assert os.path.getsize(os.fsencode(name)) > 0
    assert_sine(load_audio(name), atol=1 / 16000)
    assert_sine(load_audio(Path(name)), atol=1 / 16000)
    broken = os.fsdecode(os.fsencode(non_utf8_dir) + b"/caf\xe9 broken.wav")
    Path(broken).write_bytes(b"not audio at all")
    with pytest.raises(AudioError) as e:
        load_audio(broken)
    msg = str(e.value)
    msg.encode("utf-8")
    assert "caf\\xe9 broken.wav: not audio or unreadable" in msg and msg.isprintable()


def test_load_audio_names_a_file_object_by_its_base_name(tmp_path):
    """A file object (say an upload the server saved) is named without its folder."""
    path = tmp_path / "upload.wav"
    path.write_bytes(b"not audio at all")
    with open(path, "rb") as f, pytest.raises(AudioError) as e:
        load_audio(f)
    assert str(e.value).startswith("upload.wav: not audio") and str(tmp_path) not in str(e.value)
