"""Conditioning dropout in training: spans of the decoder's codes replaced by a null.

Guidance at generation time (classifier-free guidance, `benchmarks.code_guidance`) pushes each
step's logits away from those under a null conditioning, towards the codes. A decoder that
never saw a null in training has no meaningful prediction under one, and guiding away from it
only hurts. With ``decoder.cond_dropout = p`` each run of ``decoder.cond_dropout_every``
conditioning indices of an utterance is dropped with probability ``p``: its code term is zero
and only the speaker remains (`model.decoder.WaveNetDecoder.condition`). A zero null loses
nothing against a learned vector: the code projection's bias and the gates' biases can shift
by any constant between them, which moves the null relative to the codes as a learned one would.

The choice is a counter-based hash (`model.jitter`) of ``(seed, epoch, utterance, index //
every)`` with absolute conditioning indices, so every window that reads an index reads it
dropped or not alike, and the batched gradient stays the mean of per-prediction gradients
(`training.invariance`).
"""

from __future__ import annotations

import torch

from model.jitter import uniform_hash

# Added to the utterance id so these draws are none of the other perturbations' (other salts);
# utterance ids stay far below.
_SALT = 0x60000000


def dropped_conditioning(
    fraction: float, every: int, *, seed, epoch, utt: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Whether each absolute conditioning index ``index`` ``[B, C]`` of utterances ``utt``
    ``[B]`` is dropped: runs of ``every`` indices, each with probability ``fraction``."""
    span = torch.div(index, every, rounding_mode="floor")
    return uniform_hash(seed, epoch, utt[:, None] + _SALT, span) < fraction
