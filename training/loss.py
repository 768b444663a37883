"""The per-prediction loss whose batch gradient is the mean of per-prediction gradients.

For prediction t: ``l_t = CE_t + beta * commit_t (+ codebook_t)``, where ``commit_t`` is the mean
of ``d[pi(k)]`` over the slots ``k in [lo(t), hi(t)]`` that reach t. The per-frame ``d`` is
routed through the same jitter gather as the decoder's conditioning (a frame used twice counts
twice) and averaged per prediction with a prefix sum; the batch loss is the sum over valid
predictions divided by the caller's count (the all-reduced count of the whole optimiser step).
Autograd then weights each frame by exactly its use (docs/DESIGN.md, "The heart").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.autoencoder import AutoencoderOutput


@dataclass
class LossTerms:
    """Sums over valid predictions, each divided by the step's prediction count.

    ``loss`` is what to backpropagate; the parts are detached for logging.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    commitment: torch.Tensor
    codebook: torch.Tensor
    count: int


def per_prediction(frame_values: torch.Tensor, out: AutoencoderOutput) -> torch.Tensor:
    """Mean of a per-frame quantity over each prediction's slot range, ``[B, F_w] -> [B, N]``."""
    routed = frame_values.gather(1, out.slot_frames)  # [B, n_slots]: the jitter gather pi
    csum = nn.functional.pad(routed.cumsum(1), (1, 0))  # csum[:, k] = sum of slots < k
    total = csum.gather(1, out.slot_hi + 1) - csum.gather(1, out.slot_lo)
    return total / (out.slot_hi - out.slot_lo + 1).to(total.dtype)


def prediction_losses(out: AutoencoderOutput) -> dict[str, torch.Tensor]:
    """Per-prediction terms ``[B, N]`` (unmasked): ``ce``, ``commitment``, ``codebook``."""
    ce = nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
    beta = out.quantizer.beta  # the quantiser owns the weight (its EMA hook divides it out)
    terms = {"ce": ce, "commitment": beta * per_prediction(out.quantizer.commitment, out)}
    if out.quantizer.codebook is not None:
        terms["codebook"] = per_prediction(out.quantizer.codebook, out)
    return terms


def batch_loss(out: AutoencoderOutput, count: int | None = None) -> LossTerms:
    """Sum of ``l_t`` over valid predictions divided by ``count``.

    Args:
        out: the model's output for this micro-batch (its quantiser output carries beta).
        count: valid predictions of the whole optimiser step over all micro-batches and ranks;
            defaults to this micro-batch's own count.
    """
    if count is None:
        count = int(out.mask.sum())
    if count < 1:
        raise ValueError("the loss needs at least one valid prediction")
    mask = out.mask.to(out.logits.dtype)
    sums = {k: (v * mask).sum() / count for k, v in prediction_losses(out).items()}
    zero = torch.zeros((), dtype=out.logits.dtype, device=out.logits.device)
    loss = sums["ce"] + sums["commitment"] + sums.get("codebook", zero)
    return LossTerms(
        loss=loss,
        ce=sums["ce"].detach(),
        commitment=sums["commitment"].detach(),
        codebook=sums.get("codebook", zero).detach(),
        count=count,
    )
