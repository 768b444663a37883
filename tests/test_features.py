"""`model.features.MFCC` against torchaudio, window independence, statistics and ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from model.config import FeatureConfig
from model.features import MFCC
from model.geometry import hull, total_stride

CLIPS = sorted((Path(__file__).parent / "data").glob("*.wav"))
TOP_DB = 80.0


def clip(path: Path, dtype=torch.float64) -> torch.Tensor:
    data, rate = sf.read(path, dtype="int16")
    assert rate == 16000 and data.ndim == 1
    return torch.from_numpy(data.astype(np.float64) / 32768).to(dtype)


def raw_mfcc(dtype=torch.float64) -> MFCC:
    """The default front end with mean 0 / std 1 statistics."""
    return MFCC(FeatureConfig()).to(dtype).eval()


def min_samples(m: MFCC) -> int:
    """Samples one feature frame reads, from the module's declared geometry."""
    first, last = hull(m.layers(), 0, 0)
    return last - first + 1


def torchaudio_mfcc(top_db: float | None) -> torchaudio.transforms.MFCC:
    t = torchaudio.transforms.MFCC(
        sample_rate=16000,
        n_mfcc=13,
        melkwargs=dict(n_fft=400, win_length=400, hop_length=160, n_mels=80, center=False),
    ).double()
    t.amplitude_to_DB.top_db = top_db
    return t


def torchaudio_features(wave: torch.Tensor, top_db: float | None) -> torch.Tensor:
    """``[L]`` -> ``[39, M0]`` MFCC + deltas (replicate-padded at both ends)."""
    c = torchaudio_mfcc(top_db)(wave)
    d1 = torchaudio.functional.compute_deltas(c)
    return torch.cat([c, d1, torchaudio.functional.compute_deltas(d1)])


def clamp_bites(wave: torch.Tensor) -> torch.Tensor:
    """``[M0]`` true for STFT frames where torchaudio's top_db clamp changes a mel band."""
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80, center=False
    ).double()(wave)
    db = 10 * torch.log10(mel.clamp_min(1e-10))
    return (db < db.max() - TOP_DB).any(0)


@pytest.mark.parametrize("path", CLIPS, ids=lambda p: p.stem)
def test_features_equal_torchaudio_where_its_top_db_clamp_does_not_bite(path):
    wave = clip(path)
    w = FeatureConfig().delta_width
    ours = raw_mfcc()(wave[None])[0]  # [39, M]
    ref = torchaudio_features(wave, TOP_DB)  # [39, M0]; our frame i is its frame i + 2w
    assert ours.shape == (39, ref.shape[1] - 4 * w)
    ref = ref[:, 2 * w : ref.shape[1] - 2 * w]
    bites = clamp_bites(wave)
    assert bites.float().mean().item() < 0.5  # the clamp leaves most frames alone
    static_ok = ~bites[2 * w : len(bites) - 2 * w]  # a static frame reads its own STFT frame
    # Deltas read STFT frames i .. i + 4w.
    near = torch.nn.functional.max_pool1d(bites[None, None].double(), 4 * w + 1, 1)[0, 0]
    delta_ok = near == 0
    assert delta_ok.float().mean().item() > 0.25
    assert (ours[:13, static_ok] - ref[:13, static_ok]).abs().max().item() <= 1e-3
    assert (ours[13:, delta_ok] - ref[13:, delta_ok]).abs().max().item() <= 1e-3
    # Where it bites, torchaudio really differs: the comparison above is not vacuous.
    if (~static_ok).any():
        assert (ours[:13, ~static_ok] - ref[:13, ~static_ok]).abs().max().item() > 1e-3


@pytest.mark.parametrize("path", CLIPS, ids=lambda p: p.stem)
def test_features_equal_unclamped_torchaudio_on_every_interior_frame(path):
    wave = clip(path)
    w = FeatureConfig().delta_width
    ours = raw_mfcc()(wave[None])[0]
    ref = torchaudio_features(wave, None)
    ref = ref[:, 2 * w : ref.shape[1] - 2 * w]  # where replicate padding does not reach
    assert (ours - ref).abs().max().item() <= 1e-3
    # The deltas carry signal (a scale error in them would show above).
    assert ref[13:].abs().max().item() > 1.0


def test_features_of_a_grid_aligned_segment_equal_those_of_the_whole_signal():
    m = raw_mfcc()
    hop = total_stride(m.layers())
    wave = clip(CLIPS[0])
    whole = m(wave[None])[0]
    need = min_samples(m)
    for first in (0, 1, 7, 40):
        for n in (need, need + hop - 1, need + 5 * hop + 3):
            seg = wave[first * hop : first * hop + n]
            part = m(seg[None])[0]
            assert part.shape[1] == (n - need) // hop + 1
            diff = part - whole[:, first : first + part.shape[1]]
            assert diff.abs().max().item() <= 1e-10


def test_frame_count_follows_the_declared_geometry():
    m = raw_mfcc()
    hop, need = total_stride(m.layers()), min_samples(m)
    for n in (need, need + 1, need + hop - 1, need + hop, need + 7 * hop + 5):
        assert m(torch.zeros(2, n, dtype=torch.float64) + 0.01).shape == (
            2,
            39,
            (n - need) // hop + 1,
        )


def test_normalisation_statistics_are_applied_and_travel_in_state_dict():
    wave = clip(CLIPS[1])[None, :8000]
    m = raw_mfcc()
    raw = m(wave)
    mean = torch.linspace(-3, 3, 39, dtype=torch.float64)
    std = torch.linspace(0.5, 40, 39, dtype=torch.float64)
    m.set_statistics(mean, std)
    normed = m(wave)
    expected = (raw - mean[None, :, None]) / std[None, :, None]
    assert (normed - expected).abs().max().item() <= 1e-12
    state = m.state_dict()
    assert torch.equal(state["mean"], mean) and torch.equal(state["std"], std)
    fresh = raw_mfcc()
    assert (fresh(wave) - normed).abs().max().item() > 1.0
    fresh.load_state_dict(state)
    assert torch.equal(fresh(wave), normed)


def test_zero_std_is_clamped_instead_of_dividing_by_zero():
    m = raw_mfcc()
    m.set_statistics(torch.zeros(39), torch.zeros(39))
    assert bool(torch.isfinite(m(clip(CLIPS[0])[None, :4000])).all())
    assert m.std.min().item() > 0


@pytest.mark.parametrize("short", [1, 100, 399, 400, 1000])
def test_too_few_samples_raise_naming_the_minimum(short):
    m = raw_mfcc()
    need = min_samples(m)
    assert short < need
    with pytest.raises(ValueError, match=f"at least {need} samples"):
        m(torch.zeros(1, short, dtype=torch.float64))
    assert m(torch.zeros(1, need, dtype=torch.float64) + 0.01).shape[-1] == 1


def test_onnx_export_matches_pytorch_on_a_clip(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = raw_mfcc(torch.float32)
    reference = raw_mfcc()
    truth = reference(clip(CLIPS[1])[None])[0]  # float64
    m.set_statistics(truth.mean(1), truth.std(1))  # realistic scale: about unit variance
    reference.set_statistics(truth.mean(1), truth.std(1))
    need = min_samples(m)
    example = 0.1 * torch.randn(1, need + 3000)
    path = tmp_path / "mfcc.onnx"
    samples = torch.export.Dim("samples", min=need)
    torch.onnx.export(
        m,
        (example,),
        str(path),
        dynamo=True,
        dynamic_shapes=({1: samples},),
        input_names=["wave"],
        output_names=["features"],
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for p in CLIPS:  # several lengths through one graph (dynamic axis)
        wave = clip(p, torch.float32)[None]
        (got,) = session.run(None, {"wave": wave.numpy()})
        ours = m(wave)[0].detach().numpy()
        truth = reference(wave.double())[0].detach().numpy()
        assert got.shape == (1, *ours.shape)
        # Two float32 computations: they differ by up to ~1e-4 here (9.9e-5 measured).
        assert np.abs(got[0] - ours).max() <= 1e-3
        # The export loses nothing beyond float32 rounding: onnxruntime is as close to the
        # float64 truth as PyTorch's own float32 features are.
        assert np.abs(got[0] - truth).max() <= max(2 * np.abs(ours - truth).max(), 1e-4)
