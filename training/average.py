"""Average the weights of several checkpoints of one run (a "checkpoint soup").

    python -m training.average runs/long/ckpt-00001000.pt runs/long/ckpt-00001100.pt ... \
        --out runs/long/average.pt
    python -m export --checkpoint runs/long/average.pt --out models/next

A WaveNet trained at a constant, fairly high learning rate wanders: its teacher-forced loss
barely moves from checkpoint to checkpoint, yet what it generates (and so STOI and word error
rate) changes noticeably, as the last steps' noise sits in the weights. The mean of the
weights of nearby checkpoints of one run keeps what they share and averages the noise out
(Polyak averaging after the fact). Every floating-point tensor of the model is averaged,
the EMA codebook and its statistics included (nearby checkpoints agree on which code is
which); integer and boolean buffers come from the last checkpoint, as does everything else
in the file (optimiser, step, RNG states), so the result exports like any checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


class AverageError(ValueError):
    """The checkpoints cannot be averaged."""


def average(paths: list[Path]) -> dict:
    """The last checkpoint of ``paths`` with its model weights replaced by their mean."""
    if not paths:
        raise AverageError("no checkpoints given")
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    last = states[-1]
    for path, state in zip(paths, states, strict=True):
        if state.get("model_config") != last.get("model_config"):
            raise AverageError(f"{path} has another model config than {paths[-1]}")
        if state["model"].keys() != last["model"].keys():
            raise AverageError(f"{path} has other model tensors than {paths[-1]}")
    mean = {}
    for name, value in last["model"].items():
        if value.is_floating_point():
            stacked = torch.stack([s["model"][name].double() for s in states])
            mean[name] = stacked.mean(0).to(value.dtype)
        else:
            mean[name] = value
    steps = [int(s.get("step", -1)) for s in states]
    return {**last, "model": mean, "averaged_steps": steps}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.average",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints of one run")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        state = average(args.checkpoints)
    except (OSError, KeyError, AverageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"averaged steps {state['averaged_steps']} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
