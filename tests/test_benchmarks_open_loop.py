"""`benchmarks.open_loop`: draws follow the distribution they are drawn from, a certain
distribution gives its class in every variant, and the command scores every variant on the
same utterances, the mu-law round trip near the ceiling."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np

from benchmarks.open_loop import draw, forced_waves, main, mean_amplitude, softmax
from tests.test_evaluate import pcm, write_dataset
from vqwavenet.audio import mulaw_decode


def test_draws_by_the_inverse_cdf_follow_the_probabilities():
    rng = np.random.default_rng(0)
    probs = np.tile([0.1, 0.0, 0.6, 0.3], (40_000, 1))
    counts = np.bincount(draw(probs, rng.random(len(probs))), minlength=4) / len(probs)
    np.testing.assert_allclose(counts, [0.1, 0.0, 0.6, 0.3], atol=0.01)
    # the edges: a uniform just under a cumulative step stays in its class
    assert draw(probs[:4], np.array([0.0, 0.0999, 0.6999, 0.7001])).tolist() == [0, 0, 2, 3]
    assert draw(probs[:1], np.array([0.9999999999])).tolist() == [3]


def test_a_certain_distribution_gives_its_class_at_every_temperature_and_as_the_mean():
    q, n = 256, 50
    logits = np.full((n, q), -40.0)
    classes = np.arange(n) * 5
    logits[np.arange(n), classes] = 40.0
    waves = forced_waves(logits, q, [1.0, 0.5, 2.0], np.random.default_rng(1))
    assert set(waves) == {"forced T=1", "forced T=0.5", "forced T=2", "forced mean"}
    for w in waves.values():
        np.testing.assert_allclose(w, mulaw_decode(classes, q), atol=1e-6)


def test_temperature_and_mean_act_as_defined():
    logits = np.log(np.array([[0.2, 0.8], [0.5, 0.5]]))
    np.testing.assert_allclose(softmax(logits, 0.5)[0], [0.04 / 0.68, 0.64 / 0.68])
    np.testing.assert_allclose(softmax(logits, 1.0), np.exp(logits))
    amp = mulaw_decode(np.arange(2), 2).astype(np.float64)
    np.testing.assert_allclose(mean_amplitude(np.exp(logits), 2), np.exp(logits) @ amp)


def test_the_command_scores_every_variant_on_the_same_utterances(app_model_dir, tmp_path):
    clips = [
        ("activated", pcm("activated", 12000)),
        ("agent-newlocation", pcm("agent-newlocation", 12000)),
    ]
    data = write_dataset(
        tmp_path / "data",
        [(f"en_US_f_Allison/{name}", "Allison", x, "test") for name, x in clips],
    )
    args = ["--model", str(app_model_dir), "--data", str(data), "--speakers", "Allison"]
    args += ["--temperatures", "1", "0.5", "--json", str(tmp_path / "o.json")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "o.json").read_text())["rows"]}
    assert list(rows) == [
        "free",
        "mulaw",
        "forced T=1",
        "forced T=0.5",
        "forced mean",
        "forced T=1, constant code",
    ]
    for r in rows.values():
        assert r["utterances"] == 2 and len(r["per_utterance"]["stoi"]) == 2
    assert rows["mulaw"]["stoi"] > 0.95 and rows["mulaw"]["envelope"] > 0.95
    free = np.array(rows["free"]["per_utterance"]["stoi"])
    mulaw = np.array(rows["mulaw"]["per_utterance"]["stoi"])
    assert np.isclose(rows["mulaw"]["stoi_minus_free"], (mulaw - free).mean())
    assert "| Allison | forced mean | 2 |" in out.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        assert main([*args[:6], "--temperatures", "0"]) == 2
        assert main([*args[:4], "--speakers", "Nobody"]) == 2
