"""The codes file: round trips, the documented byte layout, and one clear error per bad file."""

import io
import json
import os
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
        ({"hop": 0}, r"hop must be in \[1, 65536\], got 0"),
        ({"codebook_size": 70000}, r"codebook_size must be in \[1, 65536\], got 70000"),
        ({"model_id": ""}, "model_id must be a non-empty string"),
        ({"model_hash": 5}, "model_hash must be a non-empty string, got 5"),
        ({"speaker": "p225"}, "speaker must be an object with keys name and index"),
        (
            {"speaker": {"name": "p225", "index": -1}},
            r"speaker index must be in \[0, 65535\], got -1",
        ),
        ({"num_frames": 0}, r"num_frames must be in \[1, \d+\], got 0"),
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
        (np.arange(3), {"num_samples": 0}, r"num_samples must be in \[1, \d+\], got 0"),
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


# --- hostile files: only the reader's own error, printable and bounded ----------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 60000,
        json.dumps(valid_header()).encode().replace(b'"p225"', b"[" * 30000 + b"]" * 30000),
        b'{"model_id": ' + b'{"a": ' * 10000,
    ],
    ids=["brackets", "nested-speaker-name", "nested-objects"],
)
def test_codes_reader_rejects_deeply_nested_header(raw):
    with pytest.raises(CodesFileError, match="malformed header: nested too deeply"):
        CodesFile.from_bytes(assemble(raw, bytes(4)))


def test_codes_reader_rejects_a_number_of_thousands_of_digits():
    raw = json.dumps(valid_header()).encode().replace(b'"hop": 320', b'"hop": ' + b"9" * 5000)
    with pytest.raises(CodesFileError, match="malformed header: a number of over"):
        CodesFile.from_bytes(assemble(raw, bytes(4)))


def _at(field: str, value) -> dict:
    if field == "speaker index":
        return valid_header(speaker={"name": "p225", "index": value})
    return valid_header(**{field: value})


BOUNDED = {
    "sample_rate": "MAX_SAMPLE_RATE",
    "hop": "MAX_HOP",
    "speaker index": "MAX_SPEAKER_INDEX",
    "num_samples": "MAX_LENGTH",
    "num_frames": "MAX_LENGTH",
}


@pytest.mark.parametrize("field", list(BOUNDED))
@pytest.mark.parametrize("how", ["bound+1", "huge"])
def test_codes_reader_bounds_every_header_number(field, how):
    """Each header number has an upper bound no real file reaches; a larger one (up to the
    thousands of digits JSON still parses) is the reader's error, not an overflow later."""
    from vqwavenet import codes_file

    value = 10**4000 if how == "huge" else getattr(codes_file, BOUNDED[field]) + 1
    with pytest.raises(CodesFileError, match=rf"malformed header: {field} must be in \[\d+, "):
        CodesFile.from_bytes(assemble(_at(field, value), bytes(4)))
    if field != "num_frames":  # the writer counts the frames it holds
        with pytest.raises(CodesFileError, match=rf"{field} must be in \[\d+, "):
            make(np.arange(4), **{field.replace(" ", "_"): value})


def test_codes_header_numbers_at_their_bounds_are_safe_to_use():
    """A header that parses can be used as the service uses it: duration as a float, the
    sample count through the model's geometry, every count exact as a float."""
    from vqwavenet import audio, codes_file

    header = valid_header(
        sample_rate=codes_file.MAX_SAMPLE_RATE,
        hop=codes_file.MAX_HOP,
        num_samples=codes_file.MAX_LENGTH,
        speaker={"name": "p225", "index": codes_file.MAX_SPEAKER_INDEX},
    )
    cf = CodesFile.from_bytes(assemble(header, bytes(4)))
    assert_usable(cf)
    assert codes_file.MAX_LENGTH < 2**53  # counts survive float conversion exactly
    assert codes_file.MAX_SAMPLE_RATE == audio.MAX_SAMPLE_RATE  # no model rate can exceed it
    for field in ("num_samples", "num_frames"):
        header = valid_header(**{field: 2})
        assert CodesFile.from_bytes(assemble(header, bytes(2 if field == "num_frames" else 4)))
        with pytest.raises(CodesFileError, match=f"{field} must be in"):
            CodesFile.from_bytes(assemble(valid_header(**{field: 10**20}), bytes(4)))


def _bundled_geometry():
    from vqwavenet.model_dir import BUNDLED_MODEL, geometry_from_spec

    meta = json.loads((Path(BUNDLED_MODEL) / "model.json").read_text())
    return geometry_from_spec(meta["geometry"])


GEOMETRY = None


def assert_usable(cf: CodesFile) -> None:
    """What the service and the app do with a parsed file before decoding it."""
    global GEOMETRY
    GEOMETRY = GEOMETRY or _bundled_geometry()
    assert np.isfinite(cf.duration) and f"{cf.duration:.1f}"
    for value in (cf.sample_rate, cf.hop, cf.num_samples, cf.num_frames, cf.speaker_index):
        assert float(value) == value
    GEOMETRY.padding(cf.num_samples)
    np.asarray(cf.codes, dtype=np.int64)
    for text in (cf.model_id, cf.model_hash, cf.speaker_name):
        text.encode("utf-8")  # strict: no lone surrogates reach a UTF-8 stream
    assert_same(cf, CodesFile.from_bytes(cf.to_bytes()))


def assert_safe_message(e: CodesFileError, limit: int = 600) -> str:
    """A message the CLI can print and the app can stream: valid UTF-8, printable, bounded."""
    msg = str(e)
    msg.encode("utf-8")
    assert msg.isprintable(), repr(msg)
    assert len(msg) <= limit, f"{len(msg)} characters: {msg[:200]!r}..."
    return msg


@pytest.mark.parametrize(
    "where",
    ["model_id", "model_hash", "speaker name", "codes_dtype", "unknown key", "duplicate key"],
)
def test_codes_reader_rejects_lone_surrogates_and_shows_them_escaped(where):
    """A lone UTF-16 surrogate (JSON "\\ud800") in any header string is refused, and the
    message shows it escaped: no such character reaches a UTF-8 stream (Gradio's events)."""
    header = valid_header()
    text = json.dumps(header)
    if where == "speaker name":
        text = text.replace('"p225"', '"p\\ud800"')
    elif where == "unknown key":
        text = text[:-1] + ', "x\\udce9": 1}'
    elif where == "duplicate key":
        text = text[:-1] + ', "\\ud800": 1, "\\ud800": 2}'
    else:
        text = text.replace(f'"{where}": "{header[where]}"', f'"{where}": "ab\\ud800"')
    assert "\\ud" in text
    with pytest.raises(CodesFileError) as e:
        CodesFile.from_bytes(assemble(text.encode(), bytes(4)))
    assert "malformed header" in assert_safe_message(e.value)
    assert "\\ud800" in str(e.value) or "\\udce9" in str(e.value)


def test_codes_writer_refuses_lone_surrogates():
    with pytest.raises(CodesFileError, match="speaker name .*lone surrogate"):
        make(np.arange(3), speaker_name="p\ud800")


def test_codes_reader_quotes_file_contents_escaped_and_bounded():
    """Strings from the file appear quoted, with control characters escaped and long ones cut,
    whatever the check that shows them."""
    long_hash = make(np.arange(4), model_hash="f" * 60000).to_bytes()
    with pytest.raises(CodesFileError, match="made by another model") as e:
        CodesFile.from_bytes(long_hash, expected_model=ModelRef("small", HASH))
    assert_safe_message(e.value)
    ansi = make(np.arange(4), model_id="\x1b[31mred\n").to_bytes()
    with pytest.raises(CodesFileError, match="made by another model") as e:
        CodesFile.from_bytes(ansi, expected_model="small")
    assert "\\x1b[31mred\\n" in assert_safe_message(e.value)
    for changes in (
        {"speaker": {"name": "x" * 50000, "index": 0, "more": 1}},
        {"codes_dtype": "u" * 50000},
        {"k" * 20000: 1, "j" * 20000: 2},
        {"hop": [[[[[[[[[[[[1]]]]]]]]]]]] * 1000},
        {"model_id": ["x" * 100] * 300},
    ):
        with pytest.raises(CodesFileError, match="malformed header") as e:
            CodesFile.from_bytes(assemble(valid_header(**changes), bytes(4)))
        assert_safe_message(e.value)


def test_codes_reader_names_files_printably_and_only_as_given(tmp_path):
    """A file name that is not UTF-8 (Linux hands such names to Python as surrogate escapes)
    is shown printably; a file object is named by its base name only, never by the server
    folder it lies in."""
    broken = b"not a codes file"
    obj = tmp_path / "upload.vqwc"
    obj.write_bytes(broken)
    with open(obj, "rb") as f, pytest.raises(CodesFileError) as e:
        CodesFile.read(f)
    msg = assert_safe_message(e.value)
    assert msg.startswith("upload.vqwc: not a codes file") and str(tmp_path) not in msg
    if sys.platform == "win32" or sys.getfilesystemencoding() != "utf-8":
        return
    name = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.vqwc")
    try:
        Path(name).write_bytes(broken)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with pytest.raises(CodesFileError) as e:
        CodesFile.read(name)
    assert "caf\\xe9.vqwc: not a codes file" in assert_safe_message(e.value, limit=10**4)


# --- fuzzing: mutated valid files -------------------------------------------------------------

FUZZ_SECONDS = 3.0
HOSTILE_VALUES = [
    None,
    True,
    -1,
    0,
    2**31,
    2**63,
    10**300,
    1e308,
    float("inf"),
    float("nan"),
    "",
    "\ud800",
    "x\udce9y",
    "\x00\x1b[2J",
    "é" * 3000,
    [],
    {},
    {"name": "\ud800", "index": 0},
    {"name": "p225", "index": 2**70},
    [[[[[[[[1]]]]]]]],
]


def _mutate_header(rng, data: bytes) -> bytes:
    """A valid file's header changed as JSON (a field replaced, dropped, added or nested, or
    its text edited), re-assembled with a correct header length so the deeper checks run."""
    n = struct.unpack_from("<I", data, 6)[0]
    header, codes = json.loads(data[10 : 10 + n]), data[10 + n :]
    kind = int(rng.integers(6))
    key = str(rng.choice(list(header) + ["speaker.name", "speaker.index"]))
    value = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    if kind == 0 and "." in key:
        header["speaker"][key.split(".")[1]] = value
    elif kind <= 1:
        header[key.split(".")[0]] = value
    elif kind == 2:
        header.pop(key.split(".")[0], None)
    elif kind == 3:
        header[str(rng.choice(["extra", "\ud800", "hop "]))] = value
    elif kind == 4:  # a field's value nested deep
        header[key.split(".")[0]] = None
        depth = int(rng.choice([50, 900, 2000, 20000]))
        text = json.dumps(header).replace("null", "[" * depth + "]" * depth, 1)
        return assemble(text.encode()[:65536], codes)
    else:  # edit the JSON text itself
        text = json.dumps(header, ensure_ascii=bool(rng.integers(2)))
        i = int(rng.integers(len(text)))
        piece = str(rng.choice(["9" * 5000, "-", "e999", "\\ud800", '"', "{", "]", "\\", ""]))
        text = text[:i] + piece + text[i + int(rng.integers(3)) :]
        return assemble(text.encode("utf-8", "surrogatepass"), codes)
    return assemble(json.dumps(header).encode("utf-8", "surrogatepass"), codes)


def _mutate_bytes(rng, data: bytes) -> bytes:
    """Bits flipped, a tail cut, or random bytes inserted or deleted; half the insertions and
    deletions inside the header fix its length field, so they reach the JSON parser."""
    data = bytearray(data)
    kind = int(rng.integers(4))
    i = int(rng.integers(len(data) + 1))
    before = len(data)
    if kind == 0:  # flip a few bits
        for _ in range(int(rng.integers(1, 5))):
            j = int(rng.integers(len(data)))
            data[j] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        del data[i:]
    elif kind == 2:
        data[i:i] = rng.bytes(int(rng.integers(1, 40)))
    else:
        del data[i : i + int(rng.integers(1, 40))]
    if kind >= 2 and len(data) >= 10 and rng.random() < 0.5:
        n = struct.unpack_from("<I", data, 6)[0]
        if 10 <= i < 10 + n:
            struct.pack_into("<I", data, 6, max(0, n + len(data) - before))
    return bytes(data)


def test_codes_reader_fuzz_raises_only_its_own_error():
    """Mutated valid files (bit flips, truncations, insertions, deletions, header JSON edits),
    from a fixed seed within a time budget: each one either parses to a usable file or raises
    `CodesFileError` with a safe message, never any other exception."""
    import time

    rng = np.random.default_rng(1234)
    seeds = [
        make(np.arange(7)).to_bytes(),
        make(np.arange(5) * 200, codebook_size=1024, speaker_name="Zoë").to_bytes(),
        make(np.array([0]), codebook_size=2, num_samples=1).to_bytes(),
    ]
    expected = [None, "small", ModelRef("small", HASH), ModelRef("other")]
    deadline, cases, parsed = time.monotonic() + FUZZ_SECONDS, 0, 0
    while time.monotonic() < deadline and cases < 20000:
        data = seeds[int(rng.integers(len(seeds)))]
        if rng.random() < 0.6:
            data = _mutate_header(rng, data)
        if rng.random() < 0.6 or data in seeds:
            data = _mutate_bytes(rng, data)
        cases += 1
        try:
            cf = CodesFile.from_bytes(data, expected_model=expected[cases % len(expected)])
        except CodesFileError as e:
            assert_safe_message(e)
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {cases}: {type(e).__name__}: {str(e)[:300]!r} for {data[:300]!r}")
        parsed += 1
        assert_usable(cf)
    assert cases >= 200, f"only {cases} cases in {FUZZ_SECONDS} s"
