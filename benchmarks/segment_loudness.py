"""How loud a sampled segment is after its silent start, against the unbroken decode.

    python -m benchmarks.segment_loudness --wav a.wav --wav b.wav      # the bundled model
    python -m benchmarks.segment_loudness --segment 0.25 --bin 80 --bins 40
    python -m benchmarks.segment_loudness --warmup steady              # starts from silence

Every clip is encoded, decoded once unfolded and once folded with no burn-in and no overlap
(same seed), and each later segment's own samples, before any cross-fade, are compared with
the unfolded decode over the same span: RMS per ``--bin`` samples after the segment's start,
summed over all segments of all clips. ``--warmup`` picks the segments' start (`Codec`'s
``warmup``). A model fed its own quiet start from silence keeps quiet for a while; a
cross-fade into that start dips the loudness at every join, which a long burn-in
(`Codec.burn_in`) drops and a primed start avoids. ``benchmarks.fold_quality`` cannot show it:
teacher-forced, the model is fed the true samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from vqwavenet import BUNDLED_MODEL, Codec, DecodeRequest
from vqwavenet.audio import mulaw_decode

ROOT = Path(__file__).resolve().parent.parent


def segment_energy(
    codec: Codec, wave: np.ndarray, speaker, seed: int, segment: int, bin_: int, bins: int
):
    """Per-bin sums of squares ``(segments, unfolded)`` and counts over the later segments of
    one clip, for bins of ``bin_`` samples after each segment's start."""
    n = len(wave)
    req = [DecodeRequest(codec.encode(wave), speaker, n, seed)]
    unfolded = codec.decode_many(req, segment=n + 1)[0].astype(np.float64)
    plan = codec.plan(req, segment, 0, 0)
    (fold,) = plan.folds
    outs = codec.engine.run(plan.streams, plan.cond, None)
    seg_sq, ref_sq, counts = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for k in range(1, len(fold.bounds)):
        g = fold.start(k)
        x = mulaw_decode(outs[fold.first + k], codec.q).astype(np.float64)
        for i in range(min(bins, len(x) // bin_)):
            lo, hi = i * bin_, (i + 1) * bin_
            seg_sq[i] += np.sum(x[lo:hi] ** 2)
            ref_sq[i] += np.sum(unfolded[g + lo : g + hi] ** 2)
            counts[i] += bin_
    return seg_sq, ref_sq, counts


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--wav", action="append", help="clips (default: tests/data/*.wav)")
    p.add_argument("--speaker", default="0", help="voice of the decodes (the clips' own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", choices=["primed", "steady", "exact"], help="default: the codec's")
    p.add_argument("--segment", type=float, default=0.25, help="seconds")
    p.add_argument("--bin", type=int, default=80, help="samples per row")
    p.add_argument("--bins", type=int, default=40, help="rows")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.bin < 1 or args.bins < 1 or args.segment <= 0 or args.seed < 0:
        print("error: --bin, --bins, --segment must be positive, --seed >= 0", file=sys.stderr)
        return 2
    paths = args.wav or sorted(str(p) for p in (ROOT / "tests" / "data").glob("*.wav"))
    codec = Codec(args.model, warmup=args.warmup)
    sr = codec.sample_rate
    segment = round(args.segment * sr)
    totals = np.zeros((3, args.bins))
    for path in paths:
        wave = codec.to_model_rate(*sf.read(path, dtype="float32"))
        parts = segment_energy(codec, wave, args.speaker, args.seed, segment, args.bin, args.bins)
        totals += np.array(parts)
    seg_sq, ref_sq, counts = totals
    if not counts[0]:
        print("error: no clip is longer than two segments", file=sys.stderr)
        return 2
    rows = []
    for i in np.flatnonzero(counts):
        seg, ref = np.sqrt(seg_sq[i] / counts[i]), np.sqrt(ref_sq[i] / counts[i])
        rows.append(
            {
                "from": int(i * args.bin),
                "to": int((i + 1) * args.bin),
                "segment_rms": round(float(seg), 5),
                "unfolded_rms": round(float(ref), 5),
                "ratio": round(float(seg / ref), 3) if ref > 0 else float("nan"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{len(paths)} clips, {args.segment} s segments, seed {args.seed}, "
        f"{codec.warmup} starts, model {args.model}"
    )
    print("\n| samples after the start | segment RMS | unfolded RMS | ratio |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['from']}-{r['to']} | {r['segment_rms']:.4f} | {r['unfolded_rms']:.4f} "
            f"| {r['ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
