"""A slowly varying gain on the decoder's autoregressive input in training.

Fed the true past, a WaveNet decoder predicts the next sample almost as well with one
constant code as with the true ones (`benchmarks.open_loop`): the past carries the loudness
and the codes are left to refine it. In generation the past is the decoder's own draws, and
when they drift louder or quieter than the original the decoder follows them (it fills pauses
with speech-like sound). With ``decoder.past_gain_db = G`` every past sample the decoder reads
in training is scaled by ``10 ** (g / 20)``, ``g`` a random gain in ``[-G, G]`` dB that varies
linearly between knots ``decoder.past_gain_every`` samples apart, while the targets keep the
true loudness: the decoder can only learn how loud the next sample is from the codes.

The gain follows `model.knots`, so the gain of sample ``s`` is the same in every window that
reads it and the batched gradient stays the mean of per-prediction gradients
(`training.invariance`).
"""

from __future__ import annotations

import torch

from model.knots import knot_curve

# Added to the utterance id so the knots' draws are neither jitter's (utterance ids as they
# are) nor those of the input noise or the tilt (other salts); utterance ids stay far below.
_SALT = 0x20000000


def gain_db(
    max_db: float, every: int, seed, epoch, utt: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """The gain in dB of each element of the broadcast of ``utt`` and ``index`` (absolute
    sample indices of the padded utterance): linear between knots at multiples of ``every``,
    each knot uniform in ``[-max_db, max_db]``."""
    return max_db * knot_curve(every, seed, epoch, utt, index, salt=_SALT)


def gained_samples(
    samples: torch.Tensor,
    max_db: float,
    every: int,
    *,
    seed,
    epoch,
    utt: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Waveform ``samples`` ``[B, T]`` at absolute ``index`` ``[B, T]`` of utterances ``utt``
    ``[B]``, scaled by `gain_db` and clipped to ``[-1, 1]``."""
    db = gain_db(max_db, every, seed, epoch, utt[:, None], index)
    scale = torch.pow(10.0, db / 20.0).to(samples.dtype)
    return (samples * scale).clamp(-1.0, 1.0)
