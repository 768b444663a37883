"""The serving-load benchmark's quick mode on the app tests' tiny model: it starts the app, runs
every client count one at a time and at once, and reports each row (the numbers themselves are
for quiet cores)."""

from __future__ import annotations

import json

from benchmarks.serve_load import Listener, main


def test_serve_load_quick_mode_reports_every_row(app_model_dir, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main(["--model", str(app_model_dir), "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [(r["seconds"], r["clients"], r["mode"]) for r in rows] == [
        (s, n, mode) for s in (0.5, 1.0) for n in (1, 2) for mode in ("one at a time", "concurrent")
    ]
    for r in rows:
        assert 0 < r["first_audio_p50"] <= r["first_audio_p95"]
        assert r["first_audio_p50"] <= r["last_sample_p50"] <= r["last_sample_p95"] <= r["wall_s"]
        assert r["realtime"] > 0 and 0 <= r["gap_free"] <= r["clients"]
        assert r["worst_stall_s"] >= 0
        assert (r.get("speedup", 0) > 0) == (r["mode"] == "concurrent")
    assert json.loads(out.read_text())["rows"] == rows
    assert "| file s | clients | mode | wall s | x real time | speedup |" in printed


def test_a_listener_plays_without_a_gap_only_if_each_segment_came_in_time():
    """The gap rule: a player starts on the first segment; a segment that appears after the
    audio before it has played out is late, and the stall is the latest one, against the
    schedule of a player that never waited."""
    listener = Listener.__new__(Listener)
    listener.last = 3.0
    listener.segments = [(1.0, 0.5), (1.4, 0.5), (2.0, 1.0)]  # the third is due at 2.0
    assert listener.summary() == {"first_audio": 1.0, "last_sample": 3.0, "stall": 0.0}
    listener.segments = [(1.0, 0.5), (1.7, 0.5), (2.5, 1.0)]  # 0.2 late, then 0.5 late
    assert abs(listener.summary()["stall"] - 0.5) < 1e-9
    # A player that waits for 0.8 s of audio starts on the second segment, then never waits.
    assert listener.summary(0.8) == {"first_audio": 1.7, "last_sample": 3.0, "stall": 0.0}
    listener.segments = []  # no stream: the wav at the end
    assert listener.summary() == {"first_audio": 3.0, "last_sample": 3.0, "stall": 0.0}


def test_serve_load_refuses_bad_arguments(capsys):
    assert main(["--clients", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["--start-buffer", "-1"]) == 2
    assert "not negative" in capsys.readouterr().err
