"""Paired comparison of models evaluated on the same utterances.

Resynthesis scores vary far more between utterances than between models, so two models' mean
STOI over different prompts (or over a small seeded sample) rank them poorly. Evaluated on the
same utterances (`training.evaluate ... --seed S --json F` with the same data, split, limit,
speakers and seed), the per-utterance differences rank them with a standard error::

    python -m benchmarks.compare_evals shipped.json candidate.json [more.json ...]

For each later file against the first: per group (each voice, the seen voices together, each
held-out voice), the mean difference of STOI, envelope r and log-mel distance over the
utterances both files scored, its standard error, and on how many utterances the later model
scored higher STOI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.report import mean_se

METRICS = ("stoi", "envelope", "log_mel")


def load(path: str | Path) -> dict[str, dict]:
    """Utterance id -> its scores, from a `training.evaluate` JSON report."""
    report = json.loads(Path(path).read_text())
    return {u["id"]: u for u in report["utterances"]}


def groups_of(utts: dict[str, dict]) -> dict[str, list[str]]:
    """Group name -> utterance ids: each group of the report, plus every seen voice together."""
    seen: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for uid, u in utts.items():
        held_out = u["group"].startswith("held-out")
        (held if held_out else seen).setdefault(u["group"], []).append(uid)
    together = {"seen (all)": [i for ids in seen.values() for i in ids]} if seen else {}
    return {**dict(sorted(seen.items())), **together, **dict(sorted(held.items()))}


def compare(base: dict[str, dict], other: dict[str, dict]) -> list[dict]:
    """One row per group: paired differences (other - base) over the utterances both scored."""
    common = {uid: u for uid, u in base.items() if uid in other}
    rows = []
    for group, ids in groups_of(common).items():
        row = {"group": group, "utterances": len(ids)}
        for m in METRICS:
            pairs = [
                (base[i][m], other[i][m])
                for i in ids
                if base[i].get(m) is not None and other[i].get(m) is not None
            ]
            if not pairs:
                continue
            row[m] = mean_se([b - a for a, b in pairs])
            row[f"{m}_base"] = sum(a for a, _ in pairs) / len(pairs)
            if m == "stoi":
                row["stoi_wins"] = sum(b > a for a, b in pairs)
        rows.append(row)
    return rows


def markdown(base_name: str, other_name: str, rows: list[dict]) -> str:
    lines = [
        f"{other_name} - {base_name} (paired over the same utterances; +- one standard error)",
        "",
        "| group | utts | STOI (base) | STOI diff | higher STOI | envelope r diff | log-mel diff |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(row, m):
        if m not in row:
            return "–"
        mean, err = row[m]
        return f"{mean:+.3f} ± {err:.3f}"

    for r in rows:
        base_stoi = f"{r['stoi_base']:.3f}" if "stoi_base" in r else "–"
        wins = f"{r['stoi_wins']}/{r['utterances']}" if "stoi_wins" in r else "–"
        lines.append(
            f"| {r['group']} | {r['utterances']} | {base_stoi} | {cell(r, 'stoi')} | {wins} "
            f"| {cell(r, 'envelope')} | {cell(r, 'log_mel')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_evals",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("base", help="training.evaluate JSON report of the reference model")
    p.add_argument("others", nargs="+", help="reports of the models compared with it")
    args = p.parse_args(argv)
    base = load(args.base)
    for path in args.others:
        other = load(path)
        rows = compare(base, other)
        if not rows:
            print(f"error: {path} and {args.base} share no utterance", file=sys.stderr)
            return 2
        print(markdown(args.base, path, rows))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
