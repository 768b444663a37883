"""Random training windows from a prepared dataset: seeded, sharded per rank, resumable.

An epoch visits every training utterance once per ``windows x world`` windows, in an order
drawn from ``(seed, epoch)``; the ``i``-th window of an epoch takes utterance ``order[i % n]``
and a start drawn from ``(seed, epoch, i)``. Every window is therefore a pure function of
(seed, epoch, index) and the sampler's whole state is ``(epoch, step)``: resuming mid-epoch
replays exactly the windows an uninterrupted run would have drawn. Rank ``r`` of ``W`` takes
windows ``[r * B, (r + 1) * B)`` of each step's ``W * B``.

A window's first prediction ``u`` is drawn uniformly from ``[first - N + 1, end)`` and cut to
the utterance: every valid prediction (all phases against the stride) is equally likely to be
trained on. Windows are cut by `training.windows.make_batch` with the context the geometry
prescribes; utterance ids are dataset indices, so jitter is a pure function of
(seed, epoch, utterance, slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.autoencoder import Windows
from model.geometry import CodecGeometry
from training.dataset import Dataset
from training.windows import Utterance, WindowSpec, make_batch


@dataclass(frozen=True)
class Window:
    """``n`` predictions of dataset utterance ``utt`` from padded position ``t0``."""

    utt: int
    t0: int
    n: int


@dataclass
class MicroBatch:
    wave: torch.Tensor  # [B, L]
    windows: Windows
    n: int  # prediction columns (the configured N; short windows are masked)

    def n_valid(self) -> int:
        return int(self.windows.n_valid.sum())

    def to(self, device) -> MicroBatch:
        return MicroBatch(self.wave.to(device), self.windows.to(device), self.n)


def _first_end(geometry: CodecGeometry, length: int) -> tuple[int, int]:
    left, _, _ = geometry.padding(length)
    return left, left + length


class WindowSampler:
    """Draws this rank's windows for each optimiser step.

    Args:
        lengths: ``{dataset index: samples}`` of the utterances to draw from.
        geometry: the model's geometry (utterance padding).
        windows: windows per rank per step (micro-batch size x accumulation).
        predictions: predictions per window, N.
        seed, rank, world: the draw and this rank's shard.
    """

    def __init__(
        self,
        lengths: dict[int, int],
        geometry: CodecGeometry,
        windows: int,
        predictions: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        if not lengths:
            raise ValueError("no utterances to draw windows from")
        self.ids = sorted(lengths)
        self.bounds = {i: _first_end(geometry, lengths[i]) for i in self.ids}
        self.windows, self.predictions = windows, predictions
        self.seed, self.rank, self.world = seed, rank, world
        self.steps_per_epoch = max(1, len(self.ids) // (windows * world))
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order_cache = -1, []

    def window(self, epoch: int, i: int) -> Window:
        """The ``i``-th window of ``epoch`` (a pure function of seed, epoch and i)."""
        order = self._order(epoch)
        utt = order[i % len(order)]
        first, end = self.bounds[utt]
        rng = np.random.default_rng([self.seed, epoch, i])
        u = int(rng.integers(first - self.predictions + 1, end))
        t0 = max(first, u)
        return Window(utt, t0, u + self.predictions - t0)

    def _order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch, 0x0DE5]).permutation(len(self.ids))
            self._order_cache = [self.ids[j] for j in perm]
            self._order_epoch = epoch
        return self._order_cache

    def next(self) -> tuple[int, list[Window]]:
        """``(epoch, windows)`` of this rank for the next optimiser step."""
        epoch = self.epoch
        base = (self.step * self.world + self.rank) * self.windows
        out = [self.window(epoch, base + j) for j in range(self.windows)]
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return epoch, out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler seed {state['seed']} != configured seed {self.seed}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def fixed_windows(
    lengths: dict[int, int], geometry: CodecGeometry, count: int, predictions: int, seed: int
) -> list[Window]:
    """``count`` windows for validation, the same in every run with the same seed."""
    if not lengths or count == 0:
        return []
    sampler = WindowSampler(lengths, geometry, count, predictions, seed=seed + 0x5A11D)
    return sampler.next()[1]


class Loader:
    """Turns `Window` lists into micro-batches of waveform rows (float ``dtype``)."""

    def __init__(self, dataset: Dataset, geometry: CodecGeometry, seed: int, dtype=torch.float32):
        self.dataset, self.geometry, self.seed, self.dtype = dataset, geometry, seed, dtype

    def utterance(self, utt: int) -> Utterance:
        wave = torch.from_numpy(self.dataset.wave(utt)).to(self.dtype)
        speaker = self.dataset.records[utt].speaker
        return Utterance.prepare(wave, self.geometry, utt=utt, speaker=speaker)

    def batch(self, windows: list[Window], epoch: int, n: int) -> MicroBatch:
        """One micro-batch of ``n`` prediction columns (shorter windows are masked)."""
        utts: dict[int, int] = {}
        prepared: list[Utterance] = []
        specs = []
        for w in windows:
            if w.utt not in utts:
                utts[w.utt] = len(prepared)
                prepared.append(self.utterance(w.utt))
            specs.append(WindowSpec(utts[w.utt], w.t0, w.n))
        wave, win, _ = make_batch(self.geometry, prepared, specs, seed=self.seed, epoch=epoch)
        return MicroBatch(wave, win, n)

    def step(self, windows: list[Window], epoch: int, n: int, micro: int) -> list[MicroBatch]:
        """Split one step's windows into ``micro`` micro-batches."""
        size = -(-len(windows) // micro)
        return [self.batch(windows[i : i + size], epoch, n) for i in range(0, len(windows), size)]


def split_lengths(
    dataset: Dataset, split: str, speakers: frozenset[int] | None = None
) -> dict[int, int]:
    """Utterance index -> length of one split, only ``speakers`` (indices) when given."""
    return {
        i: dataset.records[i].length
        for i in dataset.split(split)
        if speakers is None or dataset.records[i].speaker in speakers
    }


def voice_ids(dataset: Dataset, voices: list[str] | None) -> frozenset[int] | None:
    """The speaker indices of the named voices (None: every voice), or ValueError naming the
    dataset's voices when one is not among them."""
    if voices is None:
        return None
    unknown = [v for v in voices if v not in dataset.speakers]
    if unknown:
        raise ValueError(
            f"train.voices: {', '.join(unknown)} not in the dataset (its voices: "
            f"{', '.join(dataset.speakers)})"
        )
    return frozenset(dataset.speakers.index(v) for v in voices)
