"""The package as a user gets it: the wheel holds the model, the configs and the app's
examples, and ``pip install`` into a fresh venv brings the codec without torch, whose
``vqwavenet`` command encodes and decodes from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import soundfile as sf

from vqwavenet import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "tests" / "data" / "activated.wav"


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source (setuptools builds in the source tree, and a
    stale ``build/`` there could put removed files in the wheel)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "data", "artifacts", "*.egg-info", "__pycache__"
    )
    shutil.copytree(ROOT, source, ignore=skip)
    shutil.copytree(ROOT / "tests" / "data", source / "tests" / "data")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, source], timeout=300)
    (path,) = out.glob("vqwavenet-*.whl")
    return path


def test_the_wheel_holds_the_model_configs_and_examples(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    meta = json.loads((BUNDLED_MODEL / "model.json").read_text())
    shipped = ["model.json", *meta["files"], meta["primer"]["file"]]
    shipped += [own["file"] for own in meta["primer"].get("speakers", {}).values()]
    for name in shipped:
        assert f"vqwavenet/models/bundled/{name}" in names
    for config in ("tiny", "small", "default"):
        assert f"training/configs/{config}.toml" in names
    assert "app/examples/activated.wav" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_an_installed_codec_has_no_torch_and_runs_from_any_folder(wheel, tmp_path):
    """A fresh venv gets the wheel with its dependencies (no torch); its ``vqwavenet`` encodes
    and decodes a clip in a folder outside the repository, and a training command names the
    extra it needs."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=120)
    bin_ = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([bin_ / "python", "-m", "pip", "install", "-q", wheel], env=env, timeout=300)
    installed = run([bin_ / "python", "-m", "pip", "list", "--format=freeze"], env=env).stdout
    assert "vqwavenet==" in installed
    assert not [line for line in installed.lower().split() if line.startswith("torch")]

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "speech.wav").write_bytes(CLIP.read_bytes())
    cli = bin_ / "vqwavenet"
    run([cli, "encode", "-q", "speech.wav"], cwd=work, env=env, timeout=120)
    run([cli, "decode", "-q", "speech.vqwc", "--speaker", "1"], cwd=work, env=env, timeout=300)
    decoded, sr = sf.read(work / "speech.decoded.wav")
    assert sr == 16000 and len(decoded) == len(sf.read(CLIP)[0])

    missing = subprocess.run(
        [cli, "train", "--help"], cwd=work, env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "vqwavenet[train]" in missing.stderr
    missing = subprocess.run(
        [cli, "evaluate", "--help"], cwd=work, env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "vqwavenet[eval]" in missing.stderr
