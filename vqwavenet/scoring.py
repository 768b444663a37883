"""Teacher-forced scoring: the incremental decoder driven by the true samples.

`teacher_forced` gives the logits (or the NLL of each true sample) that the parallel PyTorch
model gives, so it checks the exported graphs and measures quality without torch.
`folded_nll` scores the true samples under `Codec.decode`'s schedule of folded segments, to
see what folding costs. `Codec` exposes all three as methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vqwavenet.audio import mulaw_encode
from vqwavenet.folding import fold as make_fold
from vqwavenet.steps import Stream

if TYPE_CHECKING:
    from vqwavenet.codec import Codec


@dataclass
class _Utterance:
    """One utterance ready to be scored: its length, left padding, conditioning rows and the
    mu-law classes of the padded waveform."""

    n: int
    left: int
    cond: np.ndarray
    classes: np.ndarray


def _prepare(
    codec: Codec, wave: np.ndarray, speaker: int | str, codes: np.ndarray | None = None, r: int = 0
) -> _Utterance:
    x = codec.to_model_rate(wave)
    left, right, n_frames = codec.geometry.padding(len(x))
    padded = np.pad(x, (left, right))
    if codes is None:
        codes = codec.encode_padded(padded, n_frames)
    else:
        codes = np.asarray(codes)
        if codes.ndim != 1 or len(codes) != n_frames:
            raise ValueError(
                f"codes[{r}]: shape {codes.shape}, but utterance {r} ({len(x)} samples) has "
                f"{n_frames} frames"
            )
    cond = codec.condition(codes, speaker)  # validates the codes' type and range
    return _Utterance(len(x), left, cond, mulaw_encode(padded, codec.q))


def teacher_forced(
    codec: Codec,
    waves: Sequence[np.ndarray],
    speaker: int | str = 0,
    *,
    logits: bool = True,
    codes: Sequence[np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """Per utterance (at the model rate), logits ``[n, Q]`` or (``logits=False``) the NLL
    ``[n]`` of each true sample, the decoder fed the true past.

    ``codes``: one code array ``[F]`` per utterance to condition on instead of the codes its
    samples encode to (default), each with the utterance's frame count
    (``geometry.padding(n)[2]``, as `Codec.encode` gives) and in ``[0, codebook_size)``.
    Passing the encoder's codes gives the default's outputs; other codes (shuffled in time,
    one repeated code) measure how much the decoder relies on them. ``progress``: as in
    `Codec.decode`."""
    if codes is not None and len(codes) != len(waves):
        raise ValueError(f"codes: {len(codes)} code arrays for {len(waves)} utterances")
    conds, streams, offset = [], [], 0
    for r, w in enumerate(waves):
        u = _prepare(codec, w, speaker, None if codes is None else codes[r], r)
        tau0 = u.left - codec.context
        streams.append(
            Stream(
                request=r,
                tau0=tau0,
                length=u.n,
                cond_offset=offset,
                cond_count=len(u.cond),
                seed=(0, r),
                forced=u.classes[tau0 - 1 : u.left + u.n - 1],
                targets=None if logits else u.classes[u.left : u.left + u.n],
            )
        )
        conds.append(u.cond)
        offset += len(u.cond)
    return codec.engine.run(streams, np.concatenate(conds), progress)


def folded_nll(
    codec: Codec,
    waves: Sequence[np.ndarray],
    speaker: int | str = 0,
    *,
    segment: int,
    overlap: int | None = None,
    burn_in: int | None = None,
) -> list[np.ndarray]:
    """Per utterance, the NLL ``[n]`` of each true sample under `Codec.decode`'s schedule.
    Segment ``k`` starts as in decoding (primed, or from silence) at ``a_k - overlap -
    burn_in``, is then fed the true samples, and owns ``[a_k, b_k)``; compare with
    `teacher_forced` (full context) to see how long the model needs to recover from a segment
    start (``benchmarks/fold_quality.py``)."""
    overlap, burn_in = codec.resolve_join(overlap, burn_in)
    zero = mulaw_encode(np.zeros(1), codec.q)[0]
    conds, streams, folds, offset = [], [], [], 0
    for r, w in enumerate(waves):
        u = _prepare(codec, w, speaker)
        fold = make_fold(u.n, segment, overlap, burn_in, len(streams))
        folds.append(fold)
        primed = codec.later_segment_start(len(fold.bounds), speaker)
        for k, (_, b) in enumerate(fold.bounds):
            g = fold.start(k)
            true_prev = u.classes[u.left + g : u.left + b - 1]  # samples g .. b-2 feed g+1 ..
            first = np.full(codec.context + 1, zero)  # warm-up inputs, then the first one
            if k > 0 and primed is not None:
                first[-1] = primed[1]
            streams.append(
                Stream(
                    request=r,
                    tau0=u.left + g - codec.context,
                    length=b - g,
                    cond_offset=offset,
                    cond_count=len(u.cond),
                    seed=(0, r),
                    forced=np.concatenate([first, true_prev]),
                    steady=k > 0 and codec.warmup == "steady",
                    primed=primed if k > 0 else None,
                    targets=u.classes[u.left + g : u.left + b],
                )
            )
        conds.append(u.cond)
        offset += len(u.cond)
    nll = codec.engine.run(streams, np.concatenate(conds), None)
    outs = []
    for f in folds:
        owned = [nll[f.first + k][a - f.start(k) :] for k, (a, _) in enumerate(f.bounds)]
        outs.append(np.concatenate(owned))
    return outs


def cross_entropy(
    codec: Codec,
    waves: Sequence[np.ndarray],
    speaker: int | str = 0,
    *,
    codes: Sequence[np.ndarray] | None = None,
) -> float:
    """Teacher-forced cross-entropy (nats/sample) over all samples of the utterances,
    conditioned on their own codes or on ``codes`` (as `teacher_forced`)."""
    nll = teacher_forced(codec, waves, speaker, logits=False, codes=codes)
    return float(np.concatenate(nll).astype(np.float64).mean())
