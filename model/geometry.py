"""Receptive-field calculus: the one place that answers "which indices feed which".

Every layer declares an index map from its output index to the input indices it reads:

* `Conv(kernel, stride, dilation, offset)`: output ``o`` reads
  ``o * stride + offset + dilation * i`` for ``i < kernel`` (a valid convolution has offset 0,
  a causal one ``-dilation * (kernel - 1)``).
* `Upsample(factor, offset)`: output ``o`` reads ``floor((o - offset) / factor)`` (repetition).

A chain (input first) composes them. Hull queries are closed-form and vectorised (they accept
ints, numpy arrays or torch tensors); `exact` enumerates the true index set, and
`CodecGeometry` uses it once at construction to prove that every hull it will ever return is
exactly the dependency set (contiguity), for every phase of the stride.

All indices are absolute utterance coordinates on the padded waveform: frame ``j`` reads
samples ``[j*S, j*S + Re)``, slot ``k`` carries frame ``pi(k)``, prediction ``t`` predicts
sample ``t``. Nobody else in the project computes offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

Layer = Union["Conv", "Upsample"]


@dataclass(frozen=True)
class Conv:
    """Output ``o`` reads inputs ``o*stride + offset + dilation*i`` for ``i in range(kernel)``."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    offset: int = 0

    @property
    def span(self) -> int:
        return (self.kernel - 1) * self.dilation

    def back(self, lo, hi):
        return (
            lo * self.stride + self.offset,
            hi * self.stride + self.offset + self.span,
        )

    def forward(self, lo, hi):
        # Outputs whose hull intersects [lo, hi]: o*s + off <= hi and o*s + off + span >= lo.
        return -((self.offset + self.span - lo) // self.stride), (hi - self.offset) // self.stride

    def exact(self, idx: np.ndarray) -> np.ndarray:
        taps = self.offset + self.dilation * np.arange(self.kernel)
        return np.unique((idx[:, None] * self.stride + taps[None, :]).ravel())


@dataclass(frozen=True)
class Upsample:
    """Output ``o`` reads input ``floor((o - offset) / factor)``: upsampling by repetition."""

    factor: int
    offset: int = 0

    def back(self, lo, hi):
        return (lo - self.offset) // self.factor, (hi - self.offset) // self.factor

    def forward(self, lo, hi):
        return (
            lo * self.factor + self.offset,
            hi * self.factor + self.offset + self.factor - 1,
        )

    def exact(self, idx: np.ndarray) -> np.ndarray:
        return np.unique((idx - self.offset) // self.factor)


def hull(layers: Sequence[Layer], lo, hi):
    """Input range ``[lo', hi']`` (inclusive) read by outputs ``[lo, hi]`` of a chain."""
    for layer in reversed(layers):
        lo, hi = layer.back(lo, hi)
    return lo, hi


def reach(layers: Sequence[Layer], lo, hi):
    """Output range whose input hulls intersect the input range ``[lo, hi]`` of a chain."""
    for layer in layers:
        lo, hi = layer.forward(lo, hi)
    return lo, hi


def exact(layers: Sequence[Layer], outputs) -> np.ndarray:
    """The true (sorted, unique) set of input indices read by the given outputs of a chain."""
    idx = np.unique(np.atleast_1d(np.asarray(outputs, dtype=np.int64)))
    for layer in reversed(layers):
        idx = layer.exact(idx)
    return idx


def total_stride(layers: Sequence[Layer]) -> int:
    stride = 1
    for layer in layers:
        if isinstance(layer, Upsample):
            raise ValueError("a strided chain must not upsample")
        stride *= layer.stride
    return stride


def _contiguous(idx: np.ndarray) -> bool:
    return len(idx) > 0 and idx[-1] - idx[0] + 1 == len(idx)


@dataclass(frozen=True)
class Span:
    """The input a run of predictions needs, in absolute padded-utterance coordinates.

    ``frames[f0, f1]`` are encoded from samples ``[start, stop)``; the predictions ``[t0, t1)``
    read their autoregressive input from ``[t0 - ar_context, t1 - 1)`` inside that segment,
    which also holds the sample before that input unless the input starts the utterance.
    """

    t0: int
    t1: int
    f0: int
    f1: int
    start: int
    stop: int


class CodecGeometry:
    """Receptive fields of the whole codec, proven exact at construction.

    Args:
        encoder: chain from padded samples to frames (features and encoder layers).
        conditioning: chain from slots to decoder time (conditioning conv, upsampling).
        wavenet: the WaveNet layers in order; each adds conditioning at its own output time.
        ar_input: the layer from samples to the WaveNet input (``x[t-1]`` feeds time ``t``).
        drawn_past: training replaces past samples by the decoder's draws (`model.past_draws`),
            each predicted from the true samples before it: a window's segment must then also
            hold the input of predictions ``[t0 - ar_context, t0)`` (see `span`).
    """

    def __init__(
        self,
        encoder: Sequence[Layer],
        conditioning: Sequence[Layer],
        wavenet: Sequence[Conv],
        ar_input: Conv,
        drawn_past: bool = False,
    ):
        self.drawn_past = drawn_past
        self.encoder = tuple(encoder)
        self.conditioning = tuple(conditioning)
        self.wavenet = tuple(wavenet)
        self.ar_input = ar_input
        self.hop = total_stride(self.encoder)
        first, last = hull(self.encoder, 0, 0)
        if first != 0:
            raise ValueError("frame 0 must start at sample 0 (valid framing)")
        self.encoder_rf = last + 1
        for layer in self.wavenet:
            if layer.stride != 1 or layer.offset + layer.span != 0:
                raise ValueError("WaveNet layers must be causal, stride 1, and read their own time")
        self._verify()
        self.pad_left = self._first_valid_prediction()
        t0 = np.arange(self.hop, dtype=np.int64)
        lo, hi = self.slot_range(t0)
        lo_next, hi_next = self.slot_range(t0 + self.hop)
        if not (np.array_equal(lo_next, lo + 1) and np.array_equal(hi_next, hi + 1)):
            raise ValueError("slot ranges must move by one slot per hop (see slots_spanned)")
        _, hi_r = self.slot_range(t0[:, None] + t0[None, :])  # hi(t0 + r): [phase t0, r]
        self._slots_table = tuple(int(v) for v in (hi_r - lo[:, None]).max(0) + 1)

    # --- per-prediction queries (vectorised over t) ------------------------------------------

    def cond_times(self, t):
        """Hull of decoder times whose conditioning reaches prediction ``t`` (all layers)."""
        return hull(self.wavenet[1:], t, t)

    def slot_range(self, t):
        """``(lo(t), hi(t))``: the contiguous slot range whose conditioning reaches ``t``."""
        lo, hi = self.cond_times(t)
        return hull(self.conditioning, lo, hi)

    def ar_range(self, t):
        """Samples read autoregressively by prediction ``t``: ``[t - ar_context, t - 1]``."""
        return hull((self.ar_input, *self.wavenet), t, t)

    @property
    def ar_context(self) -> int:
        lo, _ = self.ar_range(0)
        return -lo

    @property
    def wavenet_context(self) -> int:
        """Decoder input times before the first prediction a pass needs (the WaveNet's RF - 1)."""
        return sum(layer.span for layer in self.wavenet)

    def layer_time_start(self, t0):
        """First output time each WaveNet layer must produce for predictions from ``t0``."""
        starts, acc = [], 0
        for layer in reversed(self.wavenet):
            starts.append(t0 - acc)
            acc += layer.span
        return starts[::-1]

    def cond_index(self, times):
        """Conditioning index (first slot it reads) that decoder time ``times`` uses."""
        lo, _ = hull(self.conditioning[1:], times, times)
        return lo

    # --- frames and encoder ------------------------------------------------------------------

    def frame_samples(self, j):
        """Samples ``[j*S, j*S + Re)`` read by frame ``j`` (as an inclusive pair)."""
        return hull(self.encoder, j, j)

    def n_frames(self, n_samples: int) -> int:
        """Frames a segment of ``n_samples`` yields under valid framing."""
        return max(0, (n_samples - self.encoder_rf) // self.hop + 1)

    def frames_within(self, start: int, stop: int) -> tuple[int, int]:
        """Frames ``[j0, j1]`` computable from samples ``[start, stop)`` (j1 < j0 when none)."""
        j0 = -((-start) // self.hop)
        j1 = (stop - self.encoder_rf) // self.hop
        return j0, j1

    # --- utterance padding and windows --------------------------------------------------------

    def padding(self, n_samples: int) -> tuple[int, int, int]:
        """``(pad_left, pad_right, n_frames)`` so that every original sample is a valid
        prediction: its whole slot range lies on real frames and its context inside the
        padded utterance. Computed once per utterance, the same in training and inference."""
        if n_samples < 1:
            raise ValueError("an utterance needs at least one sample")
        t_last = self.pad_left + n_samples - 1
        n_frames = int(self.slot_range(t_last)[1]) + 1
        padded = (n_frames - 1) * self.hop + self.encoder_rf
        while padded < t_last + 1:  # targets must lie inside the frames' samples
            n_frames += 1
            padded += self.hop
        return self.pad_left, padded - self.pad_left - n_samples, n_frames

    def span(self, t0: int, t1: int, n_frames: int) -> Span:
        """Input needed for predictions ``[t0, t1)`` of an utterance with ``n_frames`` frames:
        frames ``[lo(t0) - 1, hi(t1 - 1) + 1]`` clamped to the utterance (one margin frame each
        side, because jitter may reach one frame out). With ``drawn_past`` the frames and
        samples are those of predictions ``[max(t0 - ar_context, pad_left), t1)``: each past
        sample the window reads may be a draw predicted from its own context (the padding's
        silence before ``pad_left`` is never replaced)."""
        if t1 <= t0:
            raise ValueError(f"a window needs at least one prediction, got [{t0}, {t1})")
        first = min(t0, max(t0 - self.ar_context, self.pad_left)) if self.drawn_past else t0
        lo, _ = self.slot_range(first)
        _, hi = self.slot_range(t1 - 1)
        if lo < 0 or hi > n_frames - 1:
            raise ValueError(
                f"predictions [{t0}, {t1}) need slots [{lo}, {hi}] outside the utterance's "
                f"{n_frames} frames: pad the utterance with CodecGeometry.padding"
            )
        f0, f1 = max(int(lo) - 1, 0), min(int(hi) + 1, n_frames - 1)
        start, last = self.frame_samples(f0)[0], self.frame_samples(f1)[1]
        ar_lo, _ = self.ar_range(first)
        if max(ar_lo - 1, 0) < start or t1 > last + 1:  # ar_lo - 1: `model.past_tilt` reads it
            raise AssertionError(
                "the frames' samples must hold the autoregressive context and the sample before"
                " it (or start the utterance)"
            )
        return Span(int(t0), int(t1), f0, f1, int(start), int(last) + 1)

    def min_window_samples(self, n_predictions: int = 1) -> int:
        """Fewest samples any window of ``n_predictions`` can need (over all phases)."""
        best = None
        for t0 in range(self.pad_left, self.pad_left + self.hop):
            lo, _ = self.slot_range(t0)
            _, hi = self.slot_range(t0 + n_predictions - 1)
            need = (int(hi) - int(lo)) * self.hop + self.encoder_rf
            best = need if best is None else min(best, need)
        return best

    def slots_spanned(self, n_predictions: int) -> int:
        """Most slots ``hi(t0 + n - 1) - lo(t0) + 1`` any window of ``n_predictions`` reaches,
        over all phases ``t0``: a static slot count for the training forward, so that a
        compiled graph has no shape that depends on data (``tests/test_geometry.py`` checks it
        against enumeration). Slot ranges repeat with period ``hop`` (one slot later per hop),
        so the count depends on ``(n - 1) // hop`` and a table over ``(n - 1) % hop``."""
        if n_predictions < 1:
            raise ValueError(f"a window needs at least one prediction, got {n_predictions}")
        q, r = divmod(n_predictions - 1, self.hop)
        return q + self._slots_table[r]

    # --- proofs -------------------------------------------------------------------------------

    def exact_cond_times(self, t: int) -> np.ndarray:
        """The true set of decoder times whose conditioning reaches prediction ``t``: the union
        over layers of the outputs of that layer that reach ``t``."""
        sets, idx = [], np.array([t], dtype=np.int64)
        for layer in reversed(self.wavenet):
            sets.append(idx)
            idx = layer.exact(idx)
        return np.unique(np.concatenate(sets))

    def exact_slots(self, t: int) -> np.ndarray:
        """The true slot set of prediction ``t``."""
        return exact(self.conditioning, self.exact_cond_times(t))

    def _verify(self) -> None:
        """Assert, for every phase of one stride period, that each hull is the exact set."""
        j_set = exact(self.encoder, 0)
        if not _contiguous(j_set) or j_set[0] != 0 or j_set[-1] != self.encoder_rf - 1:
            raise AssertionError("a frame's samples must be one contiguous range")
        # Decoder time sets are translation invariant; only the slot mapping has a phase.
        # The times themselves may have holes (one dilation cycle reaches only even offsets);
        # what must be contiguous is the slot set they map to, checked per phase below.
        times = self.exact_cond_times(0)
        if (times[0], times[-1]) != self.cond_times(0):
            raise AssertionError("the conditioning-time hull disagrees with the exact set")
        ar = exact((self.ar_input, *self.wavenet), 0)
        if not _contiguous(ar) or (ar[0], ar[-1]) != self.ar_range(0):
            raise AssertionError("the autoregressive context of a prediction is not contiguous")
        for t in range(self.period_samples):
            slots = exact(self.conditioning, times + t)
            if not _contiguous(slots) or (slots[0], slots[-1]) != self.slot_range(t):
                raise AssertionError(f"slot range of prediction {t} is not contiguous: {slots}")

    def _first_valid_prediction(self) -> int:
        """Smallest ``t`` whose context starts at sample >= 0 and whose slots start at >= 0."""
        t = self.ar_context
        lo, _ = self.slot_range(t)
        if lo < 0:
            t += int(-lo) * self.period_samples - self.period_samples
            while self.slot_range(t)[0] < 0:
                t += 1
        return int(t)

    @property
    def period_samples(self) -> int:
        period = 1
        for layer in self.conditioning:
            if isinstance(layer, Upsample):
                period *= layer.factor
        return period
