"""The commitment weights autograd gives each frame, against docs/DESIGN.md's closed formula."""

import copy

import pytest
import torch

from model.jitter import slot_frames
from training.config import load_model_config
from training.invariance import prepare, synth_utterance
from training.loss import batch_loss
from training.windows import Utterance, WindowSpec, make_batch


def tiny_jittered_batch():
    """A jittered tiny model and three windows of float64 speech-like test signals, one of
    them shorter (padding); tests/test_compile.py uses it too."""
    model = prepare(load_model_config("tiny"), width=8, jitter=0.5)
    geo = model.geometry
    utts = [
        Utterance.prepare(synth_utterance(n, seed=n), geo, utt=5 + i, speaker=i)
        for i, n in enumerate((400, 150, 260))
    ]
    specs = [WindowSpec(0, utts[0].first + 37, 90), WindowSpec(1, utts[1].first + 9, 90)]
    specs.append(WindowSpec(2, utts[2].first, 61))
    wave, win, n = make_batch(geo, utts, specs, seed=7, epoch=2)
    return model, utts, specs, wave, win, n


@pytest.fixture(scope="module")
def batch():
    return tiny_jittered_batch()


def closed_form_weights(model, win, n_pred, shape, count):
    """dL/dd[j] = (beta / count) * sum over predictions t of mult_j(Z(t)) / |Z(t)|."""
    geo, beta = model.geometry, model.cfg.quantizer.beta
    w = torch.zeros(shape, dtype=torch.float64)
    for b in range(shape[0]):
        for t in range(int(win.t0[b]), int(win.t0[b] + win.n_valid[b])):
            lo, hi = (int(v) for v in geo.slot_range(t))
            k = torch.arange(lo, hi + 1)[None]
            frames = slot_frames(
                k,
                win.n_frames[b : b + 1],
                p=model.cfg.decoder.jitter_probability,
                seed=win.seed,
                epoch=win.epoch,
                utt=win.utt[b : b + 1],
            )[0]
            for f in frames.tolist():
                w[b, f - int(win.frame0[b])] += beta / count / (hi - lo + 1)
    return w


def test_commitment_weights_equal_closed_formula_and_feed_the_ema(batch):
    model, _, _, wave, win, n = batch
    q = model.quantizer
    q.step_count.zero_()
    q.step_sum.zero_()
    model.zero_grad()
    out = model(wave, win, n)
    d = out.quantizer.commitment
    d.retain_grad()
    count = int(out.mask.sum())
    batch_loss(out, count).loss.backward()

    expected = closed_form_weights(model, win, n, d.shape, count)
    assert torch.allclose(d.grad, expected, rtol=1e-12, atol=1e-15)
    # Frames beyond a short utterance's end, or outside every slot range, weigh nothing.
    assert (expected == 0).any() and (expected > 0).any()
    # The weights of one optimiser step sum to beta; the EMA sees them divided by beta.
    assert d.grad.sum().item() == pytest.approx(model.cfg.quantizer.beta, rel=1e-12)
    codes = out.quantizer.codes.reshape(-1)
    usage = torch.zeros_like(q.step_count).index_add_(0, codes, expected.reshape(-1))
    assert torch.allclose(q.step_count, usage / model.cfg.quantizer.beta, rtol=1e-12)
    assert q.step_count.sum().item() == pytest.approx(1.0, rel=1e-12)


def test_batch_loss_is_mean_of_per_prediction_losses(batch):
    model, utts, specs, wave, win, n = batch
    with torch.no_grad():
        batched = batch_loss(model(wave, win, n)).loss.item()
        singles = []
        for spec in specs:
            end = min(spec.t0 + spec.n, utts[spec.index].end)
            for t in range(spec.t0, end):
                w1, win1, n1 = make_batch(
                    model.geometry, utts, [WindowSpec(spec.index, t, 1)], seed=7, epoch=2
                )
                singles.append(batch_loss(model(w1, win1, n1)).loss.item())
    assert batched == pytest.approx(sum(singles) / len(singles), rel=1e-12)


def test_ema_update_moves_codes_to_usage_weighted_means(batch):
    model, _, _, wave, win, n = batch
    q = model.quantizer
    q.step_count.zero_()
    q.step_sum.zero_()
    before = q.codebook.clone()
    out = model(wave, win, n)
    out.quantizer.commitment.retain_grad()
    batch_loss(out).loss.backward()
    counts, sums = q.step_count.clone(), q.step_sum.clone()
    ema_count, ema_sum = q.ema_count.clone(), q.ema_sum.clone()
    q.ema_update()
    decay, floor = q.cfg.ema_decay, q.cfg.dead_code_threshold
    want_count = decay * ema_count + (1 - decay) * counts
    alive = want_count >= floor
    assert alive.any() and (~alive).any(), "this batch must exercise both paths"
    assert torch.allclose(q.ema_count[alive], want_count[alive])
    assert torch.allclose(q.ema_sum[alive], (decay * ema_sum + (1 - decay) * sums)[alive])
    # Dead codes restart on encoder outputs of frames that predictions used (weight > 0).
    z = model.encoder(model.features(wave)).transpose(1, 2).reshape(-1, q.cfg.dim).detach()
    used = out.quantizer.commitment.grad.reshape(-1) > 0
    assert used.any() and (~used).any(), "this batch must hold frames no prediction uses"
    for row in q.codebook[~alive]:
        assert torch.isclose(z[used], row[None]).all(1).any()
    assert torch.allclose(q.ema_count[~alive], torch.full_like(q.ema_count[~alive], floor))
    assert not torch.equal(q.codebook, before)
    assert q.step_count.abs().sum() == 0, "step statistics are reset after the update"
    assert 1.0 <= q.perplexity.item() <= q.cfg.codebook_size
    assert q.codes_used.item() == int((counts > 0).sum())
    share = q.ema_count / q.ema_count.sum()
    want_ppl = float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))
    assert q.ema_perplexity == pytest.approx(want_ppl, rel=1e-6)
    assert q.ema_perplexity != pytest.approx(q.perplexity.item())  # not the step's own


def test_window_shorter_than_receptive_field_names_the_minimum(batch):
    model, _, _, wave, win, n = batch
    need = model.geometry.min_window_samples(1)
    with pytest.raises(ValueError, match=str(need)):
        model(wave[:, : model.geometry.encoder_rf - 1], win, n)


def test_restarts_do_not_depend_on_the_micro_batch_split(batch):
    """Gradient accumulation: dead codes restart on the same encoder outputs whether a step's
    windows come as one micro-batch or several (every micro-batch's used frames, in order)."""
    model, utts, specs, *_ = batch
    geo = model.geometry
    splits = {"whole": [specs], "split": [specs[:2], specs[2:]]}
    codebooks = {}
    for name, parts in splits.items():
        m = copy.deepcopy(model)
        q = m.quantizer
        q.step_count.zero_()
        q.step_sum.zero_()
        q.ema_count.zero_()  # every code dies in this update: many restarts
        q.ema_sum.zero_()
        micro = [make_batch(geo, utts, p, seed=7, epoch=2) for p in parts]
        count = sum(int(win.n_valid.sum()) for _, win, _ in micro)
        for wave, win, n in micro:
            batch_loss(m(wave, win, n), count).loss.backward()
        q.ema_update(generator=torch.Generator().manual_seed(0))
        codebooks[name] = q.codebook.clone()
    dead = codebooks["whole"] != model.quantizer.codebook
    assert dead.all(1).sum() > 10
    assert torch.allclose(codebooks["split"], codebooks["whole"], rtol=1e-12, atol=1e-14)
