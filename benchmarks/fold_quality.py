"""What folding a long utterance into segments costs in quality, teacher-forced.

    python -m benchmarks.fold_quality                      # the bundled model, tests/data clips
    python -m benchmarks.fold_quality --model models/mine --wav a.wav --wav b.wav
    python -m benchmarks.fold_quality --warmup steady      # later segments start from silence
    python -m benchmarks.fold_quality --warmup exact       # the full zero-input warm-up

The engine decodes a long file as segments generated side by side; each after the first starts
from a state that is not the true past (the primer's speech, `vqwavenet.primer`, or silence)
``overlap`` samples before the point where it takes over, and the two are cross-faded there.
Sampling gives no number to compare, so this measures the same schedule teacher-forced
(`Codec.folded_nll`): the NLL of every true sample when its segment started that way, against
full context (`Codec.teacher_forced`); ``--warmup`` picks how segments after the first start
(`Codec`'s ``warmup``, default the codec's). Two tables:

* recovery: excess NLL (nats/sample) at distances from a segment's start, overlap 0: how long
  the model takes to forget the state it started from;
* cost: cross-entropy increase over whole clips for each segment length and overlap, with
  ``--burn-in`` samples dropped before each overlap (default 0: what the overlap alone does;
  the engine's burn-in after a silent start, 960 samples, is longer than the model needs
  teacher-forced).

Teacher-forced, the model is fed the true samples and recovers fast. Sampled from silence, a
segment recovers far more slowly (it is fed its own quiet start): ``benchmarks.segment_loudness``
and ``benchmarks.resynth_quality`` measure that, and chose the engine's starts and burn-ins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from vqwavenet import BUNDLED_MODEL, Codec, folding

ROOT = Path(__file__).resolve().parent.parent
BINS = (0, 20, 80, 320, 1280, 5120)


def recovery(codec: Codec, waves, speaker, segment: int) -> list[dict]:
    """Mean excess NLL per distance bin from the start of segments ``k >= 1`` (overlap 0)."""
    full = codec.teacher_forced(waves, speaker, logits=False)
    folded = codec.folded_nll(waves, speaker, segment=segment, overlap=0, burn_in=0)
    sums, counts = np.zeros(len(BINS)), np.zeros(len(BINS))
    for x, f, w in zip(full, folded, waves):
        for a, b in folding.segments(len(w), segment, 0)[1:]:
            excess = (f[a:b] - x[a:b]).astype(np.float64)
            for i, lo in enumerate(BINS):
                hi = BINS[i + 1] if i + 1 < len(BINS) else len(excess)
                part = excess[lo:hi]
                sums[i] += part.sum()
                counts[i] += len(part)
    rows = []
    for i, lo in enumerate(BINS):
        hi = BINS[i + 1] if i + 1 < len(BINS) else None
        if counts[i]:
            rows.append({"from": lo, "to": hi, "excess_nll": sums[i] / counts[i]})
    return rows


def cost(codec: Codec, waves, speaker, segment: int, overlap: int, burn_in: int = 0) -> dict:
    full = np.concatenate(codec.teacher_forced(waves, speaker, logits=False)).astype(np.float64)
    kw = {"segment": segment, "overlap": overlap, "burn_in": burn_in}
    folded = np.concatenate(codec.folded_nll(waves, speaker, **kw)).astype(np.float64)
    return {
        "segment_s": segment / codec.sample_rate,
        "overlap": overlap,
        "ce_full": full.mean(),
        "ce_folded": folded.mean(),
        "increase": folded.mean() - full.mean(),
    }


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--wav", action="append", help="clips (default: tests/data/*.wav)")
    p.add_argument("--speaker", default="0")
    p.add_argument("--warmup", choices=["primed", "steady", "exact"], help="default: the codec's")
    p.add_argument("--segments", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--overlaps", type=int, nargs="+", default=[0, 160, 320])
    p.add_argument("--burn-in", type=int, default=0, help="samples dropped before each overlap")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    paths = args.wav or sorted(str(p) for p in (ROOT / "tests" / "data").glob("*.wav"))
    codec = Codec(args.model, warmup=args.warmup)
    waves = [codec.to_model_rate(*sf.read(p, dtype="float32")) for p in paths]
    shortest = min(args.segments) * codec.sample_rate
    if not waves or max(len(w) for w in waves) <= shortest:
        print("error: need clips longer than the shortest segment", file=sys.stderr)
        return 1
    sr = codec.sample_rate
    rec = recovery(codec, waves, args.speaker, int(min(args.segments) * sr))
    for r in rec:
        print(json.dumps({"table": "recovery", **r}), flush=True)
    costs = []
    for seconds in args.segments:
        for overlap in args.overlaps:
            segment = int(seconds * sr)
            costs.append(cost(codec, waves, args.speaker, segment, overlap, args.burn_in))
            print(json.dumps({"table": "cost", **costs[-1]}), flush=True)
    seconds = sum(len(w) for w in waves) / sr
    print(
        f"\n{len(waves)} clips, {seconds:.1f} s, model {args.model}, {codec.warmup} starts, "
        f"burn-in {args.burn_in}"
    )
    print("\n| samples after a segment start | excess NLL (nats/sample) |\n|---|---|")
    for r in rec:
        print(f"| {r['from']}-{r['to'] or 'end'} | {r['excess_nll']:+.4f} |")
    print("\n| segment (s) | overlap | CE full | CE folded | increase |\n|---|---|---|---|---|")
    for c in costs:
        print(
            f"| {c['segment_s']:g} | {c['overlap']} | {c['ce_full']:.4f} | {c['ce_folded']:.4f} "
            f"| {c['increase']:+.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
