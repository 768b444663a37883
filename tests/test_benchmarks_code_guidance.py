"""`benchmarks.code_guidance`: its step-by-step generator computes the parallel decoder's
logits on what it draws, guidance leaves sampling alone when the null conditioning is the true
one and changes it otherwise, and the command scores each setting on the same utterances."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from benchmarks.code_guidance import conditionings, generate, main, resynthesise
from model.autoencoder import Autoencoder
from model.decoder_step import DecoderStep
from tests.conftest import fit_to_test_clips, write_checkpoint
from tests.test_evaluate import pcm, write_dataset
from training.config import load_model_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = fit_to_test_clips(Autoencoder(load_model_config("tiny")))
    return model, DecoderStep(model.decoder).eval()


def wave(name: str, n: int) -> np.ndarray:
    return pcm(name, n).astype(np.float32) / 32768


def test_the_generator_computes_the_parallel_decoders_logits_on_its_draws(tiny):
    model, step = tiny
    waves = [wave("activated", 700), wave("agent-newlocation", 500)]
    prepared = [conditionings(model, step, w, 1, "mean") for w in waves]
    conds, nulls, lefts = (list(x) for x in zip(*prepared))
    lengths = [len(w) for w in waves]
    classes, fed, logits = generate(model, step, conds, nulls, lefts, lengths, 0.5, 3, record=True)
    ctx = model.geometry.wavenet_context
    times = np.arange(-ctx, classes.shape[1])
    for b, (c, left, n) in enumerate(zip(conds, lefts, lengths)):
        # What was fed at each step is the previous step's draw (silence before time 0).
        assert torch.equal(fed[b, ctx + 1 :], torch.from_numpy(classes[b, :-1]))
        span0 = model.decoder.wavenet_layers()[0].span
        index = np.asarray(model.geometry.cond_index(times[span0:])).clip(0, len(c) - 1)
        rows = (c - step.gate_bias).t()[None]  # the step's rows carry its folded biases
        want = model.decoder(fed[b : b + 1], rows, torch.from_numpy(index)[None])
        got = logits[b, ctx:].t()[None]  # the steps whose whole past was fed
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert len(np.unique(classes[b, left : left + n])) > 5  # it drew speech-like variety


def test_guidance_is_a_no_op_when_the_null_is_the_true_conditioning_and_not_otherwise(tiny):
    model, step = tiny
    w = wave("activated", 800)
    cond, null, left = conditionings(model, step, w, 0, "mean")
    plain, _, _ = generate(model, step, [cond], None, [left], [len(w)], 0.0, 7)
    same, _, _ = generate(model, step, [cond], [cond], [left], [len(w)], 2.0, 7)
    assert np.array_equal(plain, same)
    guided, _, _ = generate(model, step, [cond], [null], [left], [len(w)], 2.0, 7)
    assert not np.array_equal(plain, guided)  # the negative control: a timing-free null
    _, constant, _ = conditionings(model, step, w, 0, "constant")
    assert constant.shape == cond.shape and not torch.equal(constant, null)
    out = resynthesise(model, step, [w], 0, 0.0, "mean", 7)
    assert out[0].shape == w.shape and out[0].dtype == np.float32
    with pytest.raises(ValueError, match="null"):
        generate(model, step, [cond], None, [left], [len(w)], 1.0, 7)
    with pytest.raises(ValueError, match="unknown null"):
        conditionings(model, step, w, 0, "nothing")


def test_the_command_scores_each_weight_on_the_same_utterances(tiny, tmp_path):
    model, _ = tiny
    ckpt = write_checkpoint(model, tmp_path / "tiny.pt")
    data = write_dataset(
        tmp_path / "data",
        [
            ("en_US_f_Allison/activated", "Allison", pcm("activated"), "test"),
            (
                "en_US_f_Allison/agent-newlocation",
                "Allison",
                pcm("agent-newlocation", 1400),
                "test",
            ),
            ("en_US_f_Allison/other", "Allison", pcm("activated", 3000), "train"),
        ],
    )
    base = ["--checkpoint", str(ckpt), "--data", str(data), "--limit", "5"]
    argv = [
        *base,
        "--speakers",
        "Allison",
        "--weights",
        "0",
        "1",
        "--null",
        "mean",
        "constant",
        "--json",
        str(tmp_path / "r.json"),
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["weight"], r["null"]) for r in rows] == [(0, "mean"), (1, "mean"), (1, "constant")]
    for r in rows:  # the two test utterances, never the train one
        assert r["utterances"] == ["en_US_f_Allison/activated", "en_US_f_Allison/agent-newlocation"]
        long, short = r["per_utterance"]["stoi"]  # the short one is under STOI's 30 frames
        assert np.isfinite(long) and np.isnan(short) and r["stoi"] == long
        assert np.isfinite(r["log_mel"]) and np.isfinite(r["envelope_r"])
    assert "| Allison | mean | 1 | 2 |" in out.getvalue()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main([*base, "--speakers", "Nobody"]) == 2
    assert "must be a voice" in err.getvalue()


def test_a_temperature_divides_what_is_drawn_from(tiny):
    """Near zero every draw is the likeliest class of the recorded logits; at 1 it is not
    (the control: plain sampling draws other classes too)."""
    model, step = tiny
    w = wave("activated", 600)
    cond, _, left = conditionings(model, step, w, 0, "mean")
    ctx = model.geometry.wavenet_context

    def draws_vs_argmax(temperature: float) -> tuple[np.ndarray, np.ndarray]:
        classes, _, logits = generate(
            model,
            step,
            [cond],
            None,
            [left],
            [len(w)],
            0.0,
            5,
            temperature=temperature,
            record=True,
        )
        steps = ctx + np.arange(left, left + len(w))  # the steps that drew the utterance
        return classes[0, left : left + len(w)], logits[0, steps].argmax(1).numpy()

    drawn, likeliest = draws_vs_argmax(1e-4)
    assert np.array_equal(drawn, likeliest)
    drawn, likeliest = draws_vs_argmax(1.0)
    assert (drawn != likeliest).mean() > 0.2
    with pytest.raises(ValueError, match="temperature"):
        generate(model, step, [cond], None, [left], [len(w)], 0.0, 5, temperature=0.0)
    argv = ["--checkpoint", "none.pt", "--data", "none", "--speakers", "Allison"]
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as err:
        main([*argv, "--temperature", "-1"])  # refused before anything is loaded
    assert exit_.value.code == 2 and "--temperature must be a positive number" in err.getvalue()
