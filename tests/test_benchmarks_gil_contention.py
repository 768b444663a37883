"""The GIL contention benchmark's quick mode: a row per switch interval and load, and the
interpreter's own switch interval back as it was."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.gil_contention import BusyThread, main


def test_gil_contention_quick_mode_reports_every_interval_and_load(capsys):
    before = sys.getswitchinterval()
    assert main(["--quick", "--intervals", "5", "0.2"]) == 0
    # back as it was, to the microsecond CPython keeps it in
    assert sys.getswitchinterval() == pytest.approx(before, abs=2e-6)
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["switch_interval_ms"], r["load"]) for r in rows] == [
        (ms, load) for ms in (5.0, 0.2) for load in ("alone", "busy thread")
    ]
    assert all(r["wall_s"] > 0 and r["x_real_time"] > 0 for r in rows)
    assert [r["slowdown"] for r in rows if r["load"] == "alone"] == [1.0, 1.0]
    assert "| switch interval ms | load | wall s | x real time | slowdown |" in out


def test_the_busy_thread_keeps_to_its_share():
    """It holds the GIL in bursts of busy_ms per period_ms, not all the time."""
    import time

    with BusyThread(0.002, 0.010) as busy:
        time.sleep(0.5)
    assert 0.05 < busy.busy < 0.35


def test_gil_contention_refuses_bad_arguments(capsys):
    assert main(["--busy-ms", "20", "--period-ms", "10"]) == 2
    assert "--busy-ms between 0 and --period-ms" in capsys.readouterr().err
