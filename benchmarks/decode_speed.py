"""One file decoded as the CLI and the app decode it: the engine's own choice of segments and
worker threads, for several file lengths.

    python -m benchmarks.decode_speed                          # the bundled model, fp32
    python -m benchmarks.decode_speed --int8 --seconds 2 5 7.8 --compare-streams-per-worker 16
    python -m benchmarks.decode_speed --compare-warmup steady  # segments started from silence

``benchmarks.generation`` times 8 s files with the thread count fixed; this one shows what a
user's file of another length gets. Each length is decoded ``--reps`` times after one untimed
call at its size (the first call also allocates the rings and binds every step phase);
``--compare-streams-per-worker`` alternates each rep with that `Codec.streams_per_worker` (the
threshold for a second worker) in the same process, for a ratio on these noisy machines, and
``--compare-warmup`` with a codec whose later segments start another way (`Codec`'s
``warmup``, with that start's own `Codec.burn_in`), ``--compare-min-segment-s`` with one
whose automatic segments may be shorter or must be longer (`Codec.min_segment`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from vqwavenet import BUNDLED_MODEL, Codec, DecodeRequest

ROOT = Path(__file__).resolve().parent.parent


def time_decode(codec: Codec, req: DecodeRequest, streams_per_worker: int) -> float:
    """Seconds of one `Codec.decode_many` call with the given worker threshold."""
    codec.streams_per_worker = streams_per_worker
    t = time.perf_counter()
    codec.decode_many([req])
    return time.perf_counter() - t


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    p.add_argument("--int8", action="store_true")
    p.add_argument("--seconds", type=float, nargs="+", default=[1, 2, 4, 6, 7.8, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compare-streams-per-worker", type=int, default=None, metavar="N")
    p.add_argument(
        "--compare-warmup",
        choices=["primed", "steady", "exact"],
        default=None,
        help="also a codec whose later segments start this way (with its own burn-in)",
    )
    p.add_argument(
        "--compare-min-segment-s",
        type=float,
        default=None,
        metavar="S",
        help="also a codec whose shortest automatic segment is S seconds",
    )
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    compared = [args.compare_streams_per_worker or 1, args.compare_min_segment_s or 1]
    if args.reps < 1 or min(args.seconds) <= 0 or min(compared) <= 0:
        print(
            "error: --reps, --seconds and the --compare-* values must be positive",
            file=sys.stderr,
        )
        return 2
    codec = Codec(args.model, int8=args.int8)
    variants = [(codec, codec.streams_per_worker)]  # (codec, worker threshold), alternated
    if args.compare_streams_per_worker is not None:
        variants.append((codec, args.compare_streams_per_worker))
    if args.compare_warmup is not None:
        other = Codec(args.model, int8=args.int8, warmup=args.compare_warmup)
        variants.append((other, other.streams_per_worker))
    if args.compare_min_segment_s is not None:
        other = Codec(args.model, int8=args.int8, min_segment_s=args.compare_min_segment_s)
        variants.append((other, other.streams_per_worker))
    rng = np.random.default_rng(0)
    rows = []
    for seconds in args.seconds:
        n = round(seconds * codec.sample_rate)
        codes = rng.integers(0, codec.codebook_size, codec.geometry.padding(n)[2])
        req = DecodeRequest(codes, 0, n, seed=1)
        times: list[list[float]] = [[] for _ in variants]
        for c, p in variants:
            time_decode(c, req, p)  # untimed: rings and bindings at this size
        for _ in range(args.reps):
            for v, (c, p) in enumerate(variants):
                times[v].append(time_decode(c, req, p))
        for (c, p), t in zip(variants, times):
            c.streams_per_worker = p
            segments = len(c.plan([req], None, None, None).folds[0].bounds)
            row = {
                "seconds": seconds,
                "segments": segments,
                "min_segment": c.min_segment,
                "warmup": c.warmup,
                "burn_in": c.burn_in,
                "streams_per_worker": p,
                "workers": c.workers_for(segments),
                "realtime_median": round(seconds / statistics.median(t), 3),
                "realtime_best": round(seconds / min(t), 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    precision = "int8" if args.int8 else "fp32"
    print(f"\n{args.model.name}, {precision}, median and best of {args.reps}")
    print(
        "| seconds | segments | min segment | start | burn-in | streams_per_worker | workers "
        "| x real time (median) | best |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seconds']} | {r['segments']} | {r['min_segment']} | {r['warmup']} "
            f"| {r['burn_in']} "
            f"| {r['streams_per_worker']} | {r['workers']} "
            f"| {r['realtime_median']} | {r['realtime_best']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
