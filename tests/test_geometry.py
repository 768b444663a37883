"""`model.geometry` against the truth: autograd dependencies of the real modules.

Every receptive-field answer the geometry gives (frame samples, slot ranges, autoregressive
context) is compared with the non-zero pattern of Jacobians (or exact perturbations) of the real
modules with random float64 weights. Dead ReLUs can leave false holes, so patterns are ORed over
several random draws and decoders are widened to 16 channels (geometry is unchanged by width).
Absolute indices come only from the geometry API and the `Windows` of `make_batch`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model import mulaw
from model.autoencoder import Autoencoder
from model.config import ModelConfig
from model.geometry import CodecGeometry, Conv, Upsample, exact, hull
from model.jitter import jitter_offsets
from training.config import load_model_config
from training.invariance import narrow
from training.windows import Utterance, WindowSpec, make_batch

DATA = Path(__file__).parent / "data"


def widened(name: str, width: int = 16) -> ModelConfig:
    """Config ``name`` with every channel count set to ``width`` (strides, kernels kept)."""
    cfg = narrow(load_model_config(name), width)
    cfg = copy.deepcopy(cfg)
    cfg.encoder.channels = width
    d = cfg.decoder
    for field in ("cond_channels", "residual_channels", "gate_channels", "skip_channels"):
        setattr(d, field, width)
    return cfg


def build(cfg: ModelConfig, seed: int) -> Autoencoder:
    torch.manual_seed(seed)
    model = Autoencoder(cfg).double().eval()
    dim = model.features.dim
    model.features.set_statistics(torch.linspace(-1, 1, dim), torch.linspace(5, 20, dim))
    return model


def speech(n: int, offset: int = 3000) -> torch.Tensor:
    """``n`` samples of a test clip as float64 in [-1, 1]."""
    data, _ = sf.read(DATA / "auth-incorrect.wav", dtype="int16")
    return torch.from_numpy(data[offset : offset + n].astype(np.float64) / 32768)


def closed(lo, hi) -> set[int]:
    return set(range(int(lo), int(hi) + 1))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These checks run thousands of tiny ops, where a second intra-op thread only adds
    synchronisation (tens of times slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_geometry() -> CodecGeometry:
    return build(widened("tiny"), 0).geometry


@pytest.fixture(scope="module")
def real_geometry() -> CodecGeometry:
    return build(widened("default"), 0).geometry


# --- encoder: which padded samples each frame reads ----------------------------------------------


def encoder_dependencies(
    cfg: ModelConfig, n_samples: int, seeds, random_dft: bool
) -> tuple[list[set[int]], CodecGeometry]:
    """Samples each frame of features + encoder depends on (ORed over draws), and geometry."""
    deps = None
    for seed in seeds:
        model = build(cfg, seed)
        if random_dft:  # every tap non-zero: the structural read set, not the Hann weights
            model.features.dft.normal_()
        g = torch.Generator().manual_seed(seed)
        wave = (0.1 * torch.randn(1, n_samples, generator=g, dtype=torch.float64)).requires_grad_()
        z = model.encoder(model.features(wave))  # [1, D, F]
        assert z.shape[-1] == model.geometry.n_frames(n_samples)
        if deps is None:
            deps = [set() for _ in range(z.shape[-1])]
        for j in range(z.shape[-1]):
            r = torch.randn(z.shape[1], generator=g, dtype=torch.float64)
            (grad,) = torch.autograd.grad((z[0, :, j] * r).sum(), wave, retain_graph=True)
            deps[j] |= set(torch.nonzero(grad[0]).flatten().tolist())
    return deps, model.geometry


@pytest.mark.parametrize(
    "name, width, extra_frames, seeds",
    [("tiny", 16, 6, (0, 1, 2)), ("default", 16, 3, (0, 1))],
    ids=["tiny", "real-320"],
)
def test_encoder_frame_reads_exactly_frame_samples(name, width, extra_frames, seeds):
    cfg = widened(name, width)
    geo = build(cfg, 0).geometry
    n = geo.encoder_rf + extra_frames * geo.hop + geo.hop // 2  # a partial frame at the end
    deps, geo = encoder_dependencies(cfg, n, seeds, random_dft=True)
    assert len(deps) == extra_frames + 1
    for j, got in enumerate(deps):
        lo, hi = geo.frame_samples(j)
        assert hi - lo + 1 == geo.encoder_rf
        assert got == closed(lo, hi), f"frame {j}"


def test_encoder_with_hann_window_reads_within_frame_samples():
    """The periodic Hann window's first tap is 0, so a frame's first sample gets zero weight;
    everything else in the hull is a true dependency and nothing outside it is."""
    cfg = widened("tiny")
    model = build(cfg, 0)
    geo, dft = model.geometry, model.features.dft
    deps, _ = encoder_dependencies(cfg, geo.encoder_rf + 4 * geo.hop, (0, 1, 2), False)
    assert bool((dft[:, 0, 0] == 0).all()) and bool((dft[:, 0, 1:] != 0).any(0).all())
    for j, got in enumerate(deps):
        lo, hi = geo.frame_samples(j)
        assert got == closed(lo + 1, hi), f"frame {j}"


# --- decoder: slots and autoregressive context of each prediction -------------------------------


def window(model: Autoencoder, n_utt: int, offset: int, n: int, seed=0, epoch=0):
    geo = model.geometry
    utt = Utterance.prepare(speech(n_utt), geo, utt=7, speaker=1)
    spec = WindowSpec(0, utt.first + offset, n)
    return utt, make_batch(geo, [utt], [spec], seed=seed, epoch=epoch)


def frame_dependencies(model: Autoencoder, wave, win, n, columns, draws=1) -> list[set[int]]:
    """Absolute frames (quantiser outputs) each logit column depends on, via autograd."""
    holder = {}

    def add_leaf(module, args, out):
        leaf = torch.zeros_like(out.quantized, requires_grad=True)
        holder["leaf"] = leaf
        return dataclasses.replace(out, quantized=out.quantized + leaf)

    handle = model.quantizer.register_forward_hook(add_leaf)
    try:
        out = model(wave, win, n)
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(0)
    deps = []
    for c in columns:
        found = set()
        for _ in range(draws):
            r = torch.randn(out.logits.shape[1], generator=g, dtype=torch.float64)
            (grad,) = torch.autograd.grad(
                (out.logits[0, :, c] * r).sum(), holder["leaf"], retain_graph=True
            )
            local = torch.nonzero(grad[0].abs().sum(-1)).flatten()
            found |= set((local + win.frame0[0]).tolist())
        deps.append(found)
    return deps


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_depend_on_exactly_the_slot_range_at_every_phase(seed):
    model = build(widened("tiny"), seed)
    geo = model.geometry
    n = 2 * geo.period_samples + 3
    _, (wave, win, n) = window(model, 40 * geo.hop, 5 * geo.hop + 3, n)
    times = [int(win.t0[0]) + c for c in range(n)]
    assert {t % geo.period_samples for t in times} == set(range(geo.period_samples))
    deps = frame_dependencies(model, wave, win, n, range(n))
    sizes = set()
    for t, got in zip(times, deps, strict=True):
        lo, hi = geo.slot_range(t)
        assert got == closed(lo, hi), f"prediction {t}"
        assert got == set(geo.exact_slots(t).tolist())
        sizes.add(len(got))
    assert len(sizes) > 1  # the slot count varies with the phase (a real check of phases)


def test_jittered_logits_depend_on_the_jittered_frames_of_their_slots():
    """pi(k) = clamp(k + delta_k, 0, F - 1) (docs/DESIGN.md), over a whole short utterance so that
    the clamp at both ends is exercised."""
    model = build(widened("tiny"), 3).train()
    model.cfg.decoder.jitter_probability = 0.5
    geo = model.geometry
    n_samples = 5 * geo.hop + 3
    utt = Utterance.prepare(speech(n_samples), geo, utt=7, speaker=1)
    spec = WindowSpec(0, utt.first, n_samples)
    wave, win, n = make_batch(geo, [utt], [spec], seed=13, epoch=2)
    deps = frame_dependencies(model, wave, win, n, range(n))
    moved, clamped = 0, set()
    for c, got in enumerate(deps):
        lo, hi = geo.slot_range(utt.first + c)
        k = torch.arange(int(lo), int(hi) + 1)
        jittered = k + jitter_offsets(0.5, 13, 2, torch.tensor(7), k)
        frames = jittered.clamp(0, utt.n_frames - 1)
        assert got == set(frames.tolist()), f"column {c}"
        moved += got != closed(lo, hi)
        clamped |= {int(v) for v in jittered if not 0 <= v < utt.n_frames}
    assert moved > 0  # the draw moved some frames: this is not the unjittered check
    assert min(clamped) < 0 and max(clamped) >= utt.n_frames  # both ends were clamped


def test_real_geometry_logits_depend_on_exactly_the_slot_range():
    model = build(widened("default"), 0)
    geo = model.geometry
    n = geo.period_samples + 1
    _, (wave, win, n) = window(model, 12000, 3 * geo.hop + 17, n)
    t0 = int(win.t0[0])
    lo, hi = geo.slot_range(np.arange(t0, t0 + n))
    changes = [c for c in range(1, n) if (lo[c], hi[c]) != (lo[c - 1], hi[c - 1])]
    assert changes  # the window crosses slot boundaries
    # Both sides of every boundary, the ends, and a spread of phases in between.
    columns = sorted({0, n - 1, *range(0, n, 40), *changes, *(c - 1 for c in changes)})
    deps = frame_dependencies(model, wave, win, n, columns)
    for c, got in zip(columns, deps, strict=True):
        assert got == closed(lo[c], hi[c]), f"prediction {t0 + c}"


def test_each_wavenet_layer_adds_the_conditioning_of_its_own_output_time():
    """Per layer, a logit reads exactly the conditioning indices ``cond_index`` names for the
    layer outputs that reach it (so the per-layer gather agrees with the geometry)."""
    model = build(widened("tiny"), 2)
    geo, dec = model.geometry, model.decoder
    n_layers, t0, n = len(geo.wavenet), geo.pad_left + 3 * geo.hop + 1, geo.hop + 2
    inputs = n + geo.wavenet_context
    times = geo.layer_time_start(t0)[0] + np.arange(inputs - geo.wavenet[0].span)
    index = torch.as_tensor(geo.cond_index(times))[None]  # [1, T - span_0]
    base = int(index.min())
    g = torch.Generator().manual_seed(0)
    width = 2 * dec.cfg.gate_channels
    cond = torch.randn(1, n_layers * width, int(index.max()) - base + 1, generator=g)
    cond = cond.double().requires_grad_()
    classes = torch.randint(0, dec.cfg.quantization_channels, (1, inputs), generator=g)
    logits = dec(classes, cond, index - base)  # [1, Q, n]
    for c in range(n):
        t = t0 + c
        (grad,) = torch.autograd.grad(logits[0, :, c].sum(), cond, retain_graph=True)
        per_layer = grad[0].reshape(n_layers, width, -1).abs().sum(1)  # [layers, C]
        for i in range(n_layers):
            got = set((torch.nonzero(per_layer[i]).flatten() + base).tolist())
            reaching = exact(geo.wavenet[i + 1 :], t)  # layer i's outputs that reach t
            assert got == set(geo.cond_index(reaching).tolist()), f"layer {i}, t {t}"


def ar_dependencies(model: Autoencoder, wave, win, n, samples) -> dict[int, tuple[set, set]]:
    """For each absolute sample: (logit columns, target columns) that change when its mu-law
    class changes, with the encoder output frozen so only the autoregressive path is seen."""
    with torch.no_grad():
        frozen = model.encoder(model.features(wave))
        handle = model.encoder.register_forward_hook(lambda m, a, o: frozen)
        try:
            base = model(wave, win, n)
            start = int(win.start[0])
            found = {}
            for s in samples:
                x = wave.clone()
                old = x[0, s - start].clone()
                x[0, s - start] = -0.9 if old >= 0 else 0.9
                assert mulaw.encode(x[0, s - start]) != mulaw.encode(old)
                out = model(x, win, n)
                logits = (out.logits != base.logits).any(1)[0]
                targets = out.targets[0] != base.targets[0]
                found[s] = (
                    set(torch.nonzero(logits).flatten().tolist()),
                    set(torch.nonzero(targets).flatten().tolist()),
                )
        finally:
            handle.remove()
    return found


def expected_ar(geo: CodecGeometry, t0: int, n: int, s: int) -> set[int]:
    lo, hi = geo.ar_range(np.arange(t0, t0 + n))
    return set(np.nonzero((lo <= s) & (s <= hi))[0].tolist())


def test_logits_depend_on_exactly_the_autoregressive_range():
    model = build(widened("tiny"), 0)
    geo = model.geometry
    _, (wave, win, n) = window(model, 30 * geo.hop, 3 * geo.hop + 5, geo.hop + 7)
    t0, start = int(win.t0[0]), int(win.start[0])
    ar_lo = geo.ar_range(t0)[0]
    near = range(ar_lo - 8, t0 + n + 8)  # every sample around the context, a spread elsewhere
    samples = sorted({*near, *range(start, start + wave.shape[1], 11)})
    found = ar_dependencies(model, wave, win, n, samples)
    for s, (logit_cols, target_cols) in found.items():
        assert logit_cols == expected_ar(geo, t0, n, s), f"sample {s}"
        assert target_cols == ({s - t0} if t0 <= s < t0 + n else set())
    assert geo.ar_range(t0) == (t0 - geo.ar_context, t0 - 1)


def test_real_geometry_logits_depend_on_exactly_the_autoregressive_range():
    """Autograd here: the oldest sample reaches a prediction through one path of 20 layers,
    an effect far below float64 rounding of the logits, but a non-zero gradient."""
    model = build(widened("default"), 0)
    geo = model.geometry
    _, (wave, win, n) = window(model, 12000, 2 * geo.hop + 5, 40)
    holder = {}

    def add_leaf(module, args, out):
        holder["leaf"] = torch.zeros_like(out, requires_grad=True)
        return out + holder["leaf"]

    handle = model.decoder.embed.register_forward_hook(add_leaf)
    try:
        logits = model(wave, win, n).logits  # [1, Q, n]
    finally:
        handle.remove()
    t0, inputs = int(win.t0[0]), holder["leaf"].shape[1]
    # Decoder contract: input i holds x[tau - 1] for decoder time tau, outputs are the last n.
    tau = t0 + n - inputs + np.arange(inputs)
    sample = hull((geo.ar_input,), tau, tau)[0]
    g = torch.Generator().manual_seed(0)
    for c in (0, 1, n // 2, n - 1):
        r = torch.randn(logits.shape[1], generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad(
            (logits[0, :, c] * r).sum(), holder["leaf"], retain_graph=True
        )
        got = set(sample[torch.nonzero(grad[0].abs().sum(-1)).flatten().numpy()].tolist())
        assert got == closed(*geo.ar_range(t0 + c)), f"prediction {t0 + c}"


# --- the geometry proves contiguity at construction ---------------------------------------------


ENCODER = [Conv(8, stride=4), Conv(3)]
UPSAMPLE = [Conv(3), Upsample(4, offset=2)]
AR = Conv(1, offset=-1)


def causal(d: int) -> Conv:
    return Conv(2, dilation=d, offset=-d)


def test_well_formed_hand_chain_constructs_with_exact_hulls():
    geo = CodecGeometry(ENCODER, UPSAMPLE, [causal(1), causal(2), causal(1), causal(2)], AR)
    for t in range(geo.pad_left, geo.pad_left + 3 * geo.period_samples):
        assert closed(*geo.slot_range(t)) == set(geo.exact_slots(t).tolist())
        assert closed(*geo.ar_range(t)) == closed(t - geo.ar_context, t - 1)


def test_dilated_wavenet_without_dilation_one_below_is_rejected():
    # Conditioning reaches prediction t from times t and t - 2 only, its context has holes.
    with pytest.raises(AssertionError, match="not contiguous"):
        CodecGeometry(ENCODER, UPSAMPLE, [causal(2), causal(2)], AR)


def test_dilated_conditioning_conv_leaves_slots_with_a_hole():
    # One conditioning index per time, but it reads slots c and c + 2: a hole at c + 1.
    with pytest.raises(AssertionError, match="slot range of prediction .* not contiguous"):
        CodecGeometry(ENCODER, [Conv(2, dilation=2), Upsample(4)], [causal(1)], AR)


def test_encoder_chain_with_a_hole_is_rejected():
    with pytest.raises(AssertionError, match="contiguous"):
        CodecGeometry([Conv(2, dilation=3, stride=2)], UPSAMPLE, [causal(1)], AR)


# --- utterance padding, spans and frames ---------------------------------------------------------


def padding_lengths(hop: int) -> list[int]:
    return sorted({1, 2, 3, hop - 1, hop, hop + 1, 7 * hop - 1, 7 * hop, 7 * hop + 1, 1001})


@pytest.mark.parametrize("which", ["tiny_geometry", "real_geometry"])
def test_padding_makes_every_original_sample_a_valid_prediction(which, request):
    geo = request.getfixturevalue(which)
    for n in padding_lengths(geo.hop):
        left, right, n_frames = geo.padding(n)
        length = left + n + right
        assert right >= 0
        t = np.arange(left, left + n)
        lo, hi = geo.slot_range(t)
        assert lo.min() >= 0 and hi.max() <= n_frames - 1, n
        ar_lo, ar_hi = geo.ar_range(t)
        assert ar_lo.min() >= 0 and ar_hi.max() < length, n
        assert geo.frame_samples(n_frames - 1)[1] == length - 1  # frames fill the padding
        assert geo.n_frames(length) == n_frames
        # Minimal: one frame fewer would lose the last sample's slots or its target.
        last = left + n - 1
        assert hi.max() == n_frames - 1 or geo.frame_samples(n_frames - 2)[1] < last, n
        # The same left padding for every length: the first valid prediction, not earlier.
        assert left == geo.pad_left
        before = left - 1
        assert geo.ar_range(before)[0] < 0 or geo.slot_range(before)[0] < 0
    with pytest.raises(ValueError):
        geo.padding(0)


@pytest.mark.parametrize("which", ["tiny_geometry", "real_geometry"])
def test_span_holds_context_targets_and_margin_frames(which, request):
    geo = request.getfixturevalue(which)
    s = geo.hop
    left, _, n_frames = geo.padding(9 * s + 5)
    end = left + 9 * s + 5
    for t0 in (left, left + 1, left + s // 2, left + 3 * s - 1, end - 1):
        for n in (1, 2, s - 1, s, s + 1, 3 * s + 7):
            t1 = min(t0 + n, end)
            span = geo.span(t0, t1, n_frames)
            lo0, _ = geo.slot_range(t0)
            _, hi1 = geo.slot_range(t1 - 1)
            assert span.f0 == max(lo0 - 1, 0) and span.f1 == min(hi1 + 1, n_frames - 1)
            assert span.start == geo.frame_samples(span.f0)[0]
            assert span.stop == geo.frame_samples(span.f1)[1] + 1
            assert span.start <= geo.ar_range(t0)[0] and t1 <= span.stop
            # and the sample before the context, which the past's tilt filter reads
            assert span.start <= geo.ar_range(t0)[0] - 1 or geo.ar_range(t0)[0] == 0
            assert geo.frames_within(span.start, span.stop) == (span.f0, span.f1)
            lo, hi = geo.slot_range(np.arange(t0, t1))
            assert lo.min() >= span.f0 and hi.max() <= span.f1
    with pytest.raises(ValueError, match="outside the utterance"):
        geo.span(end, end + 10 * s, n_frames)
    with pytest.raises(ValueError):
        geo.span(left + 5, left + 5, n_frames)


def test_frames_within_are_exactly_the_frames_whose_samples_fit(tiny_geometry):
    geo = tiny_geometry
    j = np.arange(-3, 20)
    first, last = geo.frame_samples(j)
    for start in range(0, 3 * geo.hop + 1):
        for stop in range(start, start + geo.encoder_rf + 4 * geo.hop, 3):
            fit = j[(first >= start) & (last < stop)]
            j0, j1 = geo.frames_within(start, stop)
            assert set(range(j0, j1 + 1)) == set(fit.tolist()), (start, stop)


# --- window length errors ----------------------------------------------------------------------


def test_forward_rejects_a_row_shorter_than_the_receptive_field():
    model = build(widened("tiny"), 0)
    geo = model.geometry
    minimum = geo.min_window_samples(1)
    utt, (wave, win, n) = window(model, 1, 0, 1)  # a one-sample utterance: no margin frames
    assert wave.shape[1] == minimum == len(utt.padded)
    model(wave, win, n)  # exactly the minimum works
    for short in (minimum - 1, geo.encoder_rf - 1, 10):
        with pytest.raises(ValueError, match=str(minimum)):
            model(wave[:, :short], win, n)


def test_min_window_samples_is_the_shortest_single_prediction_window(tiny_geometry):
    geo = tiny_geometry
    lengths = []
    for t in range(geo.pad_left, geo.pad_left + geo.period_samples):
        lo, hi = geo.slot_range(t)
        lengths.append(geo.frame_samples(hi)[1] + 1 - geo.frame_samples(lo)[0])
    assert min(lengths) == geo.min_window_samples(1)
    assert geo.min_window_samples(geo.hop + 1) > geo.min_window_samples(1)


# --- utterance padding is the same in windows and whole-utterance passes -------------------------


def test_windows_reproduce_the_whole_utterance_logits_and_codes():
    model = build(widened("tiny"), 5)
    geo = model.geometry
    s = geo.hop
    n_samples = 11 * s + 5
    wave = speech(n_samples, offset=9000)
    utt = Utterance.prepare(wave, geo, utt=3, speaker=2)
    padded, left, n_frames = model.pad(wave)
    assert torch.equal(padded, utt.padded) and (left, n_frames) == (utt.pad_left, utt.n_frames)

    whole_wave, whole_win, n = make_batch(geo, [utt], [WindowSpec(0, utt.first, n_samples)])
    with torch.no_grad():
        whole = model(whole_wave, whole_win, n).logits[0]  # [Q, n_samples]
        codes = model.encode(padded[None])[0]
    assert whole.shape[1] == n_samples and codes.shape[0] == n_frames

    sizes = [1, 7, s - 1, s, s + 1, 2 * s + 3, 3, 2 * s]  # cuts at many phases
    sizes.append(n_samples - sum(sizes))
    assert sizes[-1] > 0
    specs, t = [], utt.first
    for size in sizes:
        specs.append(WindowSpec(0, t, size))
        t += size
    parts = []
    with torch.no_grad():
        for spec in specs:  # one window per pass
            w, win, n = make_batch(geo, [utt], [spec])
            out = model(w, win, n)
            parts.append(out.logits[0, :, : spec.n])
            f0 = int(win.frame0[0])
            assert torch.equal(
                out.quantizer.codes[0], codes[f0 : f0 + out.quantizer.codes.shape[1]]
            )
        w, win, n = make_batch(geo, [utt], specs)  # all windows in one padded batch
        batched = model(w, win, n)
    assert (torch.cat(parts, 1) - whole).abs().max().item() <= 1e-12
    rows = [batched.logits[b, :, : spec.n] for b, spec in enumerate(specs)]
    assert (torch.cat(rows, 1) - whole).abs().max().item() <= 1e-12
    assert whole.abs().max().item() > 1e-3  # non-trivial logits


@pytest.mark.parametrize("config", ["tiny", "small", "default"])
def test_slots_spanned_is_the_most_slots_any_window_reaches(config):
    """The training forward's static slot count: the max over every phase of a window's
    ``hi(t0 + n - 1) - lo(t0) + 1``, by enumeration."""
    geo = Autoencoder(load_model_config(config)).geometry
    for n in (1, 2, geo.hop - 1, geo.hop, geo.hop + 1, 1000, 4000):
        t0 = np.arange(geo.pad_left, geo.pad_left + 2 * geo.hop)
        lo, _ = geo.slot_range(t0)
        _, hi = geo.slot_range(t0 + n - 1)
        assert geo.slots_spanned(n) == int((hi - lo).max()) + 1, n
    with pytest.raises(ValueError, match="at least one prediction"):
        geo.slots_spanned(0)
