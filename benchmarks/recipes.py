"""Compare training recipes in short runs of equal CPU time, scored on held-out speech.

    python -m benchmarks.recipes --data data/speech --out runs/recipes --cpu-minutes 20
    python -m benchmarks.recipes --data data/speech --out runs/recipes --only base wide
    python -m benchmarks.recipes --data D --out O --base tiny --cpu-minutes 0.2 --quick

Each candidate is the ``--base`` config with a few values changed (`CANDIDATES`). It trains in
its own process (``python -m training.train --cpu-minutes M``: the budget counts the process's
own CPU time, which other work on a shared machine does not inflate) and is then scored on the
same fixed validation windows, teacher-forced and without jitter:

- ``ce``: cross-entropy with the true codes (nats/sample; lower is better);
- ``ce_permuted``: with the codes of each window shuffled in time, and ``ce_constant``: with
  every frame given the window's most frequent code; ``gain`` = ``ce_permuted - ce`` is how
  much the decoder uses what the codes say (a decoder that ignores them gains 0);
- ``codes_used`` and ``perplexity`` of the codes over all validation frames.

A finished candidate is not trained again (its run directory holds ``score.json``), so an
interrupted comparison resumes. Output: one JSON line per candidate, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model.config import ModelConfig, from_dict
from training.config import TrainConfig, load_toml

# Overrides of the base config: {"table.key": value}; "model.x" and "train.x" tables.
CANDIDATES: dict[str, dict] = {
    "base": {},
    "lr-2x": {"train.lr": 1.2e-3},
    "wide": {
        "model.decoder.residual_channels": 128,
        "model.decoder.gate_channels": 128,
        "model.decoder.skip_channels": 128,
    },
    "short-rf": {"model.decoder.dilation_depth": 8},
    "windows-8x2000": {"train.windows": 8, "train.predictions": 2000},
}


def resolved(base: str, overrides: dict) -> dict:
    """The base config's tables with ``overrides`` applied (unknown tables are created)."""
    config = load_toml(base)
    for dotted, value in overrides.items():
        *tables, key = dotted.split(".")
        node = config
        for t in tables:
            node = node.setdefault(t, {})
        node[key] = value
    return config


def to_toml(config: dict, prefix: str = "") -> str:
    """A TOML document of nested tables of scalars (all a config file holds)."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{k} = {json.dumps(v)}" for k, v in scalars.items()]
    out = "\n".join(lines) + ("\n\n" if lines else "")
    for name, table in tables.items():
        out += to_toml(table, f"{prefix}.{name}" if prefix else name)
    return out


@torch.no_grad()
def score(run: Path, data: str, windows: int | None = None) -> dict:
    """Teacher-forced scores of the run's newest checkpoint on the fixed validation windows."""
    from training.train import Trainer

    state = torch.load(_latest(run), map_location="cpu", weights_only=False)

    model_cfg = from_dict(ModelConfig, state["model_config"], "model")
    train_cfg = from_dict(TrainConfig, state["train_config"], "train")
    if windows:
        train_cfg.valid_windows = windows
    trainer = Trainer(model_cfg, train_cfg, data, run, device="cpu", resume=True)
    model = trainer.model.eval()
    generator = torch.Generator().manual_seed(0)
    mode = {"name": "true"}
    codes: list[torch.Tensor] = []

    def replace(module, inputs, out):
        codes.append(out.codes[:, 1:-1].reshape(-1))  # margin frames are not scored twice
        if mode["name"] == "true":
            return out
        q = out.quantized
        if mode["name"] == "permuted":
            order = torch.stack([torch.randperm(q.shape[1], generator=generator) for _ in q])
            q = q.gather(1, order[..., None].expand_as(q))
        else:  # constant: each window's most frequent code everywhere
            top = torch.mode(out.codes, dim=1).values
            q = module.codebook[top][:, None, :].expand_as(q)
        out.quantized = q
        return out

    handle = model.quantizer.register_forward_hook(replace)
    result = {}
    try:
        for name in ("true", "permuted", "constant"):
            mode["name"] = name
            result[name] = _cross_entropy(trainer)
            if name == "true":
                all_codes = torch.cat(codes)
    finally:
        handle.remove()
    k = model.cfg.quantizer.codebook_size
    p = torch.bincount(all_codes, minlength=k).double()
    p /= p.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "step": int(state["step"]),
        "predictions_seen": int(state["step"]) * train_cfg.windows * train_cfg.predictions,
        "ce": result["true"],
        "ce_permuted": result["permuted"],
        "ce_constant": result["constant"],
        "gain": result["permuted"] - result["true"],
        "codes_used": int((p > 0).sum()),
        "codebook_size": k,
        "perplexity": float(entropy.exp()),
    }


def _cross_entropy(trainer) -> float:
    total, count = 0.0, 0
    cfg = trainer.cfg
    for i in range(0, len(trainer.valid), cfg.windows):
        b = trainer.loader.batch(trainer.valid[i : i + cfg.windows], 0, cfg.predictions)
        out = trainer.model(b.wave, b.windows, b.n)
        ce = torch.nn.functional.cross_entropy(out.logits.float(), out.targets, reduction="none")
        total += float((ce * out.mask).sum())
        count += int(out.mask.sum())
    return total / count


def _latest(run: Path) -> Path:
    from training import checkpoint as ckpt_io

    found = ckpt_io.list_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"{run} holds no checkpoint")
    return found[-1][1]


def train(name: str, args) -> dict:
    """Train one candidate (unless done) and score it; returns its row."""
    run = Path(args.out) / name
    done = run / "score.json"
    if done.is_file():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    config = run / "config.toml"
    config.write_text(to_toml(resolved(args.base, CANDIDATES[name])))
    cmd = [sys.executable, "-m", "training.train", "--config", str(config), "--data", args.data]
    cmd += ["--out", str(run), "--cpu-minutes", str(args.cpu_minutes), "--no-progress"]
    cmd += ["--device", "cpu", "--threads", str(args.threads)]
    if any(run.glob("*.pt")):
        cmd.append("--resume")
    log = open(run / "train.log", "a")
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: training failed (exit {proc.returncode}); see {run}/train.log")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    samples_per_s = [m["perf/samples_per_s"] for m in metrics]
    row = {
        "bench": "recipes",
        "candidate": name,
        "overrides": CANDIDATES[name],
        "cpu_minutes": args.cpu_minutes,
        "train_samples_per_s": sorted(samples_per_s)[len(samples_per_s) // 2],
        "train_loss_last": metrics[-1]["loss/total"],
        **score(run, args.data, args.valid_windows),
    }
    done.write_text(json.dumps(row, indent=1) + "\n")
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| candidate | steps | predictions | CE true | CE permuted | CE constant | gain "
        "| codes used | perplexity | samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['candidate']} | {r['step']} | {r['predictions_seen']:.2e} | {r['ce']:.3f} "
            f"| {r['ce_permuted']:.3f} | {r['ce_constant']:.3f} | {r['gain']:.3f} "
            f"| {r['codes_used']}/{r['codebook_size']} | {r['perplexity']:.0f} "
            f"| {r['train_samples_per_s']:.0f} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="folder of the candidates' run directories")
    p.add_argument("--base", default="small", help="config the candidates change")
    p.add_argument("--cpu-minutes", type=float, default=20.0, help="CPU budget per candidate")
    p.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="these candidates")
    p.add_argument(
        "--threads", type=int, default=1, help="threads per candidate (one: robust to load)"
    )
    p.add_argument(
        "--parallel", type=int, default=1, help="candidates trained at once (one per core)"
    )
    p.add_argument("--valid-windows", type=int, help="scoring windows (default: the config's)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if not math.isfinite(args.cpu_minutes) or args.cpu_minutes <= 0:
        print("error: --cpu-minutes must be positive", file=sys.stderr)
        return 2
    names = args.only or list(CANDIDATES)
    rows = []
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:  # each candidate is a process
        for future in [pool.submit(train, name, args) for name in names]:
            try:
                row = future.result()
            except (RuntimeError, FileNotFoundError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
