"""The resynthesis-quality benchmark on the app tests' tiny model: its scoring is wired right
(a clip against itself scores the metrics' maxima, a resynthesis far less) and it prints a row
per precision and setting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.resynth_quality import main, scores
from tests.conftest import DATA
from tests.test_export import clip


def test_scores_reach_their_maxima_only_on_the_clip_itself():
    x = clip("agent-newlocation")
    pesq_same, stoi_same = scores(x, x, 16000)
    assert pesq_same > 4.6 and stoi_same > 0.999
    noisy = x + 0.05 * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
    pesq_noisy, stoi_noisy = scores(x, noisy, 16000)
    assert pesq_noisy < 2 and stoi_noisy < 0.95
    # STOI compares frames in place: a 10 ms shift costs it. PESQ aligns the two first.
    pesq_late, stoi_late = scores(x, np.roll(x, 160), 16000)
    assert stoi_late < 0.95 and pesq_late > 4.6


def test_resynth_quality_prints_a_row_per_precision_and_setting(app_model_dir, capsys):
    wav = str(DATA / "agent-newlocation.wav")
    args = ["--model", str(app_model_dir), "--wav", wav, "--seeds", "2", "--segments", "0.5"]
    assert main([*args, "--burn-ins", "0", "400", "--warmups", "steady", "exact"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    original, *decoded = rows
    assert original["segment_s"] == "original" and original["stoi"] > 0.999
    settings = [("unfolded", "", 0)] + [
        (0.5, start, burn_in) for start in ("steady", "exact") for burn_in in (0, 400)
    ]
    assert [(r["precision"], r["segment_s"], r["warmup"], r["burn_in"]) for r in decoded] == [
        (precision, *setting) for precision in ("fp32", "int8") for setting in settings
    ]
    for r in decoded:
        assert r["n"] == 2 and r["stoi"] < original["stoi"] - 0.1 and r["realtime"] > 0
        assert r["pesq"] < original["pesq"] - 1 or np.isnan(r["pesq"])
    # Paired differences are taken against unfolded fp32, so its own row differs by 0.
    assert decoded[0]["stoi_vs_unfolded"] == 0
    for r in decoded[1:]:
        assert r["stoi_vs_unfolded"] == pytest.approx(r["stoi"] - decoded[0]["stoi"])
    header = "| precision | segment (s) | start | burn-in | PESQ-WB | STOI | STOI - unfolded fp32"
    assert header in out


def test_resynth_quality_refuses_zero_seeds_and_negative_burn_ins(app_model_dir, capsys):
    assert main(["--model", str(app_model_dir), "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert main(["--model", str(app_model_dir), "--burn-ins", "-1"]) == 2
    assert "--burn-ins must be >= 0" in capsys.readouterr().err
