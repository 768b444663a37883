"""What per-row int8 activation scales cost: decoder step time by rows in a batch, fp32 against
int8 with per-row scales (what ``python -m export --int8`` writes) and with one scale per call
(onnxruntime's own dynamic quantisation, whose samples depend on the batch).

    python -m benchmarks.int8_rows                         # small, rows 1 8 32 64 128
    python -m benchmarks.int8_rows --config default --rows 1 16 64
    python -m benchmarks.int8_rows --quick                 # tiny, seconds (the test's)

Exports the config with random weights (speed does not depend on training) with both int8
steps. Each variant decodes R unfolded streams of ``--samples`` samples on one worker thread
(one core), after an untimed call at that size; the variants alternate ``--reps`` times and a
row reports the median wall time per step, with row-steps per second and the ratio to the
per-call int8 step and to fp32 at the same row count. ``alone_equals_batched`` decodes one
stream alone and beside the others: the same samples where rows are independent. The
teacher-forced cross-entropy of each step on the test clips (``ce``) shows what each
quantisation costs against fp32; with random weights compare the int8 rows with each other
only (a trained model's cost is what ``python -m export --int8`` prints).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from export.onnx_export import export_model
from model.autoencoder import Autoencoder
from training.config import load_model_config
from vqwavenet import Codec, DecodeRequest

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
VARIANTS = ("fp32", "int8_per_row", "int8_per_call")


def step_seconds(codec: Codec, reqs: list[DecodeRequest], samples: int) -> float:
    t = time.perf_counter()
    codec.decode_many(reqs, segment=10**9)
    return (time.perf_counter() - t) / samples


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    p.add_argument("--samples", type=int, default=2000, help="samples per stream")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ce-samples", type=int, default=4000, help="per test clip, for `ce`")
    p.add_argument("--quick", action="store_true", help="tiny, two row counts: a smoke run")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.config, args.rows, args.samples, args.reps, args.ce_samples = (
            "tiny",
            [1, 4],
            300,
            1,
            600,
        )
    if min(args.rows) < 1 or args.samples < 1 or args.reps < 1 or args.ce_samples < 1:
        print("error: --rows, --samples, --reps and --ce-samples must be positive", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = Autoencoder(load_model_config(args.config)).eval()
    speakers = [f"s{i}" for i in range(model.cfg.decoder.n_speakers)]
    clips = [sf.read(p, dtype="float32")[0][: args.ce_samples] for p in sorted(DATA.glob("*.wav"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, speakers, Path(tmp) / "row", int8=True)
        export_model(model, speakers, Path(tmp) / "call", int8=True, per_row=False)
        codecs = {
            "fp32": Codec(Path(tmp) / "row", workers=1),
            "int8_per_row": Codec(Path(tmp) / "row", workers=1, int8=True),
            "int8_per_call": Codec(Path(tmp) / "call", workers=1, int8=True),
        }
        ce = {name: codec.cross_entropy(clips) for name, codec in codecs.items()}
        rng = np.random.default_rng(0)
        c = codecs["fp32"]
        codes = rng.integers(0, c.codebook_size, c.geometry.padding(args.samples)[2])
        for r in args.rows:
            reqs = [DecodeRequest(codes, i % len(speakers), args.samples, seed=i) for i in range(r)]
            times: dict[str, list[float]] = {name: [] for name in VARIANTS}
            alike = {}
            for name, codec in codecs.items():  # untimed: rings and bindings at this size
                batched = codec.decode_many(reqs, segment=10**9)[0]
                alike[name] = bool(np.array_equal(batched, codec.decode_many(reqs[:1])[0]))
            for _ in range(args.reps):
                for name, codec in codecs.items():
                    times[name].append(step_seconds(codec, reqs, args.samples))
            median = {name: statistics.median(t) for name, t in times.items()}
            for name in VARIANTS:
                row = {
                    "config": args.config,
                    "variant": name,
                    "rows": r,
                    "ms_per_step": round(1e3 * median[name], 4),
                    "row_steps_per_s": round(r / median[name]),
                    "vs_int8_per_call": round(median[name] / median["int8_per_call"], 3),
                    "vs_fp32": round(median[name] / median["fp32"], 3),
                    "alone_equals_batched": alike[name] if r > 1 else None,
                    "ce": round(ce[name], 5),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.config}, random weights, one worker; median of {args.reps}; ce: nats/sample")
    print(
        "| rows | variant | ms/step | row-steps/s | x per-call int8 | x fp32 "
        "| alone = batched | ce |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        alike = "" if r["alone_equals_batched"] is None else r["alone_equals_batched"]
        print(
            f"| {r['rows']} | {r['variant']} | {r['ms_per_step']} | {r['row_steps_per_s']} "
            f"| {r['vs_int8_per_call']} | {r['vs_fp32']} | {alike} | {r['ce']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
