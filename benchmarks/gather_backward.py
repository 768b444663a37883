"""The conditioning gather's backward: candidate segment sums against PyTorch's ``scatter_add``.

    python -m benchmarks.gather_backward                     # default shapes, CPU and CUDA
    python -m benchmarks.gather_backward --devices cpu --batch 2 --reps 3

`model.decoder` adds per-layer conditioning gathered along time by an index that repeats each
50 Hz column for a run of ``hop`` samples. The gather's backward sums each run. PyTorch does
it with ``scatter_add``: one atomic add per element on CUDA, every element of a run on the
same address (a large share of an H100 step's device time, `benchmarks/results/`; and it is
not deterministic). Candidates, all on ``grad [B, C, T]`` and a non-decreasing ``index [B, T]``:

* ``scatter_add``: ``zeros.scatter_add_``, what autograd runs as ``torch.gather``'s backward
  (the baseline), timed alone: an earlier version of this benchmark timed the forward gather
  here too, which overstated the speedups (the H100 run's notes in `benchmarks/results/`).
* ``segment_rows``: ``segment_reduce`` per batch row, run lengths by ``bincount`` (which syncs
  on CUDA): the CPU path before this benchmark.
* ``segment``: one ``segment_reduce`` over ``[B * C, T]``, run lengths by ``searchsorted``
  (no host sync, deterministic): the channel-major decoder's (`benchmarks.conv_decoder`).
* ``cumsum64``: float64 prefix sums read at the run ends and differenced.
* ``one_hot``: one ``bmm`` with the one-hot index (deterministic, bf16 accumulated in fp32,
  any index order): `model.decoder.sum_by_index`, what the decoder uses, here on the
  transposed gradient.

Each candidate is checked against a float64 reference (max error relative to the largest
sum); the run exits 1 when ``one_hot``, the model's, exceeds 1e-5 (fp32) or 1e-2 (bf16).
Shapes default to the `default` config's decoder: B = 8 windows, C = 2G = 512 channels,
T = 6046 samples (4000 predictions plus the WaveNet context), hop 320, float32 (``--dtype
bfloat16``: the gradient's type under autocast). Output: one JSON line per (device,
candidate) with ``ms`` (median over ``--reps`` after one warm-up) and
``speedup_over_scatter_add``, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.conv_decoder import segment_sum
from model.decoder import sum_by_index

BENCH = "gather_backward"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# max error relative to the largest sum: fp32 rounding, or bf16's rounding of the result
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def scatter_add(c: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What autograd runs for ``torch.gather``'s backward (the forward gather is not timed)."""
    idx = index[:, None, :].expand(-1, c.shape[1], -1)
    return torch.zeros_like(c).scatter_add_(2, idx, grad)


def segment_rows(c: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    rows = []
    for g, idx in zip(grad, index):
        lengths = torch.bincount(idx, minlength=c.shape[-1]).expand(g.shape[0], -1)
        rows.append(torch.segment_reduce(g, "sum", lengths=lengths.contiguous(), axis=1))
    return torch.stack(rows)


def segment(c: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return segment_sum(grad, index, c.shape[-1])


def cumsum64(c: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    n_cols = c.shape[-1]
    cols = torch.arange(n_cols, device=index.device).expand(index.shape[0], -1).contiguous()
    ends = torch.searchsorted(index, cols, right=True)  # [B, n_cols]: one past each run
    csum = torch.nn.functional.pad(grad.double().cumsum(-1), (1, 0))
    at = csum.gather(2, ends[:, None, :].expand(-1, grad.shape[1], -1))
    return torch.diff(at, dim=-1, prepend=at.new_zeros(at.shape[:-1] + (1,))).to(grad.dtype)


def one_hot(c: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return sum_by_index(grad.transpose(1, 2), index, c.shape[-1]).transpose(1, 2)


CANDIDATES = {
    "scatter_add": scatter_add,
    "segment_rows": segment_rows,
    "segment": segment,
    "cumsum64": cumsum64,
    "one_hot": one_hot,
}
MODEL = "one_hot"


def make_inputs(args, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_cols = args.length // args.hop + 2
    phase = torch.randint(0, args.hop, (args.batch, 1), generator=g)
    t = torch.arange(args.length)[None] + phase
    index = (t // args.hop).clamp(max=n_cols - 1)
    dtype = DTYPES[args.dtype]
    c = torch.randn(args.batch, args.channels, n_cols, generator=g).to(device, dtype)
    grad = torch.randn(args.batch, args.channels, args.length, generator=g).to(device, dtype)
    return c, index.to(device), grad


def reference(c, index, grad) -> torch.Tensor:
    out = torch.zeros(c.shape, dtype=torch.float64)
    idx = index.cpu()[:, None, :].expand(-1, c.shape[1], -1)
    return out.scatter_add_(2, idx, grad.cpu().double())


def timed(fn, c, index, grad, device, reps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn(c, index, grad)  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn(c, index, grad)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> list[dict]:
    rows = []
    for name in args.devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped", file=sys.stderr)
            continue
        device = torch.device(name)
        c, index, grad = make_inputs(args, device)
        ref = reference(c, index, grad)
        scale = float(ref.abs().max())
        base = None
        for cand, fn in CANDIDATES.items():
            got = fn(c, index, grad)
            err = float((got.cpu().double() - ref).abs().max()) / scale
            ms = 1e3 * timed(fn, c, index, grad, device, args.reps)
            base = ms if cand == "scatter_add" else base
            row = {
                "bench": BENCH,
                "device": name,
                "candidate": cand,
                "shape": [args.batch, args.channels, args.length],
                "hop": args.hop,
                "dtype": args.dtype,
                "ms": round(ms, 4),
                "speedup_over_scatter_add": round(base / ms, 2),
                "max_rel_err": err,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| device | dtype | candidate | ms | speedup over scatter_add | max rel. error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['dtype']} | {r['candidate']} | {r['ms']:.3f} "
            f"| {r['speedup_over_scatter_add']:.2f} | {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--length", type=int, default=6046)
    p.add_argument("--hop", type=int, default=320)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    rows = run(args)
    print(table(rows))
    bad = False
    for r in rows:  # only the model's own candidate fails the run; the others are reported
        if r["max_rel_err"] > TOLERANCE[args.dtype]:
            what = "error" if r["candidate"] == MODEL else "note"
            bad |= what == "error"
            err = r["max_rel_err"]
            print(f"{what}: {r['device']} {r['candidate']}: error {err:.1e}", file=sys.stderr)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
