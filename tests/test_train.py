"""The trainer: exact resume, kill -9 safety, DDP equals one rank, NaN handling, learning.

Every run uses the tiny config on a dataset cut from the speech clips in tests/data.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.autoencoder import Autoencoder
from model.quantizer import VectorQuantizer
from tests.conftest import run_process_group
from tests.test_data import tiny_train_config, write_clip_dataset
from training import checkpoint as ckpt_io
from training import train as train_mod
from training.config import (
    TrainConfig,
    load_model_config,
    load_train_config,
    parse_setting,
    with_settings,
)
from training.data import Loader, Window
from training.dataset import Dataset

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DIST_TIMEOUT = datetime.timedelta(minutes=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_clip_dataset(tmp_path_factory.mktemp("clips"))


def _assert_same(a, b, where="checkpoint"):
    """Bit-for-bit equality of nested checkpoint structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --- configuration -----------------------------------------------------------------------------


def test_train_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    assert load_train_config("tiny").predictions == 64
    with pytest.raises(KeyError, match="lrr"):
        load_train_config(tiny_train_config(tmp_path / "a.toml", lrr=1.0))
    with pytest.raises(TypeError, match="windows"):
        load_train_config(tiny_train_config(tmp_path / "b.toml", windows="four"))
    with pytest.raises(ValueError, match="decay"):
        load_train_config(tiny_train_config(tmp_path / "c.toml", decay="step"))


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    for decay in ("cosine", "linear"):
        cfg = TrainConfig(warmup_steps=4, total_steps=14, decay=decay, min_lr_ratio=0.1)
        f = [cfg.lr_factor(s) for s in range(20)]
        assert f[:4] == [0.25, 0.5, 0.75, 1.0]
        assert all(a >= b for a, b in zip(f[4:], f[5:]))
        assert f[14] == pytest.approx(0.1) and f[19] == pytest.approx(0.1)
        assert f[9] == pytest.approx(0.55)  # half-way: both shapes give the mid-point


def test_cli_rejects_too_many_speakers_and_existing_runs(data, tmp_path, capsys):
    base = tiny_train_config(tmp_path / "base.toml").read_text()
    assert "n_speakers = 3" in base
    few = tmp_path / "few.toml"
    few.write_text(base.replace("n_speakers = 3", "n_speakers = 1"))
    code = train_mod.main(["--config", str(few), "--data", str(data), "--out", str(tmp_path / "r")])
    assert code == train_mod.EXIT_ERROR
    assert "2 speakers" in capsys.readouterr().err
    missing = ["--config", "tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m")]
    assert train_mod.main(missing) == train_mod.EXIT_ERROR
    assert "not a prepared dataset" in capsys.readouterr().err
    out = tmp_path / "run"
    cfg = str(tiny_train_config(tmp_path / "ok.toml"))
    argv = ["--config", cfg, "--data", str(data), "--out", str(out), "--no-progress"]
    assert train_mod.main([*argv, "--steps", "1"]) == 0
    assert train_mod.main([*argv, "--steps", "2"]) == train_mod.EXIT_ERROR
    assert "--resume" in capsys.readouterr().err


def test_cli_rejects_devices_it_cannot_train_on(data, tmp_path, capsys):
    bad = {"gpu": "Expected one of", "mps": "runs on cpu or cuda"}
    if not torch.cuda.is_available():
        bad["cuda"] = "no usable CUDA device"
    cfg = tiny_train_config(tmp_path / "t.toml")
    for device, message in bad.items():
        argv = ["--config", str(cfg), "--data", str(data), "--out", str(tmp_path / device)]
        assert train_mod.main([*argv, "--device", device]) == train_mod.EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith(f"error: device {device!r}") and message in err, err
        assert not (tmp_path / device).exists()  # refused before anything is written


def test_feature_statistics_come_from_stats_json_only_when_its_features_match(tmp_path, capsys):
    import json

    from model.config import to_dict

    cfg = tiny_train_config(tmp_path / "s.toml", kmeans_windows=0)
    model_cfg = load_model_config(cfg)
    root = write_clip_dataset(tmp_path / "ds")
    dim = 3 * model_cfg.features.n_mfcc
    stats = {"features": to_dict(model_cfg.features), "mean": list(range(dim)), "std": [2.0] * dim}
    (root / "stats.json").write_text(json.dumps(stats))
    trainer = _trainer(cfg, root, tmp_path / "a")
    assert trainer.model.features.mean.tolist() == list(range(dim))
    assert "from the dataset's stats.json" in capsys.readouterr().err
    stats["features"]["n_mels"] += 1  # prepared for another front end: recompute
    (root / "stats.json").write_text(json.dumps(stats))
    trainer = _trainer(cfg, root, tmp_path / "b")
    mean = trainer.model.features.mean
    assert mean.tolist() != list(range(dim)) and torch.isfinite(mean).all()
    assert float(trainer.model.features.std.min()) > 0
    assert "computed from 4 train utterances" in capsys.readouterr().err


def test_settings_parse_as_json_or_words_and_are_checked_as_a_config_is():
    assert parse_setting("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_setting("train.decay=cosine") == ("train.decay", "cosine")
    with pytest.raises(ValueError, match="TABLE.KEY=VALUE"):
        parse_setting("lr=1")
    model, train = load_model_config("tiny"), load_train_config("tiny")
    m, t = with_settings(
        model,
        train,
        {"train.lr": 1e-3, "model.decoder.input_noise": 2, "model.encoder.channels": 8},
        weights_fixed=False,
    )
    assert (t.lr, m.decoder.input_noise, m.encoder.channels) == (1e-3, 2, 8)
    assert (train.lr, model.decoder.input_noise) != (1e-3, 2)  # the inputs are left as they were
    for bad, match in (
        ({"train.lrr": 1.0}, "no such setting"),
        ({"model.decoderr.input_noise": 1.0}, "no table"),
        ({"train.windows": "four"}, "windows"),
        ({"model.decoder.input_noise": -1.0}, "input_noise"),
        ({"optim.lr": 1.0}, "train.KEY"),
    ):
        with pytest.raises((KeyError, TypeError, ValueError), match=match):
            with_settings(model, train, bad, weights_fixed=False)
    # From a checkpoint, the weights fix the architecture; training-time settings may change.
    with pytest.raises(ValueError, match="weights fix it"):
        with_settings(model, train, {"model.encoder.channels": 8}, weights_fixed=True)
    m, _ = with_settings(
        model, train, {"model.decoder.jitter_probability": 0.3}, weights_fixed=True
    )
    assert m.decoder.jitter_probability == 0.3


def test_a_run_continued_with_set_trains_with_its_settings_and_keeps_them(data, tmp_path, capsys):
    """``--resume-from CKPT --set ...`` continues the saved run (weights, optimiser, data
    order) with other training-time settings, and its checkpoints carry them; ``--resume``
    refuses ``--set`` (a resume is bit for bit), and so does a setting the weights fix."""
    cfg = tiny_train_config(tmp_path / "t.toml", checkpoint_every=2)
    argv = ["--config", str(cfg), "--data", str(data), "--no-progress"]
    assert train_mod.main([*argv, "--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    kept = ckpt_io.checkpoint_path(tmp_path / "a", 2)
    noisy = ["--set", "model.decoder.input_noise=2.5", "train.lr=1e-3"]
    branch = [*argv, "--out", str(tmp_path / "b"), "--resume-from", str(kept), *noisy]
    assert train_mod.main([*branch, "--steps", "4"]) == 0
    assert "settings: model.decoder.input_noise = 2.5, train.lr = 0.001" in capsys.readouterr().err
    saved = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "b", 4))
    assert saved["model_config"]["decoder"]["input_noise"] == 2.5
    assert saved["train_config"]["lr"] == 1e-3
    # ... and trains with them: the optimiser restored from the kept run takes the new lr
    factor = TrainConfig(**saved["train_config"]).lr_factor
    groups = saved["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["lr"]) for g in groups] == [(1e-3, 1e-3 * factor(4))] * len(groups)
    assert saved["scheduler"]["base_lrs"] == [1e-3] * len(groups)
    plain = [*argv, "--out", str(tmp_path / "c"), "--resume-from", str(kept), "--steps", "4"]
    assert train_mod.main(plain) == 0
    other = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "c", 4))
    assert not torch.equal(
        saved["model"]["decoder.embed.weight"], other["model"]["decoder.embed.weight"]
    )
    resumed = [*argv, "--out", str(tmp_path / "a"), "--resume", "--steps", "4", *noisy]
    assert train_mod.main(resumed) == train_mod.EXIT_ERROR
    assert "--resume-from" in capsys.readouterr().err
    fixed = [*argv, "--out", str(tmp_path / "d"), "--resume-from", str(kept)]
    assert train_mod.main([*fixed, "--set", "model.encoder.channels=8"]) == train_mod.EXIT_ERROR
    assert "weights fix it" in capsys.readouterr().err
    assert train_mod.main([*fixed, "--set", "lr=1"]) == train_mod.EXIT_ERROR


def _decoder_keys(state: dict) -> list[str]:
    return [k for k in state if k.startswith("decoder.")]


def test_decoder_lr_scale_trains_the_decoder_at_a_multiple_of_lr(data, tmp_path):
    """``train.decoder_lr_scale`` sets the decoder's lr apart from the rest's: 0 keeps every
    decoder weight as the branch found it while the encoder trains on; the plain branch (the
    control) moves both; the optimiser's groups and the scheduler carry the scaled lr."""
    cfg = tiny_train_config(tmp_path / "t.toml", checkpoint_every=2)
    argv = ["--config", str(cfg), "--data", str(data), "--no-progress", "--steps", "4"]
    assert train_mod.main([*argv[:-2], "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    kept = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "a", 2))
    branch = [*argv, "--resume-from", str(ckpt_io.checkpoint_path(tmp_path / "a", 2))]

    def trained(name: str, *settings: str) -> dict:
        extra = ["--set", *settings] if settings else []
        assert train_mod.main([*branch, "--out", str(tmp_path / name), *extra]) == 0
        return ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / name, 4))

    frozen = trained("frozen", "train.decoder_lr_scale=0")
    plain = trained("plain")
    keys = _decoder_keys(kept["model"])
    assert keys and all(torch.equal(frozen["model"][k], kept["model"][k]) for k in keys)
    assert not all(torch.equal(plain["model"][k], kept["model"][k]) for k in keys)
    rest = [k for k in kept["model"] if k.startswith("encoder.") and "weight" in k]
    assert rest and not all(torch.equal(frozen["model"][k], kept["model"][k]) for k in rest)

    half = trained("half", "train.decoder_lr_scale=0.5")
    lr = load_train_config(cfg).lr
    factor = TrainConfig(**half["train_config"]).lr_factor(4)
    groups = half["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [lr, 0.5 * lr]
    assert [g["lr"] for g in groups] == pytest.approx([lr * factor, 0.5 * lr * factor])
    assert half["scheduler"]["base_lrs"] == [lr, 0.5 * lr]
    with pytest.raises(ValueError, match="decoder_lr_scale"):
        TrainConfig(decoder_lr_scale=-1.0).validate()


def test_a_frozen_decoder_leaves_the_gradient_clip_to_the_rest(data, tmp_path):
    """At ``decoder_lr_scale = 0`` the decoder's weights get no gradient, so the step's gradient
    norm (and the clip) is the encoder's and quantiser's alone, and their gradients are the ones
    the control, a plain trainer on the same batch, computes; the control's norm also counts
    the decoder's."""
    cfg = tiny_train_config(tmp_path / "f.toml")
    model_cfg, train_cfg = load_model_config(cfg), load_train_config(cfg)
    train_cfg.grad_clip = 0.0  # unclipped, so the gradients left behind give the logged norm

    def first_step(name: str, scale: float) -> tuple[float, dict, dict]:
        settings = dataclasses.replace(train_cfg, decoder_lr_scale=scale)
        trainer = train_mod.Trainer(model_cfg, settings, data, tmp_path / name, device="cpu")
        logged = trainer.train_step()["perf/grad_norm"]
        decoder = {id(p) for p in trainer.model.decoder.parameters()}
        named = dict(trainer.model.named_parameters())
        dec = {k: p.grad for k, p in named.items() if id(p) in decoder}
        rest = {k: p.grad for k, p in named.items() if id(p) not in decoder}
        return logged, dec, rest

    def norm(grads) -> float:
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    logged, dec, rest = first_step("frozen", 0.0)
    assert dec and all(g is None for g in dec.values())
    assert logged == pytest.approx(norm(rest.values()), rel=1e-5)
    logged_plain, dec_plain, rest_plain = first_step("plain", 1.0)
    assert all(g is not None for g in dec_plain.values())
    assert logged_plain == pytest.approx(
        norm([*dec_plain.values(), *rest_plain.values()]), rel=1e-5
    )
    assert logged_plain > logged
    for k, g in rest.items():
        torch.testing.assert_close(g, rest_plain[k], rtol=1e-4, atol=1e-7)


def test_a_one_group_optimiser_checkpoint_resumes_bit_for_bit(data, tmp_path, monkeypatch):
    """Checkpoints written before the decoder had an optimiser group of its own hold one
    AdamW group over ``model.parameters()``; resumed, they continue exactly as the same state
    laid out in two groups does. Loaded as they are, torch refuses them (the control)."""
    cfg = tiny_train_config(tmp_path / "t.toml", checkpoint_every=2)
    argv = ["--config", str(cfg), "--data", str(data), "--no-progress"]
    assert train_mod.main([*argv, "--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    new = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "a", 2))
    model = Autoencoder(load_model_config(cfg))
    rest, decoder = train_mod._decoder_split(model)
    assert decoder and rest
    groups = new["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(rest), len(decoder)]
    flat = [i for g in groups for i in g["params"]]  # ids in group order
    by_position = dict(zip(rest + decoder, flat, strict=True))
    old = copy.deepcopy(new)
    old["optimizer"] = {
        "state": {p: new["optimizer"]["state"][by_position[p]] for p in sorted(by_position)},
        "param_groups": [{**groups[0], "params": sorted(by_position)}],
    }
    old_path = tmp_path / "old.pt"
    torch.save(old, old_path)

    def resumed(name: str, path: Path) -> dict:
        out = tmp_path / name
        assert (
            train_mod.main([*argv, "--out", str(out), "--resume-from", str(path), "--steps", "4"])
            == 0
        )
        return ckpt_io.load(ckpt_io.checkpoint_path(out, 4))

    a = resumed("from-new", ckpt_io.checkpoint_path(tmp_path / "a", 2))
    b = resumed("from-old", old_path)
    _assert_same(a["model"], b["model"], "model")
    _assert_same(a["optimizer"], b["optimizer"], "optimizer")
    monkeypatch.setattr(train_mod, "regroup_optimizer_state", lambda saved, model: saved)
    with pytest.raises(ValueError, match="parameter groups"):
        train_mod.main([*argv, "--out", str(tmp_path / "c"), "--resume-from", str(old_path)])


def test_train_voices_draws_every_window_from_those_voices_only(data, tmp_path, capsys):
    """``train.voices`` keeps the dataset's speaker table (so a run on fewer voices branches
    from one on all) and draws training, validation and k-means windows from those voices
    only; an unknown or empty list is refused with the dataset's voices named."""
    ds = Dataset(data)
    every = _trainer(tiny_train_config(tmp_path / "all.toml"), data, tmp_path / "all")
    mixed = {ds.records[w.utt].speaker for _, ws in [every.sampler.next()] for w in ws}
    assert mixed == {0, 1}, "the control: without train.voices both voices are drawn"
    cfg = tiny_train_config(tmp_path / "b.toml", voices=["spk-b"])
    trainer = _trainer(cfg, data, tmp_path / "b")
    drawn = [w for _ in range(6) for w in trainer.sampler.next()[1]]
    assert {ds.records[w.utt].speaker for w in drawn} == {1}
    assert trainer.valid and {ds.records[w.utt].speaker for w in trainer.valid} == {1}
    assert "training and validating on spk-b only" in capsys.readouterr().err
    argv = ["--config", str(cfg), "--data", str(data), "--no-progress", "--steps", "1"]
    assert train_mod.main([*argv, "--out", str(tmp_path / "c")]) == 0
    saved = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "c", 1))
    assert saved["train_config"]["voices"] == ["spk-b"] and saved["speakers"] == ds.speakers
    bad = [*argv, "--out", str(tmp_path / "d"), "--set", 'train.voices=["nobody"]']
    assert train_mod.main(bad) == train_mod.EXIT_ERROR
    assert "nobody not in the dataset (its voices: spk-a, spk-b)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="non-empty list"):
        TrainConfig(voices=[]).validate()


# --- exact resume ------------------------------------------------------------------------------


def test_resume_continues_bit_for_bit(data, tmp_path):
    cfg = tiny_train_config(
        tmp_path / "t.toml", accumulation=2, windows=2, valid_every=2, checkpoint_every=2
    )

    def run(out, *extra):
        argv = ["--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress"]
        assert train_mod.main([*argv, *extra]) == 0

    run(tmp_path / "straight", "--steps", "6")
    run(tmp_path / "split", "--steps", "3")
    kept = tmp_path / "kept.pt"  # a checkpoint carried to another machine (a new --out)
    shutil.copy(ckpt_io.checkpoint_path(tmp_path / "split", 3), kept)
    run(tmp_path / "split", "--resume", "--steps", "6")
    run(tmp_path / "moved", "--resume-from", str(kept), "--steps", "6")
    a = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "straight", 6))
    b = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "split", 6))
    assert a["step"] == 6 and a["sampler"]["step"] + a["sampler"]["epoch"] > 0
    assert a["optimizer"]["state"], "the optimiser must have taken steps"
    _assert_same(a, b)
    moved = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "moved", 6))
    _assert_same(a, moved)
    _assert_same(
        ckpt_io.load(tmp_path / "straight" / ckpt_io.BEST),
        ckpt_io.load(tmp_path / "split" / ckpt_io.BEST),
        "best",
    )
    # Two processes wrote the split run's history, each step once.
    assert (tmp_path / "split" / "metrics.jsonl").read_text().count('"step": 4,') == 1


def test_resume_restores_the_dead_code_restart_generator(data, tmp_path, monkeypatch):
    """Codes die and restart at steps before and after the resume point (a dead-code threshold
    of 0.05, near the mean usage of tiny's 16 codes), and the resumed run still equals the
    unbroken one: the restarts draw from the generator that the checkpoint carries. In
    test_resume_continues_bit_for_bit no code dies, so that generator is never drawn."""
    cfg = tiny_train_config(
        tmp_path / "t.toml", accumulation=2, windows=2, valid_every=2, checkpoint_every=3
    )
    text = cfg.read_text()
    assert text.count("[model.quantizer]\n") == 1
    cfg.write_text(
        text.replace("[model.quantizer]\n", "[model.quantizer]\ndead_code_threshold = 0.05\n")
    )
    restarted: list[bool] = []  # per optimiser step, in the order the runs take them
    restart_dead = VectorQuantizer._restart_dead

    def recording(self, generator, broadcast):
        dead = self.ema_count < self.cfg.dead_code_threshold
        restart_dead(self, generator, broadcast)
        threshold = self.cfg.dead_code_threshold
        restarted.append(bool(dead.any()) and bool((self.ema_count[dead] == threshold).all()))

    monkeypatch.setattr(VectorQuantizer, "_restart_dead", recording)

    def run(out, *extra):
        argv = ["--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress"]
        assert train_mod.main([*argv, *extra]) == 0

    run(tmp_path / "straight", "--steps", "6")
    assert len(restarted) == 6 and any(restarted[:3]) and any(restarted[3:]), restarted
    run(tmp_path / "split", "--steps", "3")
    run(tmp_path / "split", "--resume", "--steps", "6")
    assert restarted[6:] == restarted[:6]
    a = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "straight", 6))
    b = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "split", 6))
    _assert_same(a, b)


# --- kill -9 -----------------------------------------------------------------------------------


def test_sigkill_at_random_moments_never_leaves_a_corrupt_checkpoint(data, tmp_path):
    # Far more steps than four attempts reach: a fast machine (tiny steps of ~20 ms) went
    # from 17 to 40 within them, finishing the run before the last kill.
    steps = 200
    cfg = tiny_train_config(tmp_path / "k.toml", checkpoint_every=1, keep_last=3, valid_every=3)
    out = tmp_path / "run"
    argv = [PYTHON, "-m", "training.train", "--config", str(cfg), "--data", str(data)]
    argv += ["--out", str(out), "--steps", str(steps), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(1234)
    progress, killed = [], 0
    for attempt in range(4):
        extra = ["--resume"] if attempt else []
        proc = subprocess.Popen([*argv, *extra], cwd=ROOT, env=env, stderr=subprocess.PIPE)
        # Wait until this attempt writes a checkpoint, then kill at a random moment after it.
        before = {p.name for _, p in ckpt_io.list_checkpoints(out)}
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            now = {p.name for _, p in ckpt_io.list_checkpoints(out)}
            if now - before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # a step or two: mid-step or mid-write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        proc.stderr.close()
        found = ckpt_io.list_checkpoints(out)
        for _, path in [*found, (None, out / ckpt_io.BEST)]:
            if path.exists():
                ckpt = ckpt_io.load(path)  # must never raise
                assert ckpt["train_config"]["checkpoint_every"] == 1
        progress.append(max(step for step, _ in found))
    assert killed >= 3 and progress[-1] < steps, "the kills came too late to test anything"
    assert progress == sorted(progress) and progress[-1] > progress[0]
    done = subprocess.run([*argv, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    final = ckpt_io.load(ckpt_io.checkpoint_path(out, steps))
    assert final["step"] == steps
    assert not list(out.glob(".*.tmp"))


def test_deterministic_setting_switches_the_process_to_reproducible_kernels(
    data, tmp_path, monkeypatch
):
    """``train.deterministic``: what makes CUDA resume bit for bit (tests/test_cuda.py proves
    that on a GPU); here, that the trainer sets the switches before building the model."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so restored after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        _trainer(tiny_train_config(tmp_path / "d.toml", deterministic=True), data, tmp_path / "r")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        train_mod.set_deterministic(False)
    _trainer(tiny_train_config(tmp_path / "n.toml"), data, tmp_path / "n")
    assert not torch.are_deterministic_algorithms_enabled()  # off unless asked for


# --- NaN handling ------------------------------------------------------------------------------


def _trainer(cfg_path, data, out) -> train_mod.Trainer:
    return train_mod.Trainer(
        load_model_config(cfg_path), load_train_config(cfg_path), data, out, device="cpu"
    )


def test_non_finite_step_is_skipped_without_touching_any_state(data, tmp_path):
    cfg = tiny_train_config(tmp_path / "n.toml")
    trainer = _trainer(cfg, data, tmp_path / "run")
    trainer.train_step()
    before = copy.deepcopy(
        {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    )
    weight = trainer.model.decoder.head[-1].weight
    with torch.no_grad():
        saved = weight[0, 0, 0].item()
        weight[0, 0, 0] = float("nan")
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1.0 and trainer.bad_in_a_row == 1
    with torch.no_grad():
        weight[0, 0, 0] = saved
    _assert_same(
        before,
        {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()},
    )
    assert float(trainer.model.quantizer.step_count.abs().sum()) == 0.0
    metrics = trainer.train_step()
    assert metrics["skipped"] == 0.0 and trainer.bad_in_a_row == 0 and trainer.step == 3
    assert not torch.equal(before["model"]["decoder.head.3.weight"], weight)


def test_max_bad_steps_in_a_row_write_a_checkpoint_and_exit(data, tmp_path, monkeypatch, capsys):
    cfg = tiny_train_config(tmp_path / "b.toml", max_bad_steps=3)
    real = train_mod.batch_loss
    calls = []

    def poisoned(out, count):
        terms = real(out, count)
        calls.append(1)
        if len(calls) > 2:  # two good steps, then NaN for ever
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(train_mod.Trainer, "loss", staticmethod(poisoned))
    out = tmp_path / "run"
    argv = ["--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress"]
    code = train_mod.main(argv)
    assert code == train_mod.EXIT_BAD_STEPS
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row" in err and "skipped (1 in a row)" in err
    ckpt = ckpt_io.load(ckpt_io.checkpoint_path(out, 5))
    assert ckpt["step"] == 5 and ckpt["bad_in_a_row"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# --- learning ----------------------------------------------------------------------------------


def test_loss_falls_on_real_speech(data, tmp_path):
    cfg = tiny_train_config(
        tmp_path / "l.toml", lr=0.03, predictions=256, windows=8, valid_windows=16, warmup_steps=5
    )
    trainer = _trainer(cfg, data, tmp_path / "run")
    first = trainer.validate()
    assert first == pytest.approx(math.log(256), abs=0.3)  # an untrained model is near uniform
    history = [trainer.train_step() for _ in range(40)]
    last = trainer.validate()
    # Measured: 5.61 -> 5.41 nats/sample after 40 steps (5.21 after 80); the clips' mu-law
    # marginal entropy is 5.28, so the end of the run already uses the past samples.
    assert last < first - 0.1, (first, last)
    ce = [m["loss/ce"] for m in history]
    assert np.mean(ce[-10:]) < np.mean(ce[:10]) - 0.05
    assert all(m["skipped"] == 0 for m in history)
    assert all(math.isfinite(m["vq/perplexity"]) and m["vq/codes_used"] >= 1 for m in history)


# --- data parallel -----------------------------------------------------------------------------


def _ddp_model(seed: int = 0) -> Autoencoder:
    cfg = load_model_config("tiny")
    cfg.decoder.jitter_probability = 0.5
    torch.manual_seed(seed)
    model = Autoencoder(cfg).double().train()
    dim = model.features.dim
    model.features.set_statistics(torch.linspace(-1, 1, dim), torch.linspace(5, 20, dim))
    return model


def _ddp_windows(dataset: Dataset, geometry) -> list[Window]:
    """Eight windows of 60 predictions, two of them cut short by their utterance's end."""
    out = []
    for i, utt in enumerate(range(len(dataset))):
        left, _, _ = geometry.padding(dataset.records[utt].length)
        end = left + dataset.records[utt].length
        out.append(Window(utt, left + 17 * i + 3, 60))
        if i < 2:
            out.append(Window(utt, end - 25 - 9 * i, 60))
    return out[:8]


def _step_results(model, batches, world_reduce, broadcast) -> dict[str, torch.Tensor]:
    sums = train_mod.accumulate(model, batches)
    inner = model_of(model)
    res = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    q = inner.quantizer
    res["step_count"], res["step_sum"] = q.step_count.clone(), q.step_sum.clone()
    q.ema_update(
        reduce=world_reduce, generator=torch.Generator().manual_seed(9), broadcast=broadcast
    )
    res.update(
        codebook=q.codebook.clone(), ema_count=q.ema_count.clone(), ema_sum=q.ema_sum.clone()
    )
    res["count"] = torch.tensor(float(sums.count))
    return res


def _same(x):
    return x


def model_of(m):
    return m.module if hasattr(m, "module") else m


def _ddp_worker(
    rank: int, world: int, data: str, out: str, init_file: str, device: str = "cpu"
) -> None:
    """One rank of a gloo group (CPU tensors, or CUDA ones when ``device`` is cuda: gloo moves
    them, so two ranks can share one GPU, which NCCL refuses)."""
    import torch.distributed as tdist

    from training import distributed as dist

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # not the hostname's address: sandboxes may block it
    tdist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=DIST_TIMEOUT,  # a stuck collective fails the test instead of hanging CI
    )
    try:
        dataset = Dataset(data)
        model = _ddp_model().to(device)
        model.quantizer.cfg.dead_code_threshold = 0.0  # no restarts: candidates differ by rank
        loader = Loader(dataset, model.geometry, seed=11, dtype=torch.float64)
        windows = _ddp_windows(dataset, model.geometry)[rank * 4 : (rank + 1) * 4]
        batches = [loader.batch(windows[i : i + 2], 3, 60).to(device) for i in (0, 2)]
        ids = [0] if device == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False
        )
        res = _step_results(ddp, batches, dist.all_reduce_mean, dist.broadcast)
        # A second step where every code is dead: restarts must agree on every rank.
        model.quantizer.cfg.dead_code_threshold = 1e9
        model.zero_grad()
        train_mod.accumulate(ddp, batches)
        model.quantizer.ema_update(
            reduce=dist.all_reduce_mean,
            generator=torch.Generator().manual_seed(100 + rank),  # must not matter
            broadcast=dist.broadcast,
        )
        res["restarted_codebook"] = model.quantizer.codebook.clone()
        torch.save({k: v.cpu() for k, v in res.items()}, Path(out) / f"rank{rank}.pt")
        del ddp  # before the group: see `training.distributed.shutdown`
    finally:
        dist.shutdown()


def test_two_gloo_ranks_equal_one_rank_in_float64(data, tmp_path):
    check_two_ranks_equal_one(data, tmp_path, "cpu")


def check_two_ranks_equal_one(data, tmp_path, device: str) -> None:
    import torch.multiprocessing as mp

    dataset = Dataset(data)
    model = _ddp_model().to(device)
    model.quantizer.cfg.dead_code_threshold = 0.0
    loader = Loader(dataset, model.geometry, seed=11, dtype=torch.float64)
    windows = _ddp_windows(dataset, model.geometry)
    batches = [loader.batch(windows[i : i + 4], 3, 60).to(device) for i in (0, 4)]
    assert sum(b.n_valid() for b in batches) < 8 * 60, "some windows must be masked"
    single = {k: v.cpu() for k, v in _step_results(model, batches, _same, _same).items()}

    mp.spawn(
        _ddp_worker,
        args=(2, str(data), str(tmp_path), str(tmp_path / "init"), device),
        nprocs=2,
        join=True,
        daemon=True,  # a worker left behind by a failure must not keep pytest from exiting
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, ref in single.items():
        for r, res in enumerate(ranks):
            if name in ("step_count", "step_sum"):
                continue  # per-rank shares; their reduce is compared through the EMA buffers
            err = (res[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-300)
            assert err <= 1e-9, f"rank {r} {name}: relative error {float(err):.2e}"
    shares = ranks[0]["step_count"] + ranks[1]["step_count"]
    assert torch.allclose(shares / 2, single["step_count"], rtol=1e-9, atol=0)
    assert torch.equal(ranks[0]["restarted_codebook"], ranks[1]["restarted_codebook"])
    assert not torch.equal(ranks[0]["restarted_codebook"], ranks[0]["codebook"])


def torchrun_two_ranks(cfg: Path, data: Path, out: Path, steps: int, timeout: float):
    """``python -m training.train`` under torchrun with two gloo ranks on the CPU; returns the
    finished process, which must have succeeded."""
    torchrun = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--local-addr", "127.0.0.1", "--nproc_per_node", "2"]
    cmd += ["-m", "training.train", "--config", str(cfg), "--data", str(data)]
    cmd += ["--out", str(out), "--steps", str(steps), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    done = run_process_group(cmd, timeout=timeout, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process group: gloo, 2 rank(s); device cpu" in done.stderr
    return done


DDP_STEPS = 3  # a checkpoint at step 2 (checkpoint_every) and at the end, step 3


def ddp_config(path: Path, compile_: bool) -> Path:
    return tiny_train_config(path, compile=compile_, valid_every=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def eager_ddp_run(data, tmp_path_factory) -> Path:
    """One eager training run under torchrun with two ranks, launched once for two tests: the
    command-line test checks it and the compiled-DDP test compares with it. Validation at step
    2; checkpoints at step 2 (periodic) and at the end (step 3)."""
    root = tmp_path_factory.mktemp("ddp")
    out = root / "eager"
    torchrun_two_ranks(ddp_config(root / "eager.toml", False), data, out, DDP_STEPS, 300)
    return out


def test_training_cli_runs_under_torchrun_with_two_ranks(eager_ddp_run):
    for step in (2, DDP_STEPS):
        ckpt = ckpt_io.load(ckpt_io.checkpoint_path(eager_ddp_run, step))
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == step
        assert math.isfinite(ckpt["best_valid_ce"])


def _weights_and_moments(out: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's weights and AdamW moments (the moments carry the gradients' scale,
    which Adam's normalised update hides from the weights)."""
    ckpt = ckpt_io.load(ckpt_io.checkpoint_path(out, step))
    out = dict(ckpt["model"])
    for i, st in ckpt["optimizer"]["state"].items():
        out[f"exp_avg.{i}"], out[f"exp_avg_sq.{i}"] = st["exp_avg"], st["exp_avg_sq"]
    return out


def test_compiled_model_under_ddp_trains_like_eager_ddp(data, tmp_path, eager_ddp_run):
    """``compile = true`` under torchrun (DDP around the compiled model, as configs/default.toml
    runs on several GPUs; gloo on CPU here): two ranks train the eager run's parameters and
    optimiser moments."""
    out = tmp_path / "compiled"
    done = torchrun_two_ranks(ddp_config(tmp_path / "c.toml", True), data, out, DDP_STEPS, 600)
    assert "train.compile: the first step compiles" in done.stderr
    steps = (2, DDP_STEPS)
    states = {
        False: {k: _weights_and_moments(eager_ddp_run, k) for k in steps},
        True: {k: _weights_and_moments(out, k) for k in steps},
    }

    def same(name: str, v: torch.Tensor, w: torch.Tensor) -> bool:
        if not v.is_floating_point():
            return torch.equal(v, w)
        if name.startswith("exp_avg"):  # tiny values: relative to the tensor's largest
            return float((v - w).abs().max()) <= 1e-4 * float(v.abs().max())
        return torch.allclose(v, w, atol=1e-5, rtol=1e-4)

    def close(a: dict, b: dict) -> bool:
        assert a.keys() == b.keys()
        return all(same(k, v, b[k]) for k, v in a.items())

    assert all(close(states[False][k], states[True][k]) for k in steps)
    # Negative control: the comparison tells two steps from three.
    assert not close(states[False][2], states[False][DDP_STEPS])


def test_bf16_autocast_step_keeps_the_quantiser_in_fp32(data):
    """The mixed-precision path of the trainer (bf16 autocast; CUDA in runs, the same code on
    CPU here, and on CUDA in tests/test_cuda.py): the quantiser's distances, codes and
    commitment stay fp32, the EMA usage weights still sum to 1, and the loss and gradients are
    finite and close to the fp32 step's."""
    check_bf16_autocast_step(data, "cpu")


def check_bf16_autocast_step(data, device: str) -> None:
    dataset = Dataset(data)
    results = {}
    for name, autocast in (
        ("fp32", None),
        ("bf16", lambda: torch.autocast(device, dtype=torch.bfloat16)),
    ):
        torch.manual_seed(0)
        model = Autoencoder(load_model_config("tiny")).train().to(device)
        dim = model.features.dim
        model.features.set_statistics(torch.linspace(-1, 1, dim), torch.linspace(5, 20, dim))
        seen = {}
        model.quantizer.register_forward_hook(lambda m, a, out, seen=seen: seen.update(out=out))
        loader = Loader(dataset, model.geometry, seed=11)
        windows = _ddp_windows(dataset, model.geometry)
        batches = [loader.batch(windows[:4], 0, 60), loader.batch(windows[4:], 0, 60)]
        batches = [b.to(device) for b in batches]
        kwargs = {} if autocast is None else {"autocast": autocast}
        sums = train_mod.accumulate(model, batches, **kwargs)
        out = seen["out"]
        assert out.quantized.dtype == out.commitment.dtype == torch.float32, name
        assert float(model.quantizer.step_count.sum()) == pytest.approx(1.0, abs=1e-6)
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        results[name] = (float(sums.loss), torch.cat([g.flatten() for g in grads]).cpu())
    (loss32, g32), (loss16, g16) = results["fp32"], results["bf16"]
    assert math.isfinite(loss16) and abs(loss16 - loss32) < 2e-2 * loss32
    cosine = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    assert 0.9 < cosine < 1.0  # bf16 changes the numbers (the autocast was active) but not much


def test_compiled_training_steps_equal_eager_ones(data, tmp_path, monkeypatch):
    """``train.compile = true`` (torch.compile, on CPU here) trains the same function: two
    steps give the eager run's parameters, codebook and losses up to float reordering."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "compile_threads", 1)  # no worker pool left behind
    runs = {}
    for compile_ in (False, True):
        cfg = tiny_train_config(tmp_path / f"c{compile_}.toml", compile=compile_)
        trainer = _trainer(cfg, data, tmp_path / f"run{compile_}")
        losses = [trainer.train_step()["loss/total"] for _ in range(2)]
        runs[compile_] = (losses, copy.deepcopy(trainer.model.state_dict()))
    (eager_losses, eager), (compiled_losses, compiled) = runs[False], runs[True]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for name, value in eager.items():
        if value.is_floating_point():
            assert torch.allclose(value, compiled[name], atol=1e-5, rtol=1e-4), name
        else:
            assert torch.equal(value, compiled[name]), name


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_seed_outside_int64_is_rejected(seed):
    """The jitter hash reads the seed as an int64 tensor (`Windows`)."""
    with pytest.raises(ValueError, match=r"train.seed must lie in \[0, 2\*\*63\)"):
        TrainConfig(seed=seed).validate()
    assert TrainConfig(seed=2**63 - 1).validate().seed == 2**63 - 1


def test_amp_autocasts_to_bf16_on_cpu_too(data, tmp_path):
    """``train.amp`` is bf16 autocast on the CPU as well as on CUDA (bf16 matrix products are
    the fast path of CPUs with AMX or AVX-512 BF16); off, the step runs in fp32."""
    for amp in (True, False):
        cfg = tiny_train_config(tmp_path / f"amp{amp}.toml", amp=amp)
        trainer = _trainer(cfg, data, tmp_path / f"run{amp}")
        with trainer._autocast():
            active = torch.is_autocast_enabled("cpu")
            dtype = torch.get_autocast_dtype("cpu")
        assert active == amp
        if amp:
            assert dtype == torch.bfloat16
        metrics = trainer.train_step()
        assert math.isfinite(metrics["loss/total"])


def test_time_budgets_stop_with_a_checkpoint(data, tmp_path, capsys):
    """``--cpu-minutes``/``--minutes`` end the run after the step that spends them, with a
    checkpoint to resume from; a non-positive budget is a usage error."""
    cfg = tiny_train_config(tmp_path / "t.toml", total_steps=10**6, checkpoint_every=10**6)
    cfg = str(cfg)
    out = tmp_path / "run"
    argv = ["--config", cfg, "--data", str(data), "--out", str(out), "--no-progress"]
    assert train_mod.main([*argv, "--cpu-minutes", "0.05"]) == 0
    assert "time budget spent" in capsys.readouterr().err
    steps = [step for step, _ in ckpt_io.list_checkpoints(out)]
    assert steps and 1 <= max(steps) < 10**6  # stopped by the budget
    assert train_mod.main([*argv, "--resume", "--minutes", "0.03"]) == 0
    assert max(step for step, _ in ckpt_io.list_checkpoints(out)) > max(steps)
    assert train_mod.main([*argv, "--resume", "--minutes", "0"]) == train_mod.EXIT_ERROR
    assert "--minutes must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint(data, tmp_path, signum):
    """Ctrl-C (or a scheduler's SIGTERM) mid-run: the run finishes its step, writes a
    checkpoint of it although none is due, says so and exits with 128 + the signal's number;
    --resume continues from that step. Without the handler the process dies with a traceback
    and everything since the last due checkpoint is lost."""
    cfg = tiny_train_config(tmp_path / "s.toml", total_steps=10**6, checkpoint_every=10**6)
    out = tmp_path / "run"
    argv = [PYTHON, "-m", "training.train", "--config", str(cfg), "--data", str(data)]
    argv += ["--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"stopped by {signal.Signals(signum).name} after step" in err
    assert "Traceback" not in err
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert [step for step, _ in ckpt_io.list_checkpoints(out)] == [last] and last >= 3
    more = subprocess.run(
        [*argv, "--resume", "--steps", str(last + 2)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert more.returncode == 0, more.stderr[-2000:]
    assert f"done at step {last + 2}" in more.stderr


def test_a_second_signal_acts_at_once_and_handlers_come_back():
    from training.stop_signal import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested(torch.device("cpu")) and stop.exit_status == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
