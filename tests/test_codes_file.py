"""The codes file: round trips, the documented byte layout, and one clear error per bad file."""

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vqwavenet.codes_file import MAGIC, VERSION, CodesFile, CodesFileError, ModelRef

HASH = "3f2a9c0e" * 8


def make(codes, codebook_size=256, **kw) -> CodesFile:
    args = dict(
        model_id="small",
        model_hash=HASH,
        sample_rate=16000,
        hop=320,
        codebook_size=codebook_size,
        speaker_name="p225",
        speaker_index=3,
        num_samples=max(1, 320 * len(codes) - 100),
    )
    args.update(kw)
    return CodesFile(codes=codes, **args)


def assemble(header: dict | bytes, data: bytes, version=VERSION, magic=MAGIC) -> bytes:
    """Bytes laid out as the module docstring documents, built without the module."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return magic + struct.pack("<HI", version, len(raw)) + raw + data


def valid_header(**changes) -> dict:
    header = make(np.arange(4)).header()
    header.update(changes)
    return header


def assert_same(a: CodesFile, b: CodesFile):
    assert a.header() == b.header()
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("k", [2, 255, 256, 257, 1024, 65536])
@pytest.mark.parametrize("frames", [1, 7, 3001])
def test_codes_round_trip_through_bytes(k, frames):
    rng = np.random.default_rng(k * frames)
    codes = rng.integers(0, k, frames)
    codes[0], codes[-1] = 0, k - 1  # both ends of the range
    original = make(codes, codebook_size=k, speaker_name="Ünïcødé spëaker")
    back = CodesFile.from_bytes(original.to_bytes())
    assert_same(original, back)
    np.testing.assert_array_equal(back.codes, codes)
    assert back.codes.dtype == (np.uint8 if k <= 256 else np.uint16)
    assert back.num_frames == frames


def test_codes_round_trip_through_path_and_file_object(tmp_path):
    original = make(np.arange(500) % 256)
    path = tmp_path / "speech.vqwc"
    original.write(path)
    assert_same(original, CodesFile.read(path))
    assert_same(original, CodesFile.read(str(path)))
    buf = io.BytesIO()
    original.write(buf)
    buf.seek(0)
    assert_same(original, CodesFile.read(buf, expected_model=ModelRef("small", HASH)))


def test_codes_layout_matches_documented_format():
    codes = np.array([0, 1, 300, 65535])
    f = make(codes, codebook_size=65536)
    expected_header = {
        "model_id": "small",
        "model_hash": HASH,
        "sample_rate": 16000,
        "hop": 320,
        "codebook_size": 65536,
        "speaker": {"name": "p225", "index": 3},
        "num_samples": f.num_samples,
        "num_frames": 4,
        "codes_dtype": "uint16",
    }
    data = f.to_bytes()
    magic, version, n = struct.unpack_from("<4sHI", data)
    assert (magic, version) == (b"VQWC", 1)
    assert json.loads(data[10 : 10 + n].decode("utf-8")) == expected_header
    assert data[10 + n :] == struct.pack("<4H", 0, 1, 300, 65535)
    small = make(np.array([7, 255]), codebook_size=256).to_bytes()
    n = struct.unpack_from("<I", small, 6)[0]
    assert json.loads(small[10 : 10 + n])["codes_dtype"] == "uint8"
    assert small[10 + n :] == bytes([7, 255])


def test_codes_file_accepts_numpy_integer_fields_and_stores_plain_ints():
    f = make(np.arange(3, dtype=np.int64), sample_rate=np.int64(16000), num_samples=np.int32(700))
    back = CodesFile.from_bytes(f.to_bytes())
    assert back.sample_rate == 16000 and type(back.sample_rate) is int
    assert back.num_samples == 700


def test_codes_reader_rejects_bad_magic():
    data = make(np.arange(4)).to_bytes()
    with pytest.raises(CodesFileError, match=r"not a codes file.*expected magic b'VQWC'"):
        CodesFile.from_bytes(b"RIFF" + data[4:])
    with pytest.raises(CodesFileError, match="not a codes file"):
        CodesFile.from_bytes(b"")


def test_codes_reader_rejects_truncated_preamble():
    with pytest.raises(CodesFileError, match="truncated preamble: expected 10 bytes, got 6"):
        CodesFile.from_bytes(make(np.arange(4)).to_bytes()[:6])


def test_codes_reader_rejects_unsupported_version():
    with pytest.raises(CodesFileError, match=r"unsupported codes file version 2 \(.*supports 1\)"):
        CodesFile.from_bytes(assemble(valid_header(), bytes(4), version=2))


def test_codes_reader_rejects_truncated_header():
    data = make(np.arange(4)).to_bytes()
    n = struct.unpack_from("<I", data, 6)[0]
    with pytest.raises(CodesFileError, match=f"truncated header: expected {n} bytes, got 20"):
        CodesFile.from_bytes(data[:30])


def test_codes_reader_rejects_absurd_header_length_without_reading_it():
    data = MAGIC + struct.pack("<HI", VERSION, 2**32 - 1)
    with pytest.raises(CodesFileError, match=r"malformed header: length 4294967295 outside"):
        CodesFile.from_bytes(data)


def test_codes_reader_rejects_truncated_codes():
    data = make(np.arange(10), codebook_size=1000).to_bytes()
    with pytest.raises(
        CodesFileError, match=r"truncated codes: expected 20 bytes \(10 frames of uint16\), got 15"
    ):
        CodesFile.from_bytes(data[:-5])


def test_codes_reader_rejects_trailing_garbage():
    data = make(np.arange(10)).to_bytes()
    with pytest.raises(CodesFileError, match="trailing garbage: 3 bytes after the codes"):
        CodesFile.from_bytes(data + b"abc")


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"model_id": ', "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"hop": 1, "hop": 2}', "duplicate field"),
    ],
)
def test_codes_reader_rejects_unparsable_header(raw, message):
    with pytest.raises(CodesFileError, match=f"malformed header: {message}"):
        CodesFile.from_bytes(assemble(raw, bytes(4)))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hop": None}, "hop must be an integer, got None"),
        ({"sample_rate": 16000.0}, "sample_rate must be an integer, got 16000.0"),
        ({"num_samples": True}, "num_samples must be an integer, got True"),
        ({"hop": 0}, "hop must be >= 1, got 0"),
        ({"codebook_size": 70000}, r"codebook_size must be in \[1, 65536\], got 70000"),
        ({"model_id": ""}, "model_id must be a non-empty string"),
        ({"model_hash": 5}, "model_hash must be a non-empty string, got 5"),
        ({"speaker": "p225"}, "speaker must be an object with keys name and index"),
        ({"speaker": {"name": "p225", "index": -1}}, "speaker index must be >= 0, got -1"),
        ({"num_frames": 0}, "num_frames must be >= 1, got 0"),
        ({"codes_dtype": "uint16"}, "codes_dtype 'uint16' does not match codebook_size 256"),
        ({"colour": "blue"}, "unknown field.* colour"),
    ],
)
def test_codes_reader_rejects_bad_header_field(changes, message):
    with pytest.raises(CodesFileError, match=f"malformed header: {message}"):
        CodesFile.from_bytes(assemble(valid_header(**changes), bytes(4)))


def test_codes_reader_names_every_missing_field():
    header = valid_header()
    del header["hop"], header["speaker"]
    with pytest.raises(CodesFileError, match="malformed header: missing field.* hop, speaker"):
        CodesFile.from_bytes(assemble(header, bytes(4)))


def test_codes_reader_rejects_codes_out_of_range():
    data = assemble(valid_header(codebook_size=10), bytes([1, 2, 12, 200]))
    with pytest.raises(
        CodesFileError, match=r"2 code\(s\) out of range \[0, 10\): first is 12 at frame 2"
    ):
        CodesFile.from_bytes(data)


def test_codes_reader_rejects_file_of_another_model():
    data = make(np.arange(4)).to_bytes()
    assert CodesFile.from_bytes(data, expected_model="small").model_id == "small"
    assert CodesFile.from_bytes(data, expected_model=("small", HASH)).model_hash == HASH
    with pytest.raises(CodesFileError, match="made by another model: model 'small'.*is 'default'"):
        CodesFile.from_bytes(data, expected_model=ModelRef("default", HASH))
    with pytest.raises(CodesFileError, match="has hash 0123 \\(different weights\\)"):
        CodesFile.from_bytes(data, expected_model=ModelRef("small", "0123"))


def test_codes_reader_error_names_the_file(tmp_path):
    path = tmp_path / "broken.vqwc"
    path.write_bytes(b"not a codes file at all")
    with pytest.raises(CodesFileError, match=r"broken\.vqwc: not a codes file"):
        CodesFile.read(path)
    with pytest.raises(CodesFileError, match=r"missing\.vqwc: cannot open"):
        CodesFile.read(tmp_path / "missing.vqwc")


@pytest.mark.parametrize(
    "codes, kw, message",
    [
        (np.array([0, 256]), {}, r"out of range \[0, 256\): first is 256 at frame 1"),
        (np.array([-1, 0]), {}, "first is -1 at frame 0"),
        (np.zeros((2, 3), int), {}, r"one-dimensional \[frames\], got shape \(2, 3\)"),
        (np.array([0.0, 1.0]), {}, "codes must be integers, got dtype float64"),
        (np.array([], int), {}, "at least one frame, got 0"),
        (np.arange(3), {"num_samples": 0}, "num_samples must be >= 1, got 0"),
        (np.arange(3), {"speaker_name": ""}, "speaker name must be a non-empty string"),
        (np.arange(3), {"model_hash": "x" * 70000}, "header is .* bytes, over the 65536-byte"),
    ],
)
def test_codes_writer_refuses_what_the_reader_would_reject(codes, kw, message):
    with pytest.raises(CodesFileError, match=message):
        make(codes, **kw).to_bytes()


def test_codes_file_and_audio_modules_do_not_import_torch():
    code = "import sys, vqwavenet.codes_file, vqwavenet.audio; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "False"
