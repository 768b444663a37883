"""The training-curve report: slope, flatness, spans and the figure, on synthetic histories."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from benchmarks import training_curve as tc


def _history(path, valid, every=100, ce=2.4):
    """A metrics.jsonl with a training record per step and ``valid(step)`` every ``every``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for step in range(1, 20 * every + 1):
            r = {"step": step, "loss/ce": ce, "vq/codes_used": 40.0, "vq/perplexity_ema": 200.0}
            if step % every == 0:
                r["valid/ce"] = valid(step)
            f.write(json.dumps(r) + "\n")
    return path


def test_slope_and_its_error_match_a_known_line():
    xs = [float(x) for x in range(10)]
    fit = tc.fit_slope(xs, [3.0 - 0.5 * x for x in xs])
    assert fit.slope == pytest.approx(-0.5) and fit.stderr == pytest.approx(0, abs=1e-12)
    assert not fit.flat
    wobble = [(-1) ** i * 0.1 for i in range(10)]  # no trend: slope small against its error
    assert tc.fit_slope(xs, wobble).flat
    with pytest.raises(ValueError):
        tc.fit_slope([1.0, 2.0], [1.0, 2.0])


def test_a_falling_curve_is_still_moving_and_a_level_one_is_flat(tmp_path, capsys):
    falling = _history(tmp_path / "falling.jsonl", lambda s: 3.0 - 1e-4 * s + 0.001 * math.sin(s))
    assert tc.main([str(falling), "--span", "500"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["flat"] is False
    assert result["slope_per_1000_steps"] == pytest.approx(-0.1, rel=0.05)
    assert "| 1-500 | 2.400 |" in out and "still moving" in out

    level = _history(tmp_path / "level.jsonl.gz", lambda s: 2.6 + 0.01 * (-1) ** (s // 100))
    figure = tmp_path / "curve.png"
    assert tc.main([str(level), "--figure", str(figure)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert result["flat"] is True and result["last_step"] == 2000 and result["validations"] == 20
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_usage_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        tc.main([str(empty)])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        tc.main([str(tmp_path / "missing.jsonl")])


def test_a_run_without_validations_has_no_slope_but_a_figure(tmp_path, capsys):
    """A short run (no validation yet) reports why there is no slope and still draws."""
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss/ce": 3.0}) + "\n" for s in (1, 2, 3)))
    figure = tmp_path / "short.png"
    assert tc.main([str(path), "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "no slope" in out and figure.read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"loss/ce": 3.0}\n')
    with pytest.raises(SystemExit) as e:
        tc.main([str(bad)])
    assert e.value.code == 2
