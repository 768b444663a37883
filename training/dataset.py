"""The prepared dataset: one int16 array plus a JSON index (written by `training.prepare`).

Layout of a dataset directory::

    audio.npy          int16 [total_samples], every utterance back to back (memory-mapped)
    index.json         {"version", "sample_rate", "speakers": [names],
                        "utterances": [{"id", "speaker", "offset", "length", "split"}],
                        "skipped": [{"path", "reason"}],
                        optional "source": {"corpus", "root", ...} (how it was made)}
    stats.json         {"features": FeatureConfig as a dict, "mean": [...], "std": [...],
                        optional "frames": feature frames counted, "padded": whether the
                        utterances were padded by `CodecGeometry.padding` first, "config"}

``speaker`` is an index into ``speakers`` (sorted names); ``offset``/``length`` are in samples of
``audio.npy``. Splits are ``train``, ``valid`` and ``test``, assigned deterministically per
utterance. `DatasetWriter` writes this layout; readers ignore keys they do not know.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class UtteranceRecord:
    id: str
    speaker: int
    offset: int
    length: int
    split: str


class Dataset:
    """Read-only view of a prepared dataset directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a prepared dataset (no index.json): "
                "run python -m training.prepare first"
            )
        index = json.loads(index_path.read_text())
        if index.get("version") != VERSION:
            raise ValueError(f"{index_path}: dataset version {index.get('version')} != {VERSION}")
        self.sample_rate = int(index["sample_rate"])
        self.speakers: list[str] = list(index["speakers"])
        self.records = [UtteranceRecord(**u) for u in index["utterances"]]
        self.skipped = list(index.get("skipped", []))
        self.audio = np.load(self.root / "audio.npy", mmap_mode="r")
        stats_path = self.root / "stats.json"
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None

    def split(self, name: str) -> list[int]:
        """Indices of the utterances of one split."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} (one of {SPLITS})")
        return [i for i, r in enumerate(self.records) if r.split == name]

    def wave(self, i: int) -> np.ndarray:
        """Utterance ``i`` as float32 in [-1, 1]."""
        r = self.records[i]
        return np.asarray(self.audio[r.offset : r.offset + r.length], dtype=np.float32) / 32768.0

    def __len__(self) -> int:
        return len(self.records)


def split_of(utterance_id: str, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Deterministic split from a stable hash of the utterance id (independent of file order)."""
    import hashlib

    h = int.from_bytes(hashlib.sha1(utterance_id.encode()).digest()[:8], "big") / 2.0**64
    if h < test_fraction:
        return "test"
    if h < test_fraction + valid_fraction:
        return "valid"
    return "train"


class DatasetWriter:
    """Streams utterances into a new dataset directory (the layout above), one at a time.

    Audio goes to a raw file as it arrives (memory stays flat for any corpus size) and becomes
    ``audio.npy`` in `close`. Speaker indices are assigned at `close` from the sorted names, so
    they do not depend on the order utterances were added. Write into a scratch directory and
    rename it into place: a failed run must not leave a half-written dataset.
    """

    def __init__(self, root: str | Path, sample_rate: int):
        self.root = Path(root)
        self.sample_rate = int(sample_rate)
        self._raw_path = self.root / "audio.raw"
        self._raw = open(self._raw_path, "wb")
        self._offset = 0
        self._utterances: list[tuple[str, str, int, int, str]] = []  # id, speaker, off, len, split
        self._ids: set[str] = set()
        self.skipped: list[dict] = []

    def __contains__(self, utterance_id: str) -> bool:
        return utterance_id in self._ids

    def add(self, utterance_id: str, speaker: str, samples: np.ndarray, split: str) -> None:
        """Append one utterance: ``samples`` int16 ``[n]``, n >= 1."""
        if samples.dtype != np.int16 or samples.ndim != 1 or len(samples) == 0:
            raise ValueError("an utterance is a non-empty 1-D int16 array")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (one of {SPLITS})")
        if utterance_id in self._ids:
            raise ValueError(f"duplicate utterance id {utterance_id!r}")
        self._raw.write(np.ascontiguousarray(samples, dtype="<i2").tobytes())
        self._utterances.append((utterance_id, speaker, self._offset, len(samples), split))
        self._ids.add(utterance_id)
        self._offset += len(samples)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})

    def __len__(self) -> int:
        return len(self._utterances)

    def close(self, stats: dict | None = None, source: dict | None = None) -> None:
        """Write ``audio.npy``, ``index.json`` and (when given) ``stats.json``."""
        self._raw.close()
        audio = np.lib.format.open_memmap(
            self.root / "audio.npy", mode="w+", dtype=np.int16, shape=(self._offset,)
        )
        chunk = 1 << 22
        with open(self._raw_path, "rb") as f:
            for start in range(0, self._offset, chunk):
                block = np.frombuffer(f.read(2 * chunk), dtype="<i2")
                audio[start : start + len(block)] = block
        audio.flush()
        del audio
        os.remove(self._raw_path)
        speakers = sorted({u[1] for u in self._utterances})
        number = {name: i for i, name in enumerate(speakers)}
        records = [
            asdict(UtteranceRecord(uid, number[spk], off, n, split))
            for uid, spk, off, n, split in sorted(self._utterances)
        ]
        index = {
            "version": VERSION,
            "sample_rate": self.sample_rate,
            "speakers": speakers,
            "utterances": records,
            "skipped": sorted(self.skipped, key=lambda s: s["path"]),
        }
        if source is not None:
            index["source"] = source
        (self.root / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        if stats is not None:
            (self.root / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
