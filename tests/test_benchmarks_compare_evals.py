"""benchmarks.compare_evals: paired differences over the utterances two reports share."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import compare_evals


def _report(path, scores: dict[str, tuple[str, float, float | None]]):
    """A `training.evaluate`-shaped JSON report: id -> (group, STOI, envelope r)."""
    utts = [
        {"id": uid, "group": group, "stoi": stoi, "envelope": env, "log_mel": 1.0}
        for uid, (group, stoi, env) in scores.items()
    ]
    path.write_text(json.dumps({"meta": {}, "rows": [], "utterances": utts, "notes": []}))
    return path


def test_differences_are_paired_over_shared_utterances_with_their_standard_error(tmp_path):
    # The utterances differ far more from each other than the models do: model b is 0.01 or
    # 0.03 higher on each shared one. "x" is only in a (and would lower a's unpaired mean).
    base = _report(
        tmp_path / "a.json",
        {
            "u1": ("Allison", 0.2, 0.1),
            "u2": ("Allison", 0.8, None),
            "u3": ("June", 0.5, 0.3),
            "x": ("June", 0.0, 0.0),
            "h1": ("held-out SmallFish (as Allison)", 0.1, 0.2),
        },
    )
    other = _report(
        tmp_path / "b.json",
        {
            "u1": ("Allison", 0.21, 0.2),
            "u2": ("Allison", 0.83, 0.5),
            "u3": ("June", 0.51, 0.1),
            "h1": ("held-out SmallFish (as Allison)", 0.05, 0.2),
        },
    )
    rows = compare_evals.compare(compare_evals.load(base), compare_evals.load(other))
    by = {r["group"]: r for r in rows}
    assert list(by) == ["Allison", "June", "seen (all)", "held-out SmallFish (as Allison)"]
    seen = by["seen (all)"]
    assert seen["utterances"] == 3 and seen["stoi_wins"] == 3
    mean, err = seen["stoi"]
    diffs = [0.01, 0.03, 0.01]
    sd = math.sqrt(sum((d - 0.05 / 3) ** 2 for d in diffs) / 2)
    assert mean == pytest.approx(0.05 / 3) and err == pytest.approx(sd / math.sqrt(3))
    # an utterance without a score is left out of that metric only
    assert by["Allison"]["envelope"][0] == pytest.approx(0.1)
    assert math.isnan(by["Allison"]["envelope"][1])
    assert by["held-out SmallFish (as Allison)"]["stoi"][0] == pytest.approx(-0.05)
    assert by["held-out SmallFish (as Allison)"]["stoi_wins"] == 0


def test_cli_prints_a_table_per_compared_model_and_refuses_disjoint_reports(tmp_path, capsys):
    a = _report(tmp_path / "a.json", {"u1": ("Allison", 0.4, 0.1), "u2": ("Allison", 0.5, 0.2)})
    b = _report(tmp_path / "b.json", {"u1": ("Allison", 0.5, 0.1), "u2": ("Allison", 0.4, 0.2)})
    assert compare_evals.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| Allison | 2 | 0.450 | +0.000 ± 0.100 | 1/2 |" in out
    c = _report(tmp_path / "c.json", {"v1": ("Allison", 0.4, 0.1)})
    assert compare_evals.main([str(a), str(c)]) == 2
    assert "share no utterance" in capsys.readouterr().err
