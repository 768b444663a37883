"""Evaluate an exported model on a prepared dataset with the torch-free engine (`vqwavenet`).

    python -m training.evaluate --data data/asterisk-fillets          # the bundled model
    python -m training.evaluate --model DIR --data DATA --split valid --limit 16 --json out.json
    python -m training.evaluate --model DIR --data DATA --card DIR/MODEL_CARD.md

Every utterance of ``--split`` (up to ``--limit`` per speaker, a seeded sample) is encoded and
resynthesised in its own speaker's voice, in one batched `Codec.decode_many` call per speaker. A
dataset may hold a nested prepared dataset ``heldout/`` of voices never trained on: its
``--split`` (all of it where that split is empty) is evaluated too, one group per voice,
resynthesised in ``--heldout-voice`` (default: the model's first speaker), since a new voice has
no speaker embedding of its own. Dataset speakers map to the model's by name; one the model
does not know is an error outside ``heldout/`` unless ``--speakers`` leaves it out or
``--skip-unknown-speakers`` drops it (noted in the output).

Per group (each seen speaker, all seen speakers together, each held-out voice):

- STOI and wide-band PESQ of the resynthesis against the original (`pystoi`, `pesq`), means
  over utterances; an utterance too short for a score (pystoi: under 30 frames of speech;
  PESQ: no speech found) is left out of that mean.
- log-mel distance (`log_mel_distance`) and the correlation of the loudness contours
  (`envelope_correlation`: does the resynthesis get loud and quiet where the original does),
  means over utterances.
- word error rate of an offline recogniser (pocketsphinx's default US English model) on the
  originals and on the resynthesis, over the utterances with an English transcript
  (`training.transcripts`): total word errors over total reference words.
- teacher-forced cross-entropy in nats/sample (`Codec.cross_entropy` with ``codes=``) under
  the true codes, the codes permuted in time (a permutation of each utterance's frames seeded
  by ``--seed`` and its position in the group) and one constant code (each utterance's most
  frequent code on every frame), averaged over all samples: how much the decoder uses the
  codes. Held-out voices are scored in the voice they are resynthesised in.
- codes (`code_stats`): how many of the K codes occur, the perplexity ``exp(H)`` of their
  frequencies over all frames, and ``H`` in bits per second at the model's frame rate.
- the real-time factor of the resynthesis: audio seconds over the wall seconds of encoding and
  one batched decode (``--seed``; fp32, or int8 with ``--int8``).

Scores are computed on 16 kHz audio (PESQ-WB and the recogniser need it; other model rates
are resampled). The output is a markdown table on stdout and, with ``--json``, the same numbers
plus every utterance's; ``--card`` writes a model card (`write_model_card`, which also takes
sections such as the training details). Torch is not imported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.dataset import SPLITS, Dataset
from training.transcripts import PACKAGE, TRANSCRIPTS, Transcripts
from vqwavenet.model_dir import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parent.parent
SCORE_RATE = 16000
HELDOUT_DIR = "heldout"
N_MELS = 80
MEL_FLOOR = 1e-5


class EvaluationError(ValueError):
    """A usage error (missing model or dataset, empty split, unknown speaker): one line."""


# --- metrics ----------------------------------------------------------------------------------


def mel_filterbank(sr: int, n_fft: int, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular filters ``[n_mels, n_fft // 2 + 1]`` equally spaced on the HTK mel scale
    ``2595 log10(1 + f / 700)`` from 0 Hz to ``sr / 2``, peak 1 (float64)."""
    mel = 2595 * np.log10(1 + np.array([0.0, sr / 2]) / 700)
    hz = 700 * (10 ** (np.linspace(mel[0], mel[1], n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (freqs - lo) / (mid - lo)
    falling = (hi - freqs) / (hi - mid)
    return np.maximum(0, np.minimum(rising, falling))


def log_mel(x: np.ndarray, sr: int) -> np.ndarray:
    """Log-mel spectrogram ``[T, 80]`` of ``x`` ``[n]``: 25 ms Hann windows every 10 ms (no
    centring; a signal shorter than one window is zero-padded to one), FFT of the next power
    of two, power spectrum through `mel_filterbank`, natural log of ``max(mel, 1e-5)``."""
    win, hop = round(0.025 * sr), round(0.010 * sr)
    n_fft = 1 << (win - 1).bit_length()
    x = np.asarray(x, dtype=np.float64)
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    n_frames = 1 + (len(x) - win) // hop
    idx = np.arange(win)[None] + hop * np.arange(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(win + 2)[1:-1], n_fft)) ** 2
    return np.log(np.maximum(spec @ mel_filterbank(sr, n_fft).T, MEL_FLOOR))


def log_mel_distance(reference: np.ndarray, degraded: np.ndarray, sr: int) -> float:
    """Mean absolute difference of the `log_mel` spectrograms of two signals over frames and
    mel bands (nats), the longer signal cut to the shorter."""
    n = min(len(reference), len(degraded))
    return float(np.abs(log_mel(reference[:n], sr) - log_mel(degraded[:n], sr)).mean())


def envelope_correlation(reference: np.ndarray, degraded: np.ndarray, sr: int) -> float:
    """Pearson correlation of the two signals' loudness contours: the log of each `log_mel`
    frame's total mel power, over the frames both have. 1: the resynthesis rises and falls
    with the original (a gain or a filter leaves it near 1); near 0: its loudness ignores the
    original's, as when a decoder fills pauses and drops syllables whatever the codes say.
    NaN for a contour without variation (a constant signal)."""
    n = min(len(reference), len(degraded))
    a, b = (np.logaddexp.reduce(log_mel(x[:n], sr), axis=1) for x in (reference, degraded))
    if np.ptp(a) < 1e-6 or np.ptp(b) < 1e-6:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def stoi_score(reference: np.ndarray, degraded: np.ndarray, sr: int) -> float:
    """STOI, NaN where pystoi finds too little speech (it warns and returns 1e-5)."""
    from pystoi import stoi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(stoi(reference, degraded, sr))
    short = any("Not enough STFT frames" in str(w.message) for w in caught)
    return float("nan") if short else score


def pesq_score(reference: np.ndarray, degraded: np.ndarray, sr: int) -> float:
    """Wide-band PESQ, NaN where it finds no speech (as `benchmarks.resynth_quality`)."""
    from pesq import PesqError, pesq

    p = pesq(sr, reference, degraded, "wb", on_error=PesqError.RETURN_VALUES)
    return float(p) if p >= -0.5 else float("nan")


def code_stats(codes: Sequence[np.ndarray], codebook_size: int, frame_rate: float) -> dict:
    """Usage of the codebook over all frames of ``codes`` (arrays ``[F_i]``): ``used`` codes of
    ``codebook_size``, ``perplexity`` exp(H) and ``bits_per_second`` H / ln 2 * frame_rate,
    where H is the entropy (nats) of the codes' relative frequencies."""
    counts = np.bincount(np.concatenate(codes).astype(np.int64), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return {
        "used": int((counts > 0).sum()),
        "codebook_size": int(codebook_size),
        "perplexity": math.exp(h),
        "bits_per_second": h / math.log(2) * frame_rate,
    }


def permuted_codes(codes: np.ndarray, seed: int, utterance: int) -> np.ndarray:
    """The frames of ``codes`` in a random order drawn from ``default_rng([seed, utterance])``."""
    return codes[np.random.default_rng([seed, utterance]).permutation(len(codes))]


def constant_codes(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Every frame the most frequent code of ``codes`` (the smallest on a tie), and that code."""
    code = int(np.bincount(codes).argmax())
    return np.full_like(codes, code), code


def word_errors(reference: str, hypothesis: str) -> int:
    """Substitutions, deletions and insertions between two normalised word strings (jiwer)."""
    import jiwer

    if not hypothesis.split():
        return len(reference.split())
    out = jiwer.process_words(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions


class Recogniser:
    """pocketsphinx's default US English model on 16 kHz audio; `transcribe` gives the
    normalised words (`training.transcripts.normalise`)."""

    name = "pocketsphinx en-us"

    def __init__(self):
        from pocketsphinx import Decoder

        self._decoder = Decoder(loglevel="FATAL")

    def transcribe(self, wave: np.ndarray) -> str:
        """Words of ``wave`` float ``[n]`` at 16 kHz, in [-1, 1]."""
        from training.transcripts import normalise

        pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
        d = self._decoder
        # Feature state (the cepstral mean among it) carries over between utterances: after
        # noise the next clip was misrecognised. Reset, so a transcript depends on its audio.
        d.reinit_feat()
        d.start_utt()
        d.process_raw(pcm.tobytes(), full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        return normalise(hyp.hypstr) if hyp is not None else ""


# --- what to evaluate -------------------------------------------------------------------------


@dataclass
class Group:
    """Utterances ``indices`` of ``dataset`` resynthesised in the model's speaker ``voice``."""

    name: str
    kind: str  # "seen" or "heldout"
    dataset: Dataset
    indices: list[int]
    voice: str
    voice_index: int


@dataclass
class Plan:
    """What `plan` chose: the groups, and the choices the report records."""

    root: Path
    split: str
    limit: int | None
    seed: int
    groups: list[Group] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    heldout_split: str | None = None
    source: dict | None = None  # index.json's "source", how the dataset was made


def _sample(indices: list[int], limit: int | None, seed: int) -> list[int]:
    """Up to ``limit`` of ``indices``: a seeded sample, in dataset order."""
    if limit is None or len(indices) <= limit:
        return indices
    keep = np.random.default_rng(seed).choice(len(indices), limit, replace=False)
    return [indices[i] for i in sorted(keep)]


def _by_speaker(ds: Dataset, indices: list[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(ds.speakers[ds.records[i].speaker], []).append(i)
    return dict(sorted(groups.items()))


def _open_dataset(root: Path) -> Dataset:
    if not (root / "index.json").is_file():
        raise EvaluationError(
            f"{root}: not a prepared dataset (no index.json; python -m training.prepare)"
        )
    try:
        return Dataset(root)
    except (OSError, ValueError, KeyError) as e:
        raise EvaluationError(f"{root}: cannot read the dataset ({e})") from e


def plan(
    data: str | Path,
    model_speakers: Sequence[str],
    *,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    heldout_voice: str | None = None,
    speakers: Sequence[str] | None = None,
    skip_unknown: bool = False,
) -> Plan:
    """The groups to evaluate (see the module doc); `EvaluationError` for usage errors."""
    root = Path(data)
    if not root.is_dir():
        raise EvaluationError(f"{root}: no such dataset directory")
    ds = _open_dataset(root)
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    if limit is not None and limit < 1:
        raise EvaluationError("--limit must be >= 1")
    result = Plan(
        root, split, limit, seed, source=json.loads((root / "index.json").read_text()).get("source")
    )
    by_speaker = _by_speaker(ds, ds.split(split))
    if not by_speaker:
        counts = {s: len(ds.split(s)) for s in SPLITS}
        raise EvaluationError(f"{root}: split {split!r} is empty (utterances per split: {counts})")
    if speakers:
        missing = [s for s in speakers if s not in by_speaker]
        if missing:
            raise EvaluationError(
                f"--speakers {' '.join(missing)}: not in split {split!r} of {root} "
                f"(it has {', '.join(by_speaker)})"
            )
        by_speaker = {s: by_speaker[s] for s in speakers}
    unknown = [s for s in by_speaker if s not in model_speakers]
    if unknown and not skip_unknown:
        raise EvaluationError(
            f"speakers {', '.join(unknown)} of {root} are not the model's "
            f"({', '.join(model_speakers)}): leave them out with --speakers or "
            "--skip-unknown-speakers, or move them to heldout/"
        )
    if unknown:
        result.notes.append(
            f"Speakers the model does not know, not evaluated: {', '.join(unknown)}."
        )
    for name, indices in by_speaker.items():
        if name in unknown:
            continue
        result.groups.append(
            Group(name, "seen", ds, _sample(indices, limit, seed), name, model_speakers.index(name))
        )
    if not result.groups:
        raise EvaluationError(f"{root}: no speaker of split {split!r} is one of the model's")
    if (root / HELDOUT_DIR).is_dir():
        held = _open_dataset(root / HELDOUT_DIR)
        voice = model_speakers[0] if heldout_voice is None else heldout_voice
        if voice not in model_speakers:
            raise EvaluationError(
                f"--heldout-voice {voice!r} is not one of the model's speakers "
                f"({', '.join(model_speakers)})"
            )
        indices = held.split(split)
        result.heldout_split = split if indices else "all"
        indices = indices or list(range(len(held)))
        by_held = _by_speaker(held, indices)
        for name, idx in by_held.items():
            result.groups.append(
                Group(
                    f"held-out {name} (as {voice})",
                    "heldout",
                    held,
                    _sample(idx, limit, seed),
                    voice,
                    model_speakers.index(voice),
                )
            )
        known = [name for name in by_held if name in model_speakers]
        if known:
            result.notes.append(
                f"Held-out voices {', '.join(known)} are also speakers of the model: it may "
                "have been trained on them."
            )
        result.notes.append(
            f"Held-out voices ({root / HELDOUT_DIR}, split {result.heldout_split}) are "
            f"resynthesised and scored in the voice of {voice} (an unseen voice has no speaker "
            "embedding of its own)."
        )
    elif heldout_voice is not None:
        result.notes.append(f"--heldout-voice {heldout_voice}: {root} has no heldout/.")
    return result


# --- running it -------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over work units (one per utterance and stage); engine calls move it
    fractionally through their share."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="utt", disable=not enabled, file=sys.stderr)
        self.done = 0.0

    def stage(self, desc: str, units: int) -> Callable[[int, int], None]:
        self.bar.set_description(desc)
        base = self.done
        self.done += units

        def update(done: int, total: int) -> None:
            self.bar.n = round(base + units * done / max(total, 1), 2)
            self.bar.refresh()

        return update

    def close(self) -> None:
        self.bar.n = self.done
        self.bar.close()


def _to_score_rate(x: np.ndarray, sr: int) -> np.ndarray:
    if sr == SCORE_RATE:
        return np.asarray(x, dtype=np.float64)
    import soxr

    return soxr.resample(np.asarray(x, dtype=np.float64), sr, SCORE_RATE)


def evaluate_group(
    codec,
    group: Group,
    *,
    seed: int = 0,
    ce: bool = True,
    recogniser: Recogniser | None = None,
    transcripts: Transcripts | None = None,
    progress: _Progress | None = None,
) -> tuple[list[dict], list[np.ndarray], float]:
    """Per-utterance records of one group, its codes per utterance and the wall seconds of its
    resynthesis (encoding and one batched decode)."""
    from vqwavenet import DecodeRequest

    progress = progress or _Progress(0, enabled=False)
    ds, n = group.dataset, len(group.indices)
    waves = [codec.to_model_rate(ds.wave(i), ds.sample_rate) for i in group.indices]
    step = progress.stage(f"{group.name}: resynthesis", n)
    start = time.perf_counter()
    codes = [codec.encode(x) for x in waves]
    requests = [DecodeRequest(c, group.voice_index, len(x), seed) for c, x in zip(codes, waves)]
    resynth = codec.decode_many(requests, progress=step)
    wall = time.perf_counter() - start
    records = []
    for i, x, c in zip(group.indices, waves, codes):
        rec = ds.records[i]
        records.append(
            {
                "id": rec.id,
                "speaker": ds.speakers[rec.speaker],
                "voice": group.voice,
                "samples": len(x),
                "seconds": len(x) / codec.sample_rate,
                "frames": len(c),
            }
        )
    if ce:
        step = progress.stage(f"{group.name}: teacher forcing", n)
        shuffled = [permuted_codes(c, seed, k) for k, c in enumerate(codes)]
        constant = [constant_codes(c) for c in codes]
        nll = codec.teacher_forced(
            waves * 3,
            group.voice_index,
            logits=False,
            codes=codes + shuffled + [c for c, _ in constant],
            progress=step,
        )
        for k, r in enumerate(records):
            r["ce_true"] = float(nll[k].astype(np.float64).mean())
            r["ce_permuted"] = float(nll[n + k].astype(np.float64).mean())
            r["ce_constant"] = float(nll[2 * n + k].astype(np.float64).mean())
            r["constant_code"] = constant[k][1]
    step = progress.stage(f"{group.name}: scoring", n)
    for k, (r, x, y) in enumerate(zip(records, waves, resynth)):
        ref, deg = _to_score_rate(x, codec.sample_rate), _to_score_rate(y, codec.sample_rate)
        r["stoi"] = stoi_score(ref, deg, SCORE_RATE)
        r["pesq"] = pesq_score(ref, deg, SCORE_RATE)
        r["log_mel"] = log_mel_distance(ref, deg, SCORE_RATE)
        r["envelope"] = envelope_correlation(ref, deg, SCORE_RATE)
        reference = transcripts.reference(r["id"]) if transcripts is not None else None
        if recogniser is not None and reference is not None:
            r["reference"] = reference
            r["words"] = len(reference.split())
            r["hyp_original"] = recogniser.transcribe(ref)
            r["hyp_resynth"] = recogniser.transcribe(deg)
            r["errors_original"] = word_errors(reference, r["hyp_original"])
            r["errors_resynth"] = word_errors(reference, r["hyp_resynth"])
        step(k + 1, n)
    return records, codes, wall


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def summarise(
    name: str,
    records: list[dict],
    codes: list[np.ndarray],
    wall: float,
    codebook_size: int,
    frame_rate: float,
    voice: str,
) -> dict:
    """One table row from a group's records, codes and resynthesis wall time."""
    samples = sum(r["samples"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    row = {
        "group": name,
        "voice": voice,
        "utterances": len(records),
        "seconds": seconds,
        "stoi": _mean(r["stoi"] for r in records),
        "pesq": _mean(r["pesq"] for r in records),
        "log_mel": _mean(r["log_mel"] for r in records),
        "envelope": _mean(r.get("envelope") for r in records),
    }
    scored = [r for r in records if "words" in r]
    words = sum(r["words"] for r in scored)
    row["wer_utterances"] = len(scored)
    for kind in ("original", "resynth"):
        errors = sum(r[f"errors_{kind}"] for r in scored)
        row[f"wer_{kind}"] = errors / words if words else None
    for kind in ("true", "permuted", "constant"):
        key = f"ce_{kind}"
        have = all(key in r for r in records)
        row[key] = sum(r[key] * r["samples"] for r in records) / samples if have else None
    row.update(code_stats(codes, codebook_size, frame_rate))
    row["rtf"] = seconds / wall if wall > 0 else None
    return row


def evaluate(
    codec,
    groups_plan: Plan,
    *,
    seed: int | None = None,
    ce: bool = True,
    wer: bool = True,
    progress: bool = True,
) -> dict:
    """Evaluate every group of ``groups_plan`` with ``codec``: the report (rows, per-utterance
    records, notes) that `markdown_table`, ``--json`` and `model_card` show."""
    seed = groups_plan.seed if seed is None else seed
    notes = list(groups_plan.notes)
    transcripts = recogniser = None
    if wer:
        transcripts = Transcripts.load()
        if transcripts is None:
            notes.append(f"No word error rates: {TRANSCRIPTS} is missing (install {PACKAGE}).")
        else:
            recogniser = Recogniser()
    units = sum(len(g.indices) for g in groups_plan.groups) * (3 if ce else 2)
    bar = _Progress(units, enabled=progress)
    frame_rate = codec.sample_rate / codec.hop
    rows, utterances, seen = [], [], ([], [], 0.0)
    try:
        for group in groups_plan.groups:
            records, codes, wall = evaluate_group(
                codec,
                group,
                seed=seed,
                ce=ce,
                recogniser=recogniser,
                transcripts=transcripts,
                progress=bar,
            )
            for r in records:
                r["group"] = group.name
            utterances += records
            rows.append(
                summarise(
                    group.name, records, codes, wall, codec.codebook_size, frame_rate, group.voice
                )
            )
            rows[-1]["kind"] = group.kind
            if group.kind == "seen":
                seen = (seen[0] + records, seen[1] + codes, seen[2] + wall)
    finally:
        bar.close()
    n_seen = sum(g.kind == "seen" for g in groups_plan.groups)
    everyone = summarise("seen (all)", *seen, codec.codebook_size, frame_rate, "own")
    everyone["kind"] = "seen-all"
    rows.insert(n_seen, everyone)
    if ce:
        notes.append(
            "CE: teacher-forced nats/sample under the true codes, the codes permuted in time "
            f"(seed {seed}) and each utterance's most frequent code on every frame."
        )
    if recogniser is not None:
        n = sum(r["wer_utterances"] for r in rows if r["kind"] != "seen-all")
        notes.append(
            f"WER: {Recogniser.name} on the {n} utterances with an English transcript "
            "(total errors over total reference words)."
        )
    meta = {
        "model": str(codec.dir),
        "model_id": codec.model_id,
        "notice": codec.meta.get("notice"),
        "sample_rate": codec.sample_rate,
        "frame_rate": frame_rate,
        "codebook_size": codec.codebook_size,
        "speakers": codec.speakers,
        "precision": "int8" if codec.int8 else "fp32",
        "sampling_temperature": codec.sampling_temperature,
        "data": str(groups_plan.root),
        "source": groups_plan.source,
        "split": groups_plan.split,
        "heldout_split": groups_plan.heldout_split,
        "limit": groups_plan.limit,
        "seed": seed,
        "recogniser": Recogniser.name if recogniser is not None else None,
    }
    return {"meta": meta, "rows": rows, "utterances": utterances, "notes": notes}


# --- output -----------------------------------------------------------------------------------

COLUMNS = (
    ("group", "group", "{}"),
    ("utterances", "utts", "{}"),
    ("seconds", "seconds", "{:.1f}"),
    ("stoi", "STOI", "{:.3f}"),
    ("pesq", "PESQ-WB", "{:.2f}"),
    ("log_mel", "log-mel dist.", "{:.3f}"),
    ("envelope", "envelope r", "{:.2f}"),
    ("wer_original", "WER original", "{:.1%}"),
    ("wer_resynth", "WER resynth", "{:.1%}"),
    ("ce_true", "CE true", "{:.3f}"),
    ("ce_permuted", "CE permuted", "{:.3f}"),
    ("ce_constant", "CE constant", "{:.3f}"),
    ("used", "codes used/K", None),
    ("perplexity", "perplexity", "{:.1f}"),
    ("bits_per_second", "bits/s", "{:.0f}"),
    ("rtf", "RTF", "{:.2f}x"),
)


def format_cell(row: dict, key: str, fmt: str | None) -> str:
    """One `COLUMNS` cell of a row (``–``: not measured)."""
    if key == "used":
        return f"{row['used']}/{row['codebook_size']}"
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows of a report as a markdown table (``–``: not measured)."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row, k, f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def _section(title: str, body: str | Mapping) -> str:
    if isinstance(body, Mapping):
        body = "\n".join(f"- **{k}**: {v}" for k, v in body.items())
    return f"## {title}\n\n{str(body).strip()}\n"


def _source(source: dict | None) -> str:
    """How the dataset was made, briefly: its corpus and held-out voices (the JSON has all)."""
    if not source:
        return ""
    brief = {k: source[k] for k in ("corpus", "held_out") if k in source} or source
    return " (" + ", ".join(f"{k}: {v}" for k, v in brief.items()) + ")"


def model_card(report: dict, sections: Mapping[str, str | Mapping] | None = None) -> str:
    """A markdown model card: the model, what was evaluated and how, the evaluation table and
    its notes, then ``sections`` in order (title -> markdown text, or a mapping shown as a
    list of ``key: value``), e.g. ``{"Training": {"config": ..., "data": ..., "compute":
    ...}}``."""
    meta = report["meta"]
    lines = [f"# Model card: {meta['model_id']}\n"]
    if meta.get("notice"):
        lines.append(f"{meta['notice']}\n")
    model = {
        "model id": meta["model_id"],
        "sample rate": f"{meta['sample_rate']} Hz, {meta['frame_rate']:g} code frames/s",
        "codebook": f"{meta['codebook_size']} codes",
        "speakers": ", ".join(meta["speakers"]),
    }
    lines.append(_section("Model", model))
    what = {
        "dataset": meta["data"] + _source(meta.get("source")),
        "split": meta["split"]
        + (f"; held-out voices: {meta['heldout_split']}" if meta.get("heldout_split") else ""),
        "utterances": f"up to {meta['limit']} per group (seeded sample)"
        if meta["limit"]
        else "all",
        "engine": f"vqwavenet, {meta['precision']}, sampling temperature "
        f"{meta.get('sampling_temperature', 1.0):g}, seed {meta['seed']}",
    }
    if meta.get("command"):
        what["command"] = f"`{meta['command']}`"
    lines.append(_section("Evaluation", what))
    lines.append(markdown_table(report["rows"]) + "\n")
    lines += [f"- {note}" for note in report["notes"]]
    lines.append("")
    for title, body in (sections or {}).items():
        lines.append(_section(title, body))
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(
    path: str | Path, report: dict, sections: Mapping[str, str | Mapping] | None = None
) -> None:
    """Write `model_card` to ``path`` (replacing the file)."""
    Path(path).write_text(model_card(report, sections))


def _finite(value):
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- command line -----------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="model directory")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--limit", type=int, help="utterances per group (a seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling, permutation and decode seed")
    p.add_argument("--int8", action="store_true", help="the int8 decoder graphs")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--card", type=Path, help="write a model card (markdown) here")
    p.add_argument(
        "--card-notes",
        type=Path,
        help="markdown appended to the model card (training details, limits)",
    )
    p.add_argument("--no-wer", action="store_true", help="skip speech recognition")
    p.add_argument("--no-ce", action="store_true", help="skip teacher-forced cross-entropy")
    p.add_argument(
        "--heldout-voice", help="model speaker that held-out voices are resynthesised in"
    )
    p.add_argument("--speakers", nargs="+", help="evaluate only these dataset speakers")
    p.add_argument(
        "--skip-unknown-speakers",
        action="store_true",
        help="leave out dataset speakers the model does not know (instead of failing)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    from vqwavenet import Codec, ModelDirError

    if args.seed < 0:
        print("error: --seed must be >= 0", file=sys.stderr)
        return 2
    notes = None
    if args.card_notes is not None:
        try:
            notes = args.card_notes.read_text()
        except OSError as e:
            print(f"error: --card-notes: {e.strerror}: {args.card_notes}", file=sys.stderr)
            return 2
    model = Path(args.model)
    if not model.is_dir():
        print(f"error: {model}: no such model directory", file=sys.stderr)
        return 2
    try:
        codec = Codec(model, int8=args.int8)
        groups = plan(
            args.data,
            codec.speakers,
            split=args.split,
            limit=args.limit,
            seed=args.seed,
            heldout_voice=args.heldout_voice,
            speakers=args.speakers,
            skip_unknown=args.skip_unknown_speakers,
        )
    except (EvaluationError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = evaluate(
        codec,
        groups,
        seed=args.seed,
        ce=not args.no_ce,
        wer=not args.no_wer,
        progress=not args.quiet,
    )
    argv = sys.argv[1:] if argv is None else argv
    report["meta"]["command"] = " ".join(["python -m training.evaluate", *map(str, argv)])
    print(markdown_table(report["rows"]))
    for note in report["notes"]:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    if args.card:
        card = model_card(report)
        args.card.write_text(card if notes is None else f"{card}\n{notes.strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
