"""A slowly varying random curve over an utterance's samples, a pure function of indices.

The decoder's past is perturbed in training by settings that drift over time (`model.past_gain`,
`model.past_tilt`). Each curve is linear between knots ``every`` samples apart, each knot a
counter-based hash (`model.jitter`) of ``(seed, epoch, utterance + salt, knot index)``: the
value at sample ``s`` is the same in every window that reads it, so the batched gradient stays
the mean of per-prediction gradients (`training.invariance`), and each perturbation draws its
own knots through its own salt.
"""

from __future__ import annotations

import torch

from model.jitter import uniform_hash


def knot_curve(
    every: int, seed, epoch, utt: torch.Tensor, index: torch.Tensor, *, salt: int
) -> torch.Tensor:
    """Values in ``[-1, 1]`` for each element of the broadcast of ``utt`` and ``index``
    (absolute sample indices of the padded utterance): linear between knots at multiples of
    ``every``, each knot uniform in ``[-1, 1]``."""
    index = torch.as_tensor(index, dtype=torch.int64)
    knot = torch.div(index, every, rounding_mode="floor")
    frac = (index - knot * every).double() / every
    lo = uniform_hash(seed, epoch, utt + salt, knot)
    hi = uniform_hash(seed, epoch, utt + salt, knot + 1)
    return 2.0 * (lo + (hi - lo) * frac) - 1.0
