"""Cutting utterances into windows of N consecutive predictions, with exactly the context the
geometry prescribes. Utterances are padded once (`Utterance.prepare`), never per window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.autoencoder import Windows
from model.geometry import CodecGeometry


@dataclass
class Utterance:
    """A padded utterance: original sample ``i`` sits at ``padded[pad_left + i]``."""

    padded: torch.Tensor  # [L]
    n_samples: int
    pad_left: int
    n_frames: int
    utt: int
    speaker: int

    @classmethod
    def prepare(
        cls, wave: torch.Tensor, geometry: CodecGeometry, utt: int, speaker: int = 0
    ) -> Utterance:
        left, right, n_frames = geometry.padding(wave.shape[-1])
        padded = torch.nn.functional.pad(wave, (left, right))
        return cls(padded, wave.shape[-1], left, n_frames, utt, speaker)

    @property
    def first(self) -> int:
        """First valid prediction (original sample 0)."""
        return self.pad_left

    @property
    def end(self) -> int:
        """One past the last valid prediction."""
        return self.pad_left + self.n_samples


@dataclass(frozen=True)
class WindowSpec:
    """Up to ``n`` predictions of utterance ``index`` from padded position ``t0``."""

    index: int
    t0: int
    n: int


def make_batch(
    geometry: CodecGeometry,
    utterances: list[Utterance],
    specs: list[WindowSpec],
    *,
    seed: int = 0,
    epoch: int = 0,
) -> tuple[torch.Tensor, Windows, int]:
    """Rows of waveform for the frames each window needs, zero-filled to one length.

    Returns:
        ``(wave [B, L], windows, N)`` with N the widest window; predictions past an
        utterance's end are masked out (``n_valid``).
    """
    rows, fields = [], {k: [] for k in ("start", "frame0", "n_frames", "t0", "n_valid")}
    utts, speakers = [], []
    n_max = max(s.n for s in specs)
    for spec in specs:
        u = utterances[spec.index]
        if not u.first <= spec.t0 < u.end:
            raise ValueError(f"prediction {spec.t0} is outside utterance {u.utt}")
        n_valid = min(spec.n, u.end - spec.t0)
        span = geometry.span(spec.t0, spec.t0 + n_valid, u.n_frames)
        rows.append(u.padded[span.start : span.stop])
        for key, value in (
            ("start", span.start),
            ("frame0", span.f0),
            ("n_frames", u.n_frames),
            ("t0", spec.t0),
            ("n_valid", n_valid),
        ):
            fields[key].append(value)
        utts.append(u.utt)
        speakers.append(u.speaker)
    length = max(len(r) for r in rows)
    wave = torch.stack([torch.nn.functional.pad(r, (0, length - len(r))) for r in rows])
    as_long = {k: torch.tensor(v, dtype=torch.long) for k, v in fields.items()}
    windows = Windows(
        **as_long,
        utt=torch.tensor(utts, dtype=torch.long),
        speaker=torch.tensor(speakers, dtype=torch.long),
        seed=seed,
        epoch=epoch,
    )
    return wave, windows, n_max
