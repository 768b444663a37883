"""The prepared dataset: one int16 array plus a JSON index (written by `training.prepare`).

Layout of a dataset directory::

    audio.npy          int16 [total_samples], every utterance back to back (memory-mapped)
    index.json         {"version", "sample_rate", "speakers": [names],
                        "utterances": [{"id", "speaker", "offset", "length", "split"}],
                        "skipped": [{"path", "reason"}]}
    stats.json         {"features": FeatureConfig as a dict, "mean": [...], "std": [...]}

Splits are ``train``, ``valid`` and ``test``, assigned deterministically per utterance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
