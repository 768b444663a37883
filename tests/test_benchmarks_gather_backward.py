"""Smoke tests of the gather-backward benchmark on CPU at small shapes (a second)."""

from __future__ import annotations

import json

from benchmarks import gather_backward
from benchmarks.gather_backward import CANDIDATES, MODEL, main

SMALL = ["--devices", "cpu", "--batch", "2", "--channels", "4", "--length", "1000", "--reps", "1"]


def test_benchmark_times_every_candidate_against_scatter_add(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["candidate"] for r in rows] == list(CANDIDATES)
    for r in rows:
        assert r["ms"] > 0 and r["max_rel_err"] < 1e-5 and r["dtype"] == "float32"
    assert rows[0]["speedup_over_scatter_add"] == 1.0
    assert "| cpu | float32 | segment |" in out and "| cpu | float32 | one_hot |" in out


def test_benchmark_fails_when_the_models_candidate_is_wrong(capsys, monkeypatch):
    assert MODEL == "one_hot"
    right = CANDIDATES[MODEL]

    def wrong(c, index, grad):
        return right(c, index, grad) * 1.01

    monkeypatch.setitem(gather_backward.CANDIDATES, MODEL, wrong)
    assert main(SMALL) == 1
    assert "error: cpu one_hot:" in capsys.readouterr().err


def test_bf16_errors_of_other_candidates_are_notes_not_failures(capsys):
    assert main([*SMALL, "--dtype", "bfloat16"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    for name in ("segment", MODEL):
        row = next(r for r in rows if r["candidate"] == name)
        assert row["max_rel_err"] < 1e-2
