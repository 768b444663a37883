"""`python -m training.prepare`: messy folders, corpus layouts, splits, atomic output, Asterisk."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from G722 import G722

from model.autoencoder import Autoencoder
from training import prepare as prep
from training.config import load_model_config
from training.dataset import Dataset, split_of

DATA = Path(__file__).parent / "data"
ALLISON = prep.ASTERISK_ROOT / "en_US_f_Allison"


def clip(name: str) -> np.ndarray:
    x, sr = sf.read(DATA / f"{name}.wav", dtype="int16")
    assert sr == 16000 and x.ndim == 1
    return x


def resample(x: np.ndarray, sr: int, new: int) -> np.ndarray:
    return torchaudio.functional.resample(torch.from_numpy(x.astype(np.float32)), sr, new).numpy()


def run(*argv) -> int:
    return prep.main([*map(str, argv), "--config", "tiny", "--quiet"])


def utterance(ds: Dataset, uid: str) -> np.ndarray:
    i = next(i for i, r in enumerate(ds.records) if r.id == uid)
    return np.asarray(ds.audio[ds.records[i].offset :][: ds.records[i].length])


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A folder of good files in odd formats and bad files of every kind, prepared once."""
    base = tmp_path_factory.mktemp("messy")
    root = base / "corpus"
    for d in ("alice", "bob", "carol"):
        (root / d).mkdir(parents=True)
    good, long = clip("activated"), clip("agent-newlocation")
    sf.write(root / "alice/good.wav", good, 16000, subtype="PCM_16")
    x44 = resample(long / 32768.0, 16000, 44100)
    sf.write(root / "alice/stereo44.wav", np.stack([x44, 0.5 * x44], 1), 44100, subtype="FLOAT")
    x8 = np.round(resample(clip("auth-incorrect"), 16000, 8000)).astype(np.int16)
    sf.write(root / "bob/eight.wav", x8, 8000, subtype="PCM_16")
    sf.write(root / "bob/float.wav", good.astype(np.float32) / 32768.0, 16000, subtype="FLOAT")
    (root / "bob/corrupt.wav").write_bytes(b"RIFF\x24\x10\x00\x00WAVEfmt " + bytes(range(256)) * 8)
    (root / "bob/empty.wav").write_bytes(b"")
    (root / "carol/notes.wav").write_text("these are my notes, not audio\n")
    nan = good.astype(np.float32) / 32768.0
    nan[1000] = np.nan
    sf.write(root / "carol/nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "carol/zero.wav", np.zeros(0, np.int16), 16000, subtype="PCM_16")
    (root / "carol/readme.txt").write_text("not a candidate: wrong suffix\n")
    out = base / "prepared"
    rc = run("--corpus", "folder", "--root", root, "--out", out)
    return {"base": base, "root": root, "out": out, "rc": rc, "x44": x44, "x8": x8}


def test_prepare_keeps_good_files_as_16k_mono_int16(messy):
    assert messy["rc"] == 0
    ds = Dataset(messy["out"])
    assert ds.sample_rate == 16000
    assert ds.audio.dtype == np.int16 and ds.audio.ndim == 1
    assert sorted(r.id for r in ds.records) == [
        "alice/good",
        "alice/stereo44",
        "bob/eight",
        "bob/float",
    ]
    assert ds.speakers == ["alice", "bob"]
    good = clip("activated")
    # 16 kHz int16 and float32 files come through bit-exact.
    np.testing.assert_array_equal(utterance(ds, "alice/good"), good)
    np.testing.assert_array_equal(utterance(ds, "bob/float"), good)
    # 8 kHz: twice the samples, and still the same speech (correlated with the 16 kHz source).
    eight = utterance(ds, "bob/eight").astype(np.float64)
    assert len(eight) == 2 * len(messy["x8"])
    ref = clip("auth-incorrect").astype(np.float64)
    n = min(len(ref), len(eight))
    assert np.corrcoef(ref[:n], eight[:n])[0, 1] > 0.95
    # 44.1 kHz stereo (left x, right x/2): mono is the channel mean 0.75 x, back at 16 kHz.
    stereo = utterance(ds, "alice/stereo44").astype(np.float64)
    assert len(stereo) == math.ceil(len(messy["x44"]) * 16000 / 44100)
    ref = 0.75 * clip("agent-newlocation").astype(np.float64)
    n = min(len(ref), len(stereo))
    err = np.sum((stereo[:n] - ref[:n]) ** 2) / np.sum(ref[:n] ** 2)
    assert err < 1e-2, f"resampled stereo differs from 0.75 x by {10 * np.log10(err):.1f} dB"


def test_prepare_lists_every_bad_file_with_its_reason(messy, capsys):
    ds = Dataset(messy["out"])
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert set(reasons) == {"corrupt.wav", "empty.wav", "notes.wav", "nan.wav", "zero.wav"}
    assert reasons["corrupt.wav"].startswith("unreadable")
    assert reasons["notes.wav"].startswith("unreadable")
    assert reasons["empty.wav"].startswith("empty file")
    assert "NaN" in reasons["nan.wav"]
    assert reasons["zero.wav"].startswith("zero length")


def test_prepare_prints_skipped_files_at_the_end(tmp_path, capsys):
    root = tmp_path / "c" / "spk"
    root.mkdir(parents=True)
    sf.write(root / "ok.wav", clip("activated"), 16000)
    (root / "bad.wav").write_text("nope")
    assert run("--corpus", "folder", "--root", tmp_path / "c", "--out", tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert "skipped 1 file(s)" in out and "bad.wav: unreadable" in out


def test_prepare_leaves_no_scratch_directory_and_refuses_to_overwrite(messy, capsys):
    base, out = messy["base"], messy["out"]
    assert sorted(p.name for p in base.iterdir()) == ["corpus", "prepared"]
    before = (out / "index.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        run("--corpus", "folder", "--root", messy["root"], "--out", out)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err
    assert (out / "index.json").read_bytes() == before
    assert run("--corpus", "folder", "--root", messy["root"], "--out", out, "--force") == 0
    assert (out / "index.json").read_bytes() == before  # same input, same dataset
    assert sorted(p.name for p in base.iterdir()) == ["corpus", "prepared"]


def test_prepare_fails_cleanly_when_nothing_is_usable(tmp_path, capsys):
    root = tmp_path / "corpus" / "spk"
    root.mkdir(parents=True)
    (root / "a.wav").write_text("text")
    (root / "b.flac").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        run("--corpus", "folder", "--root", tmp_path / "corpus", "--out", tmp_path / "out")
    assert e.value.code != 0
    assert "no usable audio" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("padded", [True, False])
def test_feature_statistics_are_those_of_the_train_split(messy, tmp_path, padded):
    out = messy["out"]
    if padded:
        out = tmp_path / "padded"
        assert run("--corpus", "folder", "--root", messy["root"], "--out", out, "--stats-on",
                   "padded") == 0  # fmt: skip
    ds = Dataset(out)
    cfg = load_model_config("tiny")
    model = Autoencoder(cfg)
    train = ds.split("train")
    assert train, "this test needs a train utterance"
    feats = []
    with torch.no_grad():
        for i in train:
            x = torch.from_numpy(ds.wave(i))[None]
            if padded:
                x = model.pad(x)[0]
            feats.append(model.features(x)[0].double())
    feats = torch.cat(feats, 1)  # [D, frames]
    stats = ds.stats
    assert stats["features"] == asdict(cfg.features)
    assert stats["padded"] is padded and stats["splits"] == ["train"]
    assert stats["frames"] == feats.shape[1]
    np.testing.assert_allclose(stats["mean"], feats.mean(1).numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["std"], feats.std(1, correction=0).numpy(), rtol=1e-9)


def test_statistics_fall_back_to_every_split_without_train_utterances(tmp_path):
    name = next(f"u{i}" for i in range(1000) if split_of(f"spk/u{i}") != "train")
    (tmp_path / "corpus" / "spk").mkdir(parents=True)
    sf.write(tmp_path / "corpus" / "spk" / f"{name}.wav", clip("activated"), 16000)
    assert run("--corpus", "folder", "--root", tmp_path / "corpus", "--out", tmp_path / "o") == 0
    ds = Dataset(tmp_path / "o")
    assert ds.split("train") == [] and len(ds) == 1
    assert ds.stats["splits"] == ["train", "valid", "test"] and ds.stats["frames"] > 0
    assert np.isfinite(ds.stats["mean"]).all() and min(ds.stats["std"]) > 0


def test_corpus_layouts_give_speakers_from_the_path(tmp_path):
    short = clip("activated")[:3200]
    files = {
        "LibriSpeech/train-clean-100/19/198/19-198-0001.flac": "19",
        "LibriSpeech/train-clean-100/19/198/19-198-0002.flac": "19",
        "LibriSpeech/dev-clean/84/121123/84-121123-0000.flac": "84",
        "VCTK/wav48_silence_trimmed/p225/p225_001_mic1.flac": "p225",
        "VCTK/wav48_silence_trimmed/p225/p225_001_mic2.flac": "p225",
        "VCTK/wav48_silence_trimmed/s5/s5_002_mic1.flac": "s5",
        "VCTK-old/wav48/p226/p226_003.wav": "p226",
        "misc/dave/session1/take.wav": "session1",
        "misc/erin/hello.wav": "erin",
        "misc/erin/hello.flac": "erin",  # same utterance id as hello.wav: one is kept
        "top.wav": "corpus",
    }
    root = tmp_path / "corpus"
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, short, 16000)
    out = tmp_path / "out"
    assert run("--corpus", "folder", "--root", root, "--out", out) == 0
    ds = Dataset(out)
    assert ds.speakers == sorted(set(files.values()))
    got = {r.id: ds.speakers[r.speaker] for r in ds.records}
    assert got == {
        "19/19-198-0001": "19",
        "19/19-198-0002": "19",
        "84/84-121123-0000": "84",
        "p225/p225_001_mic1": "p225",
        "p225/p225_001_mic2": "p225",
        "s5/s5_002_mic1": "s5",
        "p226/p226_003": "p226",
        "misc/dave/session1/take": "session1",
        "misc/erin/hello": "erin",
        "top": "corpus",
    }
    assert [(Path(x["path"]).name, x["reason"][:9]) for x in ds.skipped] == [
        ("hello.wav", "duplicate")
    ]
    split = {r.id: r.split for r in ds.records}
    assert split["p225/p225_001_mic1"] == split["p225/p225_001_mic2"] == split_of("p225/p225_001")


def test_splits_are_deterministic_and_independent_of_file_order(tmp_path):
    root = tmp_path / "corpus"
    base = clip("agent-newlocation")
    for i in range(60):
        d = root / f"spk{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        sf.write(d / f"u{i:02d}.wav", base[i * 800 : i * 800 + 1600], 16000)
    sources = prep.folder_sources(root)
    shuffled = sources[:]
    random.Random(0).shuffle(shuffled)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prep.prepare(sources, a, config="tiny", progress=False)
    prep.prepare(shuffled, b, config="tiny", progress=False)
    prep.prepare(shuffled[::2], c, config="tiny", progress=False)  # a different subset
    for name in ("index.json", "stats.json", "audio.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    da, dc = Dataset(a), Dataset(c)
    split_a = {r.id: r.split for r in da.records}
    assert {r.id: r.split for r in dc.records}.items() <= split_a.items()
    assert all(split == split_of(uid) for uid, split in split_a.items())
    assert {"train", "valid", "test"} <= set(split_a.values()), "60 ids should reach every split"
    for i, r in enumerate(dc.records):
        np.testing.assert_array_equal(dc.wave(i), utterance(da, r.id) / 32768.0)


def test_asterisk_voices_map_to_speakers_without_counting_symlinks_twice(tmp_path):
    sounds = tmp_path / "sounds"
    prompts = {
        "en_US_f_Allison/activated.g722": clip("activated"),
        "en_US_f_Allison/digits/1.g722": clip("auth-incorrect")[:8000],
        "es_MX_f_Allison/hola.g722": clip("agent-newlocation")[:16000],
        "fr_CA_f_June/bonjour.g722": clip("auth-incorrect"),
        "it_IT_m_Carlo/ciao.g722": clip("activated"),  # not among --languages
    }
    for rel, x in prompts.items():
        (sounds / rel).parent.mkdir(parents=True, exist_ok=True)
        (sounds / rel).write_bytes(G722(16000, 64000).encode(x))
    (sounds / "en").symlink_to("en_US_f_Allison")  # how Debian's alternatives look
    (sounds / "en_US").symlink_to("en_US_f_Allison")
    out = tmp_path / "out"
    argv = ("--corpus", "asterisk", "--sounds-root", sounds, "--languages", "en,es,fr")
    assert run(*argv, "--no-install", "--out", out) == 0
    ds = Dataset(out)
    assert ds.speakers == ["Allison", "June"]
    got = {r.id: ds.speakers[r.speaker] for r in ds.records}
    assert got == {
        "en_US_f_Allison/activated": "Allison",
        "en_US_f_Allison/digits/1": "Allison",
        "es_MX_f_Allison/hola": "Allison",
        "fr_CA_f_June/bonjour": "June",
    }
    for r in ds.records:
        src = prompts[r.id + ".g722"].astype(np.float64)
        y = np.asarray(ds.audio[r.offset : r.offset + r.length], dtype=np.float64)
        assert len(y) == len(src)  # 64 kbit/s G.722: two samples per byte
        best = max(np.corrcoef(src[: len(src) - k], y[k:])[0, 1] for k in range(40))
        assert best > 0.99, f"{r.id}: decoded audio does not match its source"


def test_asterisk_rejects_unknown_languages(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run("--corpus", "asterisk", "--languages", "en,xx", "--out", tmp_path / "o")
    assert e.value.code != 0 and "xx" in capsys.readouterr().err


def test_english_prompts_bring_their_transcripts_package():
    """The evaluation's word error rates need the English transcripts: preparing English
    prompts installs their package too, and only then."""
    assert prep.asterisk_packages(["en", "fr"]) == [
        "asterisk-core-sounds-en-g722",
        "asterisk-core-sounds-fr-g722",
        "asterisk-core-sounds-en",
    ]
    assert prep.asterisk_packages(["fr"]) == ["asterisk-core-sounds-fr-g722"]


def test_install_refuses_clearly_without_root(monkeypatch):
    monkeypatch.setattr(prep.os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="asterisk-core-sounds-fr-g722.*root"):
        prep.install_packages(["asterisk-core-sounds-fr-g722"])


@pytest.mark.skipif(not ALLISON.is_dir(), reason="asterisk-core-sounds-en-g722 not installed")
def test_asterisk_reads_the_installed_english_prompts(tmp_path):
    out = tmp_path / "out"
    assert run("--corpus", "asterisk", "--languages", "en", "--limit", "3", "--out", out) == 0
    ds = Dataset(out)
    assert len(ds) == 3 and ds.speakers == ["Allison"]
    index = json.loads((out / "index.json").read_text())
    assert index["source"]["corpus"] == "asterisk"
    for r in ds.records:
        assert r.id.startswith("en_US_f_Allison/")
        path = prep.ASTERISK_ROOT / (r.id + ".g722")
        assert r.length == 2 * path.stat().st_size


def _fillets_tree(root: Path) -> dict[str, np.ndarray]:
    """A Fish Fillets-like sound folder: LEVEL/nl/PREFIX-VOICE-WORD.ogg at 22.05 kHz."""
    lines = {
        "airplane/nl/let-m-divna.ogg": clip("activated"),
        "airplane/nl/let-v-oko.ogg": clip("auth-incorrect"),
        "bathroom/nl/koup-m-voda.ogg": clip("agent-newlocation")[:20000],
        "bathroom/nl/koup-0-kohout.ogg": clip("activated"),  # a minor character: left out
        "bathroom/cs/koup-m-voda.ogg": clip("activated"),  # another language: left out
    }
    for rel, x in lines.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, resample(x / 32768.0, 16000, 22050), 22050, format="OGG")
    return lines


def test_fillets_keeps_the_two_fish_resampled_to_16k(tmp_path):
    lines = _fillets_tree(tmp_path / "sound")
    out = tmp_path / "out"
    argv = ("--corpus", "fillets", "--fillets-root", tmp_path / "sound", "--no-install")
    assert run(*argv, "--out", out) == 0
    ds = Dataset(out)
    assert ds.speakers == ["BigFish", "SmallFish"]
    got = {r.id: ds.speakers[r.speaker] for r in ds.records}
    assert got == {
        "fillets/airplane/nl/let-m-divna": "SmallFish",
        "fillets/airplane/nl/let-v-oko": "BigFish",
        "fillets/bathroom/nl/koup-m-voda": "SmallFish",
    }
    for r in ds.records:
        src = lines[r.id.removeprefix("fillets/") + ".ogg"].astype(np.float64)
        y = np.asarray(ds.audio[r.offset : r.offset + r.length], dtype=np.float64)
        assert abs(len(y) - len(src)) <= 2  # 22.05 kHz back to 16 kHz
        n = min(len(y), len(src))
        assert np.corrcoef(src[:n], y[:n])[0, 1] > 0.95, r.id  # Vorbis is lossy


def test_corpora_merge_and_a_held_out_voice_goes_to_its_own_dataset(tmp_path, capsys):
    _fillets_tree(tmp_path / "sound")
    sounds = tmp_path / "asterisk"
    (sounds / "fr_CA_f_June").mkdir(parents=True)
    (sounds / "fr_CA_f_June/bonjour.g722").write_bytes(G722(16000, 64000).encode(clip("activated")))
    (sounds / "it_IT_m_Carlo").mkdir(parents=True)
    (sounds / "it_IT_m_Carlo/ciao.g722").write_bytes(G722(16000, 64000).encode(clip("activated")))
    out = tmp_path / "out"
    argv = ["--corpus", "asterisk", "fillets", "--languages", "fr,it", "--no-install"]
    argv += ["--sounds-root", sounds, "--fillets-root", tmp_path / "sound"]
    assert run(*argv, "--hold-out", "SmallFish", "--out", out) == 0
    assert "heldout" in capsys.readouterr().out  # the summary's column
    ds, held = Dataset(out), Dataset(out / "heldout")
    assert ds.speakers == ["BigFish", "Carlo", "June"]
    assert held.speakers == ["SmallFish"]
    assert sorted(r.id for r in held.records) == [
        "fillets/airplane/nl/let-m-divna",
        "fillets/bathroom/nl/koup-m-voda",
    ]
    index = json.loads((out / "index.json").read_text())
    assert index["source"]["corpus"] == "asterisk+fillets"
    assert json.loads((out / "heldout/index.json").read_text())["source"]["held_out"] == [
        "SmallFish"
    ]
    # The held-out voice is not in the training statistics: fewer frames than without it.
    assert run(*argv, "--out", tmp_path / "all") == 0
    assert not (tmp_path / "all/heldout").exists()
    frames = [json.loads((d / "stats.json").read_text())["frames"] for d in (out, tmp_path / "all")]
    assert Dataset(tmp_path / "all").speakers == ["BigFish", "Carlo", "June", "SmallFish"]
    assert 0 < frames[0] < frames[1]
    with pytest.raises(SystemExit):
        run(*argv, "--hold-out", "Nobody", "--out", tmp_path / "none")
    assert "no utterances of Nobody" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
