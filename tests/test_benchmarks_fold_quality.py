"""Smoke test of the fold-quality benchmark on the app tests' tiny model."""

from __future__ import annotations

import json

from benchmarks.fold_quality import main
from tests.conftest import DATA


def test_fold_quality_prints_recovery_and_cost_tables(app_model_dir, capsys):
    clip = str(DATA / "agent-newlocation.wav")
    args = ["--model", str(app_model_dir), "--wav", clip, "--segments", "0.1", "0.2"]
    assert main([*args, "--overlaps", "0", "16"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    recovery = [r for r in rows if r["table"] == "recovery"]
    cost = [r for r in rows if r["table"] == "cost"]
    assert recovery[0]["from"] == 0 and recovery[0]["excess_nll"] > 0  # a cold start costs
    assert len(cost) == 4 and all(r["ce_full"] > 0 for r in cost)
    by = {(r["segment_s"], r["overlap"]): r["increase"] for r in cost}
    assert by[(0.1, 16)] < by[(0.1, 0)]  # an overlap of one receptive field hides the start
    assert "| segment (s) | overlap |" in out
    # So does a burn-in of one receptive field, with no overlap: nothing is left to cost.
    assert main([*args, "--overlaps", "0", "--burn-in", "16"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    burnt = [r["increase"] for r in rows if r["table"] == "cost"]
    assert len(burnt) == 2 and max(abs(x) for x in burnt) < 1e-6


def test_fold_quality_refuses_clips_shorter_than_a_segment(app_model_dir, capsys):
    clip = str(DATA / "agent-newlocation.wav")
    args = ["--model", str(app_model_dir), "--wav", clip, "--segments", "60"]
    assert main(args) == 1
    assert "longer than the shortest segment" in capsys.readouterr().err
