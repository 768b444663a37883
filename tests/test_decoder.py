"""The decoder: its time-major forward against the channel-major reference, and its
conditioning gather's one-hot backward against autograd's scatter_add."""

from __future__ import annotations

import torch

from benchmarks.conv_decoder import conv_forward
from model.decoder import WaveNetDecoder, _RepeatByIndex, sum_by_index
from training.config import load_model_config


def runs_index(batch: int, length: int, n_rows: int, seed: int) -> torch.Tensor:
    """Non-decreasing rows with uneven runs and rows no sample reads (empty segments)."""
    g = torch.Generator().manual_seed(seed)
    steps = (torch.rand(batch, length, generator=g) < 0.05).long()
    steps[:, 0] = torch.randint(0, 3, (batch,), generator=g)  # rows start past row 0
    steps[steps.bool() & (torch.rand(batch, length, generator=g) < 0.3)] = 2  # skip a row
    return steps.cumsum(1).clamp(max=n_rows - 1)


def autograd_backward(c: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    c = c.detach().requires_grad_(True)
    c.gather(1, index[:, :, None].expand(-1, -1, c.shape[-1])).backward(grad)
    return c.grad


def check_sum_by_index(device: str) -> None:
    batch, channels, length, n_rows = 3, 5, 400, 20
    g = torch.Generator().manual_seed(2)
    runs = runs_index(batch, length, n_rows, seed=1)
    assert (runs.diff(dim=1) == 2).any(), "the index should leave some rows empty"
    assert (runs[:, -1] == n_rows - 1).all(), "every row should end in a clamped last run"
    shuffled = runs[:, torch.randperm(length, generator=g)]  # the product needs no runs
    for index in (runs.to(device), shuffled.to(device)):
        c = torch.randn(batch, n_rows, channels, dtype=torch.float64, generator=g).to(device)
        grad = torch.randn(batch, length, channels, dtype=torch.float64, generator=g).to(device)
        want = autograd_backward(c, index, grad)
        torch.testing.assert_close(sum_by_index(grad, index, n_rows), want, rtol=0, atol=1e-12)
        # Through the autograd function as the decoder calls it, non-contiguous gradient too.
        leaf = c.detach().requires_grad_(True)
        out = _RepeatByIndex.apply(leaf, index)
        assert torch.equal(out, c.gather(1, index[..., None].expand(-1, -1, channels)))
        wide = torch.stack([grad, -grad], dim=-1)[..., 0]  # a strided view equal to grad
        out.backward(wide)
        torch.testing.assert_close(leaf.grad, want, rtol=0, atol=1e-12)


def test_sum_by_index_equals_the_gathers_own_backward():
    check_sum_by_index("cpu")


def check_low_precision_sums(device: str) -> None:
    """bf16 gradients are summed in fp32: 320 ones make 320, not bf16's 256 (the negative
    control: a running sum in bf16 itself)."""
    index = (torch.arange(1000, device=device) // 320)[None].contiguous()
    ones = torch.ones(1, 1000, 2, dtype=torch.bfloat16, device=device)
    got = sum_by_index(ones, index, 4)
    assert got.dtype == torch.bfloat16
    assert got[0, :3].eq(320).all() and got[0, 3].eq(40).all(), got
    naive = torch.zeros(2, dtype=torch.bfloat16, device=device)
    for row in ones[0, :320]:
        naive = naive + row
    assert naive[0] == 256, "bf16 accumulation should lose the count (negative control)"


def test_low_precision_gradients_are_summed_in_fp32():
    check_low_precision_sums("cpu")


def test_time_major_forward_equals_the_channel_major_reference():
    """Logits and every gradient equal the earlier ``nn.Conv1d`` forward's in float64 (the
    speed-up changed the layout, not the function), for the default kernel and a wider one."""
    cfg = load_model_config("tiny").decoder
    for kernel in (2, 3):
        cfg.kernel_size = kernel
        torch.manual_seed(0)
        dec = WaveNetDecoder(8, cfg).double()
        span = sum((kernel - 1) * d for d in dec.dilations)
        length, first = span + 40, dec.wavenet_layers()[0].span
        inputs = torch.randint(0, cfg.quantization_channels, (2, length))
        cond = torch.randn(2, len(dec.dilations) * 2 * cfg.gate_channels, 6, dtype=torch.float64)
        index = torch.sort(torch.randint(0, 6, (2, length - first)), dim=1).values
        results = []
        for forward in (WaveNetDecoder.forward, conv_forward):
            leaf = cond.clone().requires_grad_(True)
            dec.zero_grad()
            for _ in range(2):  # accumulated: no two parameters' gradients may share memory
                logits = forward(dec, inputs, leaf, index)
                weight = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64)
                (logits * weight.view_as(logits)).sum().backward()
            grads = [p.grad.clone() for p in dec.parameters() if p.grad is not None]
            results.append((logits.detach(), leaf.grad, grads))
        (new, new_cond, new_grads), (ref, ref_cond, ref_grads) = results
        assert new.shape == ref.shape == (2, cfg.quantization_channels, 40)
        torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new_cond, ref_cond, rtol=1e-10, atol=1e-12)
        assert (
            len(new_grads) == len(ref_grads) == len(list(dec.parameters())) - 6
        )  # not: condition()
        for a, b in zip(new_grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_forward_in_bf16_stays_close_to_fp32():
    """Under bf16 autocast the logits stay within bf16 rounding of fp32 (the gates, the
    conditioning and the skip sum stay bf16 rather than promoting to fp32)."""
    cfg = load_model_config("tiny").decoder
    torch.manual_seed(1)
    dec = WaveNetDecoder(8, cfg)
    span = sum(d for d in dec.dilations)
    inputs = torch.randint(0, cfg.quantization_channels, (2, span + 30))
    cond = torch.randn(2, len(dec.dilations) * 2 * cfg.gate_channels, 4)
    index = (torch.arange(inputs.shape[1] - dec.wavenet_layers()[0].span) // 20).clamp(max=3)
    index = index[None].expand(2, -1)
    ref = dec(inputs, cond, index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dec(inputs, cond.bfloat16(), index)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05, err
