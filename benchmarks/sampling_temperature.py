"""Does a sampling temperature make a model's resynthesis more intelligible?

    python -m benchmarks.sampling_temperature --model DIR --data data/asterisk-fillets \
        --temperatures 0.7 0.8 1.0 1.2 --seeds 0 1 --speakers Allison June

The engine samples each output from the step graph's softmax. Dividing the logits by ``T``
(``T < 1`` sharpens the distribution towards its likeliest classes, ``T > 1`` flattens it) is
the same as dividing the step graph's output projection, weight and bias, by ``T``: for every
``T`` this writes such a copy of the model (`with_temperature`, under ``--work``) and scores
it with `training.evaluate` on the same utterances and seeds (no cross-entropy, which does not
sample; no recogniser unless ``--wer``). It prints one JSON line per temperature, seed and
group, and a markdown table: STOI, the loudness-contour correlation (envelope r), log-mel
distance and, with ``--wer``, the word error rates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from training.evaluate import COLUMNS as EVALUATE_COLUMNS
from training.evaluate import format_cell

STEP_GRAPH = "decoder_step.onnx"


def _output_projection(graph) -> tuple[str, str]:
    """Names of the weight and bias initialisers of the step graph's last layer: ``logits =
    MatMul(h, W) + b``."""
    producer = {out: node for node in graph.node for out in node.output}
    inits = {init.name for init in graph.initializer}
    add = producer.get("logits")
    if add is None or add.op_type != "Add":
        raise ValueError("the step graph's 'logits' is not the output of an Add")
    (bias,) = [name for name in add.input if name in inits] or [None]
    (matmul,) = [producer[name] for name in add.input if name in producer] or [None]
    if bias is None or matmul is None or matmul.op_type != "MatMul":
        raise ValueError("the step graph's 'logits' is not MatMul(h, W) + b")
    (weight,) = [name for name in matmul.input if name in inits] or [None]
    if weight is None:
        raise ValueError("the step graph's last MatMul has no weight initialiser")
    return weight, bias


def with_temperature(model_dir: Path, out: Path, temperature: float) -> Path:
    """A copy of ``model_dir`` in ``out`` whose fp32 step graph's logits are divided by
    ``temperature``, with its hash in ``model.json`` and the temperature it now samples at
    recorded: ``temperature`` times the one it was exported with (``python -m export
    --temperature``, which divides only what the graph samples from)."""
    import onnx
    from onnx import numpy_helper

    if not (temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"a temperature must be a positive number, not {temperature}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out)
    graph_file = out / STEP_GRAPH
    proto = onnx.load(graph_file)
    names = _output_projection(proto.graph)
    for init in proto.graph.initializer:
        if init.name in names:
            scaled = numpy_helper.to_array(init) / np.float32(temperature)
            init.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), init.name))
    onnx.save(proto, graph_file)
    meta = json.loads((out / "model.json").read_text())
    meta["files"][STEP_GRAPH] = hashlib.sha256(graph_file.read_bytes()).hexdigest()
    meta["sampling_temperature"] = meta.get("sampling_temperature", 1.0) * temperature
    (out / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


# The evaluation's columns that sampling changes.
SCORES = ("stoi", "envelope", "log_mel", "wer_original", "wer_resynth")
COLUMNS = tuple(next(c for c in EVALUATE_COLUMNS if c[0] == key) for key in SCORES)


def table(records: list[dict]) -> str:
    head = ["T", "seed", "group", *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [f"{r['temperature']:g}", str(r["seed"]), r["group"]]
        cells += [format_cell(r, key, fmt) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sampling_temperature", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", type=Path, required=True, help="exported model directory")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.8, 1.0, 1.2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--speakers", nargs="+", help="dataset speakers (default: all)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=16, help="utterances per voice")
    p.add_argument("--wer", action="store_true", help="also the recogniser's word error rates")
    p.add_argument("--work", type=Path, default=Path("runs/temperature"), help="model copies")
    p.add_argument("--json", type=Path, help="also write every record here")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    from training.evaluate import EvaluationError, evaluate, plan
    from vqwavenet import Codec

    if any(not (t > 0 and np.isfinite(t)) for t in args.temperatures):
        print("error: --temperatures must be positive numbers", file=sys.stderr)
        return 2
    if not (args.model / "model.json").is_file():
        print(f"error: {args.model}: no model.json", file=sys.stderr)
        return 2
    records = []
    for t in args.temperatures:
        copy = with_temperature(args.model, args.work / f"T{t:g}", t)
        codec = Codec(copy)
        for seed in args.seeds:
            try:
                groups = plan(
                    args.data,
                    codec.speakers,
                    split=args.split,
                    limit=args.limit,
                    seed=seed,
                    speakers=args.speakers,
                )
            except EvaluationError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            report = evaluate(codec, groups, seed=seed, ce=False, wer=args.wer, progress=False)
            for row in report["rows"]:
                rec = {"temperature": t, "seed": seed, "group": row["group"]}
                rec.update({key: row.get(key) for key, _, _ in COLUMNS})
                print(json.dumps(rec), flush=True)
                records.append(rec)
    print(table(records))
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
