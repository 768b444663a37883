"""Export a checkpoint to ONNX and verify it against PyTorch.

    python -m export --checkpoint runs/small/last.pt --out exported/small [--int8]
    python -m export --requantize-int8 exported/small     # an older export's int8 step
    python -m export --checkpoint CKPT --out DIR --voices Allison June    # only these voices

With ``--int8`` the teacher-forced cross-entropy of the fp32 and int8 decoder steps on held-out
clips (``--eval-wav``, default the test clips) is printed. The primer that folded segments
start from (`vqwavenet.primer`) is cut from ``--primer-wav``, by default the first held-out clip.
``--requantize-int8 DIR`` gives an export made before the int8 step's activation scales were per
row one that has them (from its own int8 weights; nothing else changes, not the model id), and
measures its cost again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

CLIPS = Path(__file__).resolve().parent.parent / "tests" / "data"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a training checkpoint (.pt)")
    p.add_argument("--out", help="output directory")
    p.add_argument(
        "--requantize-int8",
        metavar="DIR",
        help="instead: quantise the int8 step of the export in DIR per row (no checkpoint)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write int8 copies of the decoder step and warm-up graphs",
    )
    p.add_argument(
        "--eval-wav",
        action="append",
        default=None,
        help="held-out clip for the int8 quality check (repeatable; default tests/data/*.wav)",
    )
    p.add_argument("--eval-samples", type=int, default=8000, help="samples per clip checked")
    p.add_argument(
        "--primer-wav",
        default=None,
        help="clean speech that later segments start from (default: the first held-out clip)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="the decoder samples from softmax(logits / T); below 1 sharper (default 1)",
    )
    p.add_argument("--notice", default=None, help="a caveat stored in model.json for users")
    p.add_argument(
        "--voices",
        nargs="+",
        metavar="NAME",
        help="export only these voices of the checkpoint, in this order (default: all)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    return p


def fatal(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _load_waves(paths: list[str], sample_rate: int):
    import numpy as np
    import soundfile as sf
    import soxr

    waves = []
    for path in paths:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if sr != sample_rate:
            x = soxr.resample(x, sr, sample_rate)
        waves.append(np.asarray(x, dtype=np.float32))
    return waves


def requantize(args) -> int:
    from export.onnx_export import requantize_int8
    from vqwavenet.model_dir import ModelDirError, read_meta

    folder = Path(args.requantize_int8)
    paths = args.eval_wav or sorted(str(p) for p in CLIPS.glob("*.wav"))
    try:
        rate = int(read_meta(folder)["sample_rate"])
        meta = requantize_int8(folder, _load_waves(paths, rate) if paths else None)
    except (ModelDirError, ValueError, OSError) as e:
        return fatal(str(e))
    print(f"{folder}: int8 step with per-row activation scales (model id {meta['model_id']})")
    _print_int8_quality(meta)
    return 0


def _print_int8_quality(meta: dict) -> None:
    if "int8_quality" in meta:
        q = meta["int8_quality"]
        print(
            f"int8 quality: teacher-forced CE fp32 {q['ce_fp32']:.4f}, int8 {q['ce_int8']:.4f} "
            f"nats/sample (+{q['ce_increase']:.4f}) on {q['clips']} clips, {q['samples']} samples"
        )


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.requantize_int8:
        if args.checkpoint or args.out:
            parser.error("--requantize-int8 takes no --checkpoint or --out")
        return requantize(args)
    if not (args.checkpoint and args.out):
        parser.error("--checkpoint and --out are required (or --requantize-int8 DIR)")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        parser.error(f"--temperature must be a positive number, not {args.temperature}")
    out = Path(args.out)
    if not Path(args.checkpoint).is_file():
        return fatal(f"no checkpoint {args.checkpoint}")
    if (out / "model.json").exists() and not args.force:
        return fatal(f"{out} already holds an export (use --force to overwrite)")
    from export.onnx_export import ExportMismatch, export_model, keep_voices, load_checkpoint

    try:
        model, speakers, _ = load_checkpoint(args.checkpoint)
    except (KeyError, RuntimeError, OSError) as e:
        return fatal(f"cannot load {args.checkpoint}: {e}")
    if args.voices:
        try:
            speakers = keep_voices(model, speakers, args.voices)
        except ValueError as e:
            return fatal(str(e))
    waves = None
    paths = args.eval_wav or sorted(str(p) for p in CLIPS.glob("*.wav"))
    if args.int8:
        if not paths:
            return fatal("--int8 needs held-out clips (--eval-wav)")
        waves = _load_waves(paths, model.cfg.features.sample_rate)
    primer = args.primer_wav or (paths[0] if paths else None)
    if primer is None:
        return fatal("no clip for the primer (--primer-wav)")
    if not Path(primer).is_file():
        return fatal(f"no primer clip {primer}")
    try:
        meta = export_model(
            model,
            speakers,
            out,
            int8=args.int8,
            quality_waves=waves,
            quality_samples=args.eval_samples,
            notice=args.notice,
            temperature=args.temperature,
        )
    except ExportMismatch as e:
        return fatal(str(e))
    from vqwavenet.primer import write_primer

    try:
        wave = _load_waves([primer], model.cfg.features.sample_rate)[0]
        entry = write_primer(out, wave, Path(primer).name)
    except ValueError as e:
        return fatal(f"primer {primer}: {e}")
    print(f"wrote {out} (model id {meta['model_id']})")
    print(f"primer: {entry['samples']} samples of {entry['source']}")
    print("verification against PyTorch: " + json.dumps(meta["verification"]))
    _print_int8_quality(meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
