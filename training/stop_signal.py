"""Ctrl-C and SIGTERM end a training run at the next step boundary, with a checkpoint.

The first signal asks the loop to stop after the step in flight, so the checkpoint holds whole
steps and ``--resume`` continues as if the run had never stopped; a second one acts as it
would without this (KeyboardInterrupt for Ctrl-C, termination for SIGTERM) for a run that must
end now. Schedulers that preempt with SIGTERM (SLURM, Kubernetes) get the same checkpoint.
Under torchrun every rank stops after the same step: the request is summed over ranks.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

from training import distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager that catches SIGINT and SIGTERM while the training loop runs.

    Handlers are installed only on the main thread (Python allows no other); elsewhere the
    signals keep their usual effect. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second signal: what it would have done
            signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(again to stop at once, without one)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, device: torch.device) -> bool:
        """True once any rank has received a signal (one small all-reduce per step when
        there is more than one rank, so that all ranks leave the loop together)."""
        if dist.world_size() == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        return bool(dist.all_reduce_sum(flag).item() > 0)

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + int(self.received or 0)
