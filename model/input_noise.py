"""Noise on the decoder's autoregressive input in training, a pure function of absolute indices.

Teacher forcing feeds the decoder the true past samples; in generation it reads its own draws,
which scatter over several mu-law classes. A decoder trained only on the clean past may read
that scatter as signal (in a pause, as the start of speech) and follow it rather than the
codes. With ``decoder.input_noise = sigma`` the class of every past sample the decoder reads
in training moves by ``round(sigma * z)``, ``z`` standard normal, clamped to the classes (the
targets stay clean), as LPCNet does for the same reason (Valin and Skoglund, 2019).

``z`` comes from the counter-based hash of `model.jitter` over ``(seed, epoch, utterance,
sample index)``, so every window that reads sample ``s`` reads it with the same noise and the
batched gradient stays the mean of per-prediction gradients (`training.invariance`).
"""

from __future__ import annotations

import math

import torch

from model.jitter import uniform_hash

# Added to the utterance id so the noise's draws are not jitter's (which hashes slot indices
# of the same utterance ids); utterance ids stay far below it.
_SALT = 0x40000000


def noise_offsets(
    sigma: float, seed, epoch, utt: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """``round(sigma * z)`` per element of the broadcast of ``utt`` and ``index`` (absolute
    sample indices of the padded utterance), ``z`` standard normal (Box-Muller over two
    hashed uniforms)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    u1 = uniform_hash(seed, epoch, utt + _SALT, 2 * index)
    u2 = uniform_hash(seed, epoch, utt + _SALT, 2 * index + 1)
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)  # 1 - u1 in (0, 1]
    return torch.round(sigma * z).long()


def noisy_classes(
    classes: torch.Tensor,
    q: int,
    sigma: float,
    *,
    seed,
    epoch,
    utt: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Mu-law ``classes`` ``[B, T]`` of samples at absolute ``index`` ``[B, T]`` of utterances
    ``utt`` ``[B]``, moved by `noise_offsets` and clamped to ``[0, q)``."""
    return (classes + noise_offsets(sigma, seed, epoch, utt[:, None], index)).clamp(0, q - 1)
