"""The window-length experiment on the tiny config: the three losses, the grid, resuming."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from benchmarks import window_losses as wl
from tests.test_data import tiny_train_config, write_clip_dataset
from training.config import load_model_config, load_train_config
from training.data import fixed_windows, split_lengths
from training.train import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_clip_dataset(tmp_path_factory.mktemp("clips"))


def _step_weights(trainer, loss, windows, predictions):
    """Per-frame EMA weights (what the commitment's gradient gives each frame) of one step on
    ``windows``, and the step's loss terms."""
    q = trainer.model.quantizer
    q._pool.clear()
    b = trainer.loader.batch(windows, 0, predictions)
    out = trainer.model(b.wave, b.windows, b.n)
    terms = loss(out, int(out.mask.sum()))
    terms.loss.backward()
    trainer.model.zero_grad()
    weights = torch.cat([w for _, w in q._pool]).double()
    q.discard_step()
    return weights, terms


def test_routed_weights_sum_to_one_per_step_and_the_controls_do_not(data, tmp_path):
    """Routed: every prediction's commitment weight is spread over the frames that reach it,
    so a step's EMA weights sum to 1 at any window length. Naive also sums to 1 but spreads
    it evenly over each window's frames; summed gives each frame beta-free unit weight over
    the count, so its total grows with the frames per prediction (short windows)."""
    cfg = tiny_train_config(tmp_path / "t.toml")
    trainer = Trainer(load_model_config(cfg), load_train_config(cfg), data, tmp_path / "run")
    lengths = split_lengths(trainer.dataset, "train")
    totals, cvs = {}, {}
    for name, loss in wl.LOSS_FUNCTIONS.items():
        for n in (16, 128):
            windows = fixed_windows(lengths, trainer.model.geometry, 512 // n, n, seed=1)
            w, terms = _step_weights(trainer, loss, windows, n)
            totals[name, n] = float(w.sum())
            used = w[w > 0]
            cvs[name, n] = float(used.std() / used.mean())
            assert torch.isfinite(terms.loss)
    assert totals["routed", 16] == pytest.approx(1.0, rel=1e-5)
    assert totals["routed", 128] == pytest.approx(1.0, rel=1e-5)
    assert totals["naive", 16] == pytest.approx(1.0, rel=1e-5)
    # Summed: each frame weighs 1 / count, and short windows have more frames per prediction.
    assert totals["summed", 16] > 1.5 * totals["summed", 128]
    # Naive spreads a window's weight evenly over its frames; routed weights edge frames less.
    assert cvs["naive", 128] < 1e-6 < cvs["routed", 128]


def test_quick_grid_trains_logs_summarises_and_resumes(data, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["--data", str(data), "--out", str(out), "--quick", "--no-progress"]
    argv += ["--set", "train.lr=0.002", "model.decoder.residual_channels=6"]
    assert wl.main(argv) == 0
    config = tomllib.loads((out / "routed-n16-seed0" / "config.toml").read_text())
    assert config["train"]["lr"] == 0.002 and config["train"]["windows"] == 512 // 16
    init = torch.load(out / "init.pt", weights_only=False)
    assert init["model_config"]["decoder"]["residual_channels"] == 6
    printed = capsys.readouterr().out
    assert "| routed | held-out CE |" in printed and "seed noise" in printed
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    # 3 losses x 3 lengths, plus a second seed of each loss at one length.
    assert len(runs) == 12
    assert {r["loss"] for r in runs} == set(wl.LOSSES)
    for r in runs:
        assert r["steps"] == wl.QUICK["steps"]
        final = r["final"]
        for key, _ in wl.SUMMARY_KEYS:
            assert key in final, (r["run"], key)
        assert r["history"][0]["step"] == 0 and "valid/ce" in r["history"][0]
    # Same initial weights, same held-out windows: every run starts from the same CE.
    starts = {round(r["history"][0]["valid/ce"], 6) for r in runs}
    assert len(starts) == 1, starts
    routed = [r for r in runs if r["loss"] == "routed" and r["seed"] == 0]
    assert all(r["final"]["ema/weight_total"] == pytest.approx(1.0, rel=1e-4) for r in routed)
    summed = sorted((r for r in runs if r["loss"] == "summed"), key=lambda r: r["length"])
    assert summed[0]["final"]["ema/weight_total"] > summed[-1]["final"]["ema/weight_total"]
    summary = result["summary"]["routed"]["valid/ce"]
    assert "seed_noise" in summary and summary["spread"] >= 0
    assert (out / "window_losses.png").stat().st_size > 10_000

    # A finished grid is not trained again; a run whose result is gone resumes from its
    # checkpoint rather than from step 0.
    victim = out / runs[0]["run"]
    (victim / "result.json").unlink()
    assert wl.main(argv) == 0
    again = json.loads((out / "results.json").read_text())["runs"]
    assert again[0]["history"][0]["step"] == 0  # the log was kept, not restarted
    assert again[0]["final"]["valid/ce"] == pytest.approx(runs[0]["final"]["valid/ce"])
    for before, after in zip(runs[1:], again[1:], strict=True):
        assert before == after
