"""Smoke tests of the trainer-throughput benchmark on CPU at the tiny config (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.train_throughput import main
from tests.test_data import write_clip_dataset
from training.train import set_deterministic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_clip_dataset(tmp_path_factory.mktemp("clips"))


@pytest.fixture
def restore_determinism():
    yield
    set_deterministic(False)


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_benchmark_times_trainer_steps_and_leaves_determinism_as_it_found_it(
    data, capsys, restore_determinism
):
    argv = ["--config", "tiny", "--data", str(data), "--device", "cpu", "--steps", "3"]
    argv += ["--skip", "1", "--windows", "2"]
    argv += ["--variants", "bf16-deterministic", "bf16", "fp32"]
    assert main([*argv, "--profile", "1"]) == 0
    out = capsys.readouterr().out
    det, bf16, fp32 = _rows(out)
    assert det["deterministic"] and not bf16["deterministic"] and not fp32["deterministic"]
    assert not torch.are_deterministic_algorithms_enabled()  # reset after its variant
    for r in (det, bf16, fp32):
        assert r["bench"] == "train_throughput" and r["windows"] == 2 and r["timed_steps"] == 2
        assert r["samples_per_s"] >= r["samples_per_s_min"] > 0
        assert r["amp"] == r["variant"].startswith("bf16")  # bf16 autocasts on CPU too
        assert r["profile_wall_ms_per_step"] > 0
    # Same seed, same steps: on CPU the deterministic switch changes nothing; autocast does.
    assert det["loss_first"] == bf16["loss_first"] and det["loss_last"] == bf16["loss_last"]
    assert bf16["loss_first"] != fp32["loss_first"]
    assert bf16["loss_first"] == pytest.approx(fp32["loss_first"], rel=1e-2)
    assert "# profile: tiny fp32, 1 steps" in out and "aten::" in out
    assert "| tiny | cpu | fp32 | 2 x " in out


def test_benchmark_rejects_steps_not_above_skip(data, capsys):
    assert main(["--config", "tiny", "--data", str(data), "--device", "cpu", "--steps", "2"]) == 2
    assert "--steps must exceed --skip" in capsys.readouterr().err


def test_a_failing_variant_is_reported_and_fails_the_run(tmp_path, capsys):
    assert main(["--config", "tiny", "--data", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "error: fp32:" in err and "error: bf16-compile:" in err


def test_a_variant_that_fails_mid_run_still_switches_determinism_back(
    data, capsys, monkeypatch, restore_determinism
):
    from benchmarks import train_throughput

    def broken(self):
        assert torch.are_deterministic_algorithms_enabled()  # the variant's own setting
        raise RuntimeError("step failed")

    monkeypatch.setattr(train_throughput.Trainer, "train_step", broken)
    argv = ["--config", "tiny", "--data", str(data), "--device", "cpu", "--steps", "2"]
    assert main([*argv, "--skip", "1", "--variants", "bf16-deterministic"]) == 1
    assert "error: bf16-deterministic: RuntimeError: step failed" in capsys.readouterr().err
    assert not torch.are_deterministic_algorithms_enabled()


def test_scatter_variants_swap_the_decoders_gather_backward(data, capsys, monkeypatch):
    """``fp32-scatter`` runs PyTorch's own gather backward (no one-hot product), ``fp32`` the
    decoder's; the swap is undone afterwards, and the losses agree."""
    from model import decoder

    calls = []
    real = decoder.sum_by_index

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "sum_by_index", counting)
    argv = ["--config", "tiny", "--data", str(data), "--device", "cpu", "--steps", "2"]
    argv += ["--skip", "1", "--windows", "2", "--variants"]
    assert main([*argv, "fp32-scatter"]) == 0
    assert calls == [] and decoder.repeat_by_index is not decoder.gather
    assert main([*argv, "fp32"]) == 0
    assert len(calls) > 0
    scatter, segment = _rows(capsys.readouterr().out)
    assert scatter["variant"] == "fp32-scatter" and segment["variant"] == "fp32"
    assert scatter["loss_first"] == pytest.approx(segment["loss_first"], rel=1e-6)


def test_conv_variant_runs_the_channel_major_reference(data, capsys, monkeypatch):
    """``fp32-conv`` times the earlier channel-major forward (the speed-up's reference): it
    runs instead of the decoder's own forward, which is back afterwards; losses agree."""
    from benchmarks import conv_decoder
    from model import decoder

    own, calls = decoder.WaveNetDecoder.forward, []
    reference = conv_decoder.conv_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return reference(*args, **kwargs)

    monkeypatch.setattr("benchmarks.train_throughput.conv_forward", counting)
    argv = ["--config", "tiny", "--data", str(data), "--device", "cpu", "--steps", "2"]
    argv += ["--skip", "1", "--windows", "2", "--variants", "fp32-conv", "fp32"]
    assert main(argv) == 0
    assert len(calls) > 0 and decoder.WaveNetDecoder.forward is own
    conv, ours = _rows(capsys.readouterr().out)
    assert conv["variant"] == "fp32-conv" and ours["variant"] == "fp32"
    assert conv["loss_first"] == pytest.approx(ours["loss_first"], rel=1e-5)
