"""MFCC + delta + delta-delta features with valid framing, from plain torch ops.

The windowed DFT is one strided convolution, the mel filterbank and DCT are matrix products:
all of it exports to ONNX and matches `torchaudio.transforms.MFCC(center=False)` without its
window-dependent ``top_db`` clamp (a clamp relative to the loudest frame of the input would make
a frame's features depend on the window it was computed in). Deltas are valid convolutions
(torchaudio's formula, no replicate padding). Normalisation statistics are fixed buffers.
"""

from __future__ import annotations

import math

import torch
import torchaudio
from torch import nn

from model.config import FeatureConfig
from model.geometry import Conv


class MFCC(nn.Module):
    """Waveform ``[B, L]`` -> normalised features ``[B, 3 * n_mfcc, M]``, valid framing.

    Feature frame ``i`` is centred on STFT frame ``i + 2 * delta_width`` and reads samples
    ``[i * hop, i * hop + win_length + 4 * delta_width * hop)``.
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        n_freq = cfg.n_fft // 2 + 1
        window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
        n = torch.arange(cfg.win_length, dtype=torch.float64)
        k = torch.arange(n_freq, dtype=torch.float64)
        phase = 2 * math.pi * torch.outer(k, n) / cfg.n_fft
        basis = torch.cat([torch.cos(phase), -torch.sin(phase)]) * window  # [2F, win]
        self.register_buffer("dft", basis[:, None, :].float())
        fb = torchaudio.functional.melscale_fbanks(
            n_freq,
            cfg.f_min,
            cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2,
            cfg.n_mels,
            cfg.sample_rate,
        )
        self.register_buffer("mel_fb", fb.float())  # [F, n_mels]
        dct = torchaudio.functional.create_dct(cfg.n_mfcc, cfg.n_mels, "ortho")
        self.register_buffer("dct", dct.float())  # [n_mels, n_mfcc]
        w = cfg.delta_width
        taps = torch.arange(-w, w + 1, dtype=torch.float64)
        delta = taps / (taps**2).sum()  # torchaudio: sum_n n (c[t+n] - c[t-n]) / (2 sum n^2)
        self.register_buffer("delta", delta.repeat(cfg.n_mfcc, 1)[:, None, :].float())
        dim = 3 * cfg.n_mfcc
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @property
    def dim(self) -> int:
        return 3 * self.cfg.n_mfcc

    def layers(self) -> list[Conv]:
        """Geometry: STFT framing, then delta and delta-delta (valid, 2*width+1 taps each)."""
        c = self.cfg
        return [Conv(c.win_length, stride=c.hop_length), Conv(4 * c.delta_width + 1)]

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the normalisation (computed once from the training set)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).clamp_min(1e-5))

    def mfcc(self, wave: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> ``[B, n_mfcc, M0]`` static MFCCs, valid framing."""
        if wave.shape[-1] < self.cfg.win_length:
            raise ValueError(
                f"features need at least {self.cfg.win_length} samples, got {wave.shape[-1]}"
            )
        spec = nn.functional.conv1d(wave[:, None, :], self.dft, stride=self.cfg.hop_length)
        re, im = spec.chunk(2, dim=1)  # [B, F, M0]
        power = re * re + im * im
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb)  # [B, M0, n_mels]
        db = 10.0 * torch.log10(mel.clamp_min(1e-10))
        return torch.matmul(db, self.dct).transpose(1, 2)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        w = self.cfg.delta_width
        need = self.cfg.win_length + 4 * w * self.cfg.hop_length
        if wave.shape[-1] < need:  # before `mfcc`, whose own minimum is one STFT window
            raise ValueError(f"features need at least {need} samples, got {wave.shape[-1]}")
        c = self.mfcc(wave)  # [B, n_mfcc, M0]
        d1 = nn.functional.conv1d(c, self.delta, groups=c.shape[1])
        d2 = nn.functional.conv1d(d1, self.delta, groups=c.shape[1])
        feats = torch.cat(
            [c[..., 2 * w : c.shape[-1] - 2 * w], d1[..., w : d1.shape[-1] - w], d2], 1
        )
        return (feats - self.mean[:, None]) / self.std[:, None]
