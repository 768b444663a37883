"""How much intelligibility does sampling itself cost, and how much the free-running past?

    python -m benchmarks.open_loop --model DIR --data data/asterisk-fillets \
        --speakers Allison June --limit 12 --temperatures 1.0 0.5 --seed 0

A resynthesis is sampled one step at a time, each step fed the decoder's own earlier draws.
Its distance from the original has two sources: the width of every step's distribution (a
draw is not the true sample even when the past is right) and the drift of a past made of
draws, which the decoder follows instead of the codes (docs/TRAINING.md, "What goes wrong").
This benchmark separates them on the same utterances, scoring each waveform against the
original as `training.evaluate` does (STOI, loudness-contour correlation, log-mel distance):

- ``mulaw``: the original through the model's mu-law classes and back, the ceiling of what a
  decoder of these classes can give;
- ``forced T``: every sample drawn at temperature ``T`` from the decoder's distribution given
  the *true* past and the codes (teacher-forced logits, `Codec.teacher_forced`). The past
  never drifts, so this is what the width of the distribution alone costs;
- ``forced mean``: every sample the distribution's mean amplitude given the true past, the
  least-squares guess, with no sampling noise;
- ``forced T, constant code``: as ``forced T`` with one constant code for the whole utterance
  (its most frequent), which says how much of ``forced`` the true past carries on its own;
- ``free``: the engine's resynthesis (`Codec.decode_many`, as `training.evaluate`), each step
  fed the decoder's own draws.

``forced`` far above ``free`` means the loss is the drift, and a better-fitted decoder under
the same teacher-forced loss need not help; ``forced`` close to ``free`` means the step
distribution is too wide and lower cross-entropy is what is needed. Draws use one seeded
uniform stream per utterance and inverse-CDF sampling, as the engine does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import emit, mean_se
from training.dataset import Dataset
from training.evaluate import (
    constant_codes,
    envelope_correlation,
    log_mel_distance,
    stoi_score,
)
from vqwavenet.audio import mulaw_decode, mulaw_encode

METRICS = ("stoi", "envelope", "log_mel")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def draw(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One class per row by the inverse CDF: the first class whose cumulative probability
    exceeds the row's uniform."""
    cdf = np.cumsum(probs, axis=-1)
    cdf[:, -1] = np.inf  # rounding never pushes a draw past the last class
    return (cdf < uniforms[:, None]).sum(axis=-1)


def mean_amplitude(probs: np.ndarray, q: int) -> np.ndarray:
    """Each row's expected waveform value, the classes decoded to amplitudes."""
    return probs @ mulaw_decode(np.arange(q), q).astype(np.float64)


def forced_waves(
    logits: np.ndarray, q: int, temperatures: list[float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Waveforms from one utterance's teacher-forced logits ``[n, q]``: a draw per
    temperature (the same uniforms for each) and the mean amplitude."""
    uniforms = rng.random(len(logits))
    out = {
        f"forced T={t:g}": mulaw_decode(draw(softmax(logits, t), uniforms), q) for t in temperatures
    }
    out["forced mean"] = mean_amplitude(softmax(logits), q).astype(np.float32)
    return out


def scores(reference: np.ndarray, degraded: np.ndarray, sr: int) -> dict[str, float]:
    return {
        "stoi": stoi_score(reference, degraded, sr),
        "envelope": envelope_correlation(reference, degraded, sr),
        "log_mel": log_mel_distance(reference, degraded, sr),
    }


def forced_variants(codec, waves, voice: int, codes, args) -> list[dict[str, np.ndarray]]:
    """Every variant's waveform but ``free`` for each utterance, at the model rate; one
    batched teacher-forced run for the true codes and the constant ones."""
    q, n, t = codec.q, len(waves), args.temperatures[0]
    constant = [constant_codes(c)[0] for c in codes]
    logits = codec.teacher_forced(list(waves) * 2, voice, codes=list(codes) + constant)
    out = []
    for r, x in enumerate(waves):
        v = {"mulaw": mulaw_decode(mulaw_encode(x, q), q)}
        v.update(
            forced_waves(logits[r], q, args.temperatures, np.random.default_rng((args.seed, r)))
        )
        uniforms = np.random.default_rng((args.seed, r, 1)).random(len(logits[n + r]))
        v[f"forced T={t:g}, constant code"] = mulaw_decode(
            draw(softmax(logits[n + r], t), uniforms), q
        )
        out.append(v)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| speaker | variant | utts | STOI | STOI - free (paired) | envelope r | log-mel |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (
            f"{r['stoi_minus_free']:+.3f} ± {r['stoi_minus_free_se']:.3f}"
            if r["variant"] != "free"
            else "–"
        )
        lines.append(
            f"| {r['speaker']} | {r['variant']} | {r['utterances']} | {r['stoi']:.3f} | {diff} "
            f"| {r['envelope']:.2f} | {r['log_mel']:.3f} |"
        )
    return "\n".join(lines)


def summarise(speaker: str, per: dict[str, dict[str, list[float]]]) -> list[dict]:
    """One row per variant: means, and the STOI difference from ``free`` paired by
    utterance."""
    free = np.asarray(per["free"]["stoi"], dtype=float)
    rows = []
    for variant, values in per.items():
        diff = np.asarray(values["stoi"], dtype=float) - free
        d, se = mean_se(diff)
        rows.append(
            {
                "speaker": speaker,
                "variant": variant,
                "utterances": int(np.isfinite(values["stoi"]).sum()),
                **{m: mean_se(values[m])[0] for m in METRICS},
                "stoi_minus_free": d,
                "stoi_minus_free_se": se,
                "per_utterance": values,
            }
        )
    return rows


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="exported model directory")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--speakers", nargs="+", required=True, help="voices of model and dataset")
    p.add_argument("--limit", type=int, default=12, help="first N utterances of each speaker")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all)")
    p.add_argument("--json", type=Path, help="write settings and rows here")
    return p


def main(argv=None) -> int:
    from vqwavenet import Codec, DecodeRequest

    args = get_parser().parse_args(argv)
    if any(not (t > 0) for t in args.temperatures):
        print("error: temperatures must be positive", file=sys.stderr)
        return 2
    codec = Codec(args.model, threads=args.threads)
    ds = Dataset(args.data)
    rows = []
    for name in args.speakers:
        if name not in codec.speakers or name not in ds.speakers:
            print(
                f"error: {name!r} must be a voice of the model ({', '.join(codec.speakers)}) "
                f"and of the dataset ({', '.join(ds.speakers)})",
                file=sys.stderr,
            )
            return 2
        sid, voice = ds.speakers.index(name), codec.speaker_index(name)
        idx = [i for i in ds.split(args.split) if ds.records[i].speaker == sid][: args.limit]
        waves = [codec.to_model_rate(ds.wave(i), ds.sample_rate) for i in idx]
        t0 = time.perf_counter()
        codes = [codec.encode(x) for x in waves]
        requests = [DecodeRequest(c, voice, len(x), args.seed) for c, x in zip(codes, waves)]
        free = codec.decode_many(requests)
        per: dict[str, dict[str, list[float]]] = {}
        forced = forced_variants(codec, waves, voice, codes, args)
        for x, y, others in zip(waves, free, forced):
            variants = {"free": y, **others}
            for variant, w in variants.items():
                s = scores(x.astype(np.float64), np.asarray(w, dtype=np.float64), codec.sample_rate)
                for m in METRICS:
                    per.setdefault(variant, {k: [] for k in METRICS})[m].append(s[m])
        rows += summarise(name, per)
        print(f"{name}: {len(idx)} utterances, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    emit(rows, table(rows), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
