"""Export a checkpoint to four ONNX graphs plus ``model.json``, then prove them against PyTorch.

    python -m export --checkpoint runs/small/last.pt --out exported/small [--int8]

Graphs (dynamic batch and length axes, exported with a batch of 2):

* ``encoder.onnx``: ``wave [B, L]`` (padded utterances) -> ``codes [B, F]``, MFCC inside.
* ``conditioner.onnx``: ``codes [B, F]``, ``speaker [B]`` -> ``cond [B, L*2G, F - k + 1]``,
  per-layer gate conditioning at 50 Hz (constant biases folded in, see `DecoderStep`).
* ``decoder_step.onnx``: ``prev [B]``, ``noise [B]``, ``past.{i}.{j} [B, R]`` (layer ``i``'s
  input at ``tau - j d_i``), ``cond.{i} [B, 2G]`` -> ``sample [B]``, ``logits [B, Q]``,
  ``current.{i} [B, R]`` (`DecoderStep.layers`): one tensor per ring slot, so the runtime binds
  them in place.
* ``decoder_warmup.onnx``: ``prev [B, T]``, ``cond [B, C, L*2G]``, ``index [B, T]`` ->
  ``state [B, sum((k-1) d_i), R]``, the rings after ``T`` warm-up steps computed in parallel
  (`DecoderStep.warm`); the runtime starts each folded segment with it.
* ``decoder_step.int8.onnx``, ``decoder_warmup.int8.onnx`` with ``--int8``: dynamically
  quantised weights (the step from its unfused form: onnxruntime quantises ``MatMul``, not
  ``Gemm``; the output head stays fp32), the step's activations quantised with one scale per
  row (`per_row_activations`), so a row's samples do not depend on the rows beside it; the
  export prints its teacher-forced cross-entropy against fp32 on held-out clips.

``model.json`` holds the resolved model config, the geometry's layer specs (the engine rebuilds
`CodecGeometry` from them), sample rate, hop, K, speakers, the sha256 of every file and a model
id. After writing, every graph is run with onnxruntime and compared with PyTorch; a mismatch
raises `ExportMismatch`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.autoencoder import Autoencoder
from model.config import ModelConfig, from_dict, to_dict
from model.decoder_step import DecoderStep
from vqwavenet.model_dir import (
    CONDITIONER_FILE,
    ENCODER_FILE,
    FORMAT,
    GRAPH_FILES,
    INT8_FILES,
    STEP_FILE,
    VERSION,
    WARMUP_FILE,
    StepSpec,
    geometry_spec,
    model_id,
    step_names,
    write_meta,
)
from vqwavenet.model_dir import file_sha256 as sha256

OPSET = 20
TIE = 1e-5  # float32 distance ties below which two codes may legitimately differ
TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """An exported graph disagrees with the PyTorch model."""


# --- graphs --------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` padded utterances -> codes ``[B, F]``."""
        return self.model.encode(wave)


class ConditionerGraph(nn.Module):
    def __init__(self, model: Autoencoder, step: DecoderStep):
        super().__init__()
        self.model, self.step = model, step

    def forward(self, codes: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, F]`` + speakers ``[B]`` -> ``[B, L*2G, F - k + 1]`` (slots = frames:
        no jitter at inference)."""
        vecs = self.model.quantizer.codebook[codes]  # [B, F, D]
        return self.step.condition(vecs.transpose(1, 2), speaker)


class StepGraph(nn.Module):
    """`DecoderStep.layers` with flat arguments: ``prev, noise, *past, *cond`` (`step_names`)."""

    def __init__(self, step: DecoderStep, fused: bool = True):
        super().__init__()
        self.step, self.fused = step, fused

    def forward(self, prev, noise, *tensors):
        n_past = self.step.n_layers * (self.step.kernel - 1)
        past, cond = tensors[:n_past], tensors[n_past:]
        sample, logits, current = self.step.layers(prev, past, cond, noise, fused=self.fused)
        return (sample, logits, *current)


def step_feeds(step: DecoderStep, prev, past, cond, noise) -> dict[str, np.ndarray]:
    """The step graph's inputs from `DecoderStep.forward`'s stacked arguments."""
    r, g, taps = step.residual_channels, step.gate, step.kernel - 1
    names = step_names(step.n_layers, step.kernel)
    values = [prev, noise]
    values += [p[:, t * r : (t + 1) * r] for p in past for t in range(taps)]
    values += list(cond.split(2 * g, 1))
    return {k: v.contiguous().numpy() for k, v in zip(names["inputs"], values)}


class WarmGraph(nn.Module):
    def __init__(self, step: DecoderStep):
        super().__init__()
        self.step = step

    def forward(self, prev, cond, index):
        return self.step.warm(prev, cond, index)


# --- checkpoints and specs -----------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> tuple[Autoencoder, list[str], dict]:
    """Rebuild the eval-mode model of a checkpoint; returns (model, speakers, checkpoint)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    missing = {"model_config", "model"} - set(ckpt)
    if missing:
        raise KeyError(f"{path}: not a checkpoint (missing {sorted(missing)})")
    model = Autoencoder(from_dict(ModelConfig, ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    n = model.cfg.decoder.n_speakers
    speakers = list(ckpt.get("speakers") or [f"speaker{i}" for i in range(n)])
    return model.eval(), speakers, ckpt


def keep_voices(model: Autoencoder, speakers: list[str], names: list[str]) -> list[str]:
    """Keep only the voices ``names`` (in that order) in ``model``'s speaker table, in place,
    and return them as the model's speakers: a checkpoint whose table has rows for voices it
    never trained (a run restricted by ``train.voices``) exports without them."""
    unknown = [n for n in names if n not in speakers]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"voices must be distinct voices of the checkpoint ({', '.join(speakers)}), "
            f"not {', '.join(names) or 'none'}"
        )
    rows = torch.tensor([speakers.index(n) for n in names])
    table = model.decoder.speaker
    model.decoder.speaker = nn.Embedding.from_pretrained(
        table.weight.detach()[rows].clone(), freeze=False
    )
    model.cfg.decoder.n_speakers = len(names)
    return list(names)


# --- export --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """The exporter warns per graph (TorchScript deprecation, tracer casts): keep the CLI
    readable."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export(module: nn.Module, args: tuple, path: Path, inputs, outputs, dynamic) -> None:
    """TorchScript-based exporter: seconds per graph where dynamo takes tens of seconds.
    ``dynamic`` names the dynamic axes of each input and output. The exporter restores the
    wrapper's train/eval mode afterwards (recursively), so wrappers must be in eval mode or
    the model is left in training mode, with jitter."""
    module = module.eval()
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def example_inputs(model: Autoencoder, step: DecoderStep, batch: int = 2, frames: int = 12):
    """Random but valid example inputs of every graph (batch >= 2 for the dynamic axes)."""
    geo, cfg = model.geometry, model.cfg
    g = torch.Generator().manual_seed(0)
    n_samples = (frames - 1) * geo.hop + geo.encoder_rf
    wave = 0.3 * torch.randn(batch, n_samples, generator=g)
    codes = torch.randint(cfg.quantizer.codebook_size, (batch, frames), generator=g)
    speaker = torch.arange(batch) % cfg.decoder.n_speakers
    n_layers, r = step.n_layers, step.residual_channels
    prev = torch.randint(cfg.decoder.quantization_channels, (batch,), generator=g)
    past = torch.randn(n_layers, batch, (step.kernel - 1) * r, generator=g)
    cond = torch.randn(batch, n_layers * 2 * step.gate, generator=g)
    noise = torch.rand(batch, generator=g)
    steps = sum(step.ring_sizes()) + 3
    warm = (
        torch.randint(cfg.decoder.quantization_channels, (batch, steps), generator=g),
        torch.randn(batch, frames, n_layers * 2 * step.gate, generator=g),
        torch.randint(frames, (batch, steps), generator=g).sort(1).values,
    )
    return wave, (codes, speaker), (prev, past, cond, noise), warm


def export_step(step: DecoderStep, step_args: tuple, path: Path, *, fused: bool) -> None:
    names = step_names(step.n_layers, step.kernel)
    feeds = step_feeds(step, *step_args)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    _export(
        StepGraph(step, fused),
        args,
        path,
        names["inputs"],
        names["outputs"],
        {name: {0: "batch"} for name in names["inputs"] + names["outputs"]},
    )


def export_graphs(model: Autoencoder, out: Path, temperature: float = 1.0) -> DecoderStep:
    """Write the fp32 graphs into ``out``, the step sampling at ``temperature``; returns the
    step module they came from."""
    model = model.eval()
    step = DecoderStep(model.decoder, temperature).eval()
    wave, cond_args, step_args, warm_args = example_inputs(model, step)
    batch = {0: "batch"}
    _export(
        EncoderGraph(model),
        (wave,),
        out / ENCODER_FILE,
        ["wave"],
        ["codes"],
        {"wave": {0: "batch", 1: "samples"}, "codes": {0: "batch", 1: "frames"}},
    )
    _export(
        ConditionerGraph(model, step),
        cond_args,
        out / CONDITIONER_FILE,
        ["codes", "speaker"],
        ["cond"],
        {"codes": {0: "batch", 1: "frames"}, "speaker": batch, "cond": {0: "batch", 2: "slots"}},
    )
    export_step(step, step_args, out / STEP_FILE, fused=True)
    steps = {0: "batch", 1: "steps"}
    _export(
        WarmGraph(step),
        warm_args,
        out / WARMUP_FILE,
        ["prev", "cond", "index"],
        ["state"],
        {"prev": steps, "cond": {0: "batch", 1: "frames"}, "index": steps, "state": batch},
    )
    return step


# Weights of the output head's two products (`DecoderStep`), which int8 leaves in fp32.
HEAD_WEIGHTS = ("head1_w", "head2_w")
# ``model.json``'s "int8_activations" for an int8 step quantised by `per_row_activations`.
PER_ROW = "per_row"


def quantize_int8(
    model: Autoencoder, step: DecoderStep, out: Path, *, per_row: bool = True
) -> None:
    """Dynamically quantised (int8 weights, activation scales computed as it runs) copies of
    the step and the warm-up, which run faster. The step is quantised from its unfused form,
    with one activation scale per row (`per_row_activations`; ``per_row=False``: one per call,
    over all rows, as onnxruntime's dynamic quantisation does, for comparisons). The warm-up
    runs one stream per call, so its per-call scales never mix streams.

    The output head stays fp32: its products turn their inputs straight into logits, so
    quantising it cost far more cross-entropy than all the other layers together, for a small
    share of the step's multiply-adds (the export prints the int8 cost;
    ``benchmarks/README.md`` has the history)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        unfused = Path(tmp) / STEP_FILE
        export_step(step, example_inputs(model, step)[2], unfused, fused=False)
        sources = {STEP_FILE: unfused, WARMUP_FILE: out / WARMUP_FILE}
        keep = {STEP_FILE: head_products(unfused), WARMUP_FILE: []}
        for fp32, int8 in INT8_FILES.items():
            with _quiet():
                quantize_dynamic(
                    str(sources[fp32]),
                    str(out / int8),
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=keep[fp32],
                )
            left = sorted(n.name for n in _graph(out / int8).node if n.op_type == "MatMul")
            if left != sorted(keep[fp32]):  # a weight the exporter did not make a constant
                raise RuntimeError(f"{int8}: products left in fp32 {left}, not {keep[fp32]}")
    if per_row:
        import onnx

        path = out / INT8_FILES[STEP_FILE]
        onnx.save(per_row_activations(onnx.load(str(path))), str(path))


def per_row_activations(graph_model):
    """``graph_model`` (an onnxruntime-quantised ``onnx.ModelProto``, changed in place and
    returned) with no activation scale shared between rows, so that a row's outputs never
    depend on the other rows of the call.

    onnxruntime's ``DynamicQuantizeLinear`` takes one scale and zero point over a product's
    whole input, all rows together. Each is replaced, with the fixed zero point 128 on unsigned
    activations (symmetric: ``MatMulInteger``, whose fast path takes unsigned activations and
    one zero point, then multiplies ``round(x / s)`` by the int8 weights exactly):

    - an input bounded by 1 by construction (a product of ``tanh`` and ``sigmoid``, the gated
      units, and concatenations of them): the fixed scale ``1 / 127``, one ``QuantizeLinear``
      (what a per-call scale over such rows comes to, at no cost per step);
    - any other input (the residual stream): per row, the row's largest magnitude over 127 as
      its scale (``ReduceMax`` of ``Abs``, a tiny floor for a row of zeros), ``QuantizeLinear``
      along the rows; the product is rescaled by the weight's scale, then by the row's scale
      as a column.

    Returns the graph; ``graph_model.graph.doc_string`` notes the rewrite."""
    import onnx
    from onnx import helper, numpy_helper

    g = graph_model.graph
    if "per-row activation scales" in g.doc_string:
        raise ValueError("the graph's activation scales are per row already")
    producer = {o: node for node in g.node for o in node.output}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def bounded(name: str) -> bool:
        """Whether tensor ``name`` lies in [-1, 1] by construction."""
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type in ("Tanh", "Sigmoid"):
            return True
        if node.op_type in ("Mul", "Concat"):
            return all(bounded(i) for i in node.input)
        if node.op_type in ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Transpose"):
            return bounded(node.input[0])
        return False

    prefix = "per_row."
    constants = [
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}axis"),
        numpy_helper.from_array(np.array(1e-30, np.float32), f"{prefix}tiny"),
        numpy_helper.from_array(np.array([128], np.uint8), f"{prefix}zero"),
    ]
    step = np.array(1 / 127, np.float32)
    constants.append(numpy_helper.from_array(step, f"{prefix}step"))
    nodes, dropped, after = [], set(), {}  # after: a node's name -> the node to follow it
    rewritten = 0
    for node in g.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        (x,), (quantised, scale, zero_point), p = node.input, node.output, node.name
        # Every product's zero point: the fixed 128, a scalar as MatMulInteger needs.
        constants.append(numpy_helper.from_array(np.array(128, np.uint8), zero_point))
        rewritten += 1
        if bounded(x):
            constants.append(numpy_helper.from_array(step, scale))
            nodes.append(
                helper.make_node(
                    "QuantizeLinear", [x, scale, zero_point], [quantised], name=f"{p}/Quantize"
                )
            )
            continue
        nodes += [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
            helper.make_node(
                "ReduceMax",
                [f"{p}/abs", f"{prefix}axis"],
                [f"{p}/max"],
                name=f"{p}/Max",
                keepdims=0,
            ),
            helper.make_node(
                "Max", [f"{p}/max", f"{prefix}tiny"], [f"{p}/range"], name=f"{p}/Floor"
            ),
            helper.make_node("Mul", [f"{p}/range", f"{prefix}step"], [f"{p}/s"], name=f"{p}/Scale"),
            helper.make_node("Shape", [f"{p}/s"], [f"{p}/rows"], name=f"{p}/Rows"),
            helper.make_node(
                "Expand", [f"{prefix}zero", f"{p}/rows"], [f"{p}/z"], name=f"{p}/Zero"
            ),
            helper.make_node(
                "QuantizeLinear", [x, f"{p}/s", f"{p}/z"], [quantised], name=f"{p}/Quantize", axis=0
            ),
            helper.make_node(
                "Unsqueeze", [f"{p}/s", f"{prefix}axis"], [f"{p}/column"], name=f"{p}/Column"
            ),
        ]
        # onnxruntime rescales a product by Mul(Cast(acc), Mul(scale, weight scale)), and its
        # optimiser fuses that into one operator that takes the activation scale as one value
        # per call (given a column of them, its outputs are wrong). So the product is rescaled
        # by the weight's scale there, and by the row's scale after it.
        (both,) = consumers[scale]
        weight_scale = next(i for i in both.input if i != scale)
        for rescale in consumers[both.output[0]]:
            out = rescale.output[0]
            rescale.input[list(rescale.input).index(both.output[0])] = weight_scale
            rescale.output[0] = f"{out}/by_weight"
            after[rescale.name] = helper.make_node(
                "Mul", [f"{out}/by_weight", f"{p}/column"], [out], name=f"{p}/ByRow"
            )
        dropped.add(id(both))
    if not rewritten:
        raise ValueError("no DynamicQuantizeLinear to rewrite: not an onnxruntime-quantised graph")
    ordered = []
    for node in nodes:
        if id(node) not in dropped:
            ordered.append(node)
            if node.name in after:
                ordered.append(after[node.name])
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(constants)
    g.doc_string = (g.doc_string + "\n" if g.doc_string else "") + (
        "int8 with per-row activation scales (export.onnx_export.per_row_activations)"
    )
    onnx.checker.check_model(graph_model)
    return graph_model


def requantize_int8(model_dir: str | Path, waves: list[np.ndarray] | None = None, samples=8000):
    """Give an export made before per-row activation scales an int8 step that has them, from
    its own quantised weights, and nothing else: the fp32 graphs, the warm-up, the primer and
    the model id stay (the codes it made keep their meaning). ``model.json`` gets the new
    file's hash, "int8_activations" and, with ``waves``, the int8 cost measured again. Returns
    the new ``model.json``."""
    import onnx

    from vqwavenet.model_dir import read_meta, write_meta

    out = Path(model_dir)
    meta = read_meta(out)
    name = INT8_FILES[STEP_FILE]
    if name not in meta["files"]:
        raise ValueError(f"{out}: no {name} (export with --int8)")
    if meta.get("int8_activations") == PER_ROW:
        raise ValueError(f"{out}: its int8 step quantises activations per row already")
    graph = per_row_activations(onnx.load(str(out / name)))
    tmp = out / (name + ".tmp")
    onnx.save(graph, str(tmp))
    tmp.replace(out / name)
    meta["files"][name] = sha256(out / name)
    meta["int8_activations"] = PER_ROW
    write_meta(out, meta)
    if waves:
        meta["int8_quality"] = int8_quality(out, waves, samples)
        write_meta(out, meta)
    return meta


def _graph(path: Path):
    import onnx

    return onnx.load(str(path)).graph


def head_products(path: Path) -> list[str]:
    """Names of the step graph's output-head ``MatMul`` nodes (found by their weights)."""
    nodes = [
        n.name
        for n in _graph(path).node
        if n.op_type == "MatMul" and any(i.endswith(HEAD_WEIGHTS) for i in n.input)
    ]
    if len(nodes) != len(HEAD_WEIGHTS):
        raise RuntimeError(f"{path}: expected the head's {HEAD_WEIGHTS} products, found {nodes}")
    return nodes


def write_metadata(model: Autoencoder, speakers: list[str], out: Path, extra: dict) -> dict:
    cfg = model.cfg
    files = [f for f in (*GRAPH_FILES, *INT8_FILES.values()) if (out / f).is_file()]
    hashes = {f: sha256(out / f) for f in files}
    config = to_dict(cfg)
    step = DecoderStep(model.decoder)
    spec = StepSpec(
        n_layers=step.n_layers,
        kernel_size=step.kernel,
        dilations=tuple(step.dilations),
        residual_channels=step.residual_channels,
        gate_channels=step.gate,
        cond_kernel=cfg.decoder.cond_kernel,
    )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_id": model_id(config, hashes),
        "sample_rate": cfg.features.sample_rate,
        "hop": model.geometry.hop,
        "codebook_size": cfg.quantizer.codebook_size,
        "quantization_channels": cfg.decoder.quantization_channels,
        "speakers": speakers,
        "model_config": config,
        "geometry": geometry_spec(model.geometry),
        "decoder_step": spec.to_meta(),
        "files": hashes,
        **extra,
    }
    write_meta(out, meta)
    return meta


# --- verification --------------------------------------------------------------------------------


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_err(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.detach().numpy()).max())


def code_mismatches(model: Autoencoder, padded: torch.Tensor, codes: np.ndarray) -> int:
    """Frames whose ``codes`` differ from PyTorch's and are not a distance tie (within TIE)."""
    with torch.no_grad():
        z = model.encoder(model.features(padded)).transpose(1, 2).double()
        e = model.quantizer.codebook.double()
        dist = torch.cdist(z, e[None].expand(len(z), -1, -1)) ** 2  # [B, F, K]
    ref = dist.argmin(-1).numpy()
    got = torch.as_tensor(codes, dtype=torch.long)
    d_got = dist.gather(-1, got[..., None])[..., 0]
    d_best = dist.min(-1).values
    return int(((codes != ref) & ((d_got - d_best).numpy() > TIE)).sum())


def verify(model: Autoencoder, step: DecoderStep, out: Path, batch: int = 3) -> dict:
    """Run each graph with onnxruntime at a batch other than the export's and compare.

    Returns the measured errors; raises `ExportMismatch` beyond the tolerances."""
    wave, (codes, speaker), step_args, warm_args = example_inputs(model, step, batch, frames=17)
    errors = {}
    enc = _session(out / ENCODER_FILE).run(None, {"wave": wave.numpy()})[0]
    errors["encoder_code_mismatches"] = code_mismatches(model, wave, enc)
    with torch.no_grad():
        ref_cond = ConditionerGraph(model, step)(codes, speaker)
        ref = step(*step_args)
        ref_warm = step.warm(*warm_args)
    cond = _session(out / CONDITIONER_FILE).run(
        None, {"codes": codes.numpy(), "speaker": speaker.numpy()}
    )
    errors["conditioner_max_abs"] = _max_err(cond[0], ref_cond)
    feeds = step_feeds(step, *step_args)
    sample, logits, *current = _session(out / STEP_FILE).run(None, feeds)
    errors["step_logits_max_abs"] = _max_err(logits, ref.logits)
    errors["step_current_max_abs"] = _max_err(np.concatenate(current, 1), ref.current)
    # The class may differ only where the noise sits on a CDF boundary within tolerance.
    cdf = torch.softmax(ref.logits.double() / step.temperature, 1).cumsum(1)
    near = (cdf - step_args[3].double()[:, None]).abs().min(1).values < TOLERANCE
    errors["step_sample_mismatches"] = int(((sample != ref.sample.numpy()) & ~near.numpy()).sum())
    feeds = {k: v.numpy() for k, v in zip(("prev", "cond", "index"), warm_args)}
    state = _session(out / WARMUP_FILE).run(None, feeds)[0]
    errors["warmup_state_max_abs"] = _max_err(state, ref_warm)
    bad = [
        k
        for k, v in errors.items()
        if (k.endswith("mismatches") and v > 0) or (k.endswith("max_abs") and v > TOLERANCE)
    ]
    if bad:
        raise ExportMismatch(f"exported graphs differ from PyTorch: {bad} ({errors})")
    return errors


# --- int8 quality --------------------------------------------------------------------------------


def int8_quality(out: Path, waves: list[np.ndarray], max_samples: int = 8000) -> dict:
    """Teacher-forced cross-entropy (nats/sample) of fp32 and int8 steps on held-out clips."""
    from vqwavenet import Codec

    waves = [w[:max_samples] for w in waves]
    result = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        codec = Codec(out, int8=int8)
        result[f"ce_{name}"] = codec.cross_entropy(waves, speaker=0)
    result["ce_increase"] = result["ce_int8"] - result["ce_fp32"]
    result["clips"] = len(waves)
    result["samples"] = int(sum(len(w) for w in waves))
    return result


def export_model(
    model: Autoencoder,
    speakers: list[str],
    out: str | Path,
    *,
    int8: bool = False,
    quality_waves: list[np.ndarray] | None = None,
    quality_samples: int = 8000,
    notice: str | None = None,
    per_row: bool = True,
    temperature: float = 1.0,
) -> dict:
    """Export, verify and describe a model; returns the ``model.json`` contents.

    ``notice``: a caveat for users (e.g. how briefly the model was trained), shown by the app;
    ``temperature``: the step graphs (fp32 and int8) sample from ``softmax(logits /
    temperature)``, recorded as "sampling_temperature" (their ``logits`` output is unchanged);
    ``per_row``: the int8 step's activation scales per row (``False``: per call, whose samples
    depend on the batch; for comparisons).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    step = export_graphs(model, out, temperature)
    errors = verify(model, step, out)
    extra = {
        "verification": errors,
        "sampling_temperature": step.temperature,
        **({"notice": notice} if notice else {}),
    }
    if int8:
        quantize_int8(model, step, out, per_row=per_row)
        extra["int8_activations"] = PER_ROW if per_row else "per_call"
    else:
        for name in INT8_FILES.values():
            (out / name).unlink(missing_ok=True)
    meta = write_metadata(model, speakers, out, extra)
    if int8 and quality_waves:
        meta["int8_quality"] = int8_quality(out, quality_waves, quality_samples)
        write_meta(out, meta)
    return meta
