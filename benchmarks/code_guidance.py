"""Does guiding the decoder towards its codes make a resynthesis more intelligible?

    python -m benchmarks.code_guidance --checkpoint CKPT --data data/asterisk-fillets \
        --speakers Allison --limit 12 --weights 0 0.3 --null mean constant --seed 0 \
        [--temperature 0.7]

The long runs' resyntheses follow their own sampled past more than the codes (docs/TRAINING.md,
"What goes wrong"). Guidance, as in classifier-free guidance, pushes every step's logits away
from those under conditioning that carries no timing:

    logits = l(codes) + w * (l(codes) - l(null))

and draws from ``softmax(logits / T)`` (``--temperature``, as `python -m export --temperature`
bakes into a model's step graphs; a bundled model's is in its ``model.json``).
``null`` is either the time mean of the utterance's own conditioning (``mean``: its speaker and
average timbre, no timing), its most frequent code on every frame (``constant``), or the
speaker alone (``zero``: the null a decoder trained with ``decoder.cond_dropout`` saw in
training, `model.cond_dropout`). Both branches are fed the same drawn sample, so guidance
doubles the decoder's work; ``w = 0`` is plain sampling. A decoder trained without condition
dropout never saw any of these nulls, so on it this measures what guidance does to a decoder
trained as it is.

Generation runs `model.decoder_step.DecoderStep` in PyTorch with ring buffers, unfolded, from a
silent past (the engine cannot evaluate two conditionings per stream), and samples with one
seeded noise stream per utterance that every weight shares. The utterances are the first
``--limit`` of each speaker's test split in dataset order. Each row scores STOI, the
loudness-contour correlation (envelope r) and log-mel distance against the original (as
`training.evaluate` does); the table adds each setting's paired STOI difference from ``w = 0``
with its standard error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import emit, mean_se
from model import mulaw
from model.decoder_step import DecoderStep
from training.dataset import Dataset
from training.evaluate import envelope_correlation, log_mel_distance, stoi_score

NULLS = ("mean", "constant", "zero")


def conditionings(model, step: DecoderStep, wave: np.ndarray, speaker: int, null: str):
    """``(cond, null_cond, left)``: an utterance's conditioning rows ``[C, L * 2G]`` (slots =
    frames, as the exported conditioner computes them), the null rows, and its left padding."""
    if null not in NULLS:
        raise ValueError(f"unknown null conditioning {null!r} (one of {NULLS})")
    padded, left, _ = model.pad(torch.as_tensor(wave, dtype=torch.float32)[None])
    codes = model.encode(padded)  # [1, F]
    spk = torch.tensor([speaker])

    def rows(c: torch.Tensor, dropped: bool = False) -> torch.Tensor:
        vecs = model.quantizer.codebook[c].transpose(1, 2)
        n_cond = vecs.shape[-1] - model.cfg.decoder.cond_kernel + 1
        drop = torch.full((1, n_cond), True) if dropped else None
        return step.condition(vecs, spk, drop)[0].t()

    cond = rows(codes)
    if null == "zero":
        return cond, rows(codes, dropped=True), left
    if null == "mean":
        return cond, cond.mean(0, keepdim=True).expand_as(cond), left
    return cond, rows(torch.full_like(codes, int(torch.bincount(codes[0]).argmax()))), left


@torch.no_grad()
def generate(
    model,
    step: DecoderStep,
    conds: list[torch.Tensor],
    nulls: list[torch.Tensor] | None,
    lefts: list[int],
    lengths: list[int],
    weight: float,
    seed: int,
    *,
    temperature: float = 1.0,
    record: bool = False,
):
    """Sample ``B`` utterances together; returns ``(classes [B, T], fed, logits)``.

    ``classes[b, t]`` is the class at padded-utterance time ``t`` (the zero class in the left
    padding and past an utterance's end). Steps start ``wavenet_context`` samples before time
    0 on silence, so the first real prediction's receptive field holds no ring's initial zeros.
    With ``record``, ``fed [B, S]`` holds the class fed at each step and ``logits [B, S, Q]``
    the conditional branch's logits (for checking against the parallel decoder). Draws come
    from ``softmax(guided logits / temperature)``.
    """
    geo, n = model.geometry, len(conds)
    guided = weight != 0
    if guided and nulls is None:
        raise ValueError("a guidance weight needs null conditionings")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"a sampling temperature must be a positive number, not {temperature}")
    ctx = geo.wavenet_context
    total = max(left + m for left, m in zip(lefts, lengths))
    times = np.arange(-ctx, total)
    index = np.asarray(geo.cond_index(times))
    branches = conds + (nulls if guided else [])
    rows = len(branches)
    padded = torch.nn.utils.rnn.pad_sequence(branches, batch_first=True)  # [rows, C_max, L*2G]
    last = torch.tensor([len(c) - 1 for c in branches])
    every = torch.arange(rows)
    rings = [torch.zeros(size, rows, step.residual_channels) for size in step.ring_sizes()]
    zero = int(mulaw.encode(torch.zeros(1), step.head2_w.shape[1])[0])
    prev = torch.full((rows,), zero, dtype=torch.long)
    noise = torch.stack(  # one seeded stream per utterance of the batch, the same for every weight
        [
            torch.rand(
                len(times),
                generator=torch.Generator().manual_seed(seed * 100003 + b),
                dtype=torch.float64,
            )
            for b in range(n)
        ],
        1,
    )
    classes = np.full((n, total), zero, dtype=np.int64)
    fed, seen = [], []
    live = np.array([[left, left + m] for left, m in zip(lefts, lengths)])
    for s, t in enumerate(times):
        cond = padded[every, torch.full((rows,), max(int(index[s]), 0)).minimum(last)]
        past = torch.stack([ring[s % len(ring)] for ring in rings])
        out = step(prev, past, cond, torch.zeros(rows))
        current = out.current.reshape(rows, step.n_layers, -1)
        for i, ring in enumerate(rings):
            ring[s % len(ring)] = current[:, i]
        logits = out.logits[:n]
        if record:
            fed.append(prev[:n].clone())
            seen.append(logits.clone())
        if guided:
            logits = logits + weight * (logits - out.logits[n:])
        u = noise[s]
        cdf = torch.softmax(logits.double() / temperature, 1).cumsum(1)
        draw = (cdf < u[:, None]).sum(1).clamp_max(logits.shape[1] - 1)
        if t >= 0:
            keep = torch.from_numpy((live[:, 0] <= t) & (t < live[:, 1]))
            draw = torch.where(keep, draw, torch.full_like(draw, zero))
            classes[:, t] = draw.numpy()
        else:
            draw = torch.full_like(draw, zero)
        prev = draw.repeat(2) if guided else draw
    if not record:
        return classes, None, None
    return classes, torch.stack(fed, 1), torch.stack(seen, 1)


def resynthesise(
    model, step, waves, speaker, weight, null, seed, temperature: float = 1.0
) -> list[np.ndarray]:
    """Guided resyntheses of ``waves`` in voice ``speaker`` (float32 at the model's rate),
    drawn at ``temperature``."""
    prepared = [conditionings(model, step, w, speaker, null) for w in waves]
    conds, nulls, lefts = (list(x) for x in zip(*prepared))
    lengths = [len(w) for w in waves]
    classes, _, _ = generate(
        model, step, conds, nulls, lefts, lengths, weight, seed, temperature=temperature
    )
    q = step.head2_w.shape[1]
    return [
        mulaw.decode(torch.from_numpy(classes[b, left : left + m]), q).numpy().astype(np.float32)
        for b, (left, m) in enumerate(zip(lefts, lengths))
    ]


def score(waves, outputs, sr: int) -> dict:
    return {
        "stoi": [stoi_score(x, y, sr) for x, y in zip(waves, outputs)],
        "envelope_r": [envelope_correlation(x, y, sr) for x, y in zip(waves, outputs)],
        "log_mel": [log_mel_distance(x, y, sr) for x, y in zip(waves, outputs)],
    }


def table(rows: list[dict]) -> str:
    head = "| speaker | null | w | utts | STOI | STOI - (w = 0), paired | envelope r | log-mel |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    base = {r["speaker"]: np.array(r["per_utterance"]["stoi"]) for r in rows if r["weight"] == 0}
    for r in rows:
        st = np.array(r["per_utterance"]["stoi"])
        diff = "–"
        if r["weight"] != 0 and r["speaker"] in base:
            m, se = mean_se(st - base[r["speaker"]])
            diff = f"{m:+.3f} ± {se:.3f}"
        null = r["null"] if r["weight"] != 0 else "–"
        lines.append(
            f"| {r['speaker']} | {null} | {r['weight']:g} | {len(st)} | {r['stoi']:.3f} | "
            f"{diff} | {r['envelope_r']:.2f} | {r['log_mel']:.3f} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.code_guidance",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset")
    p.add_argument("--speakers", nargs="+", required=True, help="dataset voices the model has")
    p.add_argument("--limit", type=int, default=12, help="test utterances per speaker")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--null", nargs="+", choices=NULLS, default=["mean"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="draw from softmax(guided logits / T)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write settings and rows here")
    return p


def main(argv=None) -> int:
    from export.onnx_export import load_checkpoint

    parser = get_parser()
    args = parser.parse_args(argv)
    if not (args.temperature > 0 and np.isfinite(args.temperature)):
        parser.error(f"--temperature must be a positive number, not {args.temperature}")
    torch.set_num_threads(args.threads)
    model, voices, _ = load_checkpoint(args.checkpoint)
    step = DecoderStep(model.decoder).eval()
    ds = Dataset(args.data)
    rate = model.cfg.features.sample_rate
    if ds.sample_rate != rate:
        print(
            f"error: {args.data} is at {ds.sample_rate} Hz, the model at {rate} Hz", file=sys.stderr
        )
        return 2
    settings = [(0.0, "mean")] if 0.0 in args.weights else []
    settings += [(w, n) for w in args.weights if w != 0 for n in args.null]
    rows = []
    for name in args.speakers:
        if name not in voices or name not in ds.speakers:
            print(
                f"error: {name!r} must be a voice of the model ({', '.join(voices)}) and of "
                f"the dataset ({', '.join(ds.speakers)})",
                file=sys.stderr,
            )
            return 2
        sid = ds.speakers.index(name)
        idx = [i for i in ds.split("test") if ds.records[i].speaker == sid][: args.limit]
        waves = [ds.wave(i) for i in idx]
        for weight, null in settings:
            t0 = time.perf_counter()
            outputs = resynthesise(
                model, step, waves, voices.index(name), weight, null, args.seed, args.temperature
            )
            per = score(waves, outputs, ds.sample_rate)
            rows.append(
                {
                    "speaker": name,
                    "weight": weight,
                    "null": null,
                    "seed": args.seed,
                    "temperature": args.temperature,
                    "utterances": [ds.records[i].id for i in idx],
                    **{k: mean_se(v)[0] for k, v in per.items()},  # STOI is nan under 30 frames
                    "per_utterance": per,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"{name} w={weight:g} {null}: STOI {rows[-1]['stoi']:.3f}", file=sys.stderr)
    emit(rows, table(rows), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
