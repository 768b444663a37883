"""How a benchmark hands back its rows: one JSON line each, its markdown table, and, with
``--json``, a file of the settings and rows that `benchmarks/results/` keeps."""

from __future__ import annotations

import argparse
import json


def emit(rows: list[dict], table: str, args: argparse.Namespace) -> None:
    for r in rows:
        print(json.dumps(r))
    print(table)
    if args.json:
        text = json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str)
        args.json.write_text(text)
