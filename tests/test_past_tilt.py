"""A slowly varying spectral tilt on the decoder's autoregressive input (`model.past_tilt`):
a first-order filter whose coefficient is drawn per absolute sample of an utterance, so it
never depends on how predictions are batched; training only; the targets keep the true
spectrum. The batched-gradient proof with the tilt on is in test_invariance.py."""

from __future__ import annotations

import math

import pytest
import torch

from model.past_gain import gain_db
from model.past_tilt import tilt_coefficient, tilted_samples
from tests.test_input_noise import check_training_only
from training.config import load_model_config

UTT = torch.tensor([3])


def test_the_coefficient_spans_the_range_and_is_not_the_gains_draw():
    index = torch.arange(100_000)[None]
    a = tilt_coefficient(0.5, 100, 7, 1, UTT, index)[0]
    assert a.abs().max() <= 0.5 and a.max() > 0.49 and a.min() < -0.49
    assert torch.equal(a[1000:1200], tilt_coefficient(0.5, 100, 7, 1, UTT, index[:, 1000:1200])[0])
    assert not torch.allclose(a / 0.5, gain_db(1.0, 100, 7, 1, UTT, index)[0])
    assert not torch.equal(a, tilt_coefficient(0.5, 100, 7, 2, UTT, index)[0])


def test_tilted_samples_apply_the_filter_and_clip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4001, generator=gen, dtype=torch.float64) * 0.3
    index = torch.arange(1, 4001)[None]
    out = tilted_samples(x[:, 1:], x[:, :-1], 0.6, 400, seed=0, epoch=0, utt=UTT, index=index)
    a = tilt_coefficient(0.6, 400, 0, 0, UTT, index)
    expect = ((x[:, 1:] - a * x[:, :-1]) / torch.sqrt(1 + a * a)).clamp(-1, 1)
    assert torch.allclose(out, expect)
    loud = tilted_samples(
        x[:, 1:] * 10, x[:, :-1] * 10, 0.6, 400, seed=0, epoch=0, utt=UTT, index=index
    )
    assert loud.abs().max() == 1.0


def _tone(freq: float, n: int = 16_001) -> torch.Tensor:
    return torch.sin(2 * math.pi * freq / 16_000 * torch.arange(n, dtype=torch.float64))[None]


def _block_rms(v: torch.Tensor) -> torch.Tensor:
    """RMS of 400-sample blocks: short enough that the coefficient barely moves within one."""
    return v[0].reshape(-1, 400).pow(2).mean(1).sqrt()


def test_a_positive_coefficient_brightens_and_a_negative_one_dulls():
    """Where ``a > 0.3`` a 200 Hz tone comes out quieter and a 7 kHz tone louder than it went
    in; where ``a < -0.3`` the other way round: the tilt moves the balance of lows and highs."""
    index = torch.arange(1, 16_001)[None]
    a = tilt_coefficient(0.6, 1600, 5, 0, UTT, index)[0]
    ratio = {}
    for freq in (200.0, 7000.0):
        x = _tone(freq)
        y = tilted_samples(x[:, 1:], x[:, :-1], 0.6, 1600, seed=5, epoch=0, utt=UTT, index=index)
        ratio[freq] = _block_rms(y) / _block_rms(x[:, 1:])
    block_a = a.reshape(-1, 400).mean(1)
    bright, dull = block_a > 0.3, block_a < -0.3
    assert bright.any() and dull.any()
    assert (ratio[200.0][bright] < 0.85).all() and (ratio[7000.0][bright] > 1.05).all()
    assert (ratio[200.0][dull] > 1.05).all() and (ratio[7000.0][dull] < 0.85).all()


def test_the_tilt_changes_training_logits_only_and_never_the_targets():
    check_training_only(past_tilt=0.5, past_tilt_every=50)


@pytest.mark.parametrize(
    "key, bad",
    [("past_tilt", -0.1), ("past_tilt", 1.0), ("past_tilt", float("nan")), ("past_tilt_every", 0)],
)
def test_a_bad_tilt_setting_is_refused(key, bad):
    cfg = load_model_config("tiny")
    setattr(cfg.decoder, key, bad)
    with pytest.raises(ValueError, match=key):
        cfg.validate()
