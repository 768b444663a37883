"""Private temporary folders: the files the app hands to Gradio, and Gradio's own cache.

Both are the owner's only and removed when the process ends (at exit: after Ctrl-C, and after
SIGTERM, which `app.__main__` turns into the same shutdown). Gradio-free, so the entry point
can set the cache up before Gradio is imported (some of its modules read it at import).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

SCRATCH_MAX_AGE_S = 3600.0


def private_gradio_cache() -> str:
    """Gradio's cache of uploads and results for this process: a private temporary folder
    (``GRADIO_TEMP_DIR``), not the ``/tmp/gradio`` every Gradio app on the host shares, and
    removed at exit. Set once per process, before any Blocks are built (each reads it then);
    a ``GRADIO_TEMP_DIR`` the deployment set itself is kept."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        root = tempfile.mkdtemp(prefix="vqwavenet-gradio-")  # mode 0700
        atexit.register(shutil.rmtree, root, True)
        os.environ["GRADIO_TEMP_DIR"] = root
    return os.environ["GRADIO_TEMP_DIR"]


class Scratch:
    """A private temporary folder for the files handed to Gradio (codes, wavs, pictures).

    Files older than ``max_age`` seconds are pruned on each new one (Gradio has its own copy by
    then), and the folder is removed at exit. Its folders are the owner's only (0700) and so
    are the files written through `seal`."""

    def __init__(self, max_age: float = SCRATCH_MAX_AGE_S):
        self.root = Path(tempfile.mkdtemp(prefix="vqwavenet-app-"))
        self.max_age = max_age
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self.root, True)

    def path(self, name: str) -> Path:
        """A fresh path ``<root>/<unique>/<name>`` (the name is what the user downloads)."""
        self.prune()
        folder = self.root / uuid.uuid4().hex
        folder.mkdir(mode=0o700)
        return folder / name

    @staticmethod
    def seal(path: Path) -> str:
        """``path`` made readable by its owner only (Gradio's copy keeps the mode)."""
        os.chmod(path, 0o600)
        return str(path)

    def prune(self) -> None:
        cutoff = time.time() - self.max_age
        with self._lock:
            for folder in self.root.iterdir():
                try:
                    if folder.stat().st_mtime < cutoff:
                        shutil.rmtree(folder, ignore_errors=True)
                except FileNotFoundError:
                    pass
