"""The decoder's own draws in its past in training (parallel scheduled sampling).

Teacher forcing feeds the decoder the true past; in generation it reads its own draws, and
what it makes of a past it produced itself is never trained. With ``decoder.past_draws = p``
a gradient-free first pass predicts every past sample the training pass will read, from the
true past before it, and draws one class from each prediction; each past sample is then
replaced by its draw with probability ``p`` (Duckworth et al. 2019 do the same for
transformers). The targets stay the true samples: the decoder learns to predict the truth
from a past that holds its own mistakes.

The draw of sample ``s`` is an inverse-CDF draw whose uniform, like the choice to replace
``s``, is a counter-based hash (`model.jitter`) of ``(seed, epoch, utterance, s)``; its
distribution is the decoder's prediction of ``s`` from the true samples before ``s`` and the
codes of ``s``'s slots. So every window that reads ``s`` reads the same draw, and the batched
gradient stays the mean of per-prediction gradients (`training.invariance`), provided each
window's segment also holds the input of those first-pass predictions: a second
autoregressive context before its own (`model.geometry.CodecGeometry`, ``drawn_past``).
"""

from __future__ import annotations

import torch

from model.jitter import uniform_hash

# Added to the utterance id so these draws are neither jitter's nor those of the other
# perturbations of the past (other salts); utterance ids stay far below.
_SALT_CHOICE = 0x30000000
_SALT_DRAW = 0x50000000


def drawn_classes(
    logits: torch.Tensor, *, seed, epoch, utt: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """One class per column of ``logits`` ``[B, Q, T]`` (predictions of absolute samples
    ``index`` ``[B, T]`` of utterances ``utt`` ``[B]``), drawn from their softmax by inverse
    CDF at a hashed uniform -> ``[B, T]``."""
    cdf = torch.cumsum(torch.softmax(logits.double(), dim=1), dim=1)
    u = uniform_hash(seed, epoch, utt[:, None] + _SALT_DRAW, index)
    return (cdf < u[:, None]).sum(1).clamp(max=logits.shape[1] - 1)


def chosen(fraction: float, *, seed, epoch, utt: torch.Tensor, index: torch.Tensor):
    """Whether each past sample at ``index`` ``[B, T]`` is replaced by its draw (probability
    ``fraction``, a hash of the index)."""
    return uniform_hash(seed, epoch, utt[:, None] + _SALT_CHOICE, index) < fraction
