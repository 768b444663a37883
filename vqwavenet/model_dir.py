"""The model directory: what `python -m export` writes and `Codec` reads.

One directory holds ``model.json`` and the graphs it names, each with its sha256:

* ``encoder.onnx``: ``wave [B, L]`` (padded utterances) -> ``codes [B, F]``, MFCC inside.
* ``conditioner.onnx``: ``codes [B, F]``, ``speaker [B]`` -> ``cond [B, L*2G, F - k + 1]``.
* ``decoder_step.onnx``: one sample for a batch of streams, one tensor per ring slot
  (`step_names`).
* ``decoder_warmup.onnx``: the rings after a warm-up, computed in parallel over time.
* ``decoder_step.int8.onnx``, ``decoder_warmup.int8.onnx``: optional int8 copies.
* ``primer.wav`` and ``primer.<speaker index>.wav``: optional primers (`vqwavenet.primer`).

``model.json`` also holds the format name and version, the model id, sample rate, hop,
codebook size, speakers, the resolved model config, the geometry's layer specs (the engine
rebuilds `CodecGeometry` from them: one source of truth) and the decoder step's shape. This
module is the only place these names are spelled: the exporter and the engine import them.
Standard library and numpy only (the geometry is pure numpy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from model.geometry import CodecGeometry, Conv, Upsample

FORMAT = "vqwavenet-onnx"
VERSION = 2  # 2: the step graph takes one tensor per ring slot (`step_names`)
META_FILE = "model.json"
ENCODER_FILE = "encoder.onnx"
CONDITIONER_FILE = "conditioner.onnx"
STEP_FILE = "decoder_step.onnx"
WARMUP_FILE = "decoder_warmup.onnx"
GRAPH_FILES = (ENCODER_FILE, CONDITIONER_FILE, STEP_FILE, WARMUP_FILE)
INT8_FILES = {STEP_FILE: "decoder_step.int8.onnx", WARMUP_FILE: "decoder_warmup.int8.onnx"}
PRIMER_FILE = "primer.wav"

# The model shipped with the package (package data).
BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "bundled"

_LAYERS = {"Conv": Conv, "Upsample": Upsample}


class ModelDirError(ValueError):
    """The model directory is missing files, has the wrong format or fails its hashes."""


def speaker_primer_file(index: int) -> str:
    """File name of the primer of the voice with speaker index ``index``."""
    return f"primer.{index}.wav"


def step_names(n_layers: int, kernel: int) -> dict[str, list[str]]:
    """Input and output names of ``decoder_step.onnx``: per layer ``i``, the taps
    ``past.{i}.{j}`` (its input at ``tau - j d_i``, oldest first), ``cond.{i}``, and the
    output ``current.{i}`` (its input at ``tau``)."""
    past = [f"past.{i}.{j}" for i in range(n_layers) for j in range(kernel - 1, 0, -1)]
    return {
        "inputs": ["prev", "noise", *past, *(f"cond.{i}" for i in range(n_layers))],
        "outputs": ["sample", "logits", *(f"current.{i}" for i in range(n_layers))],
    }


@dataclass(frozen=True)
class StepSpec:
    """The decoder step's shape (``model.json``'s ``"decoder_step"``)."""

    n_layers: int
    kernel_size: int
    dilations: tuple[int, ...]
    residual_channels: int
    gate_channels: int
    cond_kernel: int

    @classmethod
    def from_meta(cls, entry: dict) -> StepSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in entry.items() if k in fields}
        return cls(**{**values, "dilations": tuple(int(d) for d in values["dilations"])})

    def to_meta(self) -> dict:
        return {**dataclasses.asdict(self), "dilations": list(self.dilations)}


def geometry_spec(geo: CodecGeometry) -> dict:
    """Layer specs from which `geometry_from_spec` rebuilds the same `CodecGeometry`."""

    def layer(x) -> dict:
        return {"type": type(x).__name__, **dataclasses.asdict(x)}

    return {
        "encoder": [layer(x) for x in geo.encoder],
        "conditioning": [layer(x) for x in geo.conditioning],
        "wavenet": [layer(x) for x in geo.wavenet],
        "ar_input": layer(geo.ar_input),
    }


def geometry_from_spec(spec: dict) -> CodecGeometry:
    """Rebuild the codec geometry from ``model.json``'s layer specs."""

    def layer(d: dict):
        d = dict(d)
        return _LAYERS[d.pop("type")](**d)

    return CodecGeometry(
        encoder=[layer(x) for x in spec["encoder"]],
        conditioning=[layer(x) for x in spec["conditioning"]],
        wavenet=[layer(x) for x in spec["wavenet"]],
        ar_input=layer(spec["ar_input"]),
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks (``model.json`` records one per file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(model_dir: str | os.PathLike, *, check_format: bool = True) -> dict:
    """``model.json`` of ``model_dir``; `ModelDirError` if missing or of another format."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {META_FILE} (export a checkpoint first)")
    meta = json.loads(path.read_text())
    if check_format and (meta.get("format") != FORMAT or meta.get("version") != VERSION):
        raise ModelDirError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} "
            f"is not {FORMAT} v{VERSION} (re-export it: python -m export --checkpoint ...)"
        )
    return meta


def write_meta(model_dir: str | os.PathLike, meta: dict) -> None:
    """Write ``model.json`` aside, then rename it over the old one."""
    path = Path(model_dir) / META_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def check_file(model_dir: Path, name: str, sha256: str | None, check_hash: bool) -> Path:
    """The path of ``name`` in ``model_dir`` after checking it exists and (``check_hash``)
    that its sha256 is ``sha256``; ``sha256=None``: ``model.json`` does not list it."""
    path = model_dir / name
    if sha256 is None or not path.is_file():
        hint = " (export with --int8)" if "int8" in name else ""
        raise ModelDirError(f"{model_dir}: missing {name}{hint}")
    if check_hash and file_sha256(path) != sha256:
        raise ModelDirError(f"{path}: sha256 differs from {META_FILE} (corrupt or edited)")
    return path


def codes_hash(meta: dict) -> str:
    """Hash of the weights that give codes their meaning (encoder and conditioner graphs),
    recorded in codes files. The decoder step (fp32 or int8) decodes the same codes, so it is
    left out and either engine accepts the other's files."""
    files = meta["files"]
    blob = "\n".join(f"{name}={files[name]}" for name in (ENCODER_FILE, CONDITIONER_FILE))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_id(config: dict, hashes: dict[str, str]) -> str:
    """The id of a model: a hash of its resolved config and its files' hashes."""
    blob = json.dumps({"config": config, "files": hashes}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
