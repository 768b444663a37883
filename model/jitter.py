"""Time jitter (Chorowski et al. 2019) as a pure function of absolute indices.

Slot ``k`` of utterance ``u`` carries frame ``clamp(k + delta, 0, F - 1)`` with ``delta`` in
{-1, 0, +1} drawn from a counter-based hash of ``(seed, epoch, u, k)``. Every window that holds
slot ``k`` draws the same ``delta``, so jitter never depends on how predictions are batched.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 lanes holding 32-bit values (low bits of products
    are exact under int64 wrap-around, so masking after each product keeps it exact)."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


def uniform_hash(seed, epoch, utt: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1), one per element of the broadcast of ``utt`` and ``k``.

    ``seed`` and ``epoch`` (ints in [0, 2**63) or 0-d int64 tensors, as `Windows` holds them)
    enter as int64 tensors: as Python integers made symbolic by torch.compile, Inductor
    (torch 2.11, CPU) typed them as float in C++ that did not build."""
    h = _mix32(torch.as_tensor(k, dtype=torch.int64) + 0x9E3779B9)
    h = _mix32(h ^ _mix32(torch.as_tensor(utt, dtype=torch.int64) + 0x7F4A7C15))
    epoch_ = torch.as_tensor(epoch, dtype=torch.int64, device=h.device)
    seed_ = torch.as_tensor(seed, dtype=torch.int64, device=h.device)
    h = _mix32(h ^ ((epoch_ * 0x2545F491 + 0x68E31DA4) & _MASK))
    h = _mix32(h ^ ((seed_ * 0x27D4EB2F + 0x165667B1) & _MASK))
    return h.double() / 2.0**32


def jitter_offsets(
    p: float, seed: int, epoch: int, utt: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """``delta_k`` in {-1, 0, +1}: P(-1) = P(+1) = p / 2."""
    u = uniform_hash(seed, epoch, utt, k)
    return (u < p / 2).long() * -1 + ((u >= p / 2) & (u < p)).long()


def slot_frames(
    k: torch.Tensor,
    n_frames: torch.Tensor,
    *,
    p: float,
    seed: int,
    epoch: int,
    utt: torch.Tensor,
) -> torch.Tensor:
    """Frame ``pi(k)`` carried by absolute slot ``k`` (``[B, S]``), clamped to the utterance.

    Args:
        k: absolute slot indices ``[B, S]``.
        n_frames: frames in each utterance ``[B]``.
        utt: utterance ids ``[B]``.
    """
    k = k.long()
    if p > 0:
        k = k + jitter_offsets(p, seed, epoch, utt[:, None], k)
    return torch.minimum(k.clamp_min(0), n_frames[:, None].long() - 1)
