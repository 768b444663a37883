"""int8 with activation scales per row (`export.onnx_export.per_row_activations`): a row's
samples do not depend on the rows beside it, so an int8 request decodes alike alone and in the
shared scheduler's batches, as fp32 does. onnxruntime's own dynamic quantisation (one scale per
call, over all rows) is the negative control throughout."""

from __future__ import annotations

import filecmp
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.__main__ import main as export_main
from export.onnx_export import (
    PER_ROW,
    export_model,
    load_checkpoint,
    per_row_activations,
    requantize_int8,
)
from tests.test_export import clip, make_checkpoint
from tests.test_runtime import BUNDLED_INT8_BOUND
from vqwavenet import BUNDLED_MODEL, Codec, DecodeRequest
from vqwavenet.model_dir import read_meta


def _session(model: onnx.ModelProto, optimise: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def two_products(tmp_path_factory):
    """A graph of two products as the step has them: ``h = x @ W1`` on an unbounded input, then
    ``(tanh(h) * sigmoid(h)) @ W2`` on a gated one, quantised by onnxruntime (per call) and
    rewritten (per row). Returns (per-call model, per-row model, W1, W2 as quantised)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    k, n = 48, 40
    w1 = numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32) * 0.2, "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(n, 8)).astype(np.float32) * 0.2, "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("Sigmoid", ["h"], ["g"]),
        helper.make_node("Mul", ["t", "g"], ["z"]),
        helper.make_node("MatMul", ["z", "w2"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_products",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", n]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8]),
        ],
        [w1, w2],
    )
    root = tmp_path_factory.mktemp("two_products")
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), root / "f.onnx"
    )
    quantize_dynamic(str(root / "f.onnx"), str(root / "q.onnx"), weight_type=QuantType.QInt8)
    per_call = onnx.load(str(root / "q.onnx"))
    per_row = per_row_activations(onnx.load(str(root / "q.onnx")))
    inits = {i.name: numpy_helper.to_array(i) for i in per_call.graph.initializer}
    weights = [
        (inits[f"{w}_quantized"].astype(np.int32), inits[f"{w}_scale"]) for w in ("w1", "w2")
    ]
    return per_call, per_row, weights


def test_per_row_rewrite_quantises_each_row_on_its_own(two_products):
    """The rewritten graph computes, row by row, the documented quantisation: the first
    product's input at the row's largest magnitude over 127, the gated one at the fixed 1/127,
    with the int8 weights; the same with and without onnxruntime's graph optimisations (one of
    which fuses the rescaling and takes one activation scale per call). Rows of very different
    size: the per-call graph's small rows lose their precision to the large ones (control)."""
    per_call, per_row, ((q1, s1), (q2, s2)) = two_products
    assert not [n for n in per_row.graph.node if n.op_type == "DynamicQuantizeLinear"]
    x = np.random.default_rng(1).normal(size=(5, 48)).astype(np.float32)
    x *= np.array([1e-3, 1.0, 30.0, 0.2, 5.0], np.float32)[:, None]

    def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.abs(x).max(1, keepdims=True) / 127
        h = (np.round(x / s) @ q1) * s1 * s
        z = np.tanh(h) * (1 / (1 + np.exp(-h)))
        return h, (np.round(z * 127) @ q2) * s2 / 127

    want = reference(x.astype(np.float64))
    for optimise in (True, False):
        got = _session(per_row, optimise).run(None, {"x": x})
        for g, w in zip(got, want):  # to float32 rounding, relative to each row's size
            size = np.maximum(np.abs(w).max(1, keepdims=True), 1e-12)
            np.testing.assert_allclose(g / size, w / size, atol=1e-5, rtol=0)
    h_shared, _ = _session(per_call).run(None, {"x": x})
    err_shared = np.abs(h_shared[0] - want[0][0]).max()
    assert err_shared > 100 * np.abs(got[0][0] - want[0][0]).max()


def test_per_row_rewrite_leaves_each_row_alone(two_products):
    """Each row's outputs are bit-equal whatever the other rows hold (here scaled up a
    thousandfold); the per-call graph's change (control)."""
    per_call, per_row, _ = two_products
    x = np.random.default_rng(2).normal(size=(4, 48)).astype(np.float32)
    louder = x.copy()
    louder[1:] *= 1000
    for model, alone in ((per_row, True), (per_call, False)):
        session = _session(model)
        a, b = (session.run(None, {"x": v})[1][0] for v in (x, louder))
        single = session.run(None, {"x": x[:1]})[1][0]
        assert np.array_equal(a, b) == alone and np.array_equal(a, single) == alone


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny model exported with int8, per row (the default) and per call (the control)."""
    root = tmp_path_factory.mktemp("int8rows")
    model, speakers, _ = load_checkpoint(make_checkpoint(root / "m.pt", "tiny", seed=5))
    export_model(model, speakers, root / "row", int8=True)
    export_model(model, speakers, root / "call", int8=True, per_row=False)
    return root / "row", root / "call"


def decode_at_once(codec: Codec, n: int):
    """A function that decodes a request once ``n`` threads call it."""
    start = threading.Barrier(n)

    def decode(r: DecodeRequest) -> np.ndarray:
        start.wait()
        kw = dict(n_samples=r.n_samples, segment=2500, overlap=160)
        return codec.decode(r.codes, r.speaker, r.seed, **kw)

    return decode


def test_int8_requests_decode_alike_alone_and_beside_others(exports):
    """Two files decoded in one batch, and concurrently through the scheduler, give in int8
    exactly the samples each gives alone, as in fp32. Control: the per-call int8 step's
    samples change with the batch."""
    row, call = exports
    for folder, int8, alike in ((row, True, True), (row, False, True), (call, True, False)):
        codec = Codec(folder, int8=int8)
        assert codec.rows_independent == alike
        reqs = [
            DecodeRequest(codec.encode(clip(name, n)), speaker=s, n_samples=n, seed=s + 3)
            for name, n, s in (("activated", 6000, 0), ("agent-newlocation", 9000, 1))
        ]
        alone = [codec.decode_many([r], segment=2500, overlap=160)[0] for r in reqs]
        together = codec.decode_many(reqs, segment=2500, overlap=160)
        with ThreadPoolExecutor(len(reqs)) as pool:
            concurrent = list(pool.map(decode_at_once(codec, len(reqs)), reqs))
        same = [np.array_equal(a, b) for a, b in zip(alone, together)]
        same += [np.array_equal(a, b) for a, b in zip(alone, concurrent)]
        if alike:
            assert same == [True] * 4, (folder.name, int8, same)
        else:  # the control: beside another file, per-call scales change the samples
            assert not any(same[:2]), same


def test_bundled_int8_decodes_alike_alone_and_beside_others():
    """The bundled model's int8 step scales activations per row: a file decoded beside two
    others gives the samples it gives alone, and the export's teacher-forced int8 cost stays
    within `test_runtime`'s bound."""
    codec = Codec(BUNDLED_MODEL, int8=True)
    assert codec.rows_independent and read_meta(BUNDLED_MODEL)["int8_activations"] == PER_ROW
    reqs = [
        DecodeRequest(codec.encode(clip(name, n)), speaker=s, n_samples=n, seed=s + 1)
        for name, n, s in (
            ("activated", 8000, 1),
            ("auth-incorrect", 12000, 2),
            ("activated", 4000, 3),
        )
    ]
    alone = codec.decode_many(reqs[:1])[0]
    together = codec.decode_many(reqs)[0]
    np.testing.assert_array_equal(alone, together)
    quality = read_meta(BUNDLED_MODEL)["int8_quality"]
    assert 0 < quality["ce_increase"] < BUNDLED_INT8_BOUND


def test_requantize_rewrites_only_the_int8_step(exports, tmp_path, capsys):
    """``python -m export --requantize-int8 DIR`` gives an export with a per-call int8 step the
    per-row one, from its own int8 weights: every other file and the model id stay, model.json
    names the new file's hash (so the codec loads it with its hash checks) and the cost again;
    a second run refuses, and so do a checkpoint beside it and a folder without int8."""
    _, call = exports
    folder = tmp_path / "old"
    shutil.copytree(call, folder)
    before = read_meta(folder)
    assert Codec(folder, int8=True).rows_independent is False
    assert export_main(["--requantize-int8", str(folder), "--eval-samples", "1500"]) == 0
    assert "per-row activation scales" in capsys.readouterr().out
    after = read_meta(folder)
    assert after["model_id"] == before["model_id"]
    assert after["int8_activations"] == PER_ROW and "int8_quality" in after
    changed = [f for f in before["files"] if before["files"][f] != after["files"][f]]
    assert changed == ["decoder_step.int8.onnx"]
    for name in before["files"]:
        if name != "decoder_step.int8.onnx":
            assert filecmp.cmp(folder / name, call / name, shallow=False)
    assert Codec(folder, int8=True).rows_independent
    with pytest.raises(ValueError, match="already"):
        requantize_int8(folder)
    assert export_main(["--requantize-int8", str(folder)]) == 1
    with pytest.raises(SystemExit):
        export_main(["--requantize-int8", str(folder), "--checkpoint", "x.pt"])
    meta = json.loads((folder / "model.json").read_text())
    del meta["files"]["decoder_step.int8.onnx"]
    (folder / "model.json").write_text(json.dumps(meta))
    assert export_main(["--requantize-int8", str(folder)]) == 1
    assert "export with --int8" in capsys.readouterr().err
