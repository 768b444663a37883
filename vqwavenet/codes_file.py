"""The codes file: a small, versioned, validated binary holding one utterance's VQ codes.

The encoder, the CLI and the web app write it; the decoder reads it back, possibly on another
machine and with another model, so every read is checked and every failure names what is wrong
(`CodesFileError`, a ``ValueError``). Standard library and numpy only; no pickle anywhere.

Format, version 1 (all integers little-endian)::

    offset  size  field
    0       4     magic b"VQWC"
    4       2     version, uint16 (= 1)
    6       4     header length H in bytes, uint32 (1 <= H <= 65536)
    10      H     header: a UTF-8 JSON object, exactly these keys
                    "model_id"       str, non-empty: which model made the codes
                    "model_hash"     str, non-empty: hash of that model's weights
                    "sample_rate"    int in [1, 384000]: rate of the audio the codes decode
                                     to (Hz)
                    "hop"            int in [1, 65536]: samples per frame
                    "codebook_size"  int K, 1 <= K <= 65536
                    "speaker"        {"name": str, non-empty, "index": int in [0, 65535]}:
                                     the speaker the decoder uses by default
                    "num_samples"    int in [1, 2**48]: samples of the original audio
                    "num_frames"     int in [1, 2**48]: number of codes that follow
                    "codes_dtype"    "uint8" when K <= 256, else "uint16"
    10 + H  F*B   codes: F = num_frames values of codes_dtype (B = 1 or 2 bytes), each in [0, K)
    end           nothing may follow the codes

A codes file always holds at least one frame: an empty recording is rejected when audio is
loaded, and the codec's utterance padding gives every recording of one or more samples at least
one frame, so a header with zero frames or zero samples is malformed rather than a valid empty
file. How many frames a sample count needs is the model's geometry, not this format's: the
decoder checks ``num_frames`` against its own geometry.

The upper bounds are far beyond any real file and keep every header number safe to compute
with: the sample rate is the largest the audio loader accepts (`vqwavenet.audio`), a hop or a
speaker index of 65536 is absurd for a speech codec, and 2**48 samples (over twenty years at
384 kHz) stays exact as a float (below 2**53), so durations and frame arithmetic never
overflow. Header strings must be valid Unicode: a lone UTF-16 surrogate (JSON ``"\ud800"``)
is malformed, so no such character reaches a UTF-8 stream.

Every malformed input, however hostile (deep JSON nesting, numbers of thousands of digits,
binary garbage), is a `CodesFileError`, never another exception; its message quotes what the
file holds escaped and cut short (`vqwavenet.safe_text`), and names a file by the path the
caller gave, or a file object by its base name only (an upload's server folder stays private).

Example::

    f = CodesFile(codes, model_id="small", model_hash=h, sample_rate=16000, hop=320,
                  codebook_size=256, speaker_name="p225", speaker_index=0, num_samples=n)
    f.write("speech.vqwc")
    g = CodesFile.read("speech.vqwc", expected_model=ModelRef("small", h))
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import numpy as np

from vqwavenet.safe_text import printable, quote, show_path

MAGIC = b"VQWC"
VERSION = 1
SUFFIX = ".vqwc"
MAX_HEADER_BYTES = 1 << 16
MAX_CODEBOOK_SIZE = 1 << 16
MAX_SAMPLE_RATE = 384_000  # Hz: vqwavenet.audio.MAX_SAMPLE_RATE (not imported: no soundfile)
MAX_HOP = 1 << 16  # samples per frame
MAX_SPEAKER_INDEX = (1 << 16) - 1
MAX_LENGTH = 1 << 48  # samples or frames; below 2**53, so exact as a float
_PREAMBLE = struct.Struct("<4sHI")  # magic, version, header length
_READ_CHUNK = 1 << 20
_FIELDS = (
    "model_id",
    "model_hash",
    "sample_rate",
    "hop",
    "codebook_size",
    "speaker",
    "num_samples",
    "num_frames",
    "codes_dtype",
)


class CodesFileError(ValueError):
    """A codes file (or a `CodesFile` about to be written) is invalid; the message says why."""


class ModelRef(NamedTuple):
    """The model a reader expects the codes to come from; ``model_hash=None`` checks the id only."""

    model_id: str
    model_hash: str | None = None


def codes_dtype(codebook_size: int) -> np.dtype:
    """Storage dtype of codes for a codebook of ``codebook_size`` entries (little-endian)."""
    return np.dtype("<u1") if codebook_size <= 256 else np.dtype("<u2")


@dataclass
class CodesFile:
    """One utterance's codes and what is needed to decode them.

    ``codes`` ([frames], any integer dtype on input) is stored as uint8 or uint16 according to
    ``codebook_size``; construction validates everything, so an instance always writes a file
    that `read` accepts.
    """

    codes: np.ndarray
    model_id: str
    model_hash: str
    sample_rate: int
    hop: int
    codebook_size: int
    speaker_name: str
    speaker_index: int
    num_samples: int

    def __post_init__(self):
        _check_str("model_id", self.model_id)
        _check_str("model_hash", self.model_hash)
        _check_int("sample_rate", self.sample_rate, 1, MAX_SAMPLE_RATE)
        _check_int("hop", self.hop, 1, MAX_HOP)
        _check_int("codebook_size", self.codebook_size, 1, MAX_CODEBOOK_SIZE)
        _check_str("speaker name", self.speaker_name)
        _check_int("speaker index", self.speaker_index, 0, MAX_SPEAKER_INDEX)
        _check_int("num_samples", self.num_samples, 1, MAX_LENGTH)
        for name in ("sample_rate", "hop", "codebook_size", "speaker_index", "num_samples"):
            setattr(self, name, int(getattr(self, name)))  # numpy ints are not JSON
        codes = np.asarray(self.codes)
        if codes.ndim != 1:
            raise CodesFileError(f"codes must be one-dimensional [frames], got shape {codes.shape}")
        if codes.dtype.kind not in "iu":
            raise CodesFileError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.size == 0:
            raise CodesFileError("codes must hold at least one frame, got 0")
        _check_int("num_frames", codes.size, 1, MAX_LENGTH)
        _check_range(codes, self.codebook_size)
        self.codes = codes.astype(codes_dtype(self.codebook_size).newbyteorder("="))

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[0])

    @property
    def duration(self) -> float:
        """Seconds of the original audio."""
        return self.num_samples / self.sample_rate

    def header(self) -> dict:
        """The JSON header as a dict (the keys the format documents, nothing else)."""
        return {
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "sample_rate": self.sample_rate,
            "hop": self.hop,
            "codebook_size": self.codebook_size,
            "speaker": {"name": self.speaker_name, "index": self.speaker_index},
            "num_samples": self.num_samples,
            "num_frames": self.num_frames,
            "codes_dtype": codes_dtype(self.codebook_size).name,
        }

    def to_bytes(self) -> bytes:
        header = json.dumps(self.header(), ensure_ascii=False, sort_keys=True).encode("utf-8")
        if len(header) > MAX_HEADER_BYTES:
            raise CodesFileError(
                f"header is {len(header)} bytes, over the {MAX_HEADER_BYTES}-byte limit "
                "(is a name absurdly long?)"
            )
        data = self.codes.astype(codes_dtype(self.codebook_size)).tobytes()
        return _PREAMBLE.pack(MAGIC, VERSION, len(header)) + header + data

    def write(self, dest: str | os.PathLike | BinaryIO) -> None:
        """Write to a path (created or overwritten) or to a binary file object."""
        data = self.to_bytes()
        if hasattr(dest, "write"):
            dest.write(data)
        else:
            with open(dest, "wb") as f:
                f.write(data)

    @classmethod
    def from_bytes(cls, data: bytes, expected_model: ModelRef | str | None = None) -> CodesFile:
        """Parse and validate a whole file held in memory."""
        return cls._parse(io.BytesIO(bytes(data)), expected_model)

    @classmethod
    def read(
        cls, source: str | os.PathLike | BinaryIO, expected_model: ModelRef | str | None = None
    ) -> CodesFile:
        """Read and validate a codes file from a path or a binary file object.

        Args:
            source: path, or an object with ``read`` positioned at the file's start.
            expected_model: a `ModelRef`, an ``(id, hash)`` pair or a bare id; when given, a
                file made by another model id (or, if a hash is given, other weights) is
                rejected.

        Raises:
            CodesFileError: naming the source (a path as given, a file object by its base
                name) and what is wrong.
        """
        if hasattr(source, "read"):
            name = getattr(source, "name", None)
            name = show_path(os.path.basename(name)) if isinstance(name, str | bytes) else None
            return cls._parse(source, expected_model, name)
        name = show_path(source) if isinstance(source, str | bytes | os.PathLike) else None
        try:
            with open(source, "rb") as f:
                return cls._parse(f, expected_model, name)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise CodesFileError(f"{name}: cannot open: {e.strerror}") from e

    @classmethod
    def _parse(
        cls, f: BinaryIO, expected_model: ModelRef | str | None, name: str | None = None
    ) -> CodesFile:
        try:
            return cls._parse_unnamed(f, expected_model)
        except CodesFileError as e:
            if name is None:
                raise
            raise CodesFileError(f"{name}: {e}") from e

    @classmethod
    def _parse_unnamed(cls, f: BinaryIO, expected_model: ModelRef | str | None) -> CodesFile:
        pre = _read_exactly(f, _PREAMBLE.size)
        if not pre or pre[: len(MAGIC)] != MAGIC[: len(pre)]:
            raise CodesFileError(
                f"not a codes file: starts with {pre[: len(MAGIC)]!r}, expected magic {MAGIC!r}"
            )
        if len(pre) < _PREAMBLE.size:
            raise CodesFileError(
                f"truncated preamble: expected {_PREAMBLE.size} bytes, got {len(pre)}"
            )
        _, version, header_len = _PREAMBLE.unpack(pre)
        if version != VERSION:
            raise CodesFileError(
                f"unsupported codes file version {version} (this reader supports {VERSION})"
            )
        if not 1 <= header_len <= MAX_HEADER_BYTES:
            raise CodesFileError(
                f"malformed header: length {header_len} outside [1, {MAX_HEADER_BYTES}] bytes"
            )
        raw = _read_exactly(f, header_len)
        if len(raw) < header_len:
            raise CodesFileError(f"truncated header: expected {header_len} bytes, got {len(raw)}")
        header = _parse_header(raw)
        if expected_model is not None:
            _check_model(header, _model_ref(expected_model))
        dtype = codes_dtype(header["codebook_size"])
        n_bytes = header["num_frames"] * dtype.itemsize
        data = _read_exactly(f, n_bytes)
        if len(data) < n_bytes:
            raise CodesFileError(
                f"truncated codes: expected {n_bytes} bytes ({header['num_frames']} frames of "
                f"{dtype.name}), got {len(data)}"
            )
        extra = len(_read_exactly(f, _READ_CHUNK))
        if extra:
            more = "" if extra < _READ_CHUNK else " or more"
            raise CodesFileError(f"trailing garbage: {extra}{more} bytes after the codes")
        codes = np.frombuffer(data, dtype=dtype)
        _check_range(codes, header["codebook_size"])
        return cls(
            codes=codes,
            model_id=header["model_id"],
            model_hash=header["model_hash"],
            sample_rate=header["sample_rate"],
            hop=header["hop"],
            codebook_size=header["codebook_size"],
            speaker_name=header["speaker"]["name"],
            speaker_index=header["speaker"]["index"],
            num_samples=header["num_samples"],
        )


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at end of file), in chunks so that a header claiming a huge
    size never allocates it."""
    parts, left = [], n
    while left > 0:
        part = f.read(min(left, _READ_CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise CodesFileError(f"malformed header: not UTF-8 ({e.reason} at byte {e.start})") from e
    except CodesFileError:
        raise
    except json.JSONDecodeError as e:
        raise CodesFileError(f"malformed header: not JSON ({e.msg} at char {e.pos})") from e
    except ValueError as e:  # the only other one json raises: Python's int-string limit
        raise CodesFileError(
            f"malformed header: a number of over {sys.get_int_max_str_digits()} digits"
        ) from e
    except RecursionError as e:  # the header's own nesting is two levels deep
        raise CodesFileError("malformed header: nested too deeply") from e
    if not isinstance(header, dict):
        raise CodesFileError(
            f"malformed header: expected a JSON object, got {type(header).__name__}"
        )
    missing = [k for k in _FIELDS if k not in header]
    if missing:
        raise CodesFileError(f"malformed header: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(header) - set(_FIELDS))
    if unknown:
        raise CodesFileError(f"malformed header: unknown field(s) {_quote_keys(unknown)}")
    speaker = header["speaker"]
    if not isinstance(speaker, dict) or set(speaker) != {"name", "index"}:
        raise CodesFileError(
            "malformed header: speaker must be an object with keys name and index, "
            f"got {quote(speaker)}"
        )
    try:
        _check_str("model_id", header["model_id"])
        _check_str("model_hash", header["model_hash"])
        _check_int("sample_rate", header["sample_rate"], 1, MAX_SAMPLE_RATE)
        _check_int("hop", header["hop"], 1, MAX_HOP)
        _check_int("codebook_size", header["codebook_size"], 1, MAX_CODEBOOK_SIZE)
        _check_str("speaker name", speaker["name"])
        _check_int("speaker index", speaker["index"], 0, MAX_SPEAKER_INDEX)
        _check_int("num_samples", header["num_samples"], 1, MAX_LENGTH)
        _check_int("num_frames", header["num_frames"], 1, MAX_LENGTH)
    except CodesFileError as e:
        raise CodesFileError(f"malformed header: {e}") from e
    want = codes_dtype(header["codebook_size"]).name
    if header["codes_dtype"] != want:
        raise CodesFileError(
            f"malformed header: codes_dtype {quote(header['codes_dtype'])} does not match "
            f"codebook_size {header['codebook_size']} (expected {want!r})"
        )
    return header


def _quote_keys(keys: list[str], most: int = 5) -> str:
    """Field names from a file, quoted when they hold anything but plain identifier text."""
    shown = [k if k.isidentifier() and k.isascii() and len(k) <= 40 else quote(k) for k in keys]
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(shown[:most]) + more


def _model_ref(expected) -> ModelRef:
    """A `ModelRef` from a ref, an ``(id, hash)`` pair or a bare model id."""
    if isinstance(expected, str):
        return ModelRef(expected)
    ref = ModelRef(*expected)
    _check_str("expected model id", ref.model_id)
    if ref.model_hash is not None:
        _check_str("expected model hash", ref.model_hash)
    return ref


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    dup = sorted(k for k, n in counts.items() if n > 1)
    if dup:
        raise CodesFileError(f"malformed header: duplicate field(s) {_quote_keys(dup)}")
    return dict(pairs)


def _check_model(header: dict, expected: ModelRef) -> None:
    made = f"model {quote(header['model_id'])} (hash {printable(_cut(header['model_hash']))})"
    if header["model_id"] != expected.model_id:
        raise CodesFileError(
            f"made by another model: {made}, but this model is {quote(expected.model_id)}"
        )
    if expected.model_hash is not None and header["model_hash"] != expected.model_hash:
        raise CodesFileError(
            f"made by another model: {made}, but this model {quote(expected.model_id)} has "
            f"hash {printable(_cut(expected.model_hash))} (different weights)"
        )


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def _check_str(name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise CodesFileError(f"{name} must be a non-empty string, got {quote(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CodesFileError(
            f"{name} is not valid Unicode: a lone surrogate at character {e.start} of "
            f"{quote(value)}"
        ) from None


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise CodesFileError(f"{name} must be an integer, got {quote(value)}")
    if not lo <= value <= hi:
        raise CodesFileError(f"{name} must be in [{lo}, {hi}], got {quote(value)}")


def _check_range(codes: np.ndarray, codebook_size: int) -> None:
    bad = np.flatnonzero((codes < 0) | (codes >= codebook_size))
    if bad.size:
        i = int(bad[0])
        raise CodesFileError(
            f"{bad.size} code(s) out of range [0, {codebook_size}): first is {int(codes[i])} at "
            f"frame {i}"
        )
