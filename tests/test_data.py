"""Training windows: seeded, every phase, inside the utterance, sharded per rank, resumable.

`write_clip_dataset` and `tiny_train_config` are shared with tests/test_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.autoencoder import Autoencoder
from training.config import CONFIG_DIR, load_model_config
from training.data import Loader, Window, WindowSampler, fixed_windows, split_lengths
from training.dataset import Dataset
from training.windows import Utterance

CLIPS = sorted((Path(__file__).parent / "data").glob("*.wav"))


def write_clip_dataset(root: str | Path, pieces: int = 2, valid_every: int = 3) -> Path:
    """The `training.dataset` layout written directly with numpy and json (no preparation
    tool): each speech clip of tests/data cut into ``pieces`` utterances, every
    ``valid_every``-th in the ``valid`` split, two speakers alternating by clip."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    audio, utterances, offset = [], [], 0
    for c, path in enumerate(CLIPS):
        wave, sr = sf.read(path, dtype="int16")
        assert sr == 16000
        for p, part in enumerate(np.array_split(wave, pieces)):
            split = "valid" if len(utterances) % valid_every == valid_every - 1 else "train"
            utterances.append(
                {
                    "id": f"{path.stem}-{p}",
                    "speaker": c % 2,
                    "offset": offset,
                    "length": len(part),
                    "split": split,
                }
            )
            audio.append(part)
            offset += len(part)
    np.save(root / "audio.npy", np.concatenate(audio).astype(np.int16))
    index = {
        "version": 1,
        "sample_rate": 16000,
        "speakers": ["spk-a", "spk-b"],
        "utterances": utterances,
        "skipped": [],
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def tiny_train_config(path: str | Path, **train) -> Path:
    """configs/tiny.toml with its ``[train]`` table replaced by tiny's values plus ``train``."""
    text = (CONFIG_DIR / "tiny.toml").read_text()
    model_part, _, train_part = text.partition("[train]")
    values = {}
    for line in train_part.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            values[key] = value
    for key, value in train.items():
        values[key] = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
    body = "\n".join(f"{k} = {v}" for k, v in values.items())
    Path(path).write_text(f"{model_part}[train]\n{body}\n")
    return Path(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return Dataset(write_clip_dataset(tmp_path_factory.mktemp("clips")))


@pytest.fixture(scope="module")
def geometry():
    return Autoencoder(load_model_config("tiny")).geometry


def test_windows_start_at_every_phase_and_stay_inside_their_utterance(clips, geometry):
    lengths = split_lengths(clips, "train")
    n = 40
    sampler = WindowSampler(lengths, geometry, windows=64, predictions=n, seed=3)
    phases, utts = set(), set()
    for _ in range(8):
        _, windows = sampler.next()
        for w in windows:
            left, _, _ = geometry.padding(lengths[w.utt])
            assert left <= w.t0 < left + lengths[w.utt]
            assert 1 <= w.n <= n
            phases.add((w.t0 - left) % geometry.hop)
            utts.add(w.utt)
    assert phases == set(range(geometry.hop))
    assert utts == set(lengths)


def test_window_draw_is_a_pure_function_of_seed_epoch_and_index(clips, geometry):
    lengths = split_lengths(clips, "train")
    a = WindowSampler(lengths, geometry, windows=4, predictions=64, seed=1)
    b = WindowSampler(lengths, geometry, windows=4, predictions=64, seed=1)
    c = WindowSampler(lengths, geometry, windows=4, predictions=64, seed=2)
    assert [a.window(5, i) for i in range(20)] == [b.window(5, i) for i in range(20)]
    assert [a.window(5, i) for i in range(20)] != [c.window(5, i) for i in range(20)]
    assert [a.window(5, i) for i in range(20)] != [a.window(6, i) for i in range(20)]


def test_sampler_resumes_mid_epoch_with_the_same_windows(clips, geometry):
    lengths = split_lengths(clips, "train")
    a = WindowSampler(lengths, geometry, windows=1, predictions=64, seed=7)
    assert a.steps_per_epoch == len(lengths) > 2
    for _ in range(len(lengths) + 1):  # into the second epoch
        a.next()
    state = a.state_dict()
    assert state["epoch"] == 1 and state["step"] == 1
    b = WindowSampler(lengths, geometry, windows=1, predictions=64, seed=7)
    b.load_state_dict(state)
    assert [a.next() for _ in range(6)] == [b.next() for _ in range(6)]
    wrong_seed = WindowSampler(lengths, geometry, windows=1, predictions=64, seed=8)
    with pytest.raises(ValueError, match="seed"):
        wrong_seed.load_state_dict(state)


def test_every_train_utterance_is_visited_once_per_epoch(clips, geometry):
    lengths = split_lengths(clips, "train")
    sampler = WindowSampler(lengths, geometry, windows=1, predictions=64, seed=0)
    seen = [sampler.next()[1][0].utt for _ in range(sampler.steps_per_epoch)]
    assert sorted(seen) == sorted(lengths)
    assert sampler.state_dict()["epoch"] == 1


def test_ranks_take_disjoint_shares_of_the_single_rank_stream(clips, geometry):
    lengths = split_lengths(clips, "train")
    single = WindowSampler(lengths, geometry, windows=4, predictions=64, seed=5, world=1)
    ranks = [
        WindowSampler(lengths, geometry, windows=2, predictions=64, seed=5, rank=r, world=2)
        for r in range(2)
    ]
    for _ in range(5):
        epoch, expected = single.next()
        got = [ranks[r].next() for r in range(2)]
        assert [e for e, _ in got] == [epoch, epoch]
        assert got[0][1] + got[1][1] == expected


def test_loader_cuts_rows_from_the_padded_utterance_at_the_geometry_span(clips, geometry):
    loader = Loader(clips, geometry, seed=0)
    utt = split_lengths(clips, "train")
    u0, u1 = sorted(utt)[:2]
    left, _, _ = geometry.padding(utt[u0])
    end = left + utt[u0]
    windows = [Window(u0, left + 3, 50), Window(u1, left + 100, 64), Window(u0, end - 10, 64)]
    batch = loader.batch(windows, epoch=2, n=64)
    assert batch.n == 64
    assert batch.windows.n_valid.tolist() == [50, 64, 10]  # the last one ends with its utterance
    assert batch.windows.utt.tolist() == [u0, u1, u0]
    assert batch.windows.epoch == 2
    for row, w in enumerate(windows):
        u = Utterance.prepare(torch.from_numpy(clips.wave(w.utt)), geometry, w.utt)
        span = geometry.span(w.t0, w.t0 + int(batch.windows.n_valid[row]), u.n_frames)
        assert int(batch.windows.start[row]) == span.start
        assert int(batch.windows.speaker[row]) == clips.records[w.utt].speaker
        length = span.stop - span.start
        assert torch.equal(batch.wave[row, :length], u.padded[span.start : span.stop])
    model = Autoencoder(load_model_config("tiny"))
    out = model(batch.wave, batch.windows, batch.n)
    assert out.mask.sum().item() == batch.n_valid() == 124


def test_validation_windows_are_fixed_by_the_seed(clips, geometry):
    lengths = split_lengths(clips, "valid")
    a = fixed_windows(lengths, geometry, 6, 64, seed=0)
    assert a == fixed_windows(lengths, geometry, 6, 64, seed=0)
    assert len(a) == 6 and {w.utt for w in a} <= set(lengths)
    assert fixed_windows({}, geometry, 6, 64, seed=0) == []
