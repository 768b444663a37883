"""Serving load: N listeners decoding at once through gradio_client against the app on loopback,
against the same decodes one after another.

    python -m benchmarks.serve_load                        # bundled model, fp32, N 1 2 4 8 16
    python -m benchmarks.serve_load --int8                 # the int8 graphs
    python -m benchmarks.serve_load --clients 8 --seconds 4 --json load.json
    python -m benchmarks.serve_load --quick                # a smoke run in seconds (the test's)

Starts the app (``python -m app``) in a process of its own on a free loopback port, or uses a
running one (``--url``; ``--model`` must be its model). Codes files of each length come from
the test clips, encoded with the model. After one untimed decode per length, for each length
and client count N: the N decodes one after another (the baseline), then N clients at once,
each its own gradio_client ``Client``, released together; seed i for client i.

Each client listens as a browser does. The app streams decoded audio as HLS (AAC segments
through ffmpeg): at every update the client receives, it reads the stream's playlist and notes
when each segment appeared and how long it plays. Gradio's encoder holds back the end of each
chunk until the next one comes, so a stream's first segment is short; like a browser's, the
modelled player starts once it holds ``--start-buffer`` seconds. Per request, from its
submission: **first audio** (when that player starts), **last sample** (the finished result,
the exact wav) and whether it **played without a gap**: from its start the player reaches each
next segment only after it appeared (``stall``: the latest a segment came against the schedule
of a player that never waited; within ``--gap-tolerance``, the clients' own polling, it counts
as none).
Without ffmpeg the app plays the whole wav at the end: first audio is the last sample. Per row:
the wall time (the baseline's sum, or from the first submission to the last result), real-time
factor (N x file length / wall time), speedup of the concurrent row over the baseline, p50 and
p95 over requests, the requests that played without a gap and the worst stall. One JSON line
per row, a markdown table, and ``--json FILE``. The clients run in this process, beside the
app on the same cores, as a browser on the same machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from vqwavenet import BUNDLED_MODEL, Codec
from vqwavenet.codes_file import CodesFile

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FROM_FILE = "(the file's speaker)"


def speech(seconds: float, sr: int) -> np.ndarray:
    """The test clips back to back, repeated to ``seconds``."""
    x = np.concatenate([sf.read(p, dtype="float32")[0] for p in sorted(DATA.glob("*.wav"))])
    return np.tile(x, int(np.ceil(seconds * sr / len(x))))[: round(seconds * sr)]


def codes_file(codec: Codec, seconds: float, folder: Path) -> Path:
    wave = speech(seconds, codec.sample_rate)
    path = folder / f"speech{seconds:g}s.vqwc"
    CodesFile(
        codec.encode(wave),
        model_id=codec.model_id,
        model_hash=codec.codes_hash,
        sample_rate=codec.sample_rate,
        hop=codec.hop,
        codebook_size=codec.codebook_size,
        speaker_name=codec.speakers[0],
        speaker_index=0,
        num_samples=len(wave),
    ).write(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: Path, int8: bool, concurrency: int | None, max_seconds: float):
    """``python -m app`` on a free loopback port; returns (process, url) once it serves."""
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--model", str(model), "--port", str(port)]
    cmd += ["--max-seconds", str(max_seconds)] + (["--int8"] if int8 else [])
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_app(proc)
    raise RuntimeError("the app did not start within 180 s")


def stop_app(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def new_client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, analytics_enabled=False)


class Listener:
    """One request as a browser's player gets it (see the module doc)."""

    def __init__(self, url: str):
        self.client = new_client(url)
        self.http = httpx.Client(timeout=30)
        self.segments: list[tuple[float, float]] = []  # (seconds after submission, duration)
        self.playlist: str | None = None
        self.first_update: float | None = None
        self.last: float | None = None

    def read_playlist(self, at: float) -> bool:
        """Note the segments new in the playlist at ``at``; whether the stream has ended."""
        text = self.http.get(self.playlist).text
        durations = [
            float(line[8:].split(",")[0])
            for line in text.splitlines()
            if line.startswith("#EXTINF:")
        ]
        for d in durations[len(self.segments) :]:
            self.segments.append((at, d))
        return "#EXT-X-ENDLIST" in text

    def decode(
        self, codes: Path, seed: int, barrier: threading.Barrier | None = None, start_buffer=0.0
    ) -> dict:
        from gradio_client import handle_file

        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        job = self.client.submit(handle_file(str(codes)), FROM_FILE, seed, api_name="/decode")
        seen = 0
        while True:
            done = job.done()
            outputs = job.outputs()
            now = time.perf_counter() - t0
            if len(outputs) > seen:
                self.first_update = self.first_update if self.first_update is not None else now
                for out in outputs[seen:]:
                    player = out[0] if isinstance(out, list | tuple) else None
                    if isinstance(player, dict) and player.get("is_stream") and player.get("url"):
                        self.playlist = player["url"]
                seen = len(outputs)
                if self.playlist:
                    self.read_playlist(now)
            if done:
                break
            time.sleep(0.02)
        job.result()  # raises what the app raised
        self.last = time.perf_counter() - t0
        for _ in range(50):  # the last segment is flushed when the run ends
            if self.playlist is None or self.read_playlist(time.perf_counter() - t0):
                break
            time.sleep(0.02)
        return self.summary(start_buffer)

    def summary(self, start_buffer: float = 0.0) -> dict:
        """First audio, last sample and stall of a player that starts once it holds
        ``start_buffer`` seconds of audio (or all of it)."""
        if not self.segments:  # no stream (no ffmpeg): the wav plays at the end
            return {"first_audio": self.last, "last_sample": self.last, "stall": 0.0}
        start, stall = play(self.segments, start_buffer)
        return {"first_audio": start, "last_sample": self.last, "stall": stall}


def play(segments: list[tuple[float, float]], start_buffer: float = 0.0) -> tuple[float, float]:
    """When a player of ``segments`` (arrival time, seconds of audio; in order) starts, once it
    holds ``start_buffer`` seconds (or all), and its stall: the latest a segment arrived against
    the schedule of a player that never waited (<= 0: gap-free)."""
    held, start = 0.0, segments[-1][0]
    for at, duration in segments:
        held += duration
        if held >= start_buffer - 1e-9:
            start = at
            break
    played, stall = 0.0, 0.0
    for at, duration in segments:
        stall = max(stall, at - (start + played))
        played += duration
    return start, stall


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run_concurrent(url: str, codes: Path, n: int, start_buffer: float) -> tuple[float, list[dict]]:
    listeners = [Listener(url) for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    results: list[dict | BaseException] = [None] * n

    def work(i: int) -> None:
        try:
            results[i] = listeners[i].decode(codes, i, barrier, start_buffer)
        except BaseException as e:  # reported after the others finish
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return wall, results


def run_sequential(url: str, codes: Path, n: int, start_buffer: float) -> tuple[float, list[dict]]:
    results = []
    for i in range(n):
        listener = Listener(url)
        results.append(listener.decode(codes, i, start_buffer=start_buffer))
    return sum(r["last_sample"] for r in results), results


def row(seconds: float, n: int, mode: str, wall: float, results: list[dict], tolerance: float):
    first = [r["first_audio"] for r in results]
    last = [r["last_sample"] for r in results]
    stalls = [r["stall"] for r in results]
    return {
        "seconds": seconds,
        "clients": n,
        "mode": mode,
        "wall_s": round(wall, 3),
        "realtime": round(n * seconds / wall, 3),
        "first_audio_p50": round(percentile(first, 50), 3),
        "first_audio_p95": round(percentile(first, 95), 3),
        "last_sample_p50": round(percentile(last, 50), 3),
        "last_sample_p95": round(percentile(last, 95), 3),
        "gap_free": sum(s <= tolerance for s in stalls),
        "worst_stall_s": round(max(stalls), 3),
    }


def table(rows: list[dict], title: str) -> str:
    lines = [
        title,
        "| file s | clients | mode | wall s | x real time | speedup | first audio p50 / p95 s "
        "| last sample p50 / p95 s | gap-free | worst stall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seconds']:g} | {r['clients']} | {r['mode']} | {r['wall_s']} | {r['realtime']} "
            f"| {r.get('speedup', '')} | {r['first_audio_p50']} / {r['first_audio_p95']} "
            f"| {r['last_sample_p50']} / {r['last_sample_p95']} | {r['gap_free']}/{r['clients']} "
            f"| {r['worst_stall_s']} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="the app's model")
    p.add_argument("--int8", action="store_true", help="the app decodes with the int8 graphs")
    p.add_argument("--url", help="use this running app instead of starting one")
    p.add_argument("--concurrency", type=int, help="the app's --concurrency (default: its own)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seconds", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument(
        "--start-buffer",
        type=float,
        default=0.25,
        metavar="S",
        help="audio a player holds before it starts (0: it starts on the first segment)",
    )
    p.add_argument(
        "--gap-tolerance",
        type=float,
        default=0.1,
        metavar="S",
        help="lateness that still counts as gap-free: the client polls its updates",
    )
    p.add_argument("--json", type=Path, help="also write the settings and rows here")
    p.add_argument(
        "--quick", action="store_true", help="short files and few clients: a smoke run (tests)"
    )
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.clients, args.seconds = [1, 2], [0.5, 1.0]
    if (
        min(args.clients) < 1
        or min(args.seconds) <= 0
        or min(args.gap_tolerance, args.start_buffer) < 0
    ):
        print(
            "error: --clients and --seconds must be positive, --gap-tolerance and "
            "--start-buffer not negative",
            file=sys.stderr,
        )
        return 2
    codec = Codec(args.model, workers=1, threads=1)  # to encode the files only
    proc = None
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {s: codes_file(codec, s, Path(tmp)) for s in args.seconds}
        try:
            if args.url:
                url = args.url if args.url.endswith("/") else args.url + "/"
            else:
                longest = max(args.seconds) + 1
                proc, url = start_app(args.model, args.int8, args.concurrency, max(60, longest))
            for seconds, path in files.items():
                Listener(url).decode(path, 0)  # untimed: rings, bindings, the encoder process
                for n in args.clients:
                    wall, results = run_sequential(url, path, n, args.start_buffer)
                    base = row(seconds, n, "one at a time", wall, results, args.gap_tolerance)
                    wall, results = run_concurrent(url, path, n, args.start_buffer)
                    conc = row(seconds, n, "concurrent", wall, results, args.gap_tolerance)
                    conc["speedup"] = round(base["wall_s"] / conc["wall_s"], 3)
                    for r in (base, conc):
                        rows.append(r)
                        print(json.dumps(r), flush=True)
        finally:
            if proc is not None:
                stop_app(proc)
    precision = "int8" if args.int8 else "fp32"
    title = (
        f"\n{args.model.name}, {precision}, app concurrency {args.concurrency or 'default'}, "
        f"{os.cpu_count()} cores; times from each request's submission"
    )
    print(table(rows, title))
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    worst = [r for r in rows if r["mode"] == "concurrent"]
    if worst:
        mean = statistics.fmean(r["speedup"] for r in worst)
        print(f"\nmean speedup of the concurrent rows over one at a time: {mean:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
