"""Chorowski et al. (2019) convolutional encoder: features at 100 Hz -> vectors at 50 Hz.

Valid convolutions only (no padding anywhere), so a frame's vector depends on its own samples
and nothing else: the same frame computed in two windows is the same number. Residuals are
centre-cropped to the valid output.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import EncoderConfig
from model.geometry import Conv


class _ResidualConv(nn.Module):
    """``relu(conv(x)) + crop(x)`` for a valid, odd-kernel, stride-1 convolution."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel)
        self.crop = (kernel - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return y + x[..., self.crop : x.shape[-1] - self.crop]


class Encoder(nn.Module):
    """Features ``[B, C_in, M]`` -> continuous latents ``[B, D, F]``.

    Frame ``j`` of the output reads feature frames ``[j*stride, j*stride + rf)``.
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: EncoderConfig):
        super().__init__()
        c = cfg.channels
        self.stride = cfg.stride
        self.conv_in = nn.Conv1d(in_dim, c, 3)
        self.res1 = _ResidualConv(c, 3)
        self.down = nn.Conv1d(c, c, 2 * cfg.stride, stride=cfg.stride)
        self.res2 = nn.Sequential(_ResidualConv(c, 3), _ResidualConv(c, 3))
        self.res_1x1 = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(cfg.n_residual_1x1))
        self.proj = nn.Conv1d(c, out_dim, 1)

    def layers(self) -> list[Conv]:
        """Geometry of this module, input first."""
        return [
            Conv(3),
            Conv(3),
            Conv(2 * self.stride, stride=self.stride),
            Conv(3),
            Conv(3),
        ]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_in(feats))
        x = self.res1(x)
        x = torch.relu(self.down(x))
        x = self.res2(x)
        for layer in self.res_1x1:
            x = x + torch.relu(layer(x))
        return self.proj(x)
