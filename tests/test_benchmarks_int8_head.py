"""The int8 head benchmark on a tiny checkpoint: both variants are reported, and the control's
export really quantises the head (the patch reaches the exporter)."""

from __future__ import annotations

import json
from unittest import mock

import benchmarks.int8_head as bench
from export import onnx_export
from tests.test_export import make_checkpoint


def test_int8_head_reports_both_variants_and_quantises_the_head_in_the_control(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", "tiny", seed=3)
    kept = []
    real = onnx_export.quantize_int8

    def spy(model, step, out, **kw):
        real(model, step, out, **kw)
        graph = onnx_export._graph(out / onnx_export.INT8_FILES[onnx_export.STEP_FILE])
        kept.append(sum(n.op_type == "MatMul" for n in graph.node))

    with mock.patch.object(onnx_export, "quantize_int8", spy):
        assert bench.main(["--checkpoint", str(ckpt), "--samples", "1500"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["variant"] for r in rows] == ["head fp32", "head int8"]
    assert all(r["cost"] == r["ce_int8"] - r["ce_fp32"] and r["ce_fp32"] > 0 for r in rows)
    assert kept == [2, 0]  # fp32 MatMuls left in the int8 step: the head's two, then none
