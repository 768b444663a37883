"""What keeping the output head in fp32 saves an int8 export: teacher-forced cross-entropy of
fp32 and int8 on the test clips, for a checkpoint exported as ``python -m export --int8`` does
(the head's two products in fp32) and with the head quantised too (the control).

    python -m benchmarks.int8_head --checkpoint checkpoints/small-past-gain/latest.pt

Prints a JSON line per variant and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from unittest import mock

import soundfile as sf

import export.onnx_export as onnx_export
from export.onnx_export import export_model, load_checkpoint
from vqwavenet import Codec

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CLIPS = ("activated", "agent-newlocation", "auth-incorrect")


def cross_entropies(model_dir: Path, samples: int) -> tuple[float, float]:
    waves = [sf.read(DATA / f"{name}.wav", dtype="float32")[0][:samples] for name in CLIPS]
    fp32 = Codec(model_dir).cross_entropy(waves)
    return fp32, Codec(model_dir, int8=True).cross_entropy(waves)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples", type=int, default=8000, help="per test clip")
    args = p.parse_args(argv)
    model, speakers, _ = load_checkpoint(args.checkpoint)
    rows = []
    for variant, quantise_head in (("head fp32", False), ("head int8", True)):
        keep = (lambda path: []) if quantise_head else onnx_export.head_products
        with (
            tempfile.TemporaryDirectory() as tmp,
            mock.patch.object(onnx_export, "head_products", keep),
        ):
            export_model(model, speakers, Path(tmp), int8=True)
            fp32, int8 = cross_entropies(Path(tmp), args.samples)
        rows.append({"variant": variant, "ce_fp32": fp32, "ce_int8": int8, "cost": int8 - fp32})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | CE fp32 | CE int8 | int8 cost (nats/sample) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ce_fp32']:.4f} | {r['ce_int8']:.4f} | {r['cost']:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
