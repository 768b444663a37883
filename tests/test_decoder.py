"""The decoder's conditioning gather: its segment-sum backward against autograd's scatter_add."""

from __future__ import annotations

import pytest
import torch

from model.decoder import WaveNetDecoder, _RepeatByIndex, segment_sum
from training.config import load_model_config


def runs_index(batch: int, length: int, n_cols: int, seed: int) -> torch.Tensor:
    """Non-decreasing rows with uneven runs and columns no sample reads (empty segments)."""
    g = torch.Generator().manual_seed(seed)
    steps = (torch.rand(batch, length, generator=g) < 0.05).long()
    steps[:, 0] = torch.randint(0, 3, (batch,), generator=g)  # rows start past column 0
    steps[steps.bool() & (torch.rand(batch, length, generator=g) < 0.3)] = 2  # skip a column
    return steps.cumsum(1).clamp(max=n_cols - 1)


def autograd_backward(c: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    c = c.detach().requires_grad_(True)
    c.gather(2, index[:, None, :].expand(-1, c.shape[1], -1)).backward(grad)
    return c.grad


def check_segment_sum(device: str) -> None:
    batch, channels, length, n_cols = 3, 5, 400, 20
    index = runs_index(batch, length, n_cols, seed=1).to(device)
    assert (index.diff(dim=1) == 2).any(), "the index should leave some columns empty"
    assert (index[:, 0] > 0).any(), "some row should start past column 0"
    assert (index[:, -1] == n_cols - 1).all(), "every row should end in a clamped last run"
    g = torch.Generator().manual_seed(2)
    c = torch.randn(batch, channels, n_cols, dtype=torch.float64, generator=g).to(device)
    grad = torch.randn(batch, channels, length, dtype=torch.float64, generator=g).to(device)
    want = autograd_backward(c, index, grad)
    torch.testing.assert_close(segment_sum(grad, index, n_cols), want, rtol=1e-12, atol=1e-12)
    # Through the autograd function as the decoder calls it, non-contiguous gradient included.
    leaf = c.detach().requires_grad_(True)
    out = _RepeatByIndex.apply(leaf, index)
    torch.testing.assert_close(out, c.gather(2, index[:, None].expand(-1, channels, -1)))
    wide = torch.stack([grad, -grad], dim=-1)[..., 0]  # a strided view equal to grad
    out.backward(wide)
    torch.testing.assert_close(leaf.grad, want, rtol=1e-12, atol=1e-12)


def test_segment_sum_equals_the_gathers_own_backward():
    check_segment_sum("cpu")


def check_low_precision_sums(device: str) -> None:
    """bf16 gradients are summed in fp32: 320 ones make 320, not bf16's 256 (the negative
    control: ``segment_reduce`` on the bf16 values themselves)."""
    index = (torch.arange(1000, device=device) // 320)[None].contiguous()
    ones = torch.ones(1, 2, 1000, dtype=torch.bfloat16, device=device)
    got = segment_sum(ones, index, 4)
    assert got.dtype == torch.bfloat16
    assert got[0, :, :3].eq(320).all() and got[0, :, 3].eq(40).all(), got
    lengths = torch.tensor([[320, 320, 320, 40]] * 2, device=device)
    naive = torch.segment_reduce(ones[0], "sum", lengths=lengths, axis=1)
    assert naive[0, 0] != 320, "bf16 accumulation should lose the count (negative control)"


def test_low_precision_gradients_are_summed_in_fp32():
    check_low_precision_sums("cpu")


def test_decoder_refuses_a_decreasing_conditioning_index():
    cfg = load_model_config("tiny")
    dec = WaveNetDecoder(cfg.quantizer.dim, cfg.decoder)
    n_layers, g = len(dec.dilations), dec.cfg.gate_channels
    span = sum((dec.cfg.kernel_size - 1) * d for d in dec.dilations)
    length = span + 50
    inputs = torch.randint(0, dec.cfg.quantization_channels, (1, length))
    cond = torch.randn(1, n_layers * 2 * g, 4, requires_grad=True)
    first = dec.wavenet_layers()[0].span
    good = torch.linspace(0, 3, length - first).long()[None].expand(2, -1)
    inputs, cond = inputs.expand(2, -1), cond.expand(2, -1, -1)
    assert dec(inputs, cond, good).shape == (2, dec.cfg.quantization_channels, 50)
    bad = torch.stack([good[0], good[1].flip(0)])  # only the second row decreases
    with pytest.raises(ValueError, match="non-decreasing"):
        dec(inputs, cond, bad)
    with torch.no_grad():  # inference uses the plain gather: any index is fine
        dec(inputs, cond, bad)
