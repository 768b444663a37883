"""Whole trainer steps per second, the way `python -m training.train` runs them.

    python -m benchmarks.train_throughput --data data/asterisk            # default config, CUDA
    python -m benchmarks.train_throughput --config tiny --data D --device cpu --steps 6 --skip 2

Unlike `benchmarks.train_step` (one model step, ours against a naive decoder), this times
`training.train.Trainer.train_step` itself on a prepared dataset: window sampling and batching
on the CPU, the forward and backward passes, the all-reduce, gradient clipping, AdamW and the
EMA codebook update, with the config's windows, predictions and accumulation. Each variant is
a fresh Trainer with the same seed: ``fp32`` (eager, no autocast), ``bf16`` (eager, bf16
autocast), ``bf16-compile`` (that under torch.compile) and ``bf16-deterministic`` (bf16 with
``train.deterministic``; not run by default). Each has a ``-scatter`` twin (``bf16-scatter``
...) whose decoder uses PyTorch's own gather backward (``scatter_add``) instead of its
one-hot product (`model.decoder.sum_by_index`), and a ``-conv`` twin that runs the decoder's
earlier channel-major forward (`benchmarks.conv_decoder`): ``fp32-conv`` is the reference
the CPU speed-up is quoted against, measured in the same run (on CPU the trainer keeps freed
memory for every variant, `training.host_memory`). The first ``--skip``
steps (compilation, cuDNN autotuning, allocator warm-up) are left out of the median; the
first step's wall time is reported on its own, as it holds the compilation. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA, and not measured on CPU. ``--profile K`` then
profiles K steps (torch.profiler): the operators with the most device and CPU time, and the
device's busy time per step against the wall time.

Output: one JSON line per variant, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch
from tqdm import tqdm

from benchmarks.conv_decoder import conv_forward
from model import decoder
from training.config import load_model_config, load_train_config
from training.dataset import Dataset
from training.train import Trainer, set_deterministic

# variant: (amp, compile, deterministic); a "-scatter" suffix swaps the decoder's one-hot
# gather backward for PyTorch's own (scatter_add); a "-conv" suffix runs the decoder's earlier
# channel-major forward (`benchmarks.conv_decoder`), the reference of the CPU speed-up.
BASE_VARIANTS = {
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16-compile": (True, True, False),
    "bf16-deterministic": (True, False, True),
}
SCATTER, CONV = "-scatter", "-conv"
VARIANTS = BASE_VARIANTS | {
    name + suffix: v for name, v in BASE_VARIANTS.items() for suffix in (SCATTER, CONV)
}


def measure(args, variant: str, progress) -> dict:
    """One variant's row. `train.deterministic` switches the whole process to reproducible
    kernels; they are switched back afterwards, failure or not, so later variants run without.
    (A cuBLAS workspace setting read at cuBLAS's start stays: run that variant alone, or first,
    for a clean comparison.)"""
    deterministic = VARIANTS[variant][2]
    gather = decoder.gather if variant.endswith(SCATTER) else decoder.repeat_by_index
    forward = conv_forward if variant.endswith(CONV) else decoder.WaveNetDecoder.forward
    try:
        with (
            mock.patch.object(decoder, "repeat_by_index", gather),
            mock.patch.object(decoder.WaveNetDecoder, "forward", forward),
        ):
            return _measure(args, variant, progress)
    finally:
        if deterministic:
            set_deterministic(False)


def _measure(args, variant: str, progress) -> dict:
    amp, compile_, deterministic = VARIANTS[variant]
    model_cfg, train_cfg = load_model_config(args.config), load_train_config(args.config)
    train_cfg.amp, train_cfg.compile = amp, compile_
    train_cfg.deterministic = deterministic
    if args.windows:
        train_cfg.windows = args.windows
    if args.predictions:
        train_cfg.predictions = args.predictions
    train_cfg.total_steps = max(train_cfg.total_steps, args.steps)
    # Room for every voice of the dataset (an embedding row each: no measurable cost).
    n_speakers = len(Dataset(args.data).speakers)
    model_cfg.decoder.n_speakers = max(model_cfg.decoder.n_speakers, n_speakers)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model_cfg, train_cfg, args.data, out, device=args.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rates, losses, first_s = [], [], math.nan
        for i in range(args.steps):
            started = time.perf_counter()
            metrics = trainer.train_step()
            if i == 0:
                first_s = time.perf_counter() - started
            if i >= args.skip:
                rates.append(metrics["perf/samples_per_s"])
            losses.append(metrics["loss/total"])
            progress.update()
        row = {
            "bench": "train_throughput",
            "config": args.config,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "variant": variant,
            "amp": trainer.amp,
            "compile": compile_,
            "deterministic": deterministic,
            "windows": train_cfg.windows,
            "predictions": train_cfg.predictions,
            "accumulation": train_cfg.accumulation,
            "steps": args.steps,
            "timed_steps": len(rates),
            "samples_per_s": statistics.median(rates),
            "samples_per_s_min": min(rates),
            "first_step_s": first_s,
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
        if device.type == "cuda":
            row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if args.profile:
            row.update(profile(trainer, args.profile, f"{args.config} {variant}"))
        del trainer
    return row


def profile(trainer: Trainer, steps: int, title: str) -> dict:
    """Profile ``steps`` more steps: print the operators that take the most device time and
    the most CPU time; return the wall time per step and, on CUDA, the kernel time per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    cuda = trainer.device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    started = time.perf_counter()
    with torch_profile(activities=activities, acc_events=True) as prof:
        for _ in range(steps):
            trainer.train_step()
    wall = (time.perf_counter() - started) / steps
    events = prof.key_averages()
    print(f"# profile: {title}, {steps} steps, {1e3 * wall:.1f} ms wall per step")
    keys = ("self_device_time_total", "self_cpu_time_total") if cuda else ("self_cpu_time_total",)
    for key in keys:
        print(events.table(sort_by=key, row_limit=15, max_name_column_width=60))
    result = {"profile_wall_ms_per_step": 1e3 * wall}
    if cuda:  # kernel time per step: the device's own events, as the table's total counts it
        kernels = [
            e
            for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        busy = sum(e.self_device_time_total for e in kernels) / steps / 1e3
        result["profile_device_busy_ms_per_step"] = busy
    return result


def table(rows: list[dict]) -> str:
    lines = [
        "| config | device | variant | windows x N | samples/s (median) | first step s "
        "| loss first -> last | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['device_name']} | {r['variant']} "
            f"| {r['windows']} x {r['predictions']} | {r['samples_per_s']:.0f} "
            f"| {r['first_step_s']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
            f"| {r.get('peak_mem_mb', '-')} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="default", help="config name or TOML path")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=["fp32", "bf16", "bf16-compile"]
    )
    p.add_argument("--steps", type=int, default=40, help="steps per variant")
    p.add_argument("--skip", type=int, default=10, help="untimed first steps")
    p.add_argument("--windows", type=int, help="windows per step (default: the config's)")
    p.add_argument("--predictions", type=int, help="predictions per window (default: config's)")
    p.add_argument("--profile", type=int, default=0, help="then profile this many steps")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.steps <= args.skip or args.skip < 0:
        print("error: --steps must exceed --skip (>= 0)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA requested but not available", file=sys.stderr)
        return 2
    rows = []
    with tqdm(total=args.steps * len(args.variants), desc="trainer steps", file=sys.stderr) as bar:
        for variant in args.variants:
            try:
                row = measure(args, variant, bar)
            except Exception as exc:  # one failing variant (say, compile) must not hide the rest
                print(f"error: {variant}: {type(exc).__name__}: {exc}", file=sys.stderr)
                row = None
            if row is not None:
                rows.append(row)
                tqdm.write(json.dumps(row), file=sys.stdout)
    print()
    print(table(rows))
    return 0 if len(rows) == len(args.variants) else 1


if __name__ == "__main__":
    sys.exit(main())
