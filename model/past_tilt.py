"""A slowly varying spectral tilt on the decoder's autoregressive input in training.

A random gain on the past (`model.past_gain`) taught the decoder to take its loudness from
the codes rather than from its own draws. The draws can drift in colour as well: brighter or
duller than the original. With ``decoder.past_tilt = A`` every past sample the decoder reads
in training is filtered by the first-order FIR ``(x[s] - a x[s-1]) / sqrt(1 + a**2)``, ``a``
a random coefficient in ``[-A, A]`` that varies linearly between knots
``decoder.past_tilt_every`` samples apart (`model.knots`): ``a > 0`` lifts the highs against
the lows (pre-emphasis), ``a < 0`` the lows against the highs, and the division keeps white
noise at its power. At ``a = 0.5`` the spectrum tilts by 9.5 dB from 0 Hz to Nyquist. The
targets keep the true spectrum, so the decoder can only learn the next sample's colour from
the codes.

The filter reads one sample before each past sample; a window's segment always holds it (its
first frame is a margin frame before the context, `model.geometry.CodecGeometry.span`), and
``x[-1]`` of a padded utterance is silence. Both ``a`` and the samples it mixes are functions
of absolute indices, so every window reads the same tilted past.
"""

from __future__ import annotations

import torch

from model.knots import knot_curve

# Added to the utterance id so the tilt's knots are not the gain's, the input noise's or
# jitter's draws (other salts, or none); utterance ids stay far below.
_SALT = 0x10000000


def tilt_coefficient(
    max_tilt: float, every: int, seed, epoch, utt: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """The coefficient ``a`` of each element of the broadcast of ``utt`` and ``index``
    (absolute sample indices of the padded utterance), in ``[-max_tilt, max_tilt]``."""
    return max_tilt * knot_curve(every, seed, epoch, utt, index, salt=_SALT)


def tilted_samples(
    samples: torch.Tensor,
    previous: torch.Tensor,
    max_tilt: float,
    every: int,
    *,
    seed,
    epoch,
    utt: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """Waveform ``samples`` ``[B, T]`` at absolute ``index`` ``[B, T]`` of utterances ``utt``
    ``[B]``, each with the sample before it in ``previous`` ``[B, T]``, through the tilt
    filter and clipped to ``[-1, 1]``."""
    a = tilt_coefficient(max_tilt, every, seed, epoch, utt[:, None], index).to(samples.dtype)
    return ((samples - a * previous) * torch.rsqrt(1.0 + a * a)).clamp(-1.0, 1.0)
