"""Checkpoints that survive a kill at any moment, and finding the newest intact one.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over its final name with ``os.replace`` (atomic on POSIX) and the directory fsynced, so
a file named ``ckpt-*.pt`` is always complete. ``ckpt-<step>.pt`` files rotate (last k kept);
``best.pt`` holds the best validation CE so far.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
BEST = "best.pt"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that ``path`` is either the old or the new file, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / f"ckpt-{step:08d}.pt"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the rotating checkpoints, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_stale_temporaries(out: str | Path) -> None:
    """Temporary files left by a writer that was killed mid-write."""
    for p in Path(out).glob(".*.tmp"):
        p.unlink(missing_ok=True)


def load(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


def load_latest(out: str | Path, map_location="cpu") -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(out)):
        try:
            ckpt = load(path, map_location)
            if not isinstance(ckpt, dict) or "step" not in ckpt or "model" not in ckpt:
                raise ValueError("not a training checkpoint")
            return ckpt, path
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped
            print(f"warning: skipping unreadable checkpoint {path}: {exc}", file=sys.stderr)
    return None


def save_rotating(obj: dict, out: str | Path, step: int, keep_last: int) -> Path:
    """Write ``ckpt-<step>.pt`` and delete all but the newest ``keep_last``."""
    path = checkpoint_path(out, step)
    atomic_save(obj, path)
    for _, old in list_checkpoints(out)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def save_best(obj: dict, out: str | Path) -> Path:
    path = Path(out) / BEST
    atomic_save(obj, path)
    return path
