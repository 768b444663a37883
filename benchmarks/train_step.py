"""Training-step throughput: our WaveNet decoder against a naive full-rate reference.

    python -m benchmarks.train_step                     # small and default, CPU (and CUDA)
    python -m benchmarks.train_step --configs tiny --n 200 --windows 2 --reps 2 --no-memory

One step is what the trainer does: forward, `training.loss.batch_loss`, backward, AdamW step
and the quantiser's `ema_update`. Two variants share the weights, the windows (cut by
`training.windows.make_batch` from the speech clips in tests/data) and the seeds:

* ``ours``: `model.decoder.WaveNetDecoder` as `model.autoencoder.Autoencoder` uses it, i.e.
  per-layer conditioning projected at 50 Hz and gathered per sample, mu-law input embedded.
* ``naive``: the textbook WaveNet on the same parameters: the 50 Hz conditioning (and the
  speaker embedding, broadcast) upsampled to the sample rate by repetition *before* a 1x1
  projection per layer at full rate, and the mu-law input one-hot through a 1x1 convolution.

Every repetition restores both models and optimisers to the same initial state, so each step
is the same step and the losses must agree up to float rounding (the run fails above 1e-4
relative). Repetitions alternate the variants (ours first on even repetitions, naive first on
odd ones); the reported time is the median after warm-up. Peak memory: on CPU the maximum RSS
of a fresh subprocess per variant that builds the model and runs one step (``ru_maxrss``,
and its growth over the RSS just before the step); on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps.

Besides wall time, each row gives process CPU time (``samples_per_cpu_s``), steadier when other
jobs share the cores; ``--threads 1`` makes it steadier still (no spinning worker threads).

Output: one JSON line per measurement (``"kind": "measurement"``) and per comparison
(``"kind": "comparison"``), then a markdown table. Exit status 1 when a loss check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.autoencoder import Autoencoder, Windows
from model.decoder import WaveNetDecoder
from training.config import load_model_config
from training.loss import batch_loss
from training.windows import Utterance, WindowSpec, make_batch

ROOT = Path(__file__).resolve().parent.parent
CLIPS = sorted((ROOT / "tests" / "data").glob("*.wav"))
VARIANTS = ("ours", "naive")
LOSS_TOLERANCE = 1e-4  # relative
BENCH = "train_step"


# --- the naive reference -----------------------------------------------------------------------


class NaiveDecoder(nn.Module):
    """The textbook WaveNet computation on the parameters of a `WaveNetDecoder`.

    `condition` returns the conditioning *before* the per-layer projections at 50 Hz, with the
    speaker embedding broadcast over time as extra channels: ``[B, C_cond + D_spk, C]``.
    `forward` repeats it ``hop`` times to the sample rate and projects it once per layer at
    full rate; the mu-law input is a one-hot vector through a 1x1 convolution whose weight is
    the embedding table. Same parameters, same outputs up to float rounding.
    """

    def __init__(self, inner: WaveNetDecoder, hop: int):
        super().__init__()
        self.inner = inner
        self.hop = hop

    def wavenet_layers(self):
        return self.inner.wavenet_layers()

    def conditioning_layers(self, hop: int, shift: int):
        return self.inner.conditioning_layers(hop, shift)

    def condition(
        self, slots: torch.Tensor, speaker: torch.Tensor, dropped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``slots [B, D, n_slots]``, ``speaker [B]`` -> ``[B, C_cond + D_spk, C]``. The
        reference has no conditioning dropout (``dropped`` is for a training-only setting)."""
        if dropped is not None:
            raise ValueError("the naive reference decoder has no conditioning dropout")
        local = self.inner.cond_conv(slots)
        spk = self.inner.speaker(speaker)[:, :, None].expand(-1, -1, local.shape[-1])
        return torch.cat([local, spk], dim=1)

    def upsample(self, cond: torch.Tensor, cond_index: torch.Tensor) -> torch.Tensor:
        """Repetition to the sample rate, ``[B, Ch, C] -> [B, Ch, T]`` with ``T`` the length of
        ``cond_index``: each row is a slice of ``repeat_interleave(hop)`` starting at the phase
        that ``cond_index`` (the geometry's answer) implies; past the end the last vector is
        repeated, as ``cond_index`` is clamped there."""
        hop, n = self.hop, cond_index.shape[1]
        full = cond.repeat_interleave(hop, dim=2)  # [B, Ch, C * hop]
        first = cond_index[:, 0]
        run = (cond_index == first[:, None]).sum(1)  # samples left in the first frame
        start = (first * hop + hop - run).tolist()
        need = max(start) + n - full.shape[-1]
        if need > 0:
            full = torch.cat([full, full[..., -1:].expand(-1, -1, need)], dim=2)
        return torch.stack([full[b, :, s : s + n] for b, s in enumerate(start)])

    def forward(
        self, inputs: torch.Tensor, cond: torch.Tensor, cond_index: torch.Tensor
    ) -> torch.Tensor:
        """Same contract as `WaveNetDecoder.forward`, with ``cond`` from `condition` here."""
        dec = self.inner
        g, q = dec.cfg.gate_channels, dec.cfg.quantization_channels
        one_hot = F.one_hot(inputs, q).to(dec.embed.weight.dtype).transpose(1, 2)  # [B, Q, T]
        x = F.conv1d(one_hot, dec.embed.weight.t()[:, :, None])  # [B, R, T]
        n_out = inputs.shape[1] - sum((dec.cfg.kernel_size - 1) * d for d in dec.dilations)
        up = self.upsample(cond, cond_index)  # [B, C_cond + D_spk, T_0]
        skips = 0
        for i, conv in enumerate(dec.dilated):
            h = conv(x)  # [B, 2G, T_i]
            rows = slice(i * 2 * g, (i + 1) * 2 * g)
            weight = torch.cat(
                [dec.cond_proj.weight[rows], dec.speaker_proj.weight[rows, :, None]], 1
            )
            h = h + F.conv1d(
                up[..., up.shape[-1] - h.shape[-1] :], weight, dec.cond_proj.bias[rows]
            )
            a, b = h.chunk(2, dim=1)
            z = torch.tanh(a) * torch.sigmoid(b)
            skips = skips + dec.skip[i](z[..., z.shape[-1] - n_out :])
            if i < len(dec.residual):
                x = x[..., x.shape[-1] - z.shape[-1] :] + dec.residual[i](z)
        return dec.head(skips)


# --- setup -------------------------------------------------------------------------------------


@dataclass
class Workload:
    wave: torch.Tensor
    windows: Windows
    n: int
    count: int


def load_clips() -> list[torch.Tensor]:
    if not CLIPS:
        raise FileNotFoundError(f"no speech clips in {ROOT / 'tests' / 'data'}")
    clips = []
    for path in CLIPS:
        data, _ = sf.read(path, dtype="float32")
        clips.append(torch.from_numpy(data))
    return clips


def make_workload(model: Autoencoder, n: int, n_windows: int, seed: int) -> Workload:
    """``n_windows`` full windows of ``n`` predictions, round robin over the clips, at
    phases spread over the stride (a clip too short for ``n`` is skipped)."""
    geo = model.geometry
    utts = [
        Utterance.prepare(c, geo, utt=i, speaker=i % model.cfg.decoder.n_speakers)
        for i, c in enumerate(load_clips())
    ]
    usable = [i for i, u in enumerate(utts) if u.n_samples >= n]
    if not usable:
        raise ValueError(
            f"no clip holds {n} predictions (longest: {max(u.n_samples for u in utts)})"
        )
    specs = []
    for w in range(n_windows):
        u = utts[usable[w % len(usable)]]
        room = u.n_samples - n
        t0 = u.first + (w * (geo.hop // 2 + 7919)) % (room + 1)
        specs.append(WindowSpec(usable[w % len(usable)], t0, n))
    wave, windows, n_max = make_batch(geo, utts, specs, seed=seed, epoch=1)
    return Workload(wave, windows, n_max, int(windows.n_valid.sum()))


def build(config: str, variant: str, seed: int, device: torch.device) -> Autoencoder:
    """The same initial weights for every variant (seeded), in training mode."""
    torch.manual_seed(seed)
    model = Autoencoder(load_model_config(config))
    dim = model.features.dim
    model.features.set_statistics(torch.zeros(dim), torch.full((dim,), 10.0))
    if variant == "naive":
        model.decoder = NaiveDecoder(model.decoder, model.geometry.hop)
    elif variant != "ours":
        raise ValueError(f"unknown variant {variant!r}")
    return model.to(device).train()


class Runner:
    """One variant: a model, its optimiser, and the initial state every step starts from."""

    def __init__(self, model: Autoencoder, work: Workload, device: torch.device, seed: int):
        self.model, self.device, self.seed = model, device, seed
        self.wave = work.wave.to(device)
        self.windows = work.windows.to(device)
        self.n, self.count = work.n, work.count
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.initial = (copy.deepcopy(model.state_dict()), copy.deepcopy(self.opt.state_dict()))

    def restore(self) -> None:
        self.model.load_state_dict(self.initial[0])
        self.opt.load_state_dict(self.initial[1])
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> float:
        """One training step; returns the loss."""
        model = self.model
        out = model(self.wave, self.windows, self.n)
        terms = batch_loss(out, self.count)
        terms.loss.backward()
        self.opt.step()
        model.quantizer.ema_update(generator=torch.Generator().manual_seed(self.seed))
        return float(terms.loss.detach())

    def timed_step(self) -> tuple[float, float, float]:
        """``(wall seconds, process CPU seconds, loss)`` of one step from the initial state."""
        self.restore()
        sync(self.device)
        cpu, wall = time.process_time(), time.perf_counter()
        loss = self.step()
        sync(self.device)
        return time.perf_counter() - wall, time.process_time() - cpu, loss

    def gradients(self) -> dict[str, torch.Tensor]:
        """Gradients of the last step, keyed by the `WaveNetDecoder` parameter names."""
        return {
            name.replace("decoder.inner.", "decoder."): p.grad
            for name, p in self.model.named_parameters()
            if p.grad is not None
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


# --- measurements ------------------------------------------------------------------------------


def probe_memory(args, config: str, variant: str) -> dict:
    """CPU peak memory of one variant, measured in a fresh interpreter."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--probe", variant, "--configs", config]
    cmd += ["--n", str(args.n), "--windows", str(args.windows), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {config}/{variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_probe(args) -> int:
    """Body of the ``--probe`` subprocess: one step, then the RSS figures as JSON."""
    config, device = args.configs[0], torch.device("cpu")
    model = build(config, args.probe, args.seed, device)
    runner = Runner(model, make_workload(model, args.n, args.windows, args.seed), device, args.seed)
    before = rss_mb()
    runner.restore()
    runner.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_rss_mb": round(peak, 1), "step_rss_mb": round(peak - before, 1)}))
    return 0


def grad_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max over parameters of max|a - b| / max|b|."""
    if a.keys() != b.keys():
        raise RuntimeError(f"parameters differ: {sorted(a.keys() ^ b.keys())}")
    worst = 0.0
    for name, ref in b.items():
        diff = (a[name] - ref).abs().max().item()
        worst = max(worst, diff / max(ref.abs().max().item(), 1e-30))
    return worst


def measure(args, config: str, device: torch.device, progress: tqdm) -> list[dict]:
    """Interleaved repetitions of both variants on one config and device."""
    runners = {}
    for variant in VARIANTS:
        model = build(config, variant, args.seed, device)
        work = make_workload(model, args.n, args.windows, args.seed)
        runners[variant] = Runner(model, work, device, args.seed)
    walls, cpus, losses = ({v: [] for v in VARIANTS} for _ in range(3))
    peak_cuda = dict.fromkeys(VARIANTS, 0)
    for rep in range(args.warmup + args.reps):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu, loss = runners[variant].timed_step()
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                peak_cuda[variant] = max(peak_cuda[variant], peak)
            losses[variant].append(loss)
            if rep >= args.warmup:
                walls[variant].append(wall)
                cpus[variant].append(cpu)
            progress.update(1)
    count = runners["ours"].count
    rows = []
    for variant in VARIANTS:
        wall, cpu = statistics.median(walls[variant]), statistics.median(cpus[variant])
        row = {
            "kind": "measurement",
            "bench": BENCH,
            "config": config,
            "device": device.type,
            "variant": variant,
            "windows": args.windows,
            "n": args.n,
            "predictions": count,
            "reps": args.reps,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "median_s": round(wall, 4),
            "min_s": round(min(walls[variant]), 4),
            "samples_per_s": round(count / wall, 1),
            "median_cpu_s": round(cpu, 4),
            "samples_per_cpu_s": round(count / cpu, 1),
            "loss": losses[variant][-1],
        }
        if device.type == "cuda":
            row["peak_mem_mb"] = round(peak_cuda[variant] / 2**20, 1)
            row["mem_method"] = "cuda.max_memory_allocated"
        elif not args.no_memory:
            mem = probe_memory(args, config, variant)
            row["peak_mem_mb"] = mem["peak_rss_mb"]
            row["step_mem_mb"] = mem["step_rss_mb"]
            row["mem_method"] = "ru_maxrss of a fresh process (one step)"
        rows.append(row)
    ours, naive = rows
    diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["naive"]))
    rel = diff / max(abs(ours["loss"]), 1e-30)
    rows.append(
        {
            "kind": "comparison",
            "bench": BENCH,
            "config": config,
            "device": device.type,
            "ratio_ours_over_naive": round(ours["samples_per_s"] / naive["samples_per_s"], 3),
            "cpu_ratio_ours_over_naive": round(
                ours["samples_per_cpu_s"] / naive["samples_per_cpu_s"], 3
            ),
            "loss_max_abs_diff": diff,
            "loss_rel_diff": rel,
            "loss_spread_within_variant": max(max(v) - min(v) for v in losses.values()),
            "grad_max_rel_diff": grad_rel_diff(
                runners["naive"].gradients(), runners["ours"].gradients()
            ),
            "loss_ok": rel <= LOSS_TOLERANCE,
        }
    )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown summary of the JSON rows (one line per config and device)."""
    lines = [
        "| config | device | windows x N | ours samples/s | naive samples/s | ours/naive "
        "| ours/naive (CPU time) | loss | loss max abs diff | grad max rel diff "
        "| peak mem ours / naive (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {}
    for row in rows:
        by_key.setdefault((row["config"], row["device"]), {})[row.get("variant", "cmp")] = row
    for (config, device), r in by_key.items():
        o, nv, c = r["ours"], r["naive"], r["cmp"]
        mem = f"{o['peak_mem_mb']} / {nv['peak_mem_mb']}" if "peak_mem_mb" in o else "-"
        lines.append(
            f"| {config} | {device} | {o['windows']} x {o['n']} | {o['samples_per_s']:.0f} "
            f"| {nv['samples_per_s']:.0f} | {c['ratio_ours_over_naive']:.2f} "
            f"| {c['cpu_ratio_ours_over_naive']:.2f} | {o['loss']:.6f} "
            f"| {c['loss_max_abs_diff']:.1e} | {c['grad_max_rel_diff']:.1e} | {mem} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--configs", nargs="+", default=["small", "default"], help="config names")
    p.add_argument("--n", type=int, default=4000, help="predictions per window")
    p.add_argument("--windows", type=int, default=2, help="windows per step")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), help="default: cpu (+cuda)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    p.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.n < 1 or args.windows < 1 or args.reps < 1 or args.warmup < 0:
        print("error: --n, --windows and --reps must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        if args.probe:
            return run_probe(args)
        devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if "cuda" in devices and not torch.cuda.is_available():
            print("error: CUDA requested but not available", file=sys.stderr)
            return 2
        total = len(args.configs) * len(devices) * len(VARIANTS) * (args.warmup + args.reps)
        rows = []
        with tqdm(total=total, desc="train steps", file=sys.stderr) as progress:
            for device in devices:
                for config in args.configs:
                    for row in measure(args, config, torch.device(device), progress):
                        rows.append(row)
                        tqdm.write(json.dumps(row), file=sys.stdout)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(table(rows))
    bad = [r for r in rows if r["kind"] == "comparison" and not r["loss_ok"]]
    for r in bad:
        print(
            f"error: {r['config']}/{r['device']}: losses differ by {r['loss_rel_diff']:.2e} "
            f"relative (> {LOSS_TOLERANCE:g})",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
