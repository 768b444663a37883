"""A slowly varying gain on the decoder's autoregressive input (`model.past_gain`): drawn per
absolute sample of an utterance, so it never depends on how predictions are batched; training
only; the targets keep the true loudness. The batched-gradient proof with the gain on is in
test_invariance.py."""

from __future__ import annotations

import pytest
import torch

from model.input_noise import noise_offsets
from model.jitter import uniform_hash
from model.past_gain import gain_db, gained_samples
from tests.test_input_noise import check_training_only
from training.config import load_model_config


def test_gain_spans_the_range_and_moves_linearly_between_knots():
    index = torch.arange(200_000)[None]
    db = gain_db(6.0, 100, 7, 1, torch.tensor([5]), index)[0]
    assert db.abs().max() <= 6.0 and db.max() > 5.9 and db.min() < -5.9
    knots = db[::100]
    assert abs(knots.mean().item()) < 0.1 and abs(knots.std().item() - 6 / 3**0.5) < 0.1
    # linear between knots: equal steps across each span, at most 2 * 6 dB / 100 per sample
    steps = db.diff()[: 1999 * 100].reshape(-1, 100)
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-9)
    assert db.diff().abs().max() <= 12.0 / 100 + 1e-9
    assert gain_db(0.0, 100, 7, 1, torch.tensor([5]), index).abs().max() == 0


def test_a_gain_depends_only_on_seed_epoch_utterance_and_absolute_index():
    """Sample 1000 of utterance 5 is scaled alike in every window that reads it, negative
    indices included; another utterance, epoch or seed draws anew; and the knots are neither
    jitter's nor the input noise's draws."""
    index = torch.arange(-1000, 3000)
    a = gain_db(6.0, 160, 7, 1, torch.tensor(5), index)
    assert torch.equal(a[1500:1900], gain_db(6.0, 160, 7, 1, torch.tensor(5), index[1500:1900]))
    for seed, epoch, utt in ((7, 1, 6), (7, 2, 5), (8, 1, 5)):
        assert not torch.equal(a, gain_db(6.0, 160, seed, epoch, torch.tensor(utt), index))
    knots = torch.arange(50)
    ours = uniform_hash(7, 1, torch.tensor(5) + 0x20000000, knots)
    assert not torch.equal(ours, uniform_hash(7, 1, torch.tensor(5), knots))
    noise_u = noise_offsets(1.0, 7, 1, torch.tensor(5), knots)
    assert not torch.equal(ours, noise_u.double())


def test_gained_samples_are_scaled_and_clipped():
    samples = torch.full((1, 4000), 0.5)
    index = torch.arange(4000)[None]
    out = gained_samples(samples, 12.0, 400, seed=0, epoch=0, utt=torch.tensor([3]), index=index)
    expect = 0.5 * 10 ** (gain_db(12.0, 400, 0, 0, torch.tensor([3]), index) / 20)
    assert torch.allclose(out, expect.clamp(-1, 1).float())
    assert out.max() == 1.0 and out.min() < 0.5 / 10 ** (6 / 20)  # louder ones clip, quieter scale


def test_the_gain_changes_training_logits_only_and_never_the_targets():
    check_training_only(past_gain_db=12.0, past_gain_every=50)


@pytest.mark.parametrize(
    "key, bad", [("past_gain_db", -1.0), ("past_gain_db", float("nan")), ("past_gain_every", 0)]
)
def test_a_bad_gain_setting_is_refused(key, bad):
    cfg = load_model_config("tiny")
    setattr(cfg.decoder, key, bad)
    with pytest.raises(ValueError, match=key):
        cfg.validate()
