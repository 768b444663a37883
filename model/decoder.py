"""WaveNet decoder conditioned on quantised slots and a speaker.

The teacher-forced pass runs time-major (``[B, T, C]``): every layer is a matrix product over
the channels (a kernel-2 dilated convolution is one product whose two taps are read at a
shift of its dilation), which CPUs run without the layout conversions a bf16 convolution
pays on each call, and PyTorch's CPU and CUDA matrix products accumulate bf16 in fp32. The
modules stay ``nn.Conv1d`` (the checkpoint format and the ONNX step read their weights).

Conditioning is projected for every layer at once at the slot rate (50 Hz) and gathered per
sample, 320x cheaper than projecting an upsampled full-rate tensor; the gather is the
upsampling-by-repetition of docs/DESIGN.md. Its backward (`sum_by_index`) is one batched
matrix product with the one-hot index: deterministic, no atomics, bf16 summed in fp32. The
last layer has no residual projection (its output would be unused, and every parameter must
receive gradient for DDP); the skip projections of all layers are one product over the
concatenated gate outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from model.config import DecoderConfig
from model.geometry import Conv, Upsample


def sum_by_index(grad: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sums of ``grad [B, T, C]`` over the times of each index -> ``[B, n_rows, C]``.

    The backward of gathering rows ``[B, n_rows, C]`` by ``index [B, T]``. One ``bmm`` with
    the one-hot index: deterministic on every device (no ``scatter_add`` atomics), and bf16
    gradients are accumulated in fp32 by the matrix product (a bf16 running sum of 320 ones
    is 256).
    """
    one_hot = grad.new_zeros(*index.shape, n_rows).scatter_(2, index[..., None], 1)  # [B, T, n]
    return torch.bmm(one_hot.transpose(1, 2), grad)


class _RepeatByIndex(torch.autograd.Function):
    """``c [B, K, C]`` gathered along time by ``index [B, T]`` -> ``[B, T, C]``.

    The forward is ``torch.gather``; the backward is `sum_by_index` instead of the gather's
    per-element ``scatter_add``.
    """

    @staticmethod
    def forward(ctx, c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.n_rows = c.shape[1]
        return gather(c, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return sum_by_index(grad, index, ctx.n_rows), None


def repeat_by_index(c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Training's conditioning gather (``benchmarks.train_throughput`` swaps in `gather` to
    compare)."""
    return _RepeatByIndex.apply(c, index)


def gather(c: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``c [B, K, C]`` gathered along time by ``index [B, T]``, with PyTorch's own backward."""
    return c.gather(1, index[:, :, None].expand(-1, -1, c.shape[-1]))


def pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-1 ``conv`` applied to time-major ``x [B, T, C_in]`` -> ``[B, T, C_out]``."""
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


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

    def condition(
        self, slots: torch.Tensor, speaker: torch.Tensor, dropped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-layer gate conditioning at the slot rate.

        Args:
            slots: quantised vectors per slot ``[B, D, n_slots]``.
            speaker: speaker ids ``[B]``.
            dropped: optional ``[B, n_slots - cond_kernel + 1]``, true where the codes' term is
                the null (zero), leaving the speaker's (`model.cond_dropout`).

        Returns:
            ``[B, n_layers * 2 * G, n_slots - cond_kernel + 1]``; index ``c`` reads slots
            ``[c, c + cond_kernel)``.
        """
        c = self.cond_proj(self.cond_conv(slots))
        if dropped is not None:
            c = c.masked_fill(dropped[:, None, :], 0.0)
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
        k, g = self.cfg.kernel_size, self.cfg.gate_channels
        n_out = inputs.shape[1] - sum((k - 1) * d for d in self.dilations)
        if n_out < 1:
            raise ValueError(f"the decoder needs more than {inputs.shape[1]} input samples")
        x = self.embed(inputs)  # [B, T, R]: time-major from here to the logits
        cond = cond.transpose(1, 2)  # [B, C, n_layers * 2G]
        gates = []
        for i, (conv, d) in enumerate(zip(self.dilated, self.dilations)):
            n_in = x.shape[1]
            n = n_in - (k - 1) * d
            # All taps in one product, [B, n_in, k * 2G]; tap j is read j * d samples later.
            taps = F.linear(x, conv.weight.permute(2, 0, 1).flatten(0, 1))
            h = taps[:, :n, : 2 * g]
            for j in range(1, k):
                h = h + taps[:, j * d : j * d + n, j * 2 * g : (j + 1) * 2 * g]
            c = repeat_by_index(cond[..., i * 2 * g : (i + 1) * 2 * g], cond_index[:, -n:])
            h = h + conv.bias.to(h.dtype) + c
            a, b = h.chunk(2, dim=-1)
            z = torch.tanh(a) * torch.sigmoid(b)  # [B, n, G]
            gates.append(z[:, n - n_out :])
            if i < len(self.residual):
                x = x[:, n_in - n :] + pointwise(self.residual[i], z)
        skip_weight = torch.cat([s.weight[:, :, 0] for s in self.skip], dim=1)  # [S, n_layers G]
        skip_bias = sum(s.bias for s in self.skip)  # not stack().sum(): its grads alias
        skips = F.linear(torch.cat(gates, dim=-1), skip_weight, skip_bias)
        _, hidden, _, logits = self.head
        return pointwise(logits, F.relu(pointwise(hidden, F.relu(skips)))).transpose(1, 2)
