"""Conditioning dropout in training (`model.cond_dropout`): runs of conditioning indices drawn
per absolute index of an utterance, so the choice never depends on how predictions are
batched; a dropped index keeps the speaker alone; training only. The batched-gradient proof
with dropout on is in test_invariance.py."""

from __future__ import annotations

import pytest
import torch

from benchmarks.code_guidance import conditionings
from model.autoencoder import Autoencoder
from model.cond_dropout import dropped_conditioning
from model.decoder_step import DecoderStep
from model.jitter import uniform_hash
from tests.test_input_noise import check_training_only
from training.config import load_model_config


def test_runs_of_indices_are_dropped_at_the_given_rate():
    index = torch.arange(-500, 100_000)[None]
    drop = dropped_conditioning(0.2, 25, seed=7, epoch=1, utt=torch.tensor([5]), index=index)[0]
    runs = drop[500:].reshape(-1, 25)  # index 0 starts a run
    assert torch.equal(runs, runs[:, :1].expand_as(runs))
    assert abs(runs[:, 0].double().mean().item() - 0.2) < 0.02
    assert not dropped_conditioning(
        0.0, 25, seed=7, epoch=1, utt=torch.tensor([5]), index=index
    ).any()


def test_a_choice_depends_only_on_seed_epoch_utterance_and_absolute_index():
    """Index 1000 of utterance 5 is dropped or not in every window that reads it, negative
    indices included; another utterance, epoch or seed draws anew; the draws are not jitter's."""
    index = torch.arange(-1000, 3000)[None]
    kw = {"seed": 7, "epoch": 1, "utt": torch.tensor([5])}
    a = dropped_conditioning(0.5, 3, index=index, **kw)
    assert torch.equal(
        a[:, 1500:1900], dropped_conditioning(0.5, 3, index=index[:, 1500:1900], **kw)
    )
    for seed, epoch, utt in ((7, 1, 6), (7, 2, 5), (8, 1, 5)):
        other = {"seed": seed, "epoch": epoch, "utt": torch.tensor([utt])}
        assert not torch.equal(a, dropped_conditioning(0.5, 3, index=index, **other))
    spans = torch.arange(50)
    assert not torch.equal(
        uniform_hash(7, 1, torch.tensor(5) + 0x60000000, spans) < 0.5,
        uniform_hash(7, 1, torch.tensor(5), spans) < 0.5,
    )


def test_a_dropped_index_is_conditioned_on_its_speaker_alone():
    torch.manual_seed(0)
    model = Autoencoder(load_model_config("tiny")).eval()
    dec = model.decoder
    slots = torch.randn(2, model.cfg.quantizer.dim, 9)
    speaker = torch.tensor([0, 1])
    n = 9 - model.cfg.decoder.cond_kernel + 1
    drop = torch.zeros(2, n, dtype=torch.bool)
    drop[0, 2:5] = True
    with torch.no_grad():
        plain = dec.condition(slots, speaker)
        mixed = dec.condition(slots, speaker, drop)
        other = dec.condition(torch.randn_like(slots), speaker, drop)
        voice = dec.speaker_proj(dec.speaker(speaker))[:, :, None].expand_as(plain)
    null = drop[:, None, :].expand_as(plain)
    assert torch.equal(mixed[~null], plain[~null])
    assert torch.allclose(mixed[null], voice[null]) and torch.equal(mixed[null], other[null])
    assert not torch.allclose(plain[null], voice[null])  # control: the codes did condition it
    # the guidance benchmark's ``zero`` null is the same speaker-only conditioning, plus the step
    # graph's folded gate biases
    step = DecoderStep(dec).eval()
    wave = (0.3 * torch.sin(torch.arange(2400) * 0.05)).numpy()
    cond, null, _ = conditionings(model, step, wave, 1, "zero")
    row = step.condition(
        torch.zeros(1, model.cfg.quantizer.dim, 3),
        torch.tensor([1]),
        torch.ones(1, 1, dtype=torch.bool),
    )[0, :, 0]
    assert null.shape == cond.shape and torch.allclose(null, row.expand_as(null))
    assert not torch.allclose(cond, null)


def test_dropout_changes_training_logits_only_and_never_the_targets():
    check_training_only(cond_dropout=0.5, cond_dropout_every=1)


@pytest.mark.parametrize(
    "key, bad",
    [
        ("cond_dropout", -0.1),
        ("cond_dropout", 1.0),
        ("cond_dropout", float("nan")),
        ("cond_dropout_every", 0),
    ],
)
def test_a_bad_dropout_setting_is_refused(key, bad):
    cfg = load_model_config("tiny")
    setattr(cfg.decoder, key, bad)
    with pytest.raises(ValueError, match=key):
        cfg.validate()
