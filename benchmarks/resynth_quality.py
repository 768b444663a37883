"""Resynthesis quality by objective speech metrics: wide-band PESQ and STOI of the sampled
resynthesis against the original, for each way of decoding it.

    python -m benchmarks.resynth_quality                   # the bundled model, tests/data clips
    python -m benchmarks.resynth_quality --wav a.wav --seeds 4 --segments 0.125 0.5

`benchmarks.fold_quality` measures folding teacher-forced. A listener hears sampled audio,
where the joins between independently sampled segments (eight a second with eighth-second
segments) might be audible even where the cross-entropy hardly moves. Here every clip is
encoded once, then decoded ``--seeds`` times per setting: unfolded (the clip as one segment),
folded at each ``--segments`` length with the default one-hop cross-fade, in fp32 and, where the
model directory has them, with the int8 graphs. Rows give the mean and its standard error over
clips x seeds, and the STOI difference from the unfolded fp32 decode of the same clip and seed
(paired, so clip difficulty cancels).

A WaveNet resynthesis is a new sample of the waveform, not a copy: its phase differs from the
original's, so both metrics are far below what a transparent codec scores, even for a well
trained model. Compare rows with each other. The ``original`` row scores each clip against
itself (PESQ 4.64 and STOI 1.0 when the scoring is wired right).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from pesq import PesqError, pesq
from pystoi import stoi

from export.runtime import Codec, DecodeRequest

ROOT = Path(__file__).resolve().parent.parent


def scores(reference: np.ndarray, degraded: np.ndarray, sr: int) -> tuple[float, float]:
    """(wide-band PESQ, STOI) of ``degraded`` against ``reference``; PESQ is NaN where it finds
    no speech."""
    p = pesq(sr, reference, degraded, "wb", on_error=PesqError.RETURN_VALUES)
    return (float(p) if p >= -0.5 else float("nan")), float(stoi(reference, degraded, sr))


def resynthesise(codec: Codec, codes, n: int, speaker, seeds, segment: int | None):
    """``len(seeds)`` decodes of one clip's codes in one batch (``segment=None``: unfolded)."""
    reqs = [DecodeRequest(codes, speaker, n, seed) for seed in seeds]
    return codec.decode_many(reqs, segment=n + 1 if segment is None else segment)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite ``values``."""
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


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
    p.add_argument("--model", default=str(ROOT / "models" / "bundled"))
    p.add_argument("--wav", action="append", help="clips (default: tests/data/*.wav)")
    p.add_argument("--speaker", default="0", help="voice of the resynthesis (the clips' own)")
    p.add_argument("--seeds", type=int, default=3, help="decodes per clip and setting")
    p.add_argument("--segments", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    p.add_argument("--no-int8", action="store_true", help="fp32 only")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    paths = args.wav or sorted(str(p) for p in (ROOT / "tests" / "data").glob("*.wav"))
    fp32 = Codec(args.model)
    sr = fp32.sample_rate
    waves = [fp32.to_model_rate(*sf.read(p, dtype="float32")) for p in paths]
    codes = [fp32.encode(w) for w in waves]
    seeds = list(range(args.seeds))
    codecs = [("fp32", fp32)]
    if not args.no_int8 and (Path(args.model) / "decoder_step.int8.onnx").is_file():
        codecs.append(("int8", Codec(args.model, int8=True)))
    settings = [None] + [round(s * sr) for s in args.segments]

    rows = [
        summarise({"precision": "-", "segment_s": "original"}, [scores(w, w, sr) for w in waves])
    ]
    print(json.dumps(rows[-1]), flush=True)
    base = None  # unfolded fp32, the reference of the paired differences
    for precision, codec in codecs:
        for segment in settings:
            pairs = []
            for wave, c in zip(waves, codes):
                for out in resynthesise(codec, c, len(wave), args.speaker, seeds, segment):
                    pairs.append(scores(wave, out, sr))
            base = pairs if base is None else base
            seconds = "unfolded" if segment is None else segment / sr
            rows.append(summarise({"precision": precision, "segment_s": seconds}, pairs, base))
            print(json.dumps(rows[-1]), flush=True)

    total = sum(len(w) for w in waves) / sr
    print(f"\n{len(waves)} clips, {total:.1f} s, {args.seeds} seeds, model {args.model}")
    print(
        "\n| precision | segment (s) | PESQ-WB | STOI | STOI - unfolded fp32 (paired) | decodes |"
        "\n|---|---|---|---|---|---|"
    )
    for r in rows:
        paired = (
            f"{r['stoi_vs_unfolded']:+.3f} ± {r['stoi_vs_unfolded_se']:.3f}"
            if "stoi_vs_unfolded" in r
            else ""
        )
        print(
            f"| {r['precision']} | {r['segment_s']} | {r['pesq']:.3f} ± {r['pesq_se']:.3f} "
            f"| {r['stoi']:.3f} ± {r['stoi_se']:.3f} | {paired} | {r['n']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
