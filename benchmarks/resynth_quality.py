"""Resynthesis quality by objective speech metrics: wide-band PESQ and STOI of the sampled
resynthesis against the original, for each way of decoding it.

    python -m benchmarks.resynth_quality                   # the bundled model, tests/data clips
    python -m benchmarks.resynth_quality --wav a.wav --seeds 4 --segments 0.125 0.5
    python -m benchmarks.resynth_quality --no-int8 --segments 0.125 --burn-ins 0 320 960
    python -m benchmarks.resynth_quality --warmups primed steady   # how later segments start

`benchmarks.fold_quality` measures folding teacher-forced. A listener hears sampled audio,
where the joins between independently sampled segments (eight a second with eighth-second
segments) might be audible even where the cross-entropy hardly moves. Here every clip is
encoded once, then decoded ``--seeds`` times per setting: unfolded (the clip as one segment),
folded at each ``--segments`` length with the default one-hop cross-fade, each ``--warmups``
(how a later segment starts, `Codec`'s ``warmup``) and each ``--burn-ins`` (samples a later
segment generates and drops before its cross-fade; default: the codec's for that start), in
fp32 and, where the model directory has them, with the int8 graphs. Rows give the mean and
its standard error over clips x seeds, and the STOI difference from the unfolded fp32 decode
of the same clip and seed (paired, so clip difficulty cancels), and how fast the setting
decoded (multiples of real time, decodes of one clip batched over the seeds; compare within a
run).

A WaveNet resynthesis is a new sample of the waveform, not a copy: its phase differs from the
original's, so both metrics are far below what a transparent codec scores, even for a well
trained model. Compare rows with each other. The ``original`` row scores each clip against
itself (PESQ 4.64 and STOI 1.0 when the scoring is wired right).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from pesq import PesqError, pesq
from pystoi import stoi

from benchmarks.report import mean_se
from vqwavenet import BUNDLED_MODEL, Codec, DecodeRequest

ROOT = Path(__file__).resolve().parent.parent


def scores(reference: np.ndarray, degraded: np.ndarray, sr: int) -> tuple[float, float]:
    """(wide-band PESQ, STOI) of ``degraded`` against ``reference``; PESQ is NaN where it finds
    no speech."""
    p = pesq(sr, reference, degraded, "wb", on_error=PesqError.RETURN_VALUES)
    return (float(p) if p >= -0.5 else float("nan")), float(stoi(reference, degraded, sr))


def resynthesise(codec: Codec, codes, n: int, speaker, seeds, segment: int | None, burn_in=None):
    """``len(seeds)`` decodes of one clip's codes in one batch (``segment=None``: unfolded)."""
    reqs = [DecodeRequest(codes, speaker, n, seed) for seed in seeds]
    segment = n + 1 if segment is None else segment
    return codec.decode_many(reqs, segment=segment, burn_in=burn_in)


def summarise(label: dict, pairs: list[tuple[float, float]], base=None) -> dict:
    """Mean ± standard error of each metric; with ``base`` (the unfolded fp32 scores of the
    same clips and seeds, in the same order) also the paired STOI difference from it, which
    leaves out how much harder one clip is than another."""
    row = dict(label)
    scores_ = np.array(pairs, dtype=np.float64)
    for k, name in enumerate(("pesq", "stoi")):
        row[name], row[f"{name}_se"] = mean_se(scores_[:, k])
    if base is not None:
        delta = scores_[:, 1] - np.array(base, dtype=np.float64)[:, 1]
        row["stoi_vs_unfolded"], row["stoi_vs_unfolded_se"] = mean_se(delta)
    row["n"] = len(pairs)
    return row


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--wav", action="append", help="clips (default: tests/data/*.wav)")
    p.add_argument("--speaker", default="0", help="voice of the resynthesis (the clips' own)")
    p.add_argument("--seeds", type=int, default=3, help="decodes per clip and setting")
    p.add_argument("--segments", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    p.add_argument(
        "--burn-ins", type=int, nargs="+", help="samples (default: the codec's `burn_in`)"
    )
    p.add_argument(
        "--warmups",
        nargs="+",
        choices=["primed", "steady", "exact"],
        help="starts of later segments (default: the codec's)",
    )
    p.add_argument("--no-int8", action="store_true", help="fp32 only")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.burn_ins and min(args.burn_ins) < 0:
        print("error: --burn-ins must be >= 0", file=sys.stderr)
        return 2
    paths = args.wav or sorted(str(p) for p in (ROOT / "tests" / "data").glob("*.wav"))
    fp32 = Codec(args.model)
    sr = fp32.sample_rate
    waves = [fp32.to_model_rate(*sf.read(p, dtype="float32")) for p in paths]
    codes = [fp32.encode(w) for w in waves]
    seeds = list(range(args.seeds))
    int8 = not args.no_int8 and (Path(args.model) / "decoder_step.int8.onnx").is_file()
    codecs = []  # (precision, codec, settings): unfolded first, then folded per start
    for precision in ["fp32", "int8"] if int8 else ["fp32"]:
        starts = [
            Codec(args.model, int8=precision == "int8", warmup=w) for w in args.warmups or [None]
        ]
        settings = [(starts[0], None, 0)]
        for codec in starts:
            burn_ins = args.burn_ins or [codec.burn_in]
            settings += [(codec, round(s * sr), b) for s in args.segments for b in burn_ins]
        codecs.append((precision, settings))

    rows = [
        summarise({"precision": "-", "segment_s": "original"}, [scores(w, w, sr) for w in waves])
    ]
    print(json.dumps(rows[-1]), flush=True)
    base = None  # unfolded fp32, the reference of the paired differences
    for precision, settings in codecs:
        for codec, segment, burn_in in settings:
            pairs, busy = [], 0.0
            for wave, c in zip(waves, codes):
                start = time.perf_counter()
                outs = resynthesise(codec, c, len(wave), args.speaker, seeds, segment, burn_in)
                busy += time.perf_counter() - start
                pairs.extend(scores(wave, out, sr) for out in outs)
            base = pairs if base is None else base
            label = {
                "precision": precision,
                "segment_s": "unfolded" if segment is None else segment / sr,
                "warmup": "" if segment is None else codec.warmup,
                "burn_in": burn_in,
                "realtime": round(args.seeds * sum(map(len, waves)) / sr / busy, 3),
            }
            rows.append(summarise(label, pairs, base))
            print(json.dumps(rows[-1]), flush=True)

    total = sum(len(w) for w in waves) / sr
    print(f"\n{len(waves)} clips, {total:.1f} s, {args.seeds} seeds, model {args.model}")
    print(
        "\n| precision | segment (s) | start | burn-in | PESQ-WB | STOI | STOI - unfolded fp32 "
        "(paired) | x real time | decodes |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        paired = (
            f"{r['stoi_vs_unfolded']:+.3f} ± {r['stoi_vs_unfolded_se']:.3f}"
            if "stoi_vs_unfolded" in r
            else ""
        )
        print(
            f"| {r['precision']} | {r['segment_s']} | {r.get('warmup', '')} "
            f"| {r.get('burn_in', '')} "
            f"| {r['pesq']:.3f} ± {r['pesq_se']:.3f} | {r['stoi']:.3f} ± {r['stoi_se']:.3f} "
            f"| {paired} | {r.get('realtime', '')} | {r['n']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
