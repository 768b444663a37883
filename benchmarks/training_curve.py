"""A training run's curve: has it flattened?

    python -m benchmarks.training_curve checkpoints/small-asterisk-fillets/metrics.jsonl.gz \
        --figure docs/training_curve.png

Reads a run's per-step history (`training.train`'s ``metrics.jsonl``, gzipped or not) and
answers the question a long run keeps asking: is the model still learning? It prints, per
span of ``--span`` steps, the mean training CE, the validation CE at the span's validations,
and the codes in use, then the least-squares slope of validation CE against optimiser steps
over the last ``--tail`` of the run with its standard error, in nats/sample per 1000 steps and
per 1e7 predicted samples. A slope within two standard errors of zero is a flat curve. It
draws the figure: training CE (a running mean) and validation CE against steps, and the EMA
codebook's perplexity.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path


def read_history(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (gzipped when the name ends in ``.gz``), by step."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{path}: no records")
    return sorted(records, key=lambda r: r["step"])


@dataclass
class Slope:
    """Least-squares slope of ``y`` against ``x``, with its standard error."""

    slope: float
    stderr: float
    n: int

    @property
    def flat(self) -> bool:
        """Zero is within two standard errors."""
        return abs(self.slope) <= 2 * self.stderr


def fit_slope(xs: list[float], ys: list[float]) -> Slope:
    n = len(xs)
    if n < 3:
        raise ValueError("need at least 3 points for a slope and its error")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all points at one x")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return Slope(slope, math.sqrt(residual / (n - 2) / sxx), n)


def valid_points(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["valid/ce"]) for r in records if "valid/ce" in r]


def spans(records: list[dict], span: int) -> list[dict]:
    """Per span of steps: mean training CE, validation CEs, mean codes in use."""
    rows: dict[int, dict] = {}
    for r in records:
        key = (r["step"] - 1) // span
        row = rows.setdefault(key, {"first": r["step"], "last": r["step"], "ce": [], "valid": []})
        row["last"] = r["step"]
        if "loss/ce" in r:
            row["ce"].append(r["loss/ce"])
        if "valid/ce" in r:
            row["valid"].append(r["valid/ce"])
        if "vq/codes_used" in r:
            row.setdefault("codes", []).append(r["vq/codes_used"])
    out = []
    for key in sorted(rows):
        row = rows[key]
        out.append(
            {
                "steps": f"{row['first']}-{row['last']}",
                "train_ce": sum(row["ce"]) / len(row["ce"]) if row["ce"] else None,
                "valid_ce": sum(row["valid"]) / len(row["valid"]) if row["valid"] else None,
                "codes_used": sum(row["codes"]) / len(row["codes"]) if row.get("codes") else None,
            }
        )
    return out


def running_mean(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def figure(records: list[dict], path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True)
    train = [(r["step"], r["loss/ce"]) for r in records if "loss/ce" in r]
    steps, ce = zip(*train, strict=True)
    top.plot(
        steps, running_mean(list(ce), smooth), color="0.6", label=f"train CE ({smooth}-step mean)"
    )
    vs, vce = zip(*valid_points(records), strict=True)
    top.plot(vs, vce, "o-", color="C0", label="validation CE")
    top.set_ylabel("CE (nats/sample)")
    top.legend(loc="lower left")
    ema = [(r["step"], r["vq/perplexity_ema"]) for r in records if "vq/perplexity_ema" in r]
    if ema:
        bottom.plot(*zip(*ema, strict=True), color="C1")
    bottom.set_ylabel("EMA code perplexity")
    bottom.set_xlabel("optimiser step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.training_curve",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("metrics", type=Path, help="a run's metrics.jsonl (or .jsonl.gz)")
    p.add_argument("--span", type=int, default=500, help="steps per table row")
    p.add_argument("--tail", type=float, default=0.5, help="fraction of the run the slope fits")
    p.add_argument(
        "--predictions",
        type=int,
        default=16000,
        help="predictions per optimiser step (windows x predictions; small: 4 x 4000)",
    )
    p.add_argument("--smooth", type=int, default=100, help="running-mean width of training CE")
    p.add_argument("--figure", type=Path, help="write the PNG here")
    args = p.parse_args(argv)
    if not 0 < args.tail <= 1:
        p.error("--tail must be in (0, 1]")
    try:
        records = read_history(args.metrics)
    except (OSError, ValueError) as e:
        p.error(str(e))
    per_step = args.predictions
    points = valid_points(records)
    last = records[-1]["step"]
    tail = [(s, v) for s, v in points if s > last * (1 - args.tail)]
    print("| steps | train CE | valid CE | codes in a step |")
    print("|---|---|---|---|")
    for row in spans(records, args.span):
        print(
            f"| {row['steps']} | {_fmt(row['train_ce'])} | {_fmt(row['valid_ce'])} "
            f"| {_fmt(row['codes_used'], 0)} |"
        )
    try:
        fit = fit_slope([s for s, _ in tail], [v for _, v in tail])
    except ValueError as e:
        print(f"\nno slope: {e} ({len(tail)} validations in the last {args.tail:.0%})")
        fit = None
    if fit is not None:
        per_1e7 = fit.slope * 1e7 / per_step
        print(
            f"\nvalidation CE over the last {args.tail:.0%} (steps {tail[0][0]}-{tail[-1][0]}, "
            f"{fit.n} validations): slope {1000 * fit.slope:+.4f} +- {1000 * fit.stderr:.4f} "
            f"nats/sample per 1000 steps ({per_1e7:+.4f} per 1e7 predicted samples at "
            f"{per_step} per step): {'flat' if fit.flat else 'still moving'}"
        )
    print(
        json.dumps(
            {
                "bench": "training_curve",
                "metrics": str(args.metrics),
                "last_step": last,
                "validations": len(points),
                "slope_per_1000_steps": None if fit is None else 1000 * fit.slope,
                "stderr_per_1000_steps": None if fit is None else 1000 * fit.stderr,
                "flat": None if fit is None else fit.flat,
            }
        )
    )
    if args.figure is not None:
        figure(records, args.figure, args.smooth)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
