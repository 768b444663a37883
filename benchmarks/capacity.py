"""What the engine can give N listeners at most: its capacity, and the first audio it allows.

    python -m benchmarks.capacity                          # bundled model, N 1 2 4 8 16, 4 s
    python -m benchmarks.capacity --clients 8 --repeats 5 --json capacity.json
    python -m benchmarks.capacity --quick                  # seconds (the test's)

For each N, decodes N requests for the same ``--seconds`` file in-process, in two ways that
alternate ``--repeats`` times (median wall time per row):

- ``batch``: one `Codec.decode_many` call, the engine's own segments with no row limit per
  request: the most audio per second these cores give, whatever the order it comes in.
- ``playback``: N `Codec.decode_stream` listeners on threads at once, as the app's requests
  run (each at most `Codec.playback_rows` rows, chunks in order), each heard by a player
  that starts on its first chunk: first audio (p50, p95), the listeners that played without
  a gap, and the worst stall (`benchmarks.serve_load.play`), without the app's own costs.

A listener who hears a file of L seconds without a gap from t0 on needs its last sample final
by t0 + L. Whatever the schedule, the N x L seconds of audio are not all final before
N x L / C, at a capacity of C times real time, so the last listener to get all its audio
cannot start before ``N x L / C - L`` (the ``bound`` column, from the batch capacity); with
the first N - 1 listeners done before it, the one before cannot start before
``(N - 1) x L / C - L``. No server in front of this engine does better on these cores; the
app adds its own costs (`benchmarks.serve_load`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.report import emit
from benchmarks.serve_load import play, speech
from vqwavenet import BUNDLED_MODEL, Codec
from vqwavenet.codec import DecodeRequest


def decode_batch(codec: Codec, codes, n: int, requests: int) -> float:
    """Wall seconds of one `decode_many` call for ``requests`` copies of ``codes`` (seeds 0..)."""
    reqs = [DecodeRequest(codes, 0, n, seed) for seed in range(requests)]
    started = time.perf_counter()
    codec.decode_many(reqs)
    return time.perf_counter() - started


def decode_playback(
    codec: Codec, codes, n: int, requests: int
) -> tuple[float, list[tuple[float, float]]]:
    """Wall seconds for ``requests`` threads to stream-decode ``codes`` at once (seeds 0..),
    and for each, a player's first audio and stall (`benchmarks.serve_load.play`) on its chunks
    as they came (the playback schedule holds the first back until the rest is predicted to
    come in time)."""
    chunks: list[list[tuple[float, float]]] = [[] for _ in range(requests)]
    errors: list[BaseException] = []

    def listen(seed: int) -> None:
        try:
            for chunk in codec.decode_stream(codes, 0, seed, n_samples=n):
                at = time.perf_counter() - started
                chunks[seed].append((at, len(chunk) / codec.sample_rate))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=listen, args=(i,)) for i in range(requests)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall, [play(c) for c in chunks]


def earliest_start(requests: int, seconds: float, capacity: float) -> float:
    """The latest-served listener's earliest gap-free first audio at ``capacity`` x real time."""
    return max(0.0, requests * seconds / capacity - seconds)


def run(args: argparse.Namespace) -> list[dict]:
    codec = Codec(args.model)
    wave = speech(args.seconds, codec.sample_rate)
    codes, n = codec.encode(wave), len(wave)
    rows = []
    for clients in args.clients:
        decode_batch(codec, codes, n, clients)  # untimed: rings and bindings of this size
        decode_playback(codec, codes, n, clients)
        walls: dict[str, list[float]] = {"batch": [], "playback": []}
        players: list[tuple[float, float]] = []  # every listener's (first audio, stall)
        for _ in range(args.repeats):
            walls["batch"].append(decode_batch(codec, codes, n, clients))
            wall, heard = decode_playback(codec, codes, n, clients)
            walls["playback"].append(wall)
            players += heard
        audio = clients * args.seconds
        capacity = audio / statistics.median(walls["batch"])
        for mode, mode_walls in walls.items():
            wall = statistics.median(mode_walls)
            row = {
                "clients": clients,
                "seconds": args.seconds,
                "mode": mode,
                "wall_s": round(wall, 3),
                "x_real_time": round(audio / wall, 3),
                "of_capacity": round(audio / wall / capacity, 3),
                "bound_last_s": round(earliest_start(clients, args.seconds, capacity), 2),
                "bound_next_to_last_s": round(
                    earliest_start(clients - 1, args.seconds, capacity), 2
                ),
                "walls_s": [round(w, 3) for w in mode_walls],
            }
            if mode == "playback":
                firsts = [first for first, _ in players]
                stalls = [stall for _, stall in players]
                row |= {
                    "first_audio_p50_s": round(float(np.percentile(firsts, 50)), 2),
                    "first_audio_p95_s": round(float(np.percentile(firsts, 95)), 2),
                    "gap_free": sum(s <= 0 for s in stalls),
                    "listeners": len(stalls),
                    "worst_stall_s": round(max(stalls), 3),
                }
            rows.append(row)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"\n{args.model.name}, {args.seconds:g} s file, median of {args.repeats} (first audio and "
        "gaps over every listener of every repeat); bound: the earliest gap-free first audio "
        "of the last (and next-to-last) listener at the batch capacity",
        "| clients | mode | wall s | x real time | of capacity | first audio p50 / p95 s "
        "| gap-free | worst stall s | bound, last / next-to-last s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        heard = (
            f"{r['first_audio_p50_s']} / {r['first_audio_p95_s']} | "
            f"{r['gap_free']}/{r['listeners']} | {r['worst_stall_s']}"
            if r["mode"] == "playback"
            else "- | - | -"
        )
        lines.append(
            f"| {r['clients']} | {r['mode']} | {r['wall_s']} | {r['x_real_time']} | "
            f"{r['of_capacity']:.0%} | {heard} | {r['bound_last_s']} / "
            f"{r['bound_next_to_last_s']} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="exported model directory")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16], metavar="N")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the decoded file")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per row")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="1 and 2 short requests, once (the test's)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.repeats = [1, 2], 0.5, 1
    if min(*args.clients, args.repeats) < 1 or not args.seconds > 0:
        print("error: --clients, --repeats and --seconds must be positive", file=sys.stderr)
        return 2
    rows = run(args)
    emit(rows, table(rows, args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
