"""Shared fixtures. Append new ones; several test files use what is here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
APP_SPEAKERS = ["Allison", "Carlo", "IvrvoiceRU", "June"]
APP_NOTICE = "test model with random weights: expect noise"
APP_MAX_SECONDS = 2.0
APP_MAX_FILE_SIZE = 1 << 20  # bytes


@pytest.fixture(scope="session")
def app_model_dir(tmp_path_factory) -> Path:
    """A random-weight ``tiny`` model exported with ``python -m export`` (its CLI, in process),
    with a "notice" added to ``model.json`` as the bundled model has; for the app and CLI tests.
    """
    import torch

    from export.__main__ import main as export_main
    from model.autoencoder import Autoencoder
    from training.config import load_model_config

    root = tmp_path_factory.mktemp("app_model")
    torch.manual_seed(0)
    model = Autoencoder(load_model_config("tiny")).eval()
    fit_to_test_clips(model)  # so that speech uses many codes
    ckpt = write_checkpoint(model, root / "tiny.pt")
    out = root / "model"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--int8"]) == 0
    meta_path = out / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["notice"] = APP_NOTICE
    meta_path.write_text(json.dumps(meta, indent=2))
    return out


def write_checkpoint(model, path: Path) -> Path:
    """Save ``model`` as a step-0 training checkpoint whose voices are named like the bundled
    model's (then ``speakerN``)."""
    import torch

    from model.config import to_dict

    n = model.cfg.decoder.n_speakers
    speakers = (APP_SPEAKERS + [f"speaker{i}" for i in range(len(APP_SPEAKERS), n)])[:n]
    state = {"model_config": to_dict(model.cfg), "model": model.state_dict(), "step": 0}
    torch.save({**state, "speakers": speakers}, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_server(app_model_dir):
    """The web app serving `app_model_dir` on loopback in this process (torch-free itself; the
    no-torch check runs in its own process). Yields ``(url, service)``; limits: 2 s of audio,
    1 MiB uploads, 2 requests at once."""
    from app.service import CodecService
    from app.ui import serve

    service = CodecService(app_model_dir, max_seconds=APP_MAX_SECONDS)
    demo = serve(
        service,
        port=free_port(),
        concurrency=2,
        max_file_size=APP_MAX_FILE_SIZE,
        block=False,
    )
    try:
        yield demo.local_url, service
    finally:
        demo.close()


CLIP = DATA / "activated.wav"


def write_codes(path: Path, cf, **changes) -> Path:
    """Write ``cf`` with header fields replaced (bypassing validation, to make bad files)."""
    from vqwavenet.codes_file import CodesFile

    fields = {
        k: getattr(cf, k)
        for k in (
            "codes",
            "model_id",
            "model_hash",
            "sample_rate",
            "hop",
            "codebook_size",
            "speaker_name",
            "speaker_index",
            "num_samples",
        )
    }
    fields.update(changes)
    CodesFile(**fields).write(path)
    return path


@pytest.fixture(scope="session")
def app_inputs(tmp_path_factory, app_model_dir):
    """Input files for the app and CLI tests, each bad one with a phrase its message must hold.

    Returns a namespace: ``clip`` (0.3 s of 16 kHz int16 speech) and ``clip_codes`` (its codes
    ``[F]``), ``codes`` (its codes file), ``odd`` {name: (path, lossless)} of valid files in
    other formats, rates and channel counts (``lossless``: same samples as ``clip``, so the same
    codes), ``bad_audio`` and ``bad_codes`` {name: (path, phrase)}.
    """
    from types import SimpleNamespace

    import numpy as np
    import soundfile as sf

    from app.service import CodecService

    root = tmp_path_factory.mktemp("app_inputs")
    service = CodecService(app_model_dir, max_seconds=APP_MAX_SECONDS)
    pcm, sr = sf.read(CLIP, dtype="int16")
    assert sr == 16000
    pcm = pcm[2000:6800]  # 0.3 s of speech
    x = pcm.astype(np.float64) / 32768.0
    clip = root / "clip.wav"
    sf.write(clip, pcm, sr, subtype="PCM_16")
    enc = service.encode(str(clip))
    codes = root / "clip.vqwc"
    enc.codes.write(codes)

    odd_dir = root / "odd"
    odd_dir.mkdir()
    odd = {}
    for name, subtype, lossless in (
        ("u8", "PCM_U8", False),
        ("s24", "PCM_24", True),
        ("s32", "PCM_32", True),
        ("float", "FLOAT", True),
        ("double", "DOUBLE", True),
    ):
        sf.write(odd_dir / f"{name}.wav", x, sr, subtype=subtype)
        odd[name] = (odd_dir / f"{name}.wav", lossless)
    import soxr

    for rate in (8000, 22050, 44100, 48000):
        y = soxr.resample(x, sr, rate)
        sf.write(odd_dir / f"rate{rate}.wav", y, rate, subtype="PCM_16")
        odd[f"rate{rate}"] = (odd_dir / f"rate{rate}.wav", False)
    sf.write(odd_dir / "stereo.wav", np.stack([pcm, pcm], 1), sr, subtype="PCM_16")
    odd["stereo"] = (odd_dir / "stereo.wav", True)
    sf.write(odd_dir / "silence.wav", np.zeros(4800, np.int16), sr, subtype="PCM_16")
    odd["silence"] = (odd_dir / "silence.wav", False)  # silence is audio too
    hiss = np.random.default_rng(0).integers(-2, 3, 4800).astype(np.int16)
    sf.write(odd_dir / "near_silence.wav", hiss, sr, subtype="PCM_16")
    odd["near_silence"] = (odd_dir / "near_silence.wav", False)
    y = soxr.resample(np.stack([x, 0.5 * x], 1), sr, 44100)  # unequal channels, FLAC
    sf.write(odd_dir / "stereo44k.flac", y, 44100, subtype="PCM_16")
    odd["stereo44k_flac"] = (odd_dir / "stereo44k.flac", False)

    bad_dir = root / "bad_audio"
    bad_dir.mkdir()
    bad = {}

    def add(name: str, phrase: str) -> Path:
        bad[name] = (bad_dir / name, phrase)
        return bad_dir / name

    add("not_audio.wav", "not audio").write_text("this is text, not a recording\n")
    add("empty.wav", "empty").write_bytes(b"")
    sf.write(add("zero_length.wav", "empty"), np.zeros(0, np.int16), sr, subtype="PCM_16")
    nan = x.astype(np.float32).copy()
    nan[100] = np.nan
    sf.write(add("nan.wav", "NaN"), nan, sr, subtype="FLOAT")
    long = np.tile(pcm, int(APP_MAX_SECONDS * sr / len(pcm)) + 2)
    sf.write(add("too_long.wav", f"over the {APP_MAX_SECONDS:g} s limit"), long, sr)

    codes_dir = root / "bad_codes"
    codes_dir.mkdir()
    bad_codes = {}

    def add_codes(name: str, phrase: str) -> Path:
        bad_codes[name] = (codes_dir / name, phrase)
        return codes_dir / name

    good = enc.codes
    data = codes.read_bytes()
    add_codes("truncated.vqwc", "truncated").write_bytes(data[:-3])
    add_codes("empty.vqwc", "not a codes file").write_bytes(b"")
    add_codes("garbage.vqwc", "not a codes file").write_bytes(bytes(range(256)) * 4)
    add_codes("wav.vqwc", "not a codes file").write_bytes(clip.read_bytes())
    write_codes(add_codes("foreign.vqwc", "another model"), good, model_id="someone-elses")
    write_codes(add_codes("other_hash.vqwc", "another model"), good, model_hash="0" * 16)
    # A code at the codebook size: the constructor refuses it, so patch the file's last byte.
    out_of_range = bytearray(data)
    out_of_range[-1] = good.codebook_size
    add_codes("out_of_range.vqwc", "out of range").write_bytes(bytes(out_of_range))
    write_codes(
        add_codes("inconsistent.vqwc", "inconsistent"), good, num_samples=good.num_samples * 3
    )
    long_samples = int(APP_MAX_SECONDS * sr) + sr
    frames = service.codec.geometry.padding(long_samples)[2]
    write_codes(
        add_codes("too_long.vqwc", f"over the {APP_MAX_SECONDS:g} s limit"),
        good,
        codes=np.resize(good.codes, frames),
        num_samples=long_samples,
    )
    write_codes(
        add_codes("bad_speaker.vqwc", "speakers"),
        good,
        speaker_index=len(service.speakers) + 3,
        speaker_name="Nobody",
    )
    return SimpleNamespace(
        clip=clip,
        clip_codes=np.asarray(good.codes),
        codes=codes,
        odd=odd,
        bad_audio=bad,
        bad_codes=bad_codes,
    )


def run_process_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for a command that starts children
    of its own (torchrun): on timeout the whole process group is killed, so that no grandchild
    holding the output pipes keeps the test (and CI) waiting; then TimeoutExpired is raised."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def fit_to_test_clips(model, seed: int = 0):
    """``model`` (an `Autoencoder`) with feature statistics and a k-means codebook from the
    speech clips of tests/data, so that speech uses many codes: random weights alone map nearly
    every frame to one or two codes, and a test whose codes never change cannot see a frame
    encoded from the wrong samples. Returns the model, in eval mode."""
    import soundfile as sf
    import torch

    model = model.eval()
    waves = [torch.tensor(sf.read(p, dtype="float32")[0]) for p in sorted(DATA.glob("*.wav"))]
    dim = model.features.dim
    model.features.set_statistics(torch.zeros(dim), torch.ones(dim))
    with torch.no_grad():
        feats = torch.cat([model.features(w[None])[0] for w in waves], dim=-1)  # [dim, T]
        model.features.set_statistics(feats.mean(-1), feats.std(-1))
        z = torch.cat([model.encoder(model.features(w[None]))[0].T for w in waves])  # [F, D]
    model.quantizer.kmeans_init(z, generator=torch.Generator().manual_seed(seed))
    return model
