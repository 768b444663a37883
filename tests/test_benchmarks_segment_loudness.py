"""The segment-loudness benchmark on the app tests' tiny model: a row per bin after a segment
start, RMS compared with the unfolded decode over the same samples."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.segment_loudness import main
from tests.conftest import DATA


def test_segment_loudness_prints_a_row_per_bin(app_model_dir, capsys):
    wav = str(DATA / "agent-newlocation.wav")
    args = ["--model", str(app_model_dir), "--wav", wav, "--segment", "0.1"]
    assert main([*args, "--bin", "100", "--bins", "5"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["from"], r["to"]) for r in rows] == [(i * 100, i * 100 + 100) for i in range(5)]
    for r in rows:
        assert r["segment_rms"] > 0 and r["unfolded_rms"] > 0
        assert np.isclose(r["ratio"], r["segment_rms"] / r["unfolded_rms"], rtol=1e-2)
    assert "| samples after the start | segment RMS | unfolded RMS | ratio |" in out


def test_segment_loudness_refuses_bad_arguments(app_model_dir, capsys):
    assert main(["--model", str(app_model_dir), "--bin", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    wav = str(DATA / "agent-newlocation.wav")
    assert main(["--model", str(app_model_dir), "--wav", wav, "--segment", "60"]) == 2
    assert "longer than two segments" in capsys.readouterr().err
