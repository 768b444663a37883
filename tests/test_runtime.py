"""The torch-free engine: equal to PyTorch teacher-forced, chunked encoding equal to whole-file
encoding, seeded decoding, input validation, and no torch anywhere in its imports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx_export import export_model, load_checkpoint
from model.autoencoder import Autoencoder
from tests.conftest import fit_to_test_clips
from tests.test_export import clip, make_checkpoint, teacher_forced_reference
from training.config import load_model_config
from vqwavenet import BUNDLED_MODEL, Codec, DecodeRequest, ModelDirError, folding, steps
from vqwavenet.audio import mulaw_decode
from vqwavenet.folding import Fold

ROOT = Path(__file__).resolve().parent.parent
# What int8 may cost the bundled model, teacher-forced (nats/sample): a thousandth of its
# cross-entropy; quantising the output head as well costs it more than this.
BUNDLED_INT8_BOUND = 4e-3


def _export(root: Path, config: str):
    ckpt = make_checkpoint(root / f"{config}.pt", config, seed=7)
    model, speakers, _ = load_checkpoint(ckpt)
    export_model(model, speakers, root / config)
    return model, root / config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("rt"), "tiny")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("rt"), "small")


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """``tiny`` fitted to the test clips (`fit_to_test_clips`), exported: its codes vary from
    frame to frame, so a frame encoded from the wrong samples changes them. The random-weight
    ``tiny`` maps nearly every frame to one code, and a test on it cannot see that."""
    torch.manual_seed(7)
    model = fit_to_test_clips(Autoencoder(load_model_config("tiny")))
    speakers = [f"spk{i}" for i in range(model.cfg.decoder.n_speakers)]
    out = tmp_path_factory.mktemp("rt") / "varied"
    export_model(model, speakers, out)
    return model, out


def assert_codes_vary(codes: np.ndarray) -> None:
    """Many distinct codes, and most frames' code differs from the next one's: a frame read
    from its neighbour's samples (or one sample late) then changes the codes."""
    assert len(np.unique(codes)) >= 8, np.unique(codes)
    assert (np.diff(codes) != 0).mean() > 0.5, codes


def tie_gaps(model, padded: np.ndarray) -> np.ndarray:
    """Second-nearest minus nearest squared distance per frame (float64) ``[F]``."""
    with torch.no_grad():
        z = model.encoder(model.features(torch.from_numpy(padded)[None]))[0].T.double()
        d = torch.cdist(z, model.quantizer.codebook.double()) ** 2
        two = d.topk(2, largest=False).values
    return (two[:, 1] - two[:, 0]).numpy()


def test_runtime_and_its_imports_run_without_torch(tiny):
    _, out = tiny
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import vqwavenet
        codec = vqwavenet.Codec({str(out)!r})
        x = 0.1 * np.sin(np.arange(6000) / 7.0).astype(np.float32)
        codes = codec.encode(x, 16000, chunk_frames=5)
        y = codec.decode(codes, speaker="spk1", seed=3, n_samples=len(x), segment=1500)
        z = codec.resynthesize((x * 32767).astype(np.int16), 16000, speaker=0)
        nll = codec.cross_entropy([x[:500]])
        assert y.shape == x.shape == z.shape and np.isfinite(nll)
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("config", ["tiny", "small"])
def test_runtime_teacher_forced_matches_pytorch_logits(request, config):
    """Thousands of incremental ONNX steps, ring buffers in numpy (small: dilation 512 wraps)."""
    model, out = request.getfixturevalue(config)
    n = 3000
    wave = clip("auth-incorrect")[20000 : 20000 + n]
    ref, _, _, _ = teacher_forced_reference(model, torch.from_numpy(wave), speaker=1)
    got = Codec(out, workers=1).teacher_forced([wave], speaker=1)[0]
    assert got.shape == tuple(ref.shape)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0)


def test_teacher_forced_streams_are_independent_of_their_batch(tiny):
    """Two utterances of different lengths in one batch (different conditioning offsets and
    ring rows) give what each gives alone."""
    _, out = tiny
    codec = Codec(out, workers=1)
    a, b = clip("activated", 2500), clip("agent-newlocation", 4100)
    both = codec.teacher_forced([a, b], speaker=2)
    for wave, got in zip((a, b), both):
        alone = codec.teacher_forced([wave], speaker=2)[0]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)


def test_teacher_forced_on_given_codes(tiny):
    """``codes=``: an utterance's own codes give the default's outputs, other codes change
    them, and code arrays of the wrong count, length or range are refused; ``progress`` is
    called up to the end."""
    _, out = tiny
    codec = Codec(out, workers=1)
    a, b = clip("activated", 2500), clip("agent-newlocation", 4100)
    own = [codec.encode(a), codec.encode(b)]
    default = codec.teacher_forced([a, b], speaker=1, logits=False)
    calls = []
    given = codec.teacher_forced(
        [a, b], speaker=1, logits=False, codes=own, progress=lambda *c: calls.append(c)
    )
    assert calls and calls[-1][0] == calls[-1][1] > 0
    for d, g in zip(default, given):
        np.testing.assert_array_equal(g, d)
    assert codec.cross_entropy([a, b], 1, codes=own) == codec.cross_entropy([a, b], 1)
    other = [(c + 1) % codec.codebook_size for c in own]
    shifted = codec.teacher_forced([a, b], speaker=1, logits=False, codes=other)
    assert not np.allclose(shifted[1], default[1])
    with pytest.raises(ValueError, match="1 code arrays for 2 utterances"):
        codec.teacher_forced([a, b], codes=own[:1])
    with pytest.raises(ValueError, match=r"codes\[1\].*frames"):
        codec.teacher_forced([a, b], codes=[own[0], own[1][:-1]])
    with pytest.raises(ValueError, match="must lie in"):
        codec.teacher_forced([a], codes=[np.full_like(own[0], codec.codebook_size)])
    with pytest.raises(ValueError, match="integer"):
        codec.teacher_forced([a], codes=[own[0].astype(np.float32)])


@pytest.mark.parametrize("n", [1, 4000, 17024, 45000])
def test_chunked_encoding_equals_whole_file_encoding(varied, n):
    """Whole-file codes equal PyTorch's, and every chunking gives them, on a model whose codes
    vary (asserted), so a chunk that reads its samples one sample or one frame late fails."""
    model, out = varied
    codec = Codec(out)
    wave = np.concatenate([clip("activated"), clip("auth-incorrect")])[:n]
    left, right, n_frames = codec.geometry.padding(n)
    padded = np.pad(wave, (left, right))
    whole = codec.encode(wave, chunk_frames=n_frames + 1, batch=1)
    assert whole.shape == (n_frames,)
    if n >= 4000:
        assert_codes_vary(whole)
    gaps = tie_gaps(model, padded)
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(padded)[None])[0].numpy()
    assert ((whole == ref) | (gaps < 1e-5)).all()
    for chunk, batch in ((1, 1), (3, 2), (7, 4), (64, 3)):
        codes = codec.encode(wave, chunk_frames=chunk, batch=batch)
        assert codes.shape == whole.shape
        assert ((codes == whole) | (gaps < 1e-5)).all(), (chunk, batch)


def test_encode_mixes_down_and_resamples(varied):
    """On a model whose codes vary (asserted): a stereo file is encoded as the mean of its
    channels (equal channels: the mono codes; unequal ones: not one channel's)."""
    _, out = varied
    codec = Codec(out)
    x = clip("activated", 8000)
    codes = codec.encode(np.stack([x, x], 1), 16000)
    assert_codes_vary(codes)
    assert (codes == codec.encode(x)).all()
    quiet = np.stack([x, 0.5 * x], 1)  # mean: 0.75 x, the same float32 values
    mixed = codec.encode(quiet, 16000)
    assert (mixed == codec.encode(0.75 * x)).all()
    assert (mixed != codes).any() and (mixed != codec.encode(0.5 * x)).any()
    half = codec.encode(x[::2], 8000)  # 8 kHz input: resampled to the model's 16 kHz
    assert half.shape == (codec.geometry.padding(8000)[2],)


def test_same_seed_same_audio_and_another_seed_differs(tiny):
    _, out = tiny
    codec = Codec(out, workers=2)
    codec.streams_per_worker = 2  # six segments over two worker threads
    codes = codec.encode(clip("agent-newlocation", 12000))
    one = codec.decode(codes, speaker=1, seed=11, n_samples=12000, segment=2000, overlap=200)
    again = codec.decode(codes, speaker=1, seed=11, n_samples=12000, segment=2000, overlap=200)
    other = codec.decode(codes, speaker=1, seed=12, n_samples=12000, segment=2000, overlap=200)
    assert one.shape == (12000,) and one.dtype == np.float32
    assert np.array_equal(one, again)
    assert np.mean(one != other) > 0.5
    assert np.isfinite(one).all() and np.abs(one).max() <= 1.0


def test_step_batches_kept_between_calls_change_no_result():
    """A codec keeps its step batches (rings, bindings) between calls and does not clear the
    rings: every row's start writes what it reads. Poisoning the kept rings with NaN leaves the
    next call's audio bit-equal (int8). Control: starts that leave one ring slot they read
    unwritten (each layer's oldest lag of the warm-up state dropped) are changed by the same
    poison."""
    out = BUNDLED_MODEL
    codec = Codec(out, workers=1, int8=True)
    codes = codec.encode(clip("agent-newlocation", 6000))
    other = codec.encode(clip("activated", 9000))
    first = codec.decode(codes, speaker=1, seed=4, n_samples=6000, segment=2000)
    (batch,) = codec.engine.batches
    codec.decode(other, speaker=2, seed=5, n_samples=9000, segment=4500)  # 2 of its 3 rows
    assert codec.engine.batches == [batch]  # the same batch, reused
    batch.store[:] = np.nan
    again = codec.decode(codes, speaker=1, seed=4, n_samples=6000, segment=2000)
    np.testing.assert_array_equal(first, again)
    codec.release_buffers()
    assert codec.engine.batches == []

    codec = Codec(out, workers=1, int8=True, warmup="exact")  # every start from warm_rings
    engine, warm = codec.engine, codec.engine.warm_rings
    needs = [(codec.kernel - 1) * d for d in codec.dilations]
    kept = np.ones(sum(needs), dtype=bool)
    kept[np.cumsum([0] + needs[:-1])] = False  # each layer's oldest lag, its first step's tap
    engine.state_layout = tuple(a[kept] for a in engine.state_layout)
    engine.warm_rings = lambda *args: warm(*args)[kept]
    clean = codec.decode(codes, speaker=1, seed=4, n_samples=6000, segment=2000)
    engine.batches[0].store[:] = np.nan
    poisoned = codec.decode(codes, speaker=1, seed=4, n_samples=6000, segment=2000)
    assert np.mean(clean != poisoned) > 0.2


def test_decode_many_batches_requests_of_different_lengths(tiny):
    _, out = tiny
    codec = Codec(out)
    reqs = [
        DecodeRequest(codec.encode(clip("activated", n)), speaker=s, n_samples=n, seed=s)
        for n, s in ((3000, 0), (9000, 2), (700, 1))
    ]
    waves = codec.decode_many(reqs, segment=2500, overlap=160)
    assert [len(w) for w in waves] == [3000, 9000, 700]
    assert all(np.isfinite(w).all() and np.abs(w).max() > 0 for w in waves)
    seen = []
    codec.decode(reqs[0].codes, n_samples=3000, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 3000
    assert codec.decode_many([]) == []  # nothing to decode (a script's empty folder)


def test_requests_decode_alike_alone_and_batched_in_fp32_and_int8(tmp_path):
    """Rows never meet: a request decoded among others equals it decoded alone, sample for
    sample (what ``app.cli --batch-seconds`` relies on), in fp32 and in int8, whose step
    scales each row's activations on its own. The control, an int8 step with one scale per
    call whose batch changes the samples, is in tests/test_int8_rows.py."""
    ckpt = make_checkpoint(tmp_path / "m.pt", "tiny", seed=5)
    model, speakers, _ = load_checkpoint(ckpt)
    export_model(model, speakers, tmp_path / "q", int8=True)
    for int8 in (False, True):
        codec = Codec(tmp_path / "q", int8=int8)
        reqs = [
            DecodeRequest(codec.encode(clip(name, n)), speaker=s, n_samples=n, seed=s + 3)
            for name, n, s in (("activated", 6000, 0), ("agent-newlocation", 9000, 1))
        ]
        together = codec.decode_many(reqs, segment=2500, overlap=160)
        alone = [codec.decode_many([r], segment=2500, overlap=160)[0] for r in reqs]
        same = [np.array_equal(t, a) for t, a in zip(together, alone)]
        assert same == [True] * 2, (int8, same)


def test_default_sample_count_is_the_most_the_codes_hold(tiny):
    _, out = tiny
    codec = Codec(out)
    for n_frames in (5, 40, 333):
        n = codec.max_samples(n_frames)
        assert codec.geometry.padding(n)[2] == n_frames
        assert codec.geometry.padding(n + 1)[2] > n_frames
    codes = codec.encode(clip("activated", 5000))
    assert len(codec.decode(codes, seed=0)) == codec.max_samples(len(codes))


def test_decode_rejects_invalid_requests(tiny):
    _, out = tiny
    codec = Codec(out)
    codes = codec.encode(clip("activated", 3000))
    with pytest.raises(ValueError, match="codes must lie"):
        codec.decode(np.full_like(codes, codec.codebook_size))
    with pytest.raises(ValueError, match="do not encode"):
        codec.decode(codes, n_samples=30000)
    with pytest.raises(ValueError, match="unknown speaker"):
        codec.decode(codes, speaker="nobody")
    with pytest.raises(ValueError, match="1-D integer"):
        codec.decode(codes.astype(np.float32))


def test_a_voice_named_by_digits_is_that_voice_not_an_index(tiny):
    """Names win over digit strings; other digit strings (and ints) are indices."""
    _, out = tiny
    codec = Codec(out)
    n = codec.meta["model_config"]["decoder"]["n_speakers"]
    assert n >= 2
    codec.speakers = ["Ann", "0"] + codec.speakers[2:]
    assert codec.speaker_index("0") == 1  # the voice named "0"
    assert codec.speaker_index(0) == 0 and codec.speaker_index("Ann") == 0
    assert codec.speaker_index("1") == 1  # no voice of that name: an index
    with pytest.raises(ValueError, match="outside"):
        codec.speaker_index(str(n))
    with pytest.raises(ValueError, match="unknown speaker"):
        codec.speaker_index("\u00b2")  # a digit to str.isdigit, not an index


def test_codec_rejects_a_tampered_model_dir(tiny, tmp_path):
    _, out = tiny
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / "conditioner.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bad / "conditioner.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="sha256"):
        Codec(bad)
    with pytest.raises(ModelDirError, match="missing decoder_step.int8.onnx"):
        Codec(out, int8=True)
    with pytest.raises(ModelDirError, match="no model.json"):
        Codec(tmp_path)


def test_codec_audio_input_goes_through_load_audio(tiny):
    """`Codec.to_model_rate` (behind encode and resynthesize) converts as `load_audio` does:
    channels mixed in either orientation, integer PCM scaled, resampled; NaN refused."""
    _, out = tiny
    codec = Codec(out)
    x = clip("activated", 4000)[::2]  # 2000 samples at 8 kHz
    mono = codec.to_model_rate(x, 8000)
    assert mono.shape == (4000,) and mono.dtype == np.float32
    np.testing.assert_array_equal(codec.to_model_rate(np.stack([x, x], 1), 8000), mono)
    np.testing.assert_array_equal(codec.to_model_rate(np.stack([x, x]), 8000), mono)
    pcm = np.round(x * 32768).clip(-32768, 32767).astype(np.int16)
    np.testing.assert_allclose(codec.to_model_rate(pcm, 8000), mono, atol=1e-4)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.full(1600, np.nan, np.float32))


def test_resynthesize_returns_the_input_length_at_the_model_rate(tiny):
    _, out = tiny
    codec = Codec(out)
    x = clip("activated", 4000)[::2]  # 2000 samples at 8 kHz
    y = codec.resynthesize(x, 8000, speaker="spk2", seed=4)
    assert y.shape == (4000,) and np.isfinite(y).all()


def test_decode_stream_chunks_concatenate_to_decode(tiny):
    """The batch schedule runs `decode`'s: its chunks are exactly the decoded audio, and the
    first one arrives while later segments are still being generated."""
    _, out = tiny
    codec = Codec(out, workers=2)
    codec.streams_per_worker = 2
    codes = codec.encode(clip("agent-newlocation", 12000))
    kwargs = dict(speaker=2, seed=5, n_samples=12000, segment=2000, overlap=200, burn_in=300)
    whole = codec.decode(codes, **kwargs)
    seen = []
    chunks = list(
        codec.decode_stream(
            codes, **kwargs, interval=0.01, progress=lambda d, t: seen.append(d), schedule="batch"
        )
    )
    assert len(chunks) > 2
    assert np.array_equal(np.concatenate(chunks), whole)
    assert len(chunks[0]) < 2000  # the first segment's samples, before it finished
    assert seen == sorted(seen)


def test_decode_stream_refuses_an_unknown_schedule(tiny):
    _, out = tiny
    codec = Codec(out)
    with pytest.raises(ValueError, match="schedule"):
        next(codec.decode_stream(np.zeros(4, np.int64), schedule="fast"))


def test_final_prefix_waits_for_the_next_segment_head():
    bounds = [(0, 100), (100, 200), (200, 300)]  # overlap 10: segments 1, 2 start 10 early
    fold = Fold(300, bounds, overlap=10, burn_in=0, first=0)
    prefix = folding.final_prefix
    assert prefix(fold, [40, 0, 0]) == 40
    assert prefix(fold, [100, 0, 50]) == 90  # segment 1's head is still missing
    assert prefix(fold, [100, 4, 0]) == 94
    assert prefix(fold, [100, 110, 9]) == 199
    assert prefix(fold, [100, 110, 110]) == 300
    # A burn-in of 30: segments 1, 2 start 40 early; what they burn finalises nothing.
    burnt = Fold(300, bounds, overlap=10, burn_in=30, first=0)
    assert prefix(burnt, [100, 0, 0]) == 90
    assert prefix(burnt, [100, 29, 0]) == 90
    assert prefix(burnt, [100, 34, 0]) == 94
    assert prefix(burnt, [100, 140, 39]) == 199
    assert prefix(burnt, [100, 140, 140]) == 300


def test_burnt_in_samples_never_reach_the_waveform(tiny):
    """Later segments start ``burn_in + overlap`` samples early; their first ``burn_in``
    samples are dropped, the next ``overlap`` cross-faded (the control: changing those changes
    the waveform), and composing in pieces gives the whole."""
    _, out = tiny
    codec = Codec(out)
    fold = Fold(300, [(0, 100), (100, 200), (200, 300)], overlap=10, burn_in=30, first=0)
    rng = np.random.default_rng(0)
    segs = [rng.integers(1, codec.q, n) for n in (100, 140, 140)]
    whole = folding.compose(fold, segs, 0, 300, codec.q)
    burnt = [s.copy() for s in segs]
    for s in burnt[1:]:
        s[:30] = 0
    np.testing.assert_array_equal(folding.compose(fold, burnt, 0, 300, codec.q), whole)
    faded = [s.copy() for s in segs]
    faded[1][30:40] = 0
    changed = folding.compose(fold, faded, 0, 300, codec.q) != whole
    assert changed[90:100].all() and not changed[:90].any() and not changed[100:].any()
    # Where one segment plays alone, the waveform is its samples.
    np.testing.assert_array_equal(whole[:90], mulaw_decode(segs[0][:90], codec.q))
    np.testing.assert_array_equal(whole[100:190], mulaw_decode(segs[1][40:130], codec.q))
    pieces = [
        folding.compose(fold, segs, lo, hi, codec.q) for lo, hi in ((0, 95), (95, 205), (205, 300))
    ]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def composed_crossfade(overlap: int, q: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The weights `folding.compose` gives a segment's fade-out and the next one's fade-in over
    their ``overlap`` samples, read from what it makes of constant segments: its output is
    linear in each segment's decoded samples (classes 20 and 235 decode to about -0.4 and
    +0.4, so that no sum reaches the clipping at 1)."""
    burn_in = 5
    fold = Fold(200, [(0, 100), (100, 200)], overlap=overlap, burn_in=burn_in, first=0)
    a, b = 20, 235
    va, vb = mulaw_decode(np.array([a, b]), q).astype(np.float64)

    def faded(c0: int, c1: int) -> np.ndarray:
        segs = [np.full(100, c0), np.full(100 + overlap + burn_in, c1)]
        return folding.compose(fold, segs, 100 - overlap, 100, q).astype(np.float64)

    both_a = faded(a, a)
    return (faded(b, a) - both_a) / (vb - va), (faded(a, b) - both_a) / (vb - va)


@pytest.mark.parametrize("overlap", [1, 7, 64])
def test_crossfade_weights_are_equal_power_ramps(overlap):
    """The cross-fade keeps the power of uncorrelated segments: at every overlap sample the
    fade-out and fade-in weights have squares summing to 1 (a linear cross-fade's sum to 1
    themselves, a dip of up to 3 dB in power), the fade-in rises and the fade-out falls
    strictly, and each is the other reversed."""
    fade_out, fade_in = composed_crossfade(overlap)
    assert fade_in.shape == fade_out.shape == (overlap,)
    np.testing.assert_allclose(fade_in**2 + fade_out**2, 1.0, rtol=0, atol=1e-6)
    assert ((fade_in > 0) & (fade_in < 1) & (fade_out > 0) & (fade_out < 1)).all()
    assert (np.diff(fade_in) > 0).all() and (np.diff(fade_out) < 0).all()
    np.testing.assert_allclose(fade_in, fade_out[::-1], rtol=0, atol=1e-6)


def test_rows_take_queued_streams_when_the_batch_is_full(tiny):
    """More streams than rows: rows pick up the queue's next stream as each finishes, and
    every stream still gives what it gives alone."""
    _, out = tiny
    codec = Codec(out, workers=1)
    codec.max_rows = 2
    waves = [clip("activated", 2500), clip("agent-newlocation", 4100), clip("auth-incorrect", 900)]
    queued = codec.teacher_forced(waves, speaker=1)
    for wave, got in zip(waves, queued):
        alone = codec.teacher_forced([wave], speaker=1)[0]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)


def test_a_draining_batch_drops_its_idle_rows(tiny, monkeypatch):
    """Once the queue is empty and half the rows are idle, the batch keeps only its busy rows
    (their rings moved to the front); what every stream gives is unchanged, in free-running
    decoding and teacher-forced. Control: the compaction happened, more than once."""
    kept = []
    keep = steps.StepBatch.keep
    monkeypatch.setattr(
        steps.StepBatch, "keep", lambda self, r: (kept.append(len(r)), keep(self, r))
    )
    _, out = tiny
    codec = Codec(out, workers=1)
    waves = [clip("activated", n) for n in (600, 900, 1500)] + [clip("agent-newlocation", 4100)]
    together = codec.teacher_forced(waves, speaker=1)
    assert kept == [2, 1]
    for wave, got in zip(waves, together):
        np.testing.assert_allclose(got, codec.teacher_forced([wave], speaker=1)[0], atol=1e-5)
    kept.clear()
    reqs = [DecodeRequest(codec.encode(w), 1, len(w), seed=3) for w in waves]
    decoded = codec.decode_many(reqs, segment=10**6)
    assert kept == [2, 1]
    codec.max_rows = 1  # one stream at a time: never idle rows
    for req, got in zip(reqs, decoded):
        np.testing.assert_array_equal(got, codec.decode_many([req], segment=10**6)[0])
    assert kept == [2, 1]


@pytest.mark.parametrize("block", [1, 7])
def test_steps_run_in_blocks_give_what_single_steps_give(tiny, monkeypatch, block):
    """`StepEngine`'s blocks gathers a block's inputs before its steps and scatters the outputs
    after: any block length gives the same samples, NLLs and logits, with streams loaded from
    the queue and conditioning changes inside blocks (fp32: a row's values do not depend on
    the rows beside it). Control, by hand: a block that applies conditioning changes at its
    first step only fails this test (the random tiny model's own codes give one conditioning
    for every frame, so the decoded codes are random)."""
    _, out = tiny
    codec = Codec(out, workers=1)
    codec.max_rows = 2  # three streams for two rows: one is loaded when another ends
    waves = [clip("activated", 2500), clip("agent-newlocation", 4100), clip("auth-incorrect", 900)]
    codes = np.random.default_rng(0).integers(0, codec.codebook_size, 300)  # varied frames
    reqs = [DecodeRequest(codes[:n], 1, seed=3) for n in (150, 300, 60)]

    def everything():
        return (
            codec.decode_many(reqs, segment=1500)
            + codec.teacher_forced(waves, speaker=2)
            + codec.teacher_forced(waves[2:], speaker=2, logits=True)
        )

    blocked = everything()
    monkeypatch.setattr(steps, "BLOCK", block)
    for got, want in zip(everything(), blocked, strict=True):
        np.testing.assert_array_equal(got, want)


def test_each_worker_steps_on_its_own_session(tiny):
    """Two workers run their batches on two step sessions (sharing one made int8 decodes
    erratic, `StepEngine.sessions`), keep one idle batch each, and decode what one worker decodes
    (fp32). Control: a codec whose workers share a session keeps one batch."""
    _, out = tiny
    codes = np.random.default_rng(0).integers(0, 16, 600)  # five segments of 2000
    one = Codec(out, workers=1).decode(codes, 1, seed=2, segment=2000)
    codec = Codec(out, workers=2)
    assert codec.workers_for(2) == 2
    np.testing.assert_array_equal(codec.decode(codes, 1, seed=2, segment=2000), one)
    sessions = {id(b.session) for b in codec.engine.batches}
    assert len(codec.engine.batches) == 2 and sessions == {id(s) for s in codec.engine.sessions}
    codec.release_buffers()
    codec.engine.sessions = [codec.engine.sessions[0]] * 2
    np.testing.assert_array_equal(codec.decode(codes, 1, seed=2, segment=2000), one)
    assert len(codec.engine.batches) == 1


def test_steady_rings_are_a_fixed_point_of_the_step_on_silence(tiny):
    """`StepEngine.steady`: one more step on silence under the same conditioning, each tap fed
    from the rings, writes the rings' own values back. Control: the state one call short
    (``L - 1`` calls) is not yet the fixed point."""
    from vqwavenet.model_dir import step_names

    _, out = tiny
    codec = Codec(out, workers=1)
    cond = codec.condition(codec.encode(clip("activated", 4000)), 1)[5]
    zero = 128
    x = codec.engine.steady(cond[None], zero)[0]  # each layer's constant input [L, R]

    def step(inputs):
        names = step_names(codec.n_layers, codec.kernel)
        feeds = {"prev": np.array([zero]), "noise": np.zeros(1, np.float32)}
        for name, (i, *_rest) in zip(names["inputs"][2:], codec.engine.taps):
            feeds[name] = inputs[i][None]
        for i, c in enumerate(cond.reshape(codec.n_layers, -1)):
            feeds[f"cond.{i}"] = c[None]
        return np.concatenate(codec.engine.sessions[0].run(names["outputs"][2:], feeds))

    np.testing.assert_allclose(step(x), x, atol=1e-5, rtol=0)
    rows = codec.condition(codec.encode(clip("activated", 4000)), 1)[[5, 0, 9]]
    together = codec.engine.steady(rows, zero)  # several rows in one batch, as a batch loads them
    for row, got in zip(rows, together):
        np.testing.assert_allclose(got, codec.engine.steady(row[None], zero)[0], atol=1e-5, rtol=0)
    once = step(np.zeros_like(x))
    np.testing.assert_allclose(once[0], x[0], atol=1e-6, rtol=0)
    assert np.abs(step(once) - once).max() > 1e-3


@pytest.mark.parametrize("warmup", ["steady", "primed"])
def test_steady_and_primed_starts_start_only_later_segments(warmup):
    """With ``warmup="steady"`` or ``"primed"`` (the default where the model has a primer) a
    file's first segment still starts exactly (its samples equal those of
    ``warmup="exact"``); later segments start from the steady or primed rings, so their
    samples differ (the control that the mode is in effect). The bundled model, because in
    `tiny` the warm-up window lies within one conditioning frame, where the exact warm-up
    reaches the steady state itself."""
    out = BUNDLED_MODEL
    steady, exact = Codec(out, workers=1, warmup=warmup), Codec(out, workers=1, warmup="exact")
    assert Codec(out).warmup == "primed"
    codes = steady.encode(clip("agent-newlocation", 6000))
    a = steady.decode(codes, speaker=1, seed=4, n_samples=6000, segment=2000, burn_in=960)
    b = exact.decode(codes, speaker=1, seed=4, n_samples=6000, segment=2000, burn_in=960)
    np.testing.assert_array_equal(a[: 2000 - steady.hop], b[: 2000 - steady.hop])
    assert np.mean(a[2500:] != b[2500:]) > 0.2
    with pytest.raises(ValueError, match="warmup"):
        Codec(out, warmup="cold")
    again = steady.decode(codes, speaker=1, seed=4, n_samples=6000, segment=2000, burn_in=960)
    np.testing.assert_array_equal(a, again)  # reproducible


def test_automatic_segments_and_burn_in(tiny):
    """Automatic segments go down to a quarter second from silent starts (one 8 s file: 32
    segments), with exact starts to the receptive field too, and to an eighth from primed
    ones; ``min_segment_s`` overrides that; a batch with enough audio gets longer segments.
    Later segments burn 60 ms from silence and 10 ms from the primer unless told otherwise.
    (This tiny export has no primer, so it starts from silence by default.)"""
    _, out = tiny
    steady, exact = Codec(out, workers=2), Codec(out, workers=2, warmup="exact")
    sr = steady.sample_rate
    assert steady.warmup == "steady" and steady.min_segment == sr // 4
    primed = Codec(BUNDLED_MODEL, workers=2)
    assert (primed.min_segment, primed.burn_in) == (sr // 8, round(0.01 * sr))
    n = 8 * sr
    assert len(folding.segments(n, primed.auto_segment(n), primed.hop, primed.burn_in)) == 64
    assert exact.min_segment == max(exact.context, sr // 4)
    assert Codec(out, min_segment_s=0.125).min_segment == sr // 8
    assert len(folding.segments(n, steady.auto_segment(n), steady.hop, steady.burn_in)) == 32
    assert len(folding.segments(n, exact.auto_segment(n), exact.hop, exact.burn_in)) == 32
    many = 4 * steady.workers * steady.target_streams * sr // 4
    assert steady.auto_segment(many) == 4 * (sr // 4)
    assert steady.burn_in == exact.burn_in == round(0.06 * sr)
    assert Codec(out, burn_in=0).burn_in == 0
    with pytest.raises(ValueError, match="burn_in"):
        steady.decode(steady.encode(clip("agent-newlocation", 4000)), burn_in=-1)
    with pytest.raises(ValueError, match="burn_in"):  # teacher forcing checks it too
        steady.folded_nll([clip("agent-newlocation", 4000)], segment=2000, burn_in=-1)


def test_parallel_warm_up_equals_stepped_warm_up(tiny):
    """Segments start from `decoder_warmup.onnx`'s rings: teacher-forced outputs equal those
    of stepping through the warm-up."""
    _, out = tiny
    codec = Codec(out, workers=1)
    assert codec.parallel_warmup
    waves = [clip("activated", 2500), clip("agent-newlocation", 4100)]
    fast = codec.teacher_forced(waves, speaker=1)
    codec.parallel_warmup = False
    stepped = codec.teacher_forced(waves, speaker=1)
    for a, b in zip(fast, stepped):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_sampling_through_a_stepped_warm_up_equals_the_parallel_one():
    """Generation, not only teacher forcing: rows stepping through their zero-input warm-up
    keep the zero class as input (`_step_loop` copies a draw only to rows that generate).
    Control: feeding every row its draw changes 98 % of the samples. The two warm-ups differ
    by float rounding, so a draw whose uniform falls within that rounding of a class boundary
    can flip, and the exact warm-up carries the flip into the next segment: the bundled model
    has one such near tie at sample 2680 of this decode in segments of 3000 samples, none in
    the nine segments of 1000 used here."""
    codec = Codec(BUNDLED_MODEL, workers=1, warmup="exact")
    codes = codec.encode(clip("activated", 9000))
    parallel = codec.decode(codes, speaker=1, seed=3, n_samples=9000, segment=1000)
    codec.parallel_warmup = False
    stepped = codec.decode(codes, speaker=1, seed=3, n_samples=9000, segment=1000)
    np.testing.assert_array_equal(parallel, stepped)


def test_a_model_dir_of_an_older_format_asks_for_a_re_export(tiny, tmp_path):
    _, out = tiny
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "model.json").read_text())
    meta["version"] = 1
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="re-export"):
        Codec(old)


@pytest.mark.parametrize("schedule", ["batch", "playback"])
def test_closing_a_decode_stream_stops_its_workers(tiny, schedule):
    """A consumer that goes away (a browser tab closed mid-decode) must not leave generation
    running: closing the generator stops the workers within a step, and returns only once
    they have stopped (a script may exit right after; a worker inside onnxruntime at exit
    aborts the process). The playback schedule stops inside its second wave."""
    _, out = tiny
    codec = Codec(out, workers=2)
    codec.streams_per_worker = 1
    codec.first_wave = 1
    codes = np.random.default_rng(0).integers(0, codec.codebook_size, 24000)  # 24 segments
    stream = codec.decode_stream(codes, seed=1, segment=16000, interval=0.01, schedule=schedule)
    first = next(stream)
    assert 0 < len(first) < codec.max_samples(len(codes))
    assert any(t.name.startswith("vqwavenet-") for t in threading.enumerate())
    started = time.monotonic()
    stream.close()  # the control: the whole decode takes 1.8 s (batch) or 7 s (playback)
    assert time.monotonic() - started < 1
    assert not any(t.name.startswith("vqwavenet-") for t in threading.enumerate())


def test_int8_engine_uses_the_int8_warm_up_and_stays_close(tmp_path):
    """``--int8`` also quantises the warm-up graph; the int8 engine loads it and its
    teacher-forced outputs stay close to fp32 (the export's quality check measures the CE)."""
    ckpt = make_checkpoint(tmp_path / "m.pt", "tiny", seed=7)
    model, speakers, _ = load_checkpoint(ckpt)
    export_model(model, speakers, tmp_path / "q", int8=True)
    fp32, int8 = Codec(tmp_path / "q"), Codec(tmp_path / "q", int8=True)
    assert int8.engine.warm_path.name == "decoder_warmup.int8.onnx"
    assert fp32.engine.warm_path.name == "decoder_warmup.onnx"
    wave = clip("activated", 3000)
    a, b = fp32.cross_entropy([wave]), int8.cross_entropy([wave])
    assert a != b and abs(a - b) < 0.05


def test_folded_nll_recovers_full_context_after_one_receptive_field(tiny):
    """A segment started from silence sees the true past only after ``wavenet_context``
    samples: from then on (and everywhere once the overlap covers it) its teacher-forced NLL
    equals full context; just after a segment start it differs (the control)."""
    _, out = tiny
    codec = Codec(out, workers=1)
    wave = clip("agent-newlocation", 6000)
    full = codec.teacher_forced([wave], speaker=1, logits=False)[0]
    one = codec.folded_nll([wave], speaker=1, segment=len(wave) + 1)[0]
    np.testing.assert_allclose(one, full, atol=1e-5, rtol=0)
    ctx = codec.context
    starts = [a for a, _ in folding.segments(len(wave), 1000, 0)[1:]]
    cold = codec.folded_nll([wave], speaker=1, segment=1000, overlap=0, burn_in=0)[0]
    settled = np.ones(len(wave), dtype=bool)
    for a in starts:
        settled[a : a + ctx] = False
    np.testing.assert_allclose(cold[settled], full[settled], atol=1e-5, rtol=0)
    assert np.abs(cold[~settled] - full[~settled]).max() > 1e-3
    warm = codec.folded_nll([wave], speaker=1, segment=1000, overlap=ctx, burn_in=0)[0]
    np.testing.assert_allclose(warm, full, atol=1e-5, rtol=0)
    # A burn-in and an overlap that cover the receptive field together, and a burn-in alone.
    for overlap, burn_in in ((ctx // 2, ctx - ctx // 2), (0, ctx)):
        assert folding.segments(len(wave), 1000, overlap, burn_in) == folding.segments(
            len(wave), 1000, 0
        )
        burnt = codec.folded_nll([wave], speaker=1, segment=1000, overlap=overlap, burn_in=burn_in)[
            0
        ]
        np.testing.assert_allclose(burnt, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "needs",
    [[2**i for i in range(10)] * 2, [1, 2, 4, 8] * 2, [3, 5, 7, 11, 13], [1], [6, 6, 9]],
)
def test_ring_layout_never_reads_the_slot_it_writes(needs):
    """Every ring is longer than the inputs it must hold (reads at lags 1 .. need, the write
    at lag 0, all modulo its size) and divides the period, so step ``s``'s bindings equal
    step ``s + period``'s."""
    period, sizes = steps.ring_layout(needs)
    for need, size in zip(needs, sizes):
        assert size > need and period % size == 0
        assert 0 not in {lag % size for lag in range(1, need + 1)}


def test_ring_layout_for_the_shipped_dilations():
    """Dilations 1 ... 512 twice: period 520 and 2112 slots, against 768 and 3070 when each
    ring was 1.5x its need."""
    period, sizes = steps.ring_layout([2**i for i in range(10)] * 2)
    assert (period, sum(sizes)) == (520, 2112)


def test_int8_step_keeps_only_the_output_head_in_fp32(tmp_path):
    """Every product of the int8 step is quantised but the head's two (the export checks it
    too), and each layer's taps and current input share one quantised product."""
    import onnx

    ckpt = make_checkpoint(tmp_path / "m.pt", "tiny", seed=7)
    model, speakers, _ = load_checkpoint(ckpt)
    export_model(model, speakers, tmp_path / "q", int8=True)
    nodes = onnx.load(str(tmp_path / "q" / "decoder_step.int8.onnx")).graph.node
    fp32 = [n.input[1] for n in nodes if n.op_type == "MatMul"]
    assert sorted(w.rsplit(".", 1)[-1] for w in fp32) == ["head1_w", "head2_w"]
    quantised = [n for n in nodes if n.op_type == "MatMulInteger"]
    n_layers = len(model.decoder.dilations)
    assert len(quantised) == n_layers + (n_layers - 1) + 1  # dilated, residual, skip


def test_bundled_int8_costs_under_four_thousandths_of_a_nat():
    """Teacher-forced on the test clips, the bundled model's int8 step stays within
    `BUNDLED_INT8_BOUND` of fp32. Control: quantising the output head too costs it 2-3 times
    the bound (``benchmarks/README.md``, int8)."""
    bundled = BUNDLED_MODEL
    waves = [clip(name, 8000) for name in ("activated", "agent-newlocation", "auth-incorrect")]
    fp32 = Codec(bundled).cross_entropy(waves)
    int8 = Codec(bundled, int8=True).cross_entropy(waves)
    assert 0 < abs(int8 - fp32) < BUNDLED_INT8_BOUND


def test_a_batch_binds_each_row_count_once(tiny, monkeypatch):
    """A batch that drained to fewer rows (`StepBatch.keep`) keeps the bindings of its full
    size: the next call of the same requests binds no step phase again, and gives the same
    audio."""
    _, out = tiny
    codec = Codec(out, workers=1)
    reqs = [DecodeRequest(codec.encode(clip("activated", n)), 0, n, 1) for n in (3000, 600, 600)]
    bound = []
    bind = steps.StepBatch.bind
    monkeypatch.setattr(steps.StepBatch, "bind", lambda b, p: bound.append(b.m) or bind(b, p))
    first = codec.decode_many(reqs, segment=4000)  # unfolded: 3 rows, then 1 after draining
    assert set(bound) == {3, 1}
    bound.clear()
    again = codec.decode_many(reqs, segment=4000)
    assert bound == []
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
