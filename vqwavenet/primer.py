"""The primer: a few milliseconds of real speech that every folded segment after the first
starts from, instead of silence.

    python -m vqwavenet.primer --model vqwavenet/models/bundled --wav clip.wav
    python -m vqwavenet.primer --model vqwavenet/models/bundled --wav carlo.wav --speaker Carlo

A folded segment cannot start from the audio before it (the segments are generated side by
side), so it starts from some state and must climb out of it. From silence a sampled segment
stays quiet for a long while (the model feeds on its own quiet output), and the engine must
generate and drop many samples before each cross-fade. From the decoder's state after
``wavenet_context`` samples of real speech it starts at the loudness of an unbroken decode, and
a far shorter burn-in joins as well (`vqwavenet.Codec.burn_in`).

The excerpt is stored as ``primer.wav`` (16-bit PCM at the model rate, ``wavenet_context + 1``
samples) and named, with its sha256, under ``"primer"`` in ``model.json``; the engine encodes
it and warms the decoder on it once per speaker (`Codec.primed_state`). Any clip of clean
speech serves: the window whose loudness is closest to the clip's typical speech level is
taken. A voice may have its own primer (``--speaker``), which a decode in that voice starts
from: a voice far from the shared primer's (another sex, say) starts its segments quieter from
the shared one (``python -m benchmarks.segment_loudness`` measures it).

No torch: numpy, soundfile and the engine's model-directory helpers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from vqwavenet.audio import AudioError, load_audio
from vqwavenet.model_dir import (
    PRIMER_FILE,
    file_sha256,
    geometry_from_spec,
    read_meta,
    speaker_primer_file,
    write_meta,
)


def choose_excerpt(wave: np.ndarray, length: int, block: int = 320) -> tuple[int, int]:
    """``[start, end)`` of the ``length``-sample window of ``wave`` that ends in steady, typical
    speech: the RMS of the whole window and of its last 80, 160, 320 and 640 samples as close
    as they can be (in log ratio) to the clip's speech level, the median RMS of its
    ``block``-sample blocks above 1 % of full scale.

    A decode from the primer continues the primer's end for a few hundred samples, so its end
    sets how loud a segment starts: a primer ending loud starts segments too loud, one ending
    quiet too quiet."""
    if len(wave) < length:
        raise ValueError(f"the clip has {len(wave)} samples; the primer needs {length}")
    x = np.asarray(wave, dtype=np.float64)
    blocks = np.sqrt(np.mean(x[: len(x) // block * block].reshape(-1, block) ** 2, axis=1))
    if not (blocks > 0.01).any():
        raise ValueError("the clip has no speech above 1 % of full scale")
    level = np.median(blocks[blocks > 0.01])
    energy = np.concatenate([[0.0], np.cumsum(x**2)])
    ends = np.arange(length, len(x) + 1)
    score = np.zeros(len(ends))
    for n in sorted({80, 160, 320, 640, length}):
        n = min(n, length)
        rms = np.sqrt((energy[ends] - energy[ends - n]) / n)
        score += np.abs(np.log(np.maximum(rms, 1e-6) / level))
    end = int(ends[np.argmin(score)])
    return end - length, end


def write_primer(
    model_dir: str | Path,
    wave: np.ndarray,
    source: str,
    speaker: str | None = None,
    gain_db: float = 0.0,
) -> dict:
    """Write a primer of ``model_dir`` from ``wave`` (mono float at the model rate) and record
    it in ``model.json`` (each file written aside, then renamed). Returns its entry.

    ``gain_db`` scales the chosen excerpt: a model whose segments start quieter or louder than
    its unbroken decode from a primer at the clip's level needs its primer louder or quieter
    (`benchmarks.segment_loudness` measures it). An excerpt that would clip is refused.

    Without ``speaker`` it is the primer every voice starts from (``primer.wav``); with one,
    that voice's own (``primer.<index>.wav``, under ``"speakers"``), which the engine prefers
    when it decodes in that voice. The default primer must exist first."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir, check_format=False)
    name = PRIMER_FILE
    if speaker is not None:
        if speaker not in meta["speakers"]:
            raise ValueError(f"no speaker {speaker!r} (the model has {meta['speakers']})")
        if "primer" not in meta:
            raise ValueError("write the default primer (no --speaker) first")
        name = speaker_primer_file(meta["speakers"].index(speaker))
    length = geometry_from_spec(meta["geometry"]).wavenet_context + 1
    if not math.isfinite(gain_db):
        raise ValueError(f"the primer's gain must be a finite number of dB, not {gain_db}")
    start, end = choose_excerpt(wave, length)
    excerpt = np.asarray(wave[start:end], dtype=np.float64) * 10 ** (gain_db / 20)
    if np.abs(excerpt).max() > 1.0:  # full scale itself is what the clip already allowed
        raise ValueError(
            f"at {gain_db:+.1f} dB the excerpt clips (peak {np.abs(excerpt).max():.2f})"
        )
    path = model_dir / name
    tmp = path.with_name(path.name + ".tmp")
    sf.write(tmp, excerpt, int(meta["sample_rate"]), subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    entry = {
        "file": name,
        "sha256": file_sha256(path),
        "samples": length,
        "source": f"{source} [{start}:{end}]" + (f" at {gain_db:+.1f} dB" if gain_db else ""),
    }
    if speaker is None:
        meta["primer"] = {**entry, "speakers": meta.get("primer", {}).get("speakers", {})}
    else:
        meta["primer"].setdefault("speakers", {})[speaker] = entry
    write_meta(model_dir, meta)
    return entry


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vqwavenet.primer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="an exported model directory")
    p.add_argument("--wav", required=True, help="a clip of clean speech (any rate, any format)")
    p.add_argument("--speaker", help="the voice whose own primer this is (default: every voice's)")
    p.add_argument(
        "--gain-db",
        type=float,
        default=0.0,
        help="scale the excerpt by this many dB (default 0: the clip's level); for a model "
        "whose segments start too quiet or too loud (python -m benchmarks.segment_loudness)",
    )
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        rate = int(read_meta(args.model, check_format=False)["sample_rate"])
        wave = load_audio(args.wav, rate)
        entry = write_primer(args.model, wave, Path(args.wav).name, args.speaker, args.gain_db)
    except (AudioError, ValueError) as e:  # ModelDirError is a ValueError
        print(f"error: {args.wav}: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {Path(args.model) / entry['file']}: {entry['samples']} samples of {entry['source']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
