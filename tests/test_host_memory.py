"""The trainer's CPU allocator setting: freed tensor memory stays in the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data import write_clip_dataset

ROOT = Path(__file__).resolve().parent.parent

# Two `small` trainer steps after two of warm-up; the minor page faults count the pages the
# kernel had to zero-fill again. "default" is the negative control: the same trainer with
# glibc's own malloc settings.
PROBE = """
import resource, sys, tempfile
import torch
torch.set_num_threads(1)  # one malloc arena: the same count every run
import training.train as tt
from training.config import load_model_config, load_train_config
if sys.argv[1] == "default":
    tt.keep_freed_memory = lambda: None
m, t = load_model_config("small"), load_train_config("small")
t.windows, t.predictions, t.kmeans_windows, t.compile = 2, 2000, 4, False
with tempfile.TemporaryDirectory() as out:
    trainer = tt.Trainer(m, t, sys.argv[2], out, device="cpu")
    for _ in range(2):
        trainer.train_step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        trainer.train_step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _faults(mode: str, data: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_trainer_steps_reuse_freed_memory(tmp_path):
    data = write_clip_dataset(tmp_path)
    kept, default = _faults("keep", data), _faults("default", data)
    assert default > 10_000, default  # glibc's defaults give pages back and fault them in again
    assert kept * 2 < default, (kept, default)
