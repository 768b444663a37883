"""Folding: a long utterance cut into segments that are generated side by side as one batch
and cross-faded.

Segment ``k`` owns samples ``[a_k, b_k)``. Each after the first starts generating ``burn_in +
overlap`` samples early: it cannot start from the audio before it (that is being generated
beside it), so it starts from a stand-in state (`vqwavenet.Codec`'s ``warmup``), drops the first
``burn_in`` samples while it forgets that start, and cross-fades the next ``overlap`` with the
end of segment ``k - 1`` (equal-power sine ramps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vqwavenet.audio import mulaw_decode


@dataclass(frozen=True)
class Fold:
    """One utterance of ``n`` samples cut into segments ``[a_k, b_k)`` (``bounds``), whose
    streams start at index ``first`` of a batch. Segment ``k > 0`` starts generating at
    `start` ``(k)``, ``burn_in + overlap`` samples before ``a_k``."""

    n: int
    bounds: list[tuple[int, int]]
    overlap: int
    burn_in: int
    first: int

    def start(self, k: int) -> int:
        return self.bounds[k][0] - self.overlap - self.burn_in if k > 0 else 0


def segments(n: int, segment: int, overlap: int, burn_in: int = 0) -> list[tuple[int, int]]:
    """Boundaries ``[a_k, b_k)`` of about ``n / segment`` segments, fewer where a segment would
    not be longer than its cross-fade and burn-in together."""
    k = max(1, round(n / segment))
    while k > 1 and n // k <= overlap + burn_in:
        k -= 1
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def fold(n: int, segment: int, overlap: int, burn_in: int, first: int) -> Fold:
    """The `Fold` of an ``n``-sample utterance into segments of about ``segment`` samples."""
    return Fold(n, segments(n, segment, overlap, burn_in), overlap, burn_in, first)


def final_prefix(fold: Fold, produced: Sequence[int]) -> int:
    """Samples of the waveform that no longer change, given how many samples each segment has
    generated: a sample is final once every segment it takes samples from has generated it.
    Segment ``k`` gives samples from ``a_k - overlap`` (its head, cross-faded with the previous
    segment's tail; 0 for the first), so an unfinished segment holds back everything from
    there or from its last generated sample, whichever is later. Segments need not run in
    step: one that starts after its predecessor holds back the predecessor's tail."""
    final = fold.n
    for k, (a, b) in enumerate(fold.bounds):
        g = fold.start(k)
        if produced[k] < b - g:
            final = min(final, max(g + produced[k], a - fold.overlap if k > 0 else 0))
    return final


def compose(fold: Fold, segs: Sequence[np.ndarray], lo: int, hi: int, q: int) -> np.ndarray:
    """Samples ``[lo, hi)`` of the waveform from its segments' mu-law classes (``q`` of them):
    burn-in dropped, cross-faded over ``overlap`` samples. ``segs[k]`` need only cover them."""
    out = np.zeros(hi - lo, dtype=np.float32)
    overlap = fold.overlap
    ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / max(overlap, 1))
    fade = np.sqrt(np.clip(1 - ramp**2, 0, 1))
    for k, (a, b) in enumerate(fold.bounds):
        g = fold.start(k)
        x0, x1 = max(a - overlap if k > 0 else 0, lo), min(b, hi)
        if x0 >= x1:
            continue
        x = np.arange(x0, x1)
        w = np.ones(x1 - x0)
        if k > 0:
            head = x < a
            w[head] = ramp[x[head] - (a - overlap)]
        if k + 1 < len(fold.bounds):
            tail = x >= b - overlap
            w[tail] = fade[x[tail] - (b - overlap)]
        out[x0 - lo : x1 - lo] += mulaw_decode(segs[k][x0 - g : x1 - g], q) * w
    return np.clip(out, -1.0, 1.0)
