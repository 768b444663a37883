"""What exact batch invariance buys: one training at several window lengths, three losses.

    python -m benchmarks.window_losses --data data/asterisk-fillets --out runs/window-losses
    python -m benchmarks.window_losses --data D --out O --quick          # tiny, seconds

The trainer's loss makes a window of N predictions give exactly the mean per-prediction
gradient, whatever N (docs/DESIGN.md). This experiment trains the same model from the same
weights, with the same data seed and the same predictions per optimiser step, at window lengths
N (so ``predictions_per_step / N`` windows per step), with three losses:

- ``routed``: the trainer's (`training.loss.batch_loss`): each prediction's commitment is the
  mean over the frames that reach it, so each frame is weighted by its use;
- ``naive``: each prediction's commitment is the mean over all frames its window's encoder
  produced (the negative control of the invariance proof), so a window's frames share the
  window's weight equally and edge frames count as much as central ones;
- ``summed``: cross-entropy summed over the window's predictions plus the commitment summed over
  the window's frames, over the step's prediction count (the form the public ae-wavenet code
  ended with): a window spans about (N + receptive field) / hop frames, so the commitment's
  weight against the reconstruction changes several-fold between short and long windows.

Hypothesis, stated before any result: the routed runs coincide across N within seed noise (their
gradient estimates differ only in which predictions are drawn); the naive and summed ones do
not (their commitment weight and its spread over frames move with N).

Every run logs, every ``--log-every`` steps: the commitment term, the total weight the EMA
codebook receives and how it is spread over frames (coefficient of variation of the per-frame
weights), codes in use and perplexity, the encoder's gradient norm (before clipping), and
held-out teacher-forced CE on the same fixed windows for every run. A second data seed at one
length measures seed-to-seed noise. Runs checkpoint as they go; an interrupted grid resumes
(a finished run is not trained again). Writes ``results.json``, ``results.md`` and a figure.

The loss variants live here, not in `training.loss`: the trainer has one loss
(`training.train.Trainer.loss`), which this module's trainer subclass swaps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.recipes import resolved, to_toml
from training import checkpoint as ckpt_io
from training.config import load_model_config, load_train_config, parse_setting
from training.data import fixed_windows, split_lengths
from training.loss import LossTerms, batch_loss, prediction_losses
from training.train import Trainer

LENGTHS = (320, 1000, 4000, 16000)
LOSSES = ("routed", "naive", "summed")
QUICK = {  # tiny model (hop 16): lengths of 1 to 16 frames
    "base": "tiny",
    "lengths": (16, 64, 256),
    "per_step": 512,
    "steps": 4,
    "log_every": 2,
    "eval_windows": 4,
    "eval_predictions": 64,
}


# --- the three losses ----------------------------------------------------------------------


def routed(out, count: int) -> LossTerms:
    """The trainer's loss."""
    return batch_loss(out, count)


def _terms(ce_sum: torch.Tensor, commit_sum: torch.Tensor, count: int) -> LossTerms:
    ce, commitment = ce_sum / count, commit_sum / count
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    return LossTerms(ce + commitment, ce.detach(), commitment.detach(), zero, count)


def naive(out, count: int) -> LossTerms:
    """Each prediction's commitment: the mean of d over every frame the window's encoder
    produced (the same for all the window's predictions)."""
    mask = out.mask.to(out.logits.dtype)
    ce = prediction_losses(out)["ce"]
    window_mean = out.quantizer.commitment.mean(1)  # [B]
    commit = out.quantizer.beta * window_mean[:, None] * mask
    return _terms((ce * mask).sum(), commit.sum(), count)


def summed(out, count: int) -> LossTerms:
    """CE summed over the window's predictions plus the commitment summed over its frames."""
    mask = out.mask.to(out.logits.dtype)
    ce = prediction_losses(out)["ce"]
    commit = out.quantizer.beta * out.quantizer.commitment.sum()
    return _terms((ce * mask).sum(), commit, count)


LOSS_FUNCTIONS = {"routed": routed, "naive": naive, "summed": summed}


class ExperimentTrainer(Trainer):
    """The trainer with another loss, recording what the EMA codebook receives each step."""

    def __init__(self, *args, loss_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss = LOSS_FUNCTIONS[loss_name]
        self.ema_stats: dict[str, float] = {}
        q = self.model.quantizer
        update = q.ema_update

        def recording_update(*a, **kw):
            weights = [w for _, w in q._pool]
            if weights:
                w = torch.cat(weights).double()
                used = w[w > 0]
                cv = float(used.std() / used.mean()) if len(used) > 1 else 0.0
                self.ema_stats = {"ema/weight_total": float(w.sum()), "ema/weight_cv": cv}
            return update(*a, **kw)

        q.ema_update = recording_update

    def train_step(self) -> dict[str, float]:
        m = super().train_step()
        grads = [p.grad for p in self.model.encoder.parameters() if p.grad is not None]
        clipped = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        clip = self.cfg.grad_clip
        factor = max(1.0, m["perf/grad_norm"] / clip) if clip > 0 else 1.0
        m["grad/encoder_norm"] = clipped * factor  # clipping scales all gradients alike
        m.update(self.ema_stats)
        return m


@torch.no_grad()
def held_out_ce(trainer: Trainer, windows: list, predictions: int, batch: int = 4) -> float:
    """Teacher-forced CE (nats/sample, no jitter) on fixed windows, the same for every run."""
    model = trainer.model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        b = trainer.loader.batch(windows[i : i + batch], 0, predictions)
        out = model(b.wave, b.windows, b.n)
        ce = torch.nn.functional.cross_entropy(out.logits.float(), out.targets, reduction="none")
        total += float((ce * out.mask).sum())
        count += int(out.mask.sum())
    model.train()
    return total / max(count, 1)


# --- the grid --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    loss: str
    length: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.loss}-n{self.length}-seed{self.seed}"


def grid(lengths, losses, seed_length: int | None) -> list[Run]:
    """Every loss at every length with seed 0, then seed 1 at ``seed_length`` for each loss."""
    runs = [Run(loss, n, 0) for loss in losses for n in lengths]
    if seed_length is not None:
        runs += [Run(loss, seed_length, 1) for loss in losses]
    return runs


def write_config(args, run: Run, path: Path) -> Path:
    """The base config with the run's windows, seed and schedule."""
    if args.per_step % run.length:
        raise SystemExit(f"--per-step {args.per_step} is not a multiple of the length {run.length}")
    overrides = {
        "train.windows": args.per_step // run.length,
        "train.predictions": run.length,
        "train.seed": run.seed,
        "train.total_steps": max(args.steps, 2),
        "train.warmup_steps": min(args.warmup, max(args.steps - 1, 1)),
        "train.valid_windows": 0,  # held-out CE is measured here, the same for every run
        "train.amp": not args.fp32,
        "train.compile": False,
    }
    overrides.update(args.set or {})
    path.write_text(to_toml(resolved(args.base, overrides)))
    return path


def initial_weights(args, out: Path) -> Path:
    """One initialisation for every run: the trainer's own (feature statistics, k-means
    codebook) for the first run's config, saved once."""
    path = out / "init.pt"
    if path.exists():
        return path
    run = Run(LOSSES[0], args.lengths[0], 0)
    config = write_config(args, run, out / "init.toml")
    trainer = Trainer(
        load_model_config(config), load_train_config(config), args.data, out / "init-run"
    )
    state = trainer.state_dict()
    keep = {"model_config": state["model_config"], "model": state["model"]}
    torch.save({**keep, "speakers": trainer.dataset.speakers}, path)
    return path


def train_one(args, run: Run, init: Path, eval_windows: list) -> dict:
    """Train one run to ``args.steps`` (resuming its checkpoints) and return its record."""
    folder = args.out / run.name
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(args, run, folder / "config.toml")
    resume = bool(ckpt_io.list_checkpoints(folder))
    trainer = ExperimentTrainer(
        load_model_config(config),
        load_train_config(config),
        args.data,
        folder,
        resume=resume,
        init_from=None if resume else init,
        loss_name=run.loss,
    )
    log_path = folder / "log.jsonl"
    history = []
    if resume and log_path.exists():
        history = [json.loads(line) for line in log_path.read_text().splitlines()]
        history = [h for h in history if h["step"] <= trainer.step]
    if trainer.step == 0:
        history = [{"step": 0, "valid/ce": held_out_ce(trainer, eval_windows, args.eval_n)}]
    log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=trainer.step, desc=run.name, disable=args.no_progress)
    with open(log_path, "a") as log:
        while trainer.step < args.steps:
            m = trainer.train_step()
            bar.update(1)
            if trainer.step % args.log_every == 0 or trainer.step == args.steps:
                m["valid/ce"] = held_out_ce(trainer, eval_windows, args.eval_n)
                m["step"] = trainer.step
                history.append(m)
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.set_postfix(ce=f"{m['valid/ce']:.3f}")
            if trainer.step % args.checkpoint_every == 0:
                trainer.save()
    bar.close()
    trainer.save()
    record = {"run": run.name, "loss": run.loss, "length": run.length, "seed": run.seed}
    record |= {"steps": trainer.step, "windows_per_step": args.per_step // run.length}
    record["history"] = history
    record["final"] = {k: v for k, v in history[-1].items() if k != "step"}
    done.write_text(json.dumps(record, indent=1))
    for _, path in ckpt_io.list_checkpoints(folder)[:-1]:  # the last one is enough
        path.unlink()
    return record


# --- the summary -----------------------------------------------------------------------------

SUMMARY_KEYS = (
    ("valid/ce", "held-out CE"),
    ("loss/commitment", "commitment"),
    ("ema/weight_total", "EMA weight"),
    ("ema/weight_cv", "EMA weight CV"),
    ("vq/codes_used", "codes used"),
    ("vq/perplexity_ema", "perplexity"),
    ("grad/encoder_norm", "encoder grad"),
)


def summarise(records: list[dict], seed_length: int | None) -> dict:
    """Per loss: the final values at each length, their spread (max - min) across lengths, and
    the seed noise (|seed 0 - seed 1|) at the seed length."""
    summary = {}
    for loss in sorted({r["loss"] for r in records}, key=LOSSES.index):
        mine = [r for r in records if r["loss"] == loss]
        main = sorted((r for r in mine if r["seed"] == 0), key=lambda r: r["length"])
        entry = {"lengths": [r["length"] for r in main]}
        for key, _ in SUMMARY_KEYS:
            values = [r["final"].get(key, math.nan) for r in main]
            entry[key] = {"values": values, "spread": max(values) - min(values)}
            other = [r for r in mine if r["seed"] == 1 and r["length"] == seed_length]
            base = [r for r in main if r["length"] == seed_length]
            if other and base:
                entry[key]["seed_noise"] = abs(other[0]["final"][key] - base[0]["final"][key])
        summary[loss] = entry
    return summary


def table(summary: dict) -> str:
    lengths = next(iter(summary.values()))["lengths"]
    head = "| loss | quantity | " + " | ".join(f"N={n}" for n in lengths)
    head += " | spread (max-min) | seed noise |"
    lines = [head, "|" + "---|" * (len(lengths) + 4)]
    for loss, entry in summary.items():
        for key, label in SUMMARY_KEYS:
            e = entry[key]
            cells = " | ".join(f"{v:.4g}" for v in e["values"])
            noise = f"{e['seed_noise']:.3g}" if "seed_noise" in e else "-"
            lines.append(f"| {loss} | {label} | {cells} | {e['spread']:.3g} | {noise} |")
    return "\n".join(lines)


FIGURE_KEYS = ("valid/ce", "ema/weight_total")  # the figure's rows


def figure(records: list[dict], path: Path) -> None:
    """Held-out CE and EMA weight against steps: one column per loss, one line per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in records)]
    fig, axes = plt.subplots(2, len(losses), figsize=(4.2 * len(losses), 6.4), squeeze=False)
    lengths = sorted({r["length"] for r in records})
    colours = plt.cm.viridis([i / max(len(lengths) - 1, 1) for i in range(len(lengths))])
    for col, loss in enumerate(losses):
        for r in (r for r in records if r["loss"] == loss):
            colour = colours[lengths.index(r["length"])]
            style = "-" if r["seed"] == 0 else ":"
            label = f"N={r['length']}" + (f" seed {r['seed']}" if r["seed"] else "")
            for row, key in enumerate(FIGURE_KEYS):
                points = [(h["step"], h[key]) for h in r["history"] if key in h]
                axes[row, col].plot(*zip(*points, strict=True), style, color=colour, label=label)
        axes[0, col].set_title(loss)
        axes[0, col].set_ylabel("held-out CE (nats/sample)")
        axes[1, col].set_ylabel("EMA weight per step")
        axes[1, col].set_ylim(bottom=0, top=max(1.1, axes[1, col].get_ylim()[1]))
        axes[1, col].ticklabel_format(axis="y", useOffset=False)
        axes[1, col].set_xlabel("optimiser step")
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.window_losses",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="prepared dataset (training.prepare)")
    p.add_argument("--out", type=Path, required=True, help="folder of the runs and results")
    p.add_argument("--base", default="small", help="config the runs start from")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="window N")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--per-step", type=int, default=16000, help="predictions per optimiser step")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps per run")
    p.add_argument("--warmup", type=int, default=50, help="learning-rate warm-up steps")
    p.add_argument("--seed-length", type=int, default=4000, help="length of the second seed")
    p.add_argument("--log-every", type=int, default=25, help="steps between logged values")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per eval")
    p.add_argument("--eval-n", type=int, default=4000, help="predictions per held-out window")
    p.add_argument(
        "--set",
        nargs="+",
        metavar="TABLE.KEY=VALUE",
        help="change the base config, e.g. model.decoder.residual_channels=32 (a narrower "
        "model for a small budget); VALUE is JSON",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--figure", type=Path, help="where the PNG goes (default OUT/window_losses.png)")
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps: a smoke test")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        args.set = dict(parse_setting(item) for item in args.set or [])
    except ValueError as e:
        parser.error(f"--set: {e}")
    if args.quick:
        args.base, args.lengths, args.per_step = QUICK["base"], QUICK["lengths"], QUICK["per_step"]
        args.steps, args.log_every = QUICK["steps"], QUICK["log_every"]
        args.eval_windows, args.eval_n = QUICK["eval_windows"], QUICK["eval_predictions"]
        args.seed_length, args.warmup, args.checkpoint_every = QUICK["lengths"][1], 1, 2
    if args.seed_length not in args.lengths:
        args.seed_length = None
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    init = initial_weights(args, args.out)
    from model.autoencoder import Autoencoder
    from model.config import ModelConfig, from_dict
    from training.dataset import Dataset

    state = torch.load(init, map_location="cpu", weights_only=False)
    geometry = Autoencoder(from_dict(ModelConfig, state["model_config"], "model")).geometry
    valid = split_lengths(Dataset(args.data), "valid")
    if not valid:
        print("error: the dataset has no valid split for the held-out CE", file=sys.stderr)
        return 2
    eval_windows = fixed_windows(valid, geometry, args.eval_windows, args.eval_n, seed=0)
    records = [
        train_one(args, run, init, eval_windows)
        for run in grid(args.lengths, args.losses, args.seed_length)
    ]
    summary = summarise(records, args.seed_length)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "summary": summary,
                "runs": records,
            },
            indent=1,
        )
    )
    text = table(summary)
    (args.out / "results.md").write_text(text + "\n")
    figure(records, args.figure or args.out / "window_losses.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
