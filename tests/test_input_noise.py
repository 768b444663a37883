"""Noise on the decoder's autoregressive input (`model.input_noise`): drawn per absolute sample
of an utterance, so it never depends on how predictions are batched; training only; the
targets stay clean. The batched-gradient proof with the noise on is in test_invariance.py."""

from __future__ import annotations

import pytest
import torch

from model.autoencoder import Autoencoder
from model.config import ModelConfig
from model.input_noise import noise_offsets, noisy_classes
from model.jitter import uniform_hash
from training.config import load_model_config
from training.windows import Utterance, WindowSpec, make_batch


def test_offsets_are_rounded_normal_draws_of_the_given_std():
    z = noise_offsets(3.0, 7, 1, torch.tensor([5]), torch.arange(100_000)[None]).double()
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - (9 + 1 / 12) ** 0.5) < 0.05
    assert torch.equal(z, z.round())  # whole classes
    assert noise_offsets(0.0, 7, 1, torch.tensor([5]), torch.arange(100)[None]).abs().sum() == 0


def test_an_offset_depends_only_on_seed_epoch_utterance_and_absolute_index():
    """Sample 1000 of utterance 5 moves the same in every window that reads it; another
    utterance, epoch or seed draws anew; and the draws are not jitter's for the same ids."""
    index = torch.arange(1000, 1064)
    a = noise_offsets(2.0, 7, 1, torch.tensor(5), index)
    assert torch.equal(a[10:20], noise_offsets(2.0, 7, 1, torch.tensor(5), index[10:20]))
    for other in ((7, 1, 6), (7, 2, 5), (8, 1, 5)):
        seed, epoch, utt = other
        assert not torch.equal(a, noise_offsets(2.0, seed, epoch, torch.tensor(utt), index))
    jitter_u = uniform_hash(7, 1, torch.tensor(5), index)
    assert not torch.equal(uniform_hash(7, 1, torch.tensor(5) + 0x40000000, index), jitter_u)


def test_noisy_classes_stay_within_the_classes():
    classes = torch.tensor([[0, 1, 128, 254, 255] * 200])
    index = torch.arange(1000)[None]
    out = noisy_classes(classes, 256, 4.0, seed=0, epoch=0, utt=torch.tensor([3]), index=index)
    assert out.min() >= 0 and out.max() <= 255 and not torch.equal(out, classes)


def _model(**decoder) -> Autoencoder:
    cfg: ModelConfig = load_model_config("tiny")
    for key, value in decoder.items():
        setattr(cfg.decoder, key, value)
    cfg.decoder.jitter_probability = 0.0
    torch.manual_seed(0)
    return Autoencoder(cfg)


def tone_batch(model: Autoencoder, n: int = 40):
    """Two windows of ``n`` predictions from the middle of two utterances of a tone."""
    geo = model.geometry
    utts = [
        Utterance.prepare(0.3 * torch.sin(torch.arange(3000) * f), geo, utt=u, speaker=u % 2)
        for u, f in ((1, 0.05), (2, 0.03))
    ]
    specs = [WindowSpec(i, u.first + 1000, n) for i, u in enumerate(utts)]
    return make_batch(geo, utts, specs, seed=3, epoch=0)


def check_training_only(**decoder) -> None:
    """With the ``decoder`` settings, in train mode the decoder reads a perturbed past (its
    logits move) and the targets stay the clean classes; in eval mode (export, teacher-forced
    scoring) the output is the plain model's. Control: without them the train-mode logits are
    the plain ones."""
    plain, perturbed = _model(), _model(**decoder)
    perturbed.load_state_dict(plain.state_dict())
    wave, win, n = tone_batch(plain)
    with torch.no_grad():
        a, b = plain.train()(wave, win, n), perturbed.train()(wave, win, n)
        assert torch.equal(a.targets, b.targets)
        assert not torch.allclose(a.logits, b.logits)
        assert torch.equal(plain.eval()(wave, win, n).logits, perturbed.eval()(wave, win, n).logits)
        plain.train()
        assert torch.equal(plain(wave, win, n).logits, a.logits)


def test_the_noise_changes_training_logits_only_and_never_the_targets():
    check_training_only(input_noise=3.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_noise_level_is_refused(bad):
    cfg = load_model_config("tiny")
    cfg.decoder.input_noise = bad
    with pytest.raises(ValueError, match="input_noise"):
        cfg.validate()
