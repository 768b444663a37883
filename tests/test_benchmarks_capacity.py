"""The capacity benchmark: its bound on the first audio, and its quick mode's rows."""

from __future__ import annotations

import json

import pytest

from benchmarks.capacity import earliest_start, main
from benchmarks.serve_load import play


def test_the_bound_is_when_the_last_listener_can_start_without_a_gap():
    # eight 4 s files at 3.2x real time: all 32 s final after 10 s, the last listener's 4 s
    # must play to then, so it starts at 6 s at the earliest
    assert earliest_start(8, 4.0, 3.2) == pytest.approx(6.0)
    # an engine fast enough for all of them starts them at once
    assert earliest_start(2, 4.0, 3.0) == 0.0
    assert earliest_start(1, 4.0, 0.5) == pytest.approx(4.0)


def test_capacity_quick_mode_reports_both_modes_per_client_count(capsys):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["clients"], r["mode"]) for r in rows] == [
        (n, mode) for n in (1, 2) for mode in ("batch", "playback")
    ]
    for r in rows:
        assert r["wall_s"] > 0 and r["x_real_time"] > 0
        batch = next(b for b in rows if b["clients"] == r["clients"] and b["mode"] == "batch")
        capacity = batch["x_real_time"]
        assert r["bound_last_s"] == pytest.approx(
            earliest_start(r["clients"], 0.5, capacity), abs=0.02
        )
    assert [r["of_capacity"] for r in rows if r["mode"] == "batch"] == [1.0, 1.0]
    for r in rows:
        if r["mode"] == "playback":  # the first chunk comes, and not after the whole decode
            assert 0 < r["first_audio_p50_s"] <= r["first_audio_p95_s"] <= r["wall_s"] + 0.01
            assert 0 <= r["gap_free"] <= r["listeners"] == r["clients"]
    assert "| clients | mode | wall s | x real time | of capacity |" in out


def test_capacity_refuses_bad_arguments(capsys):
    assert main(["--clients", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_the_player_starts_on_its_buffer_and_measures_its_worst_lateness():
    # chunks of 1 s at 1, 1.5 and 3.5 s: a player starting at 1 s needs the third at 3 s
    assert play([(1.0, 1.0), (1.5, 1.0), (3.5, 1.0)]) == (1.0, 0.5)
    # waiting for 2 s of audio starts it at 1.5 s: then the third is on time
    assert play([(1.0, 1.0), (1.5, 1.0), (3.5, 1.0)], start_buffer=2.0) == (1.5, 0.0)
