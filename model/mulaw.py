"""Mu-law companding between waveforms in [-1, 1] and Q classes."""

from __future__ import annotations

import math

import torch


def encode(x: torch.Tensor, q: int = 256) -> torch.Tensor:
    """Waveform in [-1, 1] -> class indices in [0, q)."""
    mu = q - 1
    y = torch.sign(x) * torch.log1p(mu * x.abs().clamp(max=1.0)) / math.log1p(mu)
    return ((y + 1) / 2 * mu + 0.5).floor().long().clamp(0, mu)


def decode(c: torch.Tensor, q: int = 256) -> torch.Tensor:
    """Class indices -> waveform in [-1, 1]."""
    mu = q - 1
    y = 2 * c.double() / mu - 1
    return torch.sign(y) * ((1 + mu) ** y.abs() - 1) / mu
