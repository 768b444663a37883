"""`benchmarks.sampling_temperature`: the copy's step graph gives the model's logits divided by
T (so its draws are from the tempered softmax), and the command scores every temperature and
seed on the same utterances."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from benchmarks.sampling_temperature import main, with_temperature
from tests.test_evaluate import pcm, write_dataset
from vqwavenet import Codec


def test_the_copy_divides_the_logits_and_records_the_temperature(app_model_dir, tmp_path):
    wave = pcm("activated", 4000).astype(np.float32) / 32768
    (want,) = Codec(app_model_dir).teacher_forced([wave], 1)
    copy = with_temperature(app_model_dir, tmp_path / "T0.5", 0.5)
    (got,) = Codec(copy).teacher_forced([wave], 1)  # and its hash still checks
    np.testing.assert_allclose(got, want / 0.5, rtol=1e-4, atol=1e-4)
    assert json.loads((copy / "model.json").read_text())["sampling_temperature"] == 0.5
    twice = with_temperature(copy, tmp_path / "T0.25", 0.5)  # temperatures compose
    assert Codec(twice).sampling_temperature == 0.25
    (same,) = Codec(with_temperature(app_model_dir, tmp_path / "T1", 1.0)).teacher_forced([wave], 1)
    np.testing.assert_allclose(same, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        with_temperature(app_model_dir, tmp_path / "bad", 0.0)


def test_the_command_scores_each_temperature_and_seed(app_model_dir, tmp_path):
    data = write_dataset(
        tmp_path / "data",
        [
            ("en_US_f_Allison/activated", "Allison", pcm("activated"), "test"),
            ("en_US_f_Allison/agent-newlocation", "Allison", pcm("agent-newlocation"), "test"),
        ],
    )
    args = ["--model", str(app_model_dir), "--data", str(data), "--work", str(tmp_path / "w")]
    args += [
        "--temperatures",
        "0.8",
        "1.0",
        "--seeds",
        "0",
        "1",
        "--json",
        str(tmp_path / "t.json"),
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    records = json.loads((tmp_path / "t.json").read_text())["records"]
    keys = [(r["temperature"], r["seed"]) for r in records if r["group"] == "Allison"]
    assert keys == [(0.8, 0), (0.8, 1), (1.0, 0), (1.0, 1)]
    for r in records:
        assert 0 <= r["stoi"] <= 1 and -1 <= r["envelope"] <= 1 and r["log_mel"] > 0
    assert "| T | seed | group | STOI | envelope r |" in out.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        assert main([*args[:6], "--temperatures", "-1"]) == 2
