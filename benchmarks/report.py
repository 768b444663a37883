"""How a benchmark hands back its rows: one JSON line each, its markdown table, and, with
``--json``, a file of the settings and rows that `benchmarks/results/` keeps."""

from __future__ import annotations

import argparse
import json

import numpy as np


def emit(rows: list[dict], table: str, args: argparse.Namespace) -> None:
    for r in rows:
        print(json.dumps(r))
    print(table)
    if args.json:
        text = json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str)
        args.json.write_text(text)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the finite ``values`` (nan where too few to say)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)
