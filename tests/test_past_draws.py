"""The decoder's own draws in its past in training (`model.past_draws`): each draw follows the
decoder's distribution given the true past, is a function of absolute indices, reaches the
training pass only, and every window that reads a past sample reads the same draw. The
batched-gradient proof with draws on is in test_invariance.py."""

from __future__ import annotations

import pytest
import torch

from model import mulaw
from model.autoencoder import Autoencoder
from model.jitter import uniform_hash
from model.past_draws import chosen, drawn_classes
from tests.test_input_noise import check_training_only
from training.config import load_model_config
from training.windows import Utterance, WindowSpec, make_batch

KEY = {"seed": 7, "epoch": 1, "utt": torch.tensor([5])}


def test_draws_follow_the_softmax_of_the_logits():
    """Every column has the same logits: the classes drawn across 40000 columns match their
    softmax. Control: the same counts are far from the uniform distribution."""
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0, -3.0, 0.5, 1.5, -0.5])
    probs = torch.softmax(logits.double(), 0)
    n = 40_000
    columns = logits[None, :, None].expand(1, 8, n)
    classes = drawn_classes(columns, **KEY, index=torch.arange(n)[None])
    freq = torch.bincount(classes[0], minlength=8).double() / n
    assert (freq - probs).abs().max() < 0.01, (freq, probs)
    assert (freq - 1 / 8).abs().max() > 0.1


def test_a_draw_depends_only_on_seed_epoch_utterance_and_absolute_index():
    logits = torch.randn(1, 256, 1, generator=torch.Generator().manual_seed(0)).expand(1, 256, 400)
    index = torch.arange(1000, 1400)[None]
    a = drawn_classes(logits, **KEY, index=index)
    assert torch.equal(
        a[:, 100:200], drawn_classes(logits[..., :100], **KEY, index=index[:, 100:200])
    )
    for seed, epoch, utt in ((7, 1, 6), (7, 2, 5), (8, 1, 5)):
        other = drawn_classes(logits, seed=seed, epoch=epoch, utt=torch.tensor([utt]), index=index)
        assert not torch.equal(a, other)


def test_the_choice_replaces_the_given_fraction_by_its_own_hash():
    index = torch.arange(100_000)[None]
    picked = chosen(0.3, **KEY, index=index)
    assert abs(picked.double().mean().item() - 0.3) < 0.01
    assert torch.equal(picked[:, 500:900], chosen(0.3, **KEY, index=index[:, 500:900]))
    assert not chosen(0.0, **KEY, index=index).any() and chosen(1.0, **KEY, index=index).all()
    # neither jitter's draws nor the draws' own uniforms
    choice_u = uniform_hash(7, 1, torch.tensor([5]) + 0x30000000, index[:, :64])
    assert not torch.equal(choice_u, uniform_hash(7, 1, torch.tensor([5]), index[:, :64]))
    assert not torch.equal(
        choice_u, uniform_hash(7, 1, torch.tensor([5]) + 0x50000000, index[:, :64])
    )


def test_the_draws_change_training_logits_only_and_never_the_targets():
    check_training_only(past_draws=1.0)


def _model(depth: int = 3, draws: float = 1.0) -> Autoencoder:
    cfg = load_model_config("tiny")
    cfg.decoder.dilation_depth, cfg.decoder.past_draws = depth, draws
    torch.manual_seed(0)
    return Autoencoder(cfg).double().train()


def _utterance(model: Autoencoder, n: int = 2400) -> Utterance:
    wave = 0.3 * torch.sin(torch.arange(n, dtype=torch.float64) * 0.05)
    wave = wave + 0.05 * torch.randn(
        n, generator=torch.Generator().manual_seed(1), dtype=wave.dtype
    )
    return Utterance.prepare(wave, model.geometry, utt=4, speaker=1)


def test_at_fraction_one_the_decoder_reads_its_first_pass_draws():
    """The training pass's input is the class drawn from the first pass's logits at every
    past sample from the first valid prediction on, and the padding's silence before it."""
    model = _model()
    utt = _utterance(model)
    wave, win, n = make_batch(model.geometry, [utt], [WindowSpec(0, utt.first + 5, 60)], seed=3)
    calls = []
    forward = model.decoder.forward

    def spy(inputs, cond, cond_index):
        logits = forward(inputs, cond, cond_index)
        calls.append((inputs, logits))
        return logits

    model.decoder.forward = spy
    with torch.no_grad():
        model(wave, win, n)
    (_, first_logits), (inputs, _) = calls
    past = win.t0[:, None] - model.geometry.ar_context + torch.arange(inputs.shape[1])
    drawn = drawn_classes(first_logits, seed=win.seed, epoch=win.epoch, utt=win.utt, index=past)
    silence = mulaw.encode(torch.zeros(()), 256)
    expect = torch.where(past >= model.geometry.pad_left, drawn, silence)
    assert (past < model.geometry.pad_left).any() and (past >= model.geometry.pad_left).any()
    assert torch.equal(mulaw.encode(mulaw.decode(expect), 256), expect)  # classes survive
    assert torch.equal(inputs, expect)


@pytest.mark.parametrize("drawn_past", [True, False])
def test_every_window_reads_the_same_draws_when_its_segment_holds_their_context(drawn_past):
    """Logits of 40 predictions from one window equal those from 40 single-prediction windows.
    Here the decoder's field (255 samples) is long against the encoder's, so a window's frames
    alone do not hold the context of its first past sample's prediction; the geometry's
    ``drawn_past`` extends the segment. Control: the same model cutting windows without it
    predicts early past samples from zeros beyond its row's start, differently per window."""
    model = _model(depth=7)
    model.cfg.decoder.jitter_probability = 0.0
    with torch.no_grad():  # a decoder that reads its past strongly: wrong context flips draws
        for weight in model.decoder.dilated.parameters():
            weight.mul_(20.0)
    model.geometry.drawn_past = drawn_past
    utt = _utterance(model)
    t0 = utt.first + 1200
    with torch.no_grad():
        wave, win, n = make_batch(model.geometry, [utt], [WindowSpec(0, t0, 40)], seed=3)
        whole = model(wave, win, n).logits[0]
        specs = [WindowSpec(0, t0 + i, 1) for i in range(40)]
        wave, win, n = make_batch(model.geometry, [utt], specs, seed=3)
        each = model(wave, win, n).logits[:, :, 0].T
    error = (whole - each).abs().max().item()
    if drawn_past:
        assert error < 1e-9, error
    else:
        assert error > 1e-3, error


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_a_bad_fraction_is_refused(bad):
    cfg = load_model_config("tiny")
    cfg.decoder.past_draws = bad
    with pytest.raises(ValueError, match="past_draws"):
        cfg.validate()


def test_draws_and_a_tilt_are_not_combined():
    cfg = load_model_config("tiny")
    cfg.decoder.past_draws, cfg.decoder.past_tilt = 0.5, 0.3
    with pytest.raises(ValueError, match="cannot be combined"):
        cfg.validate()
