"""int8 cost of a checkpoint, as exported and with the output head quantised too.

python benchmarks/results/epyc2_2026-12-04b/int8_head_control.py CHECKPOINT, from the root
(the bundled model's: checkpoints/small-past-gain/latest.pt): teacher-forced CE of fp32 and
int8 on the clips of tests/test_runtime.py's int8 test, for the export as it is and with
`head_products` patched to keep nothing in fp32."""

import sys
import tempfile
from pathlib import Path

import soundfile as sf

import export.onnx_export as ox
from export.__main__ import main as export_main
from vqwavenet import Codec


def clip(name, n=8000):
    w, _ = sf.read(f"tests/data/{name}.wav", dtype="float32")
    return w[:n]


waves = [clip(n) for n in ("activated", "agent-newlocation", "auth-incorrect")]
ckpt = sys.argv[1]
for label, patch in (("head fp32 (as shipped)", False), ("head int8 (control)", True)):
    if patch:
        ox.head_products = lambda path: []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        export_main(
            [
                "--checkpoint",
                ckpt,
                "--out",
                str(out),
                "--int8",
                "--voices",
                "Allison",
                "Carlo",
                "IvrvoiceRU",
                "June",
            ]
        )
        fp32 = Codec(out).cross_entropy(waves)
        int8 = Codec(out, int8=True).cross_entropy(waves)
        print(f"{label}: fp32 {fp32:.4f} int8 {int8:.4f} diff {int8 - fp32:+.4f}", flush=True)
