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
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def read_history(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (gzipped when the name ends in ``.gz``), by step."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{path}: no records")
    if not all(isinstance(r, dict) and "step" in r for r in records):
        raise ValueError(f"{path}: not a metrics.jsonl (a record without a step)")
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
    try:
        slope, intercept = statistics.linear_regression(xs, ys)
    except statistics.StatisticsError as e:  # all points at one x
        raise ValueError(str(e)) from e
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    sxx = statistics.pvariance(xs) * n
    return Slope(slope, math.sqrt(residual / (n - 2) / sxx), n)


def valid_points(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["valid/ce"]) for r in records if "valid/ce" in r]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def spans(records: list[dict], span: int) -> list[dict]:
    """Per span of steps: mean training CE, mean validation CE, mean codes used in a step."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault((r["step"] - 1) // span, []).append(r)
    return [
        {
            "steps": f"{group[0]['step']}-{group[-1]['step']}",
            "train_ce": _mean([r["loss/ce"] for r in group if "loss/ce" in r]),
            "valid_ce": _mean([r["valid/ce"] for r in group if "valid/ce" in r]),
            "codes_used": _mean([r["vq/codes_used"] for r in group if "vq/codes_used" in r]),
        }
        for _, group in sorted(groups.items())
    ]


def running_mean(values: list[float], width: int) -> np.ndarray:
    """Mean of each value and the ``width - 1`` before it (fewer at the start)."""
    total = np.cumsum(np.asarray(values, dtype=np.float64))
    total[width:] -= total[:-width].copy()
    return total / np.minimum(np.arange(1, len(values) + 1), width)


def figure(records: list[dict], path: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True)
    train = [(r["step"], r["loss/ce"]) for r in records if "loss/ce" in r]
    if train:
        steps, ce = zip(*train, strict=True)
        top.plot(
            steps, running_mean(ce, smooth), color="0.6", label=f"train CE ({smooth}-step mean)"
        )
    valid = valid_points(records)
    if valid:
        top.plot(*zip(*valid, strict=True), "o-", color="C0", label="validation CE")
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
