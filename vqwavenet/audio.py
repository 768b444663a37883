"""Robust audio input and output for the inference engine, the CLI and the web app.

`load_audio` turns whatever a user hands over (a path, the bytes of an upload, an open file, or
Gradio's ``(sample_rate, array)`` tuple) into the one thing the codec takes: a float32 mono
waveform in [-1, 1] at the model's rate. Anything that would make the codec produce garbage
silently (not audio, empty, NaN/Inf, too long, an absurd sample rate) is an `AudioError` (a
``ValueError``) whose message says what is wrong, so the CLI and the app can show it as is.
Silence is audio: a silent recording encodes and decodes like any other. Standard library,
numpy, soundfile and soxr only (no torch).

Conventions:

* Integer PCM maps to float as soundfile does: ``x / 2**(bits - 1)`` (unsigned 8-bit is offset
  first), so int16 survives ``to_int16(load_audio(...))`` exactly at an unchanged rate.
* Float input a little beyond full scale (peak <= 2: the overshoot of lossy codecs, resamplers
  or hot mixes) is clipped to [-1, 1]; a larger peak means the data is on another scale (say
  int16 values stored as floats), so it is divided by its peak instead of clipped to a square
  wave.
* Channels are averaged to mono; 2-D arrays are ``[samples, channels]`` (soundfile and Gradio),
  and an array that is clearly ``[channels, samples]`` (at most 16 rows, more columns) is
  transposed.
* Resampling uses soxr at high quality ("HQ", linear phase, delay compensated); the output has
  about ``n * target_sr / sr`` samples (soxr rounds) and is clipped to [-1, 1] like the input.
* Files are decoded in blocks and the length limit is enforced while decoding, so a stream
  that does not state its length (a FLAC written to a pipe) loads, and a small file that
  decodes to hours is refused after about ``max_seconds`` of audio, with memory to match.
* Messages name a path as the caller gave it (printable: a Linux name that is not UTF-8
  shows its odd bytes as ``\\xNN``) and a file object by its base name only, so an upload's
  server folder stays private.
"""

from __future__ import annotations

import io
import math
import os
import sys
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from vqwavenet.safe_text import printable, show_path

MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
_BLOCK = 1 << 16  # frames decoded at a time: memory stays bounded by the mono output
_UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's frame count of a stream that states no length
RESAMPLE_QUALITY = "HQ"
OVERSHOOT_LIMIT = 2.0  # peaks up to this are clipped, larger ones scaled down (see above)

AudioInput = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | tuple


class AudioError(ValueError):
    """Input audio the codec cannot or should not use; the message says why."""


def load_audio(
    source: AudioInput,
    target_sr: int = 16000,
    max_seconds: float | None = 60.0,
) -> np.ndarray:
    """Load any supported audio as a mono float32 waveform at ``target_sr``.

    Args:
        source: a path; the bytes of a file (wav, flac, ogg, mp3, ... whatever libsndfile
            reads); a binary file object; or ``(sample_rate, array)`` as Gradio gives it, the
            array ``[samples]`` or ``[samples, channels]`` of any integer or float dtype.
        target_sr: the rate to return, Hz.
        max_seconds: longest accepted input in seconds (``None``: no limit). Checked against
            the length a file states before decoding it, so a huge upload costs nothing, and
            again while decoding, so a file that states no length (or a wrong one) costs no
            more than ``max_seconds`` of audio.

    Returns:
        ``[samples]`` float32 in [-1, 1] at ``target_sr``.

    Raises:
        AudioError: not audio or unreadable, empty, NaN/Inf samples, over ``max_seconds``,
            a sample rate outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE].
    """
    _check_rate(target_sr, "target sample rate")
    if isinstance(source, tuple):
        sr, decoded = _from_array(source, max_seconds)
    else:
        sr, decoded = _from_file(source, max_seconds)
    mono, peak = decoded.mono, decoded.peak
    where = f"{decoded.name}: " if decoded.name else ""
    if decoded.nonfinite:
        raise AudioError(
            f"{where}audio contains NaN or infinite samples "
            f"({decoded.nonfinite} of {decoded.values})"
        )
    if peak > OVERSHOOT_LIMIT:
        mono /= peak
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality=RESAMPLE_QUALITY)
        if mono.size == 0:
            raise AudioError(
                f"{where}audio too short: {decoded.mono.size} sample(s) at {sr} Hz resample to "
                f"none at {target_sr} Hz"
            )
    return np.ascontiguousarray(np.clip(mono, -1.0, 1.0), dtype=np.float32)


def to_int16(wave: np.ndarray) -> np.ndarray:
    """Float waveform in [-1, 1] to int16 PCM (``round(x * 32768)``, clipped); int16 passes.

    The inverse of soundfile's int16 -> float mapping, so PCM survives a round trip exactly.
    """
    wave = np.asarray(wave)
    if wave.dtype == np.int16:
        return wave
    if wave.dtype.kind != "f":
        raise AudioError(f"to_int16 needs a float or int16 waveform, got dtype {wave.dtype}")
    if not np.isfinite(wave).all():
        raise AudioError("cannot convert a waveform with NaN or infinite samples to int16")
    return np.clip(np.rint(wave * 32768.0), -32768, 32767).astype(np.int16)


def save_wav(path: str | os.PathLike | BinaryIO, wave: np.ndarray, sr: int) -> None:
    """Write a mono waveform (``[samples]``, float in [-1, 1] or int16) as 16-bit PCM WAV."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise AudioError(f"save_wav writes mono audio [samples], got shape {wave.shape}")
    _check_rate(sr, "sample rate")
    if isinstance(path, str | os.PathLike):
        path = _sf_path(path)
    sf.write(path, to_int16(wave), int(sr), subtype="PCM_16", format="WAV")


def mulaw_encode(x: np.ndarray, q: int = 256) -> np.ndarray:
    """Waveform in [-1, 1] -> classes in [0, q) (float32 arithmetic, as `model.mulaw`)."""
    mu = q - 1
    x = np.asarray(x, dtype=np.float32)
    y = np.sign(x) * np.log1p(mu * np.minimum(np.abs(x), 1.0)) / np.float32(math.log1p(mu))
    return np.clip(np.floor((y + 1) / 2 * mu + 0.5), 0, mu).astype(np.int64)


def mulaw_decode(c: np.ndarray, q: int = 256) -> np.ndarray:
    """Classes -> waveform in [-1, 1] (float32)."""
    mu = q - 1
    y = 2 * np.asarray(c, dtype=np.float64) / mu - 1
    return (np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu).astype(np.float32)


def _check_rate(sr, what: str) -> int:
    if isinstance(sr, bool) or not isinstance(sr, int | np.integer):
        if not (isinstance(sr, float | np.floating) and math.isfinite(sr) and sr == int(sr)):
            raise AudioError(f"{what} must be a whole number of Hz, got {sr!r}")
    sr = int(sr)
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{what} {sr} Hz is outside the supported range {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    return sr


def _check_length(n: int, sr: int, max_seconds: float | None) -> None:
    if n == 0:
        raise AudioError("audio is empty (zero samples)")
    if max_seconds is not None and n > max_seconds * sr:
        raise AudioError(f"audio is {n / sr:.1f} s long, over the {max_seconds:g} s limit")


def _sf_path(path: str | os.PathLike) -> str | bytes:
    """A path soundfile can open. soundfile encodes a str path strictly, but on POSIX a file
    name that is not valid in the file system's encoding reaches Python with surrogate
    escapes (b'caf\\xe9.wav' is 'caf\\udce9.wav'): such a name goes as its original bytes."""
    path = os.fspath(path)
    if isinstance(path, str) and sys.platform != "win32":
        try:
            path.encode(sys.getfilesystemencoding())
        except UnicodeEncodeError:
            return os.fsencode(path)
    return path


class _SoundFile(sf.SoundFile):
    """A SoundFile that reads a stream of unknown length front to back.

    After every read of a seekable file soundfile seeks to where the read ended, and libsndfile
    cannot seek in a FLAC stream whose header states no length (it reports ``_UNKNOWN_FRAMES``
    frames), so such a file counts as unseekable: its blocks are read one after another and
    nothing else is needed of it."""

    def seekable(self) -> bool:
        return super().seekable() and self.frames != _UNKNOWN_FRAMES


@dataclass
class _Decoded:
    """A mixed-down input and what the checks need to know about its channels."""

    mono: np.ndarray  # [samples] float64, the mean over channels
    peak: float  # max |x| over all channels (meaningless when nonfinite > 0)
    nonfinite: int  # NaN or Inf values over all channels
    values: int  # samples * channels
    name: str | None = None  # the source, for messages (None for arrays)


def _mixdown(blocks) -> _Decoded:
    """Mix ``[samples, channels]`` float blocks to mono, one block at a time (bounded memory)."""
    monos, peak, nonfinite, values = [], 0.0, 0, 0
    for block in blocks:
        if block.size == 0:
            continue
        nonfinite += int(block.size - np.count_nonzero(np.isfinite(block)))
        peak = max(peak, float(np.abs(block).max()))
        values += block.size
        monos.append(block.mean(axis=1, dtype=np.float64))
    mono = np.concatenate(monos) if monos else np.zeros(0)
    return _Decoded(mono, peak, nonfinite, values)


def _blocks(f: sf.SoundFile, max_seconds: float | None):
    """``[frames, channels]`` float32 blocks of an open file until its end; `AudioError` as
    soon as more than ``max_seconds`` have been decoded."""
    frames = 0
    while True:
        block = f.read(_BLOCK, dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            return
        frames += block.shape[0]
        if max_seconds is not None and frames > max_seconds * f.samplerate:
            raise AudioError(
                f"audio is over the {max_seconds:g} s limit (stopped decoding at "
                f"{frames / f.samplerate:.1f} s)"
            )
        yield block


def _from_file(source, max_seconds: float | None) -> tuple[int, _Decoded]:
    """Decode a path, bytes or a file object."""
    if source is None:
        raise AudioError("no audio given")
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise AudioError("not audio: the upload is empty (zero bytes)")
        name, source = "the uploaded data", io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        path, name = os.fspath(source), show_path(source)
        if not os.path.exists(path):
            raise AudioError(f"{name}: no such file")
        if os.path.isdir(path):
            raise AudioError(f"{name}: is a directory, not an audio file")
        if os.path.getsize(path) == 0:
            raise AudioError(f"{name}: not audio: the file is empty (zero bytes)")
        source = _sf_path(path)
    elif hasattr(source, "read"):
        name = getattr(source, "name", None)
        if isinstance(name, str | bytes):
            name = show_path(os.path.basename(name))
        else:
            name = "the given file object"
    else:
        raise AudioError(
            f"cannot load audio from a {type(source).__name__}: pass a path, bytes, a file "
            "object or (sample_rate, array)"
        )
    try:
        with _SoundFile(source) as f:
            sr = _check_rate(f.samplerate, "sample rate")
            if f.channels > MAX_CHANNELS:
                raise AudioError(f"{f.channels} channels, at most {MAX_CHANNELS} supported")
            # A stated length is checked before decoding; a stream states none when frames is
            # _UNKNOWN_FRAMES (a FLAC written to a pipe) or 0 and unseekable (a pipe itself).
            if 0 < f.frames < _UNKNOWN_FRAMES or (f.frames == 0 and f.seekable()):
                _check_length(f.frames, sr, max_seconds)
            decoded = _mixdown(_blocks(f, max_seconds))
            decoded.name = name
    except AudioError as e:
        raise AudioError(f"{name}: {e}") from None
    except (sf.SoundFileError, RuntimeError, OSError, EOFError, TypeError, ValueError) as e:
        reason = str(e).rsplit(": ", 1)[-1] if isinstance(e, sf.SoundFileError) else str(e)
        raise AudioError(f"{name}: not audio or unreadable ({printable(reason)})") from e
    try:
        _check_length(decoded.mono.size, sr, max_seconds)
    except AudioError as e:
        raise AudioError(f"{name}: {e}") from None
    return sr, decoded


def _from_array(pair: tuple, max_seconds: float | None) -> tuple[int, _Decoded]:
    """Gradio's ``(sample_rate, array)``."""
    if len(pair) != 2 or isinstance(pair[0], np.ndarray) or not isinstance(pair[1], np.ndarray):
        raise AudioError("an audio tuple must be (sample_rate, numpy array), as Gradio gives it")
    sr = _check_rate(pair[0], "sample rate")
    data = pair[1]
    if data.ndim == 1:
        data = data[:, None]
    elif data.ndim == 2:
        if data.shape[0] <= 16 < data.shape[1]:
            data = data.T  # [channels, samples]
        if data.shape[1] > MAX_CHANNELS:
            raise AudioError(
                f"audio array of shape {pair[1].shape} has {data.shape[1]} channels, at most "
                f"{MAX_CHANNELS} supported"
            )
        if data.shape[1] == 0:
            raise AudioError("audio is empty (zero channels)")
    else:
        raise AudioError(
            f"audio array must be [samples] or [samples, channels], got shape {data.shape}"
        )
    _check_length(data.shape[0], sr, max_seconds)
    kind = data.dtype.kind
    if kind == "f":
        wave = data.astype(np.float64)
    elif kind == "i":
        wave = data.astype(np.float64) / -float(np.iinfo(data.dtype).min)
    elif kind == "u":
        half = float(np.iinfo(data.dtype).max // 2 + 1)
        wave = (data.astype(np.float64) - half) / half
    else:
        raise AudioError(f"not audio: an array of dtype {data.dtype} (need integers or floats)")
    return sr, _mixdown([wave])
