"""How much a busy Python thread slows the engine, by the interpreter's GIL switch interval.

    python -m benchmarks.gil_contention                    # bundled model, 8 streams x 4 s
    python -m benchmarks.gil_contention --intervals 5 1 0.2 0.05 --repeats 3
    python -m benchmarks.gil_contention --quick            # seconds (the test's)

The engine's workers release the GIL inside onnxruntime and take it back after every decoder
step. In a web server other Python threads (the event loop, the request handlers) hold it in
bursts, and a worker that waits for it leaves its core idle until the holder lets go, which
CPython forces only after the switch interval (5 ms by default, several decoder steps). Each
run decodes ``--streams`` playback streams of the same file at once on threads, as the app's
requests do, either alone or beside a thread that spins in pure Python for ``--busy-ms`` of
every ``--period-ms`` (a server's share of the GIL); the runs alternate ``--repeats`` times
and a row reports the median multiple of real time (all streams' audio over the wall time)
and what the busy thread kept (``slowdown``: alone over beside it, at that interval). The
busy thread itself takes ``busy_ms / period_ms`` of one core, so on two cores about
``1 - busy_ms / period_ms / 2`` of the engine's speed is the best a run beside it can keep.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks.capacity import decode_playback
from benchmarks.report import emit
from benchmarks.serve_load import speech
from vqwavenet import BUNDLED_MODEL, Codec


class BusyThread:
    """A thread that runs pure Python (holding the GIL) for ``busy_s`` of every ``period_s``."""

    def __init__(self, busy_s: float, period_s: float):
        self.busy_s, self.period_s = busy_s, period_s
        self.stopping = threading.Event()
        self.busy = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            t0 = time.perf_counter()
            spins = 0
            while time.perf_counter() - t0 < self.busy_s:
                spins += 1
            self.busy += time.perf_counter() - t0
            self.stopping.wait(self.period_s - self.busy_s)

    def __enter__(self) -> BusyThread:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()


def decode_at_once(codec: Codec, codes, n: int, streams: int) -> float:
    """Wall seconds for ``streams`` threads to stream-decode ``codes`` at once (seeds 0..)."""
    return decode_playback(codec, codes, n, streams)[0]


def run(args: argparse.Namespace) -> list[dict]:
    codec = Codec(args.model)
    wave = speech(args.seconds, codec.sample_rate)
    codes, n = codec.encode(wave), len(wave)
    audio = args.streams * args.seconds
    default = sys.getswitchinterval()
    walls: dict[tuple[float, str], list[float]] = {}
    try:
        decode_at_once(codec, codes, n, args.streams)  # untimed: rings and bindings
        for _ in range(args.repeats):
            for ms in args.intervals:
                sys.setswitchinterval(ms / 1000)
                walls.setdefault((ms, "alone"), []).append(
                    decode_at_once(codec, codes, n, args.streams)
                )
                with BusyThread(args.busy_ms / 1000, args.period_ms / 1000):
                    walls.setdefault((ms, "busy thread"), []).append(
                        decode_at_once(codec, codes, n, args.streams)
                    )
    finally:
        sys.setswitchinterval(default)
    rows = []
    for ms in args.intervals:
        alone = statistics.median(walls[(ms, "alone")])
        for load in ("alone", "busy thread"):
            wall = statistics.median(walls[(ms, load)])
            rows.append(
                {
                    "switch_interval_ms": ms,
                    "load": load,
                    "wall_s": round(wall, 3),
                    "x_real_time": round(audio / wall, 3),
                    "slowdown": round(wall / alone, 3),
                    "walls_s": [round(w, 3) for w in walls[(ms, load)]],
                }
            )
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"\n{args.model.name}, {args.streams} streams x {args.seconds:g} s, busy thread "
        f"{args.busy_ms:g} ms of every {args.period_ms:g} ms, median of {args.repeats}",
        "| switch interval ms | load | wall s | x real time | slowdown |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['switch_interval_ms']:g} | {r['load']} | {r['wall_s']} | {r['x_real_time']} "
            f"| {r['slowdown']}x |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gil_contention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="exported model directory")
    p.add_argument("--streams", type=int, default=8, help="playback streams decoded at once")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the decoded file")
    p.add_argument(
        "--intervals",
        type=float,
        nargs="+",
        default=[5.0, 0.2],
        metavar="MS",
        help="GIL switch intervals to compare, in ms (CPython's default is 5)",
    )
    p.add_argument("--busy-ms", type=float, default=2.0, help="the busy thread's bursts")
    p.add_argument("--period-ms", type=float, default=10.0, help="one burst per this period")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per row")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="2 short streams, once (the test's)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.streams, args.seconds, args.repeats = 2, 0.5, 1
    if (
        min(args.streams, args.repeats) < 1
        or not args.seconds > 0
        or min(args.intervals) <= 0
        or not 0 < args.busy_ms < args.period_ms
    ):
        print(
            "error: --streams, --repeats, --seconds and --intervals must be positive, and "
            "--busy-ms between 0 and --period-ms",
            file=sys.stderr,
        )
        return 2
    rows = run(args)
    emit(rows, table(rows, args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
