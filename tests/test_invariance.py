"""Proof obligations of docs/DESIGN.md: batched gradients equal the mean of per-prediction
gradients.

Every comparison is float64 against a brute force that runs each prediction in its own pass
over its own minimal window. The negative controls run the identical comparison and must fail,
which shows the comparison can tell a wrong loss from ours.
"""

import dataclasses

import pytest
import torch

from training.config import load_model_config
from training.invariance import (
    CONTROL_FLOOR,
    METHODS,
    TOLERANCE,
    Case,
    brute_force,
    case_batch,
    cases_for,
    main,
    must_fail,
    prepare,
    relative_error,
    run_case,
)

CONTROLS = ("naive", "window_jitter", "window_framing")


@pytest.fixture(scope="module")
def tiny():
    return prepare(load_model_config("tiny"), width=8, jitter=0.5)


TINY_HOP = 16
TINY_CASES = cases_for(TINY_HOP)


def _id(case: Case) -> str:
    return f"N{case.n}-phase{case.phase}-jitter{'on' if case.jitter else 'off'}"


@pytest.mark.parametrize("case", TINY_CASES, ids=_id)
def test_batched_gradient_equals_mean_of_per_prediction_gradients(tiny, case):
    """Every parameter and the EMA statistics, batch of 3 masked utterances, 1/2/3 micro-batches."""
    controls = tuple(c for c in CONTROLS if must_fail(case, TINY_HOP, c))
    errors = run_case(tiny, case, methods=("ours", *controls), splits=(1, 2, 3))
    for key in ("ours", "ours/split2", "ours/split3"):
        assert errors[key] <= TOLERANCE, (key, errors)
    for control in controls:
        assert errors[control] > CONTROL_FLOOR, (control, errors)


def test_naive_loss_coincides_with_ours_for_single_predictions_without_jitter(tiny):
    errors = run_case(tiny, Case(1, 3, False), methods=("ours", "naive"))
    assert errors["naive"] <= TOLERANCE


def test_invariance_holds_for_a_gradient_trained_codebook_and_summed_distances():
    cfg = load_model_config("tiny")
    cfg.quantizer.codebook_update = "gradient"
    cfg.quantizer.commitment_reduction = "sum"
    model = prepare(cfg, width=8, jitter=0.5)
    assert isinstance(model.quantizer.codebook, torch.nn.Parameter)
    for case in (Case(17, 1, True), Case(55, 8, True)):
        errors = run_case(model, case, methods=("ours", "naive"), splits=(1, 3))
        assert errors["ours"] <= TOLERANCE and errors["ours/split3"] <= TOLERANCE, errors
        assert errors["naive"] > CONTROL_FLOOR, errors


# Perturbations of the decoder's inputs in training: their decoder settings and the function
# `model.autoencoder` calls with the absolute sample (or conditioning) index.
DECODER_INPUT = {
    "input_noise": ({"input_noise": 3.0}, "noisy_classes"),
    "past_gain": ({"past_gain_db": 12.0, "past_gain_every": 7}, "gained_samples"),
    "past_tilt": ({"past_tilt": 0.6, "past_tilt_every": 7}, "tilted_samples"),
    "past_draws": ({"past_draws": 0.5}, "chosen"),
    "cond_dropout": ({"cond_dropout": 0.5, "cond_dropout_every": 1}, "dropped_conditioning"),
}


@pytest.mark.parametrize("name", DECODER_INPUT)
def test_invariance_holds_with_a_perturbed_decoder_input(monkeypatch, name):
    """`model.input_noise` moves, `model.past_gain` scales and `model.past_tilt` filters each
    past sample the decoder reads by a draw of its absolute index, and `model.past_draws`
    replaces it by the decoder's own draw at a hashed choice, so every window reads the
    same perturbed past and the proof holds; `model.cond_dropout` drops conditioning indices
    by a hash of their absolute index, so every window reads the same conditioning. Control:
    the same draws by position within the window (a per-window draw) give each
    single-prediction pass another past (or conditioning) than the batched window, and the
    comparison fails."""
    from model import autoencoder

    settings, function = DECODER_INPUT[name]
    cfg = load_model_config("tiny")
    for key, value in settings.items():
        setattr(cfg.decoder, key, value)
    model = prepare(cfg, width=8, jitter=0.5)
    for case in (Case(17, 1, True), Case(55, 8, False)):
        errors = run_case(model, case, methods=("ours",), splits=(1, 3))
        assert errors["ours"] <= TOLERANCE and errors["ours/split3"] <= TOLERANCE, errors
    by_index = getattr(autoencoder, function)
    monkeypatch.setattr(
        autoencoder,
        function,
        lambda *a, index, **kw: by_index(*a, index=index - index[:, :1], **kw),
    )
    errors = run_case(model, Case(17, 1, True), methods=("ours",))
    assert errors["ours"] > CONTROL_FLOOR, errors


def test_a_tilt_filter_started_afresh_in_each_window_breaks_the_proof(monkeypatch):
    """The tilt reads the sample before each past sample from the window's row. The natural
    wrong implementation filters each window's past on its own, with silence before its first
    sample (a zero filter state per window): a single-prediction pass then reads another first
    sample than the batched window that holds the same prediction, and the comparison fails,
    while the row-read tilt on the same model passes. One sample of each prediction's field
    differs, so the error is small, but thousands of times the float64 tolerance."""
    from model import autoencoder

    cfg = load_model_config("tiny")
    cfg.decoder.past_tilt, cfg.decoder.past_tilt_every = 0.6, 7
    model = prepare(cfg, width=8, jitter=0.5)
    errors = run_case(model, Case(17, 1, True), methods=("ours",))
    assert errors["ours"] <= TOLERANCE, errors
    row_read = autoencoder.tilted_samples

    def fresh_state(samples, previous, *a, **kw):
        previous = torch.cat([torch.zeros_like(previous[:, :1]), samples[:, :-1]], dim=1)
        return row_read(samples, previous, *a, **kw)

    monkeypatch.setattr(autoencoder, "tilted_samples", fresh_state)
    errors = run_case(model, Case(17, 1, True), methods=("ours",))
    assert errors["ours"] > 1e3 * TOLERANCE, errors


def test_brute_force_in_chunks_of_windows_equals_one_window_per_pass(tiny):
    """Stacking single-prediction windows as rows of one pass (what the real-geometry test
    does, for speed) gives the one-window-per-pass brute force: rows never interact."""
    case = Case(3 * TINY_HOP + 7, 1, True)
    tiny.cfg.decoder.jitter_probability = tiny.jitter_p
    utts, specs = case_batch(tiny, case)
    kw = {"seed": 1234, "epoch": 3}
    one = brute_force(tiny, utts, specs, METHODS["ours"], chunk=1, **kw)
    for chunk in (7, 32):
        stacked = brute_force(tiny, utts, specs, METHODS["ours"], chunk=chunk, **kw)
        assert relative_error(stacked, one) <= TOLERANCE, chunk


def test_real_geometry_long_window_with_jitter():
    """The 320-sample stride and 2047-sample receptive field, N = 700, channels narrowed; the
    brute force stacks 32 single-prediction windows per pass (the command's default at a real
    stride; the test above shows it equals one window per pass)."""
    model = prepare(load_model_config("default"), width=8, jitter=0.5)
    assert model.geometry.hop == 320 and model.geometry.ar_context == 2047
    errors = run_case(model, Case(700, 160, True), methods=("ours",), chunk=32)
    assert errors["ours"] <= TOLERANCE, errors


def test_invariance_command_prints_table_and_exits_zero(capsys):
    assert main(["--config", "tiny", "--n", "1", "17", "--phases", "1"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "naive" in out
    rows = [line for line in out.splitlines() if not line.startswith("#") and "phase" not in line]
    assert len(rows) == 4  # N in {1, 17} x jitter off/on at one phase


def test_invariance_command_fails_when_ours_is_broken(monkeypatch, capsys):
    """Swap our loss for the naive one: the command must notice and exit non-zero."""
    from training import invariance

    broken = dataclasses.replace(invariance.METHODS["ours"], loss=invariance.naive_loss)
    monkeypatch.setitem(invariance.METHODS, "ours", broken)
    assert main(["--config", "tiny", "--n", "17", "--phases", "1", "--no-controls"]) == 1
    assert "FAIL" in capsys.readouterr().out
