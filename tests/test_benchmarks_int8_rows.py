"""The per-row int8 benchmark's quick mode: a row per variant and row count, and the property it
reports (alone equals batched for fp32 and per-row int8, not for per-call int8)."""

from __future__ import annotations

import json

from benchmarks.int8_rows import main


def test_int8_rows_quick_mode_reports_every_variant(capsys):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["rows"], r["variant"]) for r in rows] == [
        (n, v) for n in (1, 4) for v in ("fp32", "int8_per_row", "int8_per_call")
    ]
    assert all(r["ms_per_step"] > 0 and r["row_steps_per_s"] > 0 for r in rows)
    batched = {r["variant"]: r["alone_equals_batched"] for r in rows if r["rows"] == 4}
    assert batched == {"fp32": True, "int8_per_row": True, "int8_per_call": False}
    assert "| rows | variant | ms/step | row-steps/s |" in out


def test_int8_rows_refuses_bad_arguments(capsys):
    assert main(["--rows", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
