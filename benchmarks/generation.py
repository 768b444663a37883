"""Generation and encoding speed: naive PyTorch, incremental PyTorch and the ONNX engine.

    python -m benchmarks.generation                          # tiny, small, default
    python -m benchmarks.generation --configs small --seconds 2

Per config (random weights: speed does not depend on training), fp32 and int8:

* ``naive_torch``: `WaveNetDecoder.forward` over the whole receptive field for every sample
  (the textbook full recomputation), batch 1.
* ``incremental_torch``: `model.decoder_step.DecoderStep` with ring buffers, batch 1.
* ``onnx_batch1``: `vqwavenet.codec.Codec.decode` of 0.5 s without folding, one worker thread.
* ``onnx_folded_<W>w``: one file of ``--seconds`` folded into segments over W worker threads
  (``--workers``, and 1 for comparison in fp32), with the engine's defaults: eighth-second
  segments, later ones started from the primer (`vqwavenet.primer`, cut from a test clip as
  ``python -m export`` does) with a 160-sample burn-in.
* ``onnx_folded_<W>w_steady``: later segments started from silence, quarter-second with the
  960-sample burn-in that needs (``Codec(warmup="steady")``): the engine's former defaults,
  and still those of a model directory without a primer.
* ``onnx_folded_<W>w_no_burn_in``: the same with eighth-second segments started from silence
  and no burn-in, the engine's first defaults: the joins cost intelligibility
  (``benchmarks.resynth_quality``).
* ``onnx_batch<N>``: ``--files`` files of ``--seconds`` each in one `Codec.decode_many` call
  (a folder through the CLI, or the app's concurrent requests): enough segments to fill
  every worker's batch.
* ``stream_<schedule>``: `Codec.decode_stream` on one ``--seconds`` file, fp32, with each
  schedule (``playback``, the default, and ``batch``): how long a player must wait before it
  starts to play without a gap to the end (the largest lateness of a chunk behind playback
  started at 0), the first chunk's arrival and the end (what a listener of the app's Decode
  tab waits).
* ``encode``: `Codec.encode` (chunked, batched) on ``--encode-seconds`` of speech.

Each decoding row gives samples/s and the speed as a multiple of real time (>1: faster than
real time); ``macs_per_sample`` counts the decoder step's multiply-adds and ``machine_fraction``
divides the reached multiply-add rate by that of a large fp32 matrix product timed in the same
run with the same thread count (numpy, ``--threads`` threads). The warm-up steps of folded
segments count against the engine (wall time over delivered samples).

Output: one JSON line per measurement, then a markdown table. Machines shared with other jobs
give noisy absolute numbers; ratios measured in one run are what count (docs/DESIGN.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from export.onnx_export import export_model
from model.autoencoder import Autoencoder
from model.decoder_step import DecoderStep
from training.config import load_model_config
from vqwavenet import Codec, DecodeRequest
from vqwavenet.primer import write_primer

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def step_macs(cfg) -> int:
    """Multiply-adds of one incremental decoder step (per generated sample)."""
    d = cfg.decoder
    n, k = len(d.dilations), d.kernel_size
    r, g, s, q = d.residual_channels, d.gate_channels, d.skip_channels, d.quantization_channels
    return n * k * r * 2 * g + (n - 1) * g * r + n * g * s + s * s + s * q


def matmul_macs_per_s(threads: int, size: int = 2048, reps: int = 5) -> float:
    """Multiply-adds per second of a large fp32 matrix product (best of ``reps``)."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    with _blas_threads(threads):
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return size**3 / best


@contextlib.contextmanager
def _blas_threads(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's BLAS keeps its own setting
        yield
        return
    with threadpool_limits(n):
        yield


def speech(seconds: float, sr: int = 16000) -> np.ndarray:
    clips = [sf.read(p, dtype="float32")[0] for p in sorted(DATA.glob("*.wav"))]
    x = np.concatenate(clips)
    reps = int(np.ceil(seconds * sr / len(x)))
    return np.tile(x, reps)[: int(seconds * sr)]


def build(config: str) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(load_model_config(config)).eval()


@torch.no_grad()
def naive_torch(model: Autoencoder, steps: int) -> float:
    """Samples/s of recomputing the receptive field for each sample (batch 1)."""
    dec, geo = model.decoder, model.geometry
    ctx = geo.wavenet_context
    cond = torch.randn(1, dec.cond_proj.out_channels, 4)
    idx = torch.zeros(1, ctx + 1 - dec.wavenet_layers()[0].span, dtype=torch.long)
    x = torch.randint(256, (1, ctx + 1))
    dec(x, cond, idx)
    t = time.perf_counter()
    for _ in range(steps):
        logits = dec(x, cond, idx)
        probs = torch.softmax(logits[0, :, -1], 0)
        nxt = torch.multinomial(probs, 1)
        x = torch.cat([x[:, 1:], nxt[None]], 1)
    return steps / (time.perf_counter() - t)


@torch.no_grad()
def incremental_torch(model: Autoencoder, steps: int) -> float:
    """Samples/s of `DecoderStep` with per-layer ring buffers (batch 1)."""
    step = DecoderStep(model.decoder).eval()
    rings = [torch.zeros(size, 1, step.residual_channels) for size in step.ring_sizes()]
    cond = torch.randn(1, step.n_layers * 2 * step.gate)
    prev = torch.zeros(1, dtype=torch.long)
    t = time.perf_counter()
    for s in range(steps):
        past = torch.stack([ring[s % len(ring)] for ring in rings])
        out = step(prev, past, cond, torch.rand(1))
        current = out.current.reshape(1, step.n_layers, -1)
        for i, ring in enumerate(rings):
            ring[s % len(ring)] = current[:, i]
        prev = out.sample
    return steps / (time.perf_counter() - t)


def onnx_decode(codec: Codec, n: int, folded: bool, files: int = 1) -> float:
    f = codec.geometry.padding(n)[2]
    rng = np.random.default_rng(0)
    reqs = [
        DecodeRequest(rng.integers(0, codec.codebook_size, f), i % len(codec.speakers), n, i)
        for i in range(files)
    ]
    segment = None if folded else n + 1
    codec.decode(reqs[0].codes[: codec.cond_kernel + 8], seed=0, segment=segment)  # warm up
    t = time.perf_counter()
    codec.decode_many(reqs, segment=segment)
    return files * n / (time.perf_counter() - t)


def stream_timing(codec: Codec, n: int, schedule: str) -> dict:
    """`decode_stream` on ``n`` samples: seconds until a player can start and never stall
    (``max(arrival - start of the chunk)`` over chunks), to the first chunk and to the end."""
    f = codec.geometry.padding(n)[2]
    codes = np.random.default_rng(0).integers(0, codec.codebook_size, f)
    codec.decode(codes[: codec.cond_kernel + 8], seed=0)  # warm the sessions
    t = time.perf_counter()
    at, first, delay = 0, None, 0.0
    for chunk in codec.decode_stream(codes, seed=1, n_samples=n, interval=0.01, schedule=schedule):
        now = time.perf_counter() - t
        first = now if first is None else first
        delay = max(delay, now - at / codec.sample_rate)
        at += len(chunk)
    total = time.perf_counter() - t
    return {"delay_s": round(delay, 3), "first_s": round(first, 3), "total_s": round(total, 3)}


def encode_speed(codec: Codec, seconds: float) -> float:
    x = speech(seconds, codec.sample_rate)
    codec.encode(x[: codec.sample_rate])
    t = time.perf_counter()
    codec.encode(x)
    return seconds / (time.perf_counter() - t)


def run_config(config: str, args, machine: float, emit) -> None:
    model = build(config)
    sr = model.cfg.features.sample_rate
    macs = step_macs(model.cfg)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, [f"s{i}" for i in range(model.cfg.decoder.n_speakers)], tmp, int8=True)
        primer = DATA / "activated.wav"  # what `python -m export` cuts it from by default
        write_primer(tmp, sf.read(primer, dtype="float32")[0], primer.name)
        torch.set_num_threads(1)
        rows = [
            ("naive_torch", "fp32", naive_torch(model, args.naive_steps.get(config, 3))),
            ("incremental_torch", "fp32", incremental_torch(model, args.steps)),
        ]
        torch.set_num_threads(args.threads)
        n = int(args.seconds * sr)
        for precision in ("fp32", "int8"):
            codec1 = Codec(tmp, int8=precision == "int8", workers=1)
            rows.append(("onnx_batch1", precision, onnx_decode(codec1, sr // 2, folded=False)))
            layouts = [args.workers] + ([1] if args.workers != 1 and precision == "fp32" else [])
            for workers in layouts:
                codec = Codec(tmp, int8=precision == "int8", workers=workers)
                codec.streams_per_worker = 1  # exactly `workers` threads, whatever the batch
                rate = onnx_decode(codec, n, folded=True)
                rows.append((f"onnx_folded_{workers}w", precision, rate))
            former = {  # name: Codec settings
                "steady": {"warmup": "steady"},
                "no_burn_in": {"warmup": "steady", "burn_in": 0, "min_segment_s": 0.125},
            }
            for name, settings in former.items():
                codec = Codec(tmp, int8=precision == "int8", workers=args.workers, **settings)
                codec.streams_per_worker = 1
                rate = onnx_decode(codec, n, folded=True)
                rows.append((f"onnx_folded_{args.workers}w_{name}", precision, rate))
            if args.files > 1:
                codec = Codec(tmp, int8=precision == "int8", workers=args.workers)
                rate = onnx_decode(codec, n, folded=True, files=args.files)
                rows.append((f"onnx_batch{args.files}", precision, rate))
        for method, precision, rate in rows:
            emit(
                {
                    "config": config,
                    "method": method,
                    "precision": precision,
                    "samples_per_s": round(rate, 1),
                    "realtime": round(rate / sr, 4),
                    "macs_per_sample": macs,
                    "machine_fraction": round(rate * macs / machine, 4),
                }
            )
        codec = Codec(tmp, threads=args.threads)
        for schedule in ("playback", "batch"):
            timing = stream_timing(codec, n, schedule)
            emit({"config": config, "method": f"stream_{schedule}", "precision": "fp32", **timing})
        emit(
            {
                "config": config,
                "method": "encode",
                "precision": "fp32",
                "realtime": round(encode_speed(codec, args.encode_seconds), 1),
            }
        )


def table(rows: list[dict]) -> str:
    lines = [
        "| config | method | precision | samples/s | x real time | MACs/sample | of matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "delay_s" in r:  # stream_*: latencies, not a rate
            text = "plays without gaps after {delay_s} s (first chunk {first_s} s, end {total_s} s)"
            r = {**r, "realtime": text.format(**r)}
        lines.append(
            f"| {r['config']} | {r['method']} | {r['precision']} | {r.get('samples_per_s', '')} "
            f"| {r['realtime']} | {r.get('macs_per_sample', '')} "
            f"| {r.get('machine_fraction', '')} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small", "default"])
    p.add_argument("--seconds", type=float, default=8.0, help="length of each decoded file")
    p.add_argument("--files", type=int, default=8, help="files decoded together by onnx_batch")
    p.add_argument("--encode-seconds", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=400, help="incremental PyTorch steps")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.seconds <= 0 or args.encode_seconds <= 0 or args.steps < 1 or args.files < 1:
        print(
            "error: --seconds, --encode-seconds, --steps and --files must be positive",
            file=sys.stderr,
        )
        return 1
    args.naive_steps = {"tiny": 400, "small": 8, "default": 3}
    machine = matmul_macs_per_s(args.threads)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    emit({"method": "matmul", "threads": args.threads, "macs_per_s": round(machine / 1e9, 2)})
    for config in args.configs:
        try:
            run_config(config, args, machine, emit)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print()
    print(table([r for r in rows if "config" in r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
