"""The one-file decode benchmark on the app tests' tiny model: a row per length and worker
policy, with the worker count the engine chose."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.decode_speed import main


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a second worker needs a second core")
def test_decode_speed_prints_a_row_per_length_and_policy(app_model_dir, capsys):
    args = ["--model", str(app_model_dir), "--seconds", "0.25", "0.6", "--reps", "1"]
    compare = ["--compare-streams-per-worker", "16", "--compare-warmup", "exact"]
    assert main([*args, *compare, "--compare-min-segment-s", "0.25"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    got = [
        (r["seconds"], r["segments"], r["min_segment"], r["streams_per_worker"], r["workers"])
        for r in rows
    ]
    # The export wrote a primer, so the codec's own segments are an eighth of a second: two
    # for 0.25 s, five for 0.6 s, which get a second worker with the engine's own threshold
    # (1 stream each) but not with the former one (16). Exact starts, and the codec told to
    # keep quarter seconds, cut one and two.
    assert got == [
        (0.25, 2, 2000, 1, 2),
        (0.25, 2, 2000, 16, 1),
        (0.25, 1, 4000, 1, 1),
        (0.25, 1, 4000, 1, 1),
        (0.6, 5, 2000, 1, 2),
        (0.6, 5, 2000, 16, 1),
        (0.6, 2, 4000, 1, 2),
        (0.6, 2, 4000, 1, 2),
    ]
    # Its own starts are primed; the third codec's are exact.
    assert [(r["warmup"], r["burn_in"]) for r in rows] == [
        ("primed", 160),
        ("primed", 160),
        ("exact", 960),
        ("primed", 160),
    ] * 2
    assert all(r["realtime_best"] >= r["realtime_median"] > 0 for r in rows)
    assert "| seconds | segments | min segment | start | burn-in | streams_per_worker |" in out


def test_decode_speed_refuses_bad_arguments(app_model_dir, capsys):
    assert main(["--model", str(app_model_dir), "--reps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
