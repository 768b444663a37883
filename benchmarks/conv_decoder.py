"""The decoder's earlier channel-major forward: the reference its speed is measured against.

``benchmarks.train_throughput``'s ``-conv`` variants put `conv_forward` in place of
`model.decoder.WaveNetDecoder.forward` to time the whole trainer step as it ran before the
decoder went time-major: one ``nn.Conv1d`` call per layer on ``[B, C, T]``, each layer's skip
projection on its own, and the conditioning gather's backward as a `segment_sum` over runs of
equal indices (``benchmarks.gather_backward`` compares that with the model's one-hot product).
Same parameters, same outputs up to rounding (``tests/test_decoder.py``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def segment_sum(grad: torch.Tensor, index: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Sums of ``grad [B, C, T]`` over each run of equal ``index [B, T]`` -> ``[B, C, n_cols]``.

    ``index`` must be non-decreasing in every row. One ``segment_reduce`` over all rows, run
    lengths by ``searchsorted`` (no host sync, deterministic); bf16 and fp16 are summed in fp32
    (``segment_reduce`` accumulates in the input's type, and a bf16 sum of 320 ones is 256).
    """
    b, c, _ = grad.shape
    dtype = grad.dtype
    if dtype in (torch.bfloat16, torch.float16):
        grad = grad.float()
    cols = torch.arange(n_cols + 1, device=index.device).expand(b, -1).contiguous()
    lengths = torch.searchsorted(index.contiguous(), cols).diff(dim=1)  # [B, n_cols]
    lengths = lengths[:, None, :].expand(-1, c, -1).reshape(b * c, n_cols)
    out = torch.segment_reduce(grad.reshape(b * c, -1), "sum", lengths=lengths, axis=1, unsafe=True)
    return out.view(b, c, n_cols).to(dtype)


class _RepeatByRuns(torch.autograd.Function):
    """``c [B, C, K]`` gathered along time by a non-decreasing ``index [B, T]`` -> ``[B, C, T]``;
    backward by `segment_sum`."""

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


def conv_forward(self, inputs: torch.Tensor, cond: torch.Tensor, cond_index: torch.Tensor):
    """`WaveNetDecoder.forward`'s contract (``[B, Q, N]`` logits), computed channel-major."""
    g = self.cfg.gate_channels
    x = self.embed(inputs).transpose(1, 2)  # [B, R, T]
    n_out = inputs.shape[1] - sum((self.cfg.kernel_size - 1) * d for d in self.dilations)
    if n_out < 1:
        raise ValueError(f"the decoder needs more than {inputs.shape[1]} input samples")
    skips = 0
    for i, conv in enumerate(self.dilated):
        h = conv(x)  # [B, 2G, T_i]
        idx = cond_index[:, cond_index.shape[1] - h.shape[-1] :]
        h = h + _RepeatByRuns.apply(cond[:, i * 2 * g : (i + 1) * 2 * g], idx)
        a, b = h.chunk(2, dim=1)
        z = torch.tanh(a) * torch.sigmoid(b)  # [B, G, T_i]
        skips = skips + self.skip[i](z[..., z.shape[-1] - n_out :])
        if i < len(self.residual):
            x = x[..., x.shape[-1] - z.shape[-1] :] + self.residual[i](z)
    return self.head(skips)
