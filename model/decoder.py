"""WaveNet decoder conditioned on quantised slots and a speaker.

Conditioning is projected for every layer at once at the slot rate (50 Hz) and gathered per
sample, 320x cheaper than projecting an upsampled full-rate tensor; the gather is the
upsampling-by-repetition of docs/DESIGN.md (its backward sums runs of equal indices with
``segment_reduce``: faster than the gather's own ``scatter_add``, deterministic, and without
Inductor's slow kernels for it; ``benchmarks/gather_backward.py``). The last layer has no
residual projection (its output would be unused, and every parameter must receive gradient for
DDP).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from model.config import DecoderConfig
from model.geometry import Conv, Upsample


def segment_sum(grad: torch.Tensor, index: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Sums of ``grad [B, C, T]`` over each run of equal ``index [B, T]`` -> ``[B, C, n_cols]``.

    ``index`` must be non-decreasing in every row. One ``segment_reduce`` over all rows, run
    lengths by ``searchsorted``: no host sync and no atomics, so it is deterministic on CUDA
    (``benchmarks/gather_backward.py`` compares it with ``scatter_add``). bf16 and fp16 are
    summed in fp32: ``segment_reduce`` accumulates in the input's type, and a bf16 sum of 320
    ones is 256.
    """
    b, c, _ = grad.shape
    dtype = grad.dtype
    if dtype in (torch.bfloat16, torch.float16):
        grad = grad.float()
    cols = torch.arange(n_cols + 1, device=index.device).expand(b, -1).contiguous()
    lengths = torch.searchsorted(index.contiguous(), cols).diff(dim=1)  # [B, n_cols]
    lengths = lengths[:, None, :].expand(-1, c, -1).reshape(b * c, n_cols)
    # unsafe: skip segment_reduce's own checks of the lengths, each a host sync on CUDA
    out = torch.segment_reduce(grad.reshape(b * c, -1), "sum", lengths=lengths, axis=1, unsafe=True)
    return out.view(b, c, n_cols).to(dtype)


def _check_non_decreasing(index: torch.Tensor) -> None:
    """ValueError on CPU; elsewhere, and under torch.compile, an asynchronous assert (a
    RuntimeError, on CUDA at a later synchronisation, which ends the process's CUDA use)."""
    ok = (index[:, 1:] >= index[:, :-1]).all()
    message = "cond_index must be non-decreasing along time in every row"
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        if not ok:
            raise ValueError(message)
    else:  # asynchronous: a host check would stall CUDA's launch queue and break compiled graphs
        torch._assert_async(ok, message)


class _RepeatByIndex(torch.autograd.Function):
    """``c [B, K, C]`` gathered along time by ``index [B, T]`` (non-decreasing in every row).

    The forward is ``torch.gather``; the backward is `segment_sum`, which sums each run of
    equal indices instead of the gather's per-element ``scatter_add``.
    """

    @staticmethod
    def forward(ctx, c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.n_cols = c.shape[-1]
        return c.gather(2, index[:, None, :].expand(-1, c.shape[1], -1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return segment_sum(grad.contiguous(), index, ctx.n_cols), None


def repeat_by_index(c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Training's conditioning gather (``benchmarks.train_throughput`` swaps in `gather` to
    compare)."""
    return _RepeatByIndex.apply(c, index)


def gather(c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``c [B, K, C]`` gathered along time by ``index [B, T]``, with PyTorch's own backward."""
    return c.gather(2, index[:, None, :].expand(-1, c.shape[1], -1))


class WaveNetDecoder(nn.Module):
    def __init__(self, latent_dim: int, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.dilations = cfg.dilations
        n_layers, g = len(self.dilations), cfg.gate_channels
        r, s, q = cfg.residual_channels, cfg.skip_channels, cfg.quantization_channels
        self.cond_conv = nn.Conv1d(latent_dim, cfg.cond_channels, cfg.cond_kernel)
        self.speaker = nn.Embedding(cfg.n_speakers, cfg.speaker_dim)
        self.cond_proj = nn.Conv1d(cfg.cond_channels, n_layers * 2 * g, 1)
        self.speaker_proj = nn.Linear(cfg.speaker_dim, n_layers * 2 * g, bias=False)
        self.embed = nn.Embedding(q, r)
        self.dilated = nn.ModuleList(
            nn.Conv1d(r, 2 * g, cfg.kernel_size, dilation=d) for d in self.dilations
        )
        self.residual = nn.ModuleList(nn.Conv1d(g, r, 1) for _ in self.dilations[:-1])
        self.skip = nn.ModuleList(nn.Conv1d(g, s, 1) for _ in self.dilations)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(s, s, 1), nn.ReLU(), nn.Conv1d(s, q, 1))

    def conditioning_layers(self, hop: int, shift: int) -> list:
        """Geometry from slots to decoder time: conditioning conv, then repetition by ``hop``."""
        return [Conv(self.cfg.cond_kernel), Upsample(hop, offset=shift)]

    def wavenet_layers(self) -> list[Conv]:
        k = self.cfg.kernel_size
        return [Conv(k, dilation=d, offset=-d * (k - 1)) for d in self.dilations]

    def condition(self, slots: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        """Per-layer gate conditioning at the slot rate.

        Args:
            slots: quantised vectors per slot ``[B, D, n_slots]``.
            speaker: speaker ids ``[B]``.

        Returns:
            ``[B, n_layers * 2 * G, n_slots - cond_kernel + 1]``; index ``c`` reads slots
            ``[c, c + cond_kernel)``.
        """
        c = self.cond_proj(self.cond_conv(slots))
        return c + self.speaker_proj(self.speaker(speaker))[:, :, None]

    def forward(
        self, inputs: torch.Tensor, cond: torch.Tensor, cond_index: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            inputs: mu-law classes of the autoregressive input ``[B, T]``; position ``i``
                holds ``x[tau - 1]`` for decoder time ``tau = T_first + i``.
            cond: output of `condition` ``[B, n_layers * 2G, C]``.
            cond_index: conditioning index of each decoder time from the first layer's first
                output on ``[B, T - span_0]`` (later layers use a suffix).

        Returns:
            logits ``[B, Q, N]`` with ``N = T - sum of spans``: the last N decoder times.
        """
        g = self.cfg.gate_channels
        x = self.embed(inputs).transpose(1, 2)  # [B, R, T]
        n_out = inputs.shape[1] - sum((self.cfg.kernel_size - 1) * d for d in self.dilations)
        if n_out < 1:
            raise ValueError(f"the decoder needs more than {inputs.shape[1]} input samples")
        # The segment-sum backward needs runs of equal indices (true of repetition; checked).
        repeat = gather
        if cond.requires_grad and torch.is_grad_enabled():
            _check_non_decreasing(cond_index)
            repeat = repeat_by_index
        skips = 0
        for i, conv in enumerate(self.dilated):
            h = conv(x)  # [B, 2G, T_i]
            idx = cond_index[:, cond_index.shape[1] - h.shape[-1] :]
            c = cond[:, i * 2 * g : (i + 1) * 2 * g]
            h = h + repeat(c, idx)
            a, b = h.chunk(2, dim=1)
            z = torch.tanh(a) * torch.sigmoid(b)  # [B, G, T_i]
            skips = skips + self.skip[i](z[..., z.shape[-1] - n_out :])
            if i < len(self.residual):
                x = x[..., x.shape[-1] - z.shape[-1] :] + self.residual[i](z)
        return self.head(skips)
