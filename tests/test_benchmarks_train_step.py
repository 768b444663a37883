"""Smoke tests of the training-step benchmark at the tiny config (seconds, not minutes)."""

from __future__ import annotations

import json

import torch

from benchmarks import train_step
from benchmarks.train_step import NaiveDecoder, build, main, make_workload
from model.decoder import WaveNetDecoder, _RepeatByIndex
from training.loss import batch_loss
from training.windows import Utterance, WindowSpec, make_batch

TINY = ["--configs", "tiny", "--n", "150", "--windows", "2", "--reps", "1", "--warmup", "1"]
CPU = torch.device("cpu")


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_benchmark_prints_json_rows_and_table_with_equal_losses(capsys):
    assert main([*TINY, "--no-memory"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    meas = [r for r in rows if r["kind"] == "measurement"]
    (cmp,) = [r for r in rows if r["kind"] == "comparison"]
    assert [r["variant"] for r in meas] == ["ours", "naive"]
    for r in meas:
        assert r["config"] == "tiny" and r["device"] == "cpu" and r["bench"] == "train_step"
        assert r["predictions"] == 300 and r["samples_per_s"] > 0 and r["samples_per_cpu_s"] > 0
    ours, naive = meas
    assert cmp["ratio_ours_over_naive"] == round(ours["samples_per_s"] / naive["samples_per_s"], 3)
    assert cmp["loss_ok"] and cmp["loss_rel_diff"] <= train_step.LOSS_TOLERANCE
    assert cmp["loss_spread_within_variant"] == 0.0  # every repetition is the same step
    assert 0 < cmp["grad_max_rel_diff"] < 1e-4  # same function, different rounding
    assert "| tiny | cpu | 2 x 150 |" in out


def test_benchmark_fails_when_the_naive_reference_computes_something_else(capsys, monkeypatch):
    def perturbed(config, variant, seed, device):
        model = build(config, variant, seed, device)
        if variant == "naive":
            with torch.no_grad():
                model.decoder.inner.head[-1].bias[0] += 1.0
        return model

    monkeypatch.setattr(train_step, "build", perturbed)
    assert main([*TINY, "--no-memory"]) == 1
    err = capsys.readouterr().err
    assert "losses differ" in err


def test_naive_decoder_matches_ours_without_calling_its_forward():
    ours, naive = build("tiny", "ours", 0, CPU), build("tiny", "naive", 0, CPU)
    assert isinstance(naive.decoder, NaiveDecoder)
    called = []
    naive.decoder.inner.register_forward_hook(lambda *a: called.append(1))
    work = make_workload(ours, 200, 3, seed=5)
    out_o = ours(work.wave, work.windows, work.n)
    out_n = naive(work.wave, work.windows, work.n)
    assert not called
    torch.testing.assert_close(out_n.logits, out_o.logits, rtol=1e-5, atol=1e-5)
    # The reference really differs in arithmetic (full-rate projections), not only in name.
    assert not torch.equal(out_n.logits, out_o.logits)
    batch_loss(out_o, work.count).loss.backward()
    batch_loss(out_n, work.count).loss.backward()
    grads_n = dict(naive.decoder.inner.named_parameters())
    for name, p in ours.decoder.named_parameters():
        torch.testing.assert_close(grads_n[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_naive_upsampling_equals_the_gather_of_the_geometry_index_on_masked_rows():
    """Repetition with a per-row phase reproduces ``cond.gather(cond_index)``, also where a
    window runs past its utterance's end and the index is clamped."""
    model = build("tiny", "naive", 0, CPU)
    captured = {}

    def grab(module, args, output):
        captured["cond"], captured["index"] = args[1], args[2]

    model.decoder.register_forward_hook(grab)
    geo = model.geometry
    g = torch.Generator().manual_seed(0)
    utts = [
        Utterance.prepare(torch.rand(n, generator=g) - 0.5, geo, utt=i)
        for i, n in enumerate((300, 517))
    ]
    specs = [WindowSpec(0, utts[0].first + 3, 400), WindowSpec(1, utts[1].first + 11, 400)]
    wave, win, n = make_batch(geo, utts, specs)
    assert int(win.n_valid.min()) < n  # a masked row: its index is clamped at the end
    model(wave, win, n)
    cond, index = captured["cond"], captured["index"]
    expected = cond.gather(2, index[:, None, :].expand(-1, cond.shape[1], -1))
    assert torch.equal(model.decoder.upsample(cond, index), expected)


def test_memory_probe_reports_peak_rss_of_a_fresh_process():
    args = train_step.get_parser().parse_args(TINY)
    mem = train_step.probe_memory(args, "tiny", "naive")
    assert mem["peak_rss_mb"] > mem["step_rss_mb"] >= 0


def test_cli_rejects_bad_sizes(capsys):
    assert main(["--configs", "tiny", "--n", "0"]) == 2
    assert "error" in capsys.readouterr().err


def test_naive_decoder_shares_the_parameters_of_the_wrapped_decoder():
    inner = build("tiny", "ours", 0, CPU).decoder
    assert isinstance(inner, WaveNetDecoder)
    naive = NaiveDecoder(inner, hop=16)
    assert {id(p) for p in naive.parameters()} == {id(p) for p in inner.parameters()}


def test_decoder_gather_backward_equals_the_gather_gradient():
    """The decoder's one-hot backward (the optimisation this benchmark measured, then its
    successor) gives the gradient of ``torch.gather``, with empty slots and a clamped run at
    the end."""
    g = torch.Generator().manual_seed(3)
    c = torch.randn(2, 9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([[1] * 3 + [2] * 4 + [4] * 4 + [8] * 9, [0] * 4 + [3] * 4 + [5] * 12])
    weight = torch.randn(2, index.shape[1], 5, dtype=torch.float64, generator=g)
    (ours,) = torch.autograd.grad((_RepeatByIndex.apply(c, index) * weight).sum(), c)
    expanded = index[:, :, None].expand(-1, -1, 5)
    (ref,) = torch.autograd.grad((c.gather(1, expanded) * weight).sum(), c)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(_RepeatByIndex.apply(c, index), c.gather(1, expanded))
