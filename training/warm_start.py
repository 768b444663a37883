"""Start training from an exported model: rebuild its PyTorch weights from the ONNX graphs.

    python -m training.warm_start --model vqwavenet/models/bundled --data D --out init.pt
    python -m training.train --config small --data data/speech --out runs/next --init-from init.pt

An exported model directory holds every weight the codec uses, so a model whose training
checkpoint is gone can still be trained further. The exporter folds some constants: the
dilated convolutions' biases, the residual biases carried along the residual path and the
skip biases reach the graphs only as sums. The rebuilt model puts each sum on one parameter
(dilated bias = the folded gate bias, residual biases zero, the skip sum on the first skip):
another parametrisation of the same function, which `check` verifies on random input. The
EMA codebook restarts from uniform usage counts (the graphs hold the codebook, not its
statistics).

Speakers follow the dataset: a voice the model has keeps its embedding, a new voice starts
from the mean of the model's embeddings, and a voice the dataset lacks is dropped.

``--dilation-depth D`` keeps, in every dilation cycle, the first D layers (dilations 1 ... 2**(D-1))
and drops the longer ones: a decoder with a shorter receptive field that starts from the
trained one. A shorter autoregressive context leaves the decoder more to learn from the codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from model.autoencoder import Autoencoder, Windows
from model.config import ModelConfig, from_dict, to_dict
from training.dataset import Dataset


class WarmStartError(ValueError):
    """The model directory cannot be turned back into weights."""


def _initializers(path: Path) -> tuple[dict[str, np.ndarray], list]:
    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}, list(graph.node)


def _by_consumer(values: dict, nodes: list, op: str, first_input: str | None = None) -> list:
    """Initializers read by ``op`` nodes (optionally with this first input), in graph order."""
    found = []
    for node in nodes:
        if node.op_type != op or (first_input is not None and node.input[0] != first_input):
            continue
        found += [values[x] for x in node.input if x in values]
    return found


def rebuild(model_dir: str | Path) -> tuple[Autoencoder, list[str]]:
    """The eval-mode model of an exported directory and its speakers."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    cfg = from_dict(ModelConfig, meta["model_config"], "model").validate()
    model = Autoencoder(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def put(name: str, value) -> None:
        if not torch.is_tensor(value):
            value = torch.from_numpy(np.array(value))  # a writable copy
        value = value.to(state[name].dtype)
        if value.shape != state[name].shape:
            raise WarmStartError(
                f"{name}: graph has {tuple(value.shape)}, model {state[name].shape}"
            )
        state[name] = value

    enc, enc_nodes = _initializers(model_dir / "encoder.onnx")
    for name, value in enc.items():
        if name.startswith("model."):
            put(name.removeprefix("model."), value)
    put("features.mean", _by_consumer(enc, enc_nodes, "Sub")[0].reshape(-1))
    put("features.std", _by_consumer(enc, enc_nodes, "Div")[0].reshape(-1))

    cond, cond_nodes = _initializers(model_dir / "conditioner.onnx")
    for name, value in cond.items():
        if name.startswith("model."):
            put(name.removeprefix("model."), value)
    put("decoder.speaker_proj.weight", _by_consumer(cond, cond_nodes, "MatMul")[0].T)
    gate_bias = _by_consumer(cond, cond_nodes, "Add")[0].reshape(-1)  # [L * 2G]

    step, step_nodes = _initializers(model_dir / "decoder_step.onnx")
    dec = cfg.decoder
    k, g = dec.kernel_size, dec.gate_channels
    n_layers = len(model.decoder.dilations)
    put("decoder.embed.weight", step["step.embed.weight"])
    for i in range(n_layers):
        weight = torch.zeros_like(state[f"decoder.dilated.{i}.weight"])  # [2G, R, k]
        for j in range(1, k):  # past.{i}.{j}: the input j dilations back, kernel tap k-1-j
            (w,) = _by_consumer(step, step_nodes, "Gemm", f"past.{i}.{j}")
            weight[:, :, k - 1 - j] = torch.from_numpy(w.T.copy())
        (w,) = _by_consumer(step, step_nodes, "Gemm", f"current.{i}")[:1]
        weight[:, :, k - 1] = torch.from_numpy(w.T.copy())
        put(f"decoder.dilated.{i}.weight", weight)
        put(f"decoder.dilated.{i}.bias", gate_bias[i * 2 * g : (i + 1) * 2 * g])
        if i < n_layers - 1:
            residual = [
                step[x]
                for node in step_nodes
                if node.op_type == "Gemm" and node.output[0] == f"current.{i + 1}"
                for x in node.input
                if x in step
            ]
            put(f"decoder.residual.{i}.weight", residual[0].T[:, :, None])
            put(f"decoder.residual.{i}.bias", np.zeros(residual[0].shape[1], np.float32))
        skip = step["step.skip_w"][i * g : (i + 1) * g].T  # [S, G]
        put(f"decoder.skip.{i}.weight", skip[:, :, None])
        bias = step["step.skip_b"] if i == 0 else np.zeros_like(step["step.skip_b"])
        put(f"decoder.skip.{i}.bias", bias)
    put("decoder.head.1.weight", step["step.head1_w"].T[:, :, None])
    put("decoder.head.1.bias", step["step.head1_b"])
    put("decoder.head.3.weight", step["step.head2_w"].T[:, :, None])
    put("decoder.head.3.bias", step["step.head2_b"])

    q = model.quantizer
    if q.ema:
        uniform = torch.full_like(state["quantizer.ema_count"], 1.0 / q.cfg.codebook_size)
        state["quantizer.ema_count"] = uniform
        state["quantizer.ema_sum"] = state["quantizer.codebook"] * uniform[:, None]
    state["quantizer.initialized"] = torch.ones((), dtype=torch.bool)
    model.load_state_dict(state)
    return model, list(meta["speakers"])


def remap_speakers(model: Autoencoder, speakers: list[str], wanted: list[str]) -> Autoencoder:
    """The model with one speaker embedding per name of ``wanted`` (see the module doc)."""
    cfg = from_dict(ModelConfig, to_dict(model.cfg), "model")
    cfg.decoder.n_speakers = len(wanted)
    new = Autoencoder(cfg.validate()).eval()
    state = model.state_dict()
    old = state["decoder.speaker.weight"]
    rows = [old[speakers.index(s)] if s in speakers else old.mean(0) for s in wanted]
    state["decoder.speaker.weight"] = torch.stack(rows)
    new.load_state_dict(state)
    return new


def truncate_layers(model: Autoencoder, depth: int) -> Autoencoder:
    """The model with the first ``depth`` layers of every dilation cycle (see the module doc)."""
    old_cfg = model.cfg.decoder
    if not 1 <= depth <= old_cfg.dilation_depth:
        raise WarmStartError(
            f"--dilation-depth must be 1 ... {old_cfg.dilation_depth} (the model's), not {depth}"
        )
    cfg = from_dict(ModelConfig, to_dict(model.cfg), "model")
    cfg.decoder.dilation_depth = depth
    new = Autoencoder(cfg.validate()).eval()
    old, state = model.state_dict(), new.state_dict()
    g2 = 2 * old_cfg.gate_channels
    kept = [
        c * old_cfg.dilation_depth + i for c in range(old_cfg.dilation_cycles) for i in range(depth)
    ]
    per_layer = ("decoder.dilated.", "decoder.residual.", "decoder.skip.")
    for name in state:
        if name.startswith(per_layer):
            # The new last layer has no residual: the old one after it is dropped with it.
            prefix, index, param = name.rsplit(".", 2)
            state[name] = old[f"{prefix}.{kept[int(index)]}.{param}"]
        elif name in (
            "decoder.cond_proj.weight",
            "decoder.cond_proj.bias",
            "decoder.speaker_proj.weight",
        ):
            rows = torch.cat([torch.arange(j * g2, (j + 1) * g2) for j in kept])
            state[name] = old[name][rows]
        else:
            state[name] = old[name]
    new.load_state_dict(state)
    return new


@torch.no_grad()
def check(model: Autoencoder, model_dir: str | Path, seconds: float = 0.5) -> float:
    """Largest difference between the rebuilt model's teacher-forced log-probabilities and the
    exported engine's on a seeded noise burst (raises `WarmStartError` above 1e-3)."""
    from vqwavenet import Codec

    codec = Codec(model_dir)
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(int(seconds * codec.sample_rate))).astype(np.float32)
    want = codec.teacher_forced([wave], 0)[0]  # [n, Q]
    padded, left, n_frames = model.pad(torch.from_numpy(wave)[None])
    n = len(wave)
    win = Windows(
        start=torch.zeros(1, dtype=torch.long),
        frame0=torch.zeros(1, dtype=torch.long),
        n_frames=torch.tensor([n_frames]),
        t0=torch.tensor([left]),
        n_valid=torch.tensor([n]),
        utt=torch.zeros(1, dtype=torch.long),
        speaker=torch.zeros(1, dtype=torch.long),
    )
    got = model(padded, win, n).logits[0].T.numpy()  # [n, Q]
    err = float(np.abs(_log_softmax(got) - _log_softmax(want)).max())
    if not err < 1e-3:
        raise WarmStartError(f"the rebuilt model differs from the graphs by {err:.2e}")
    return err


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.warm_start",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="exported model directory")
    p.add_argument("--data", required=True, help="prepared dataset whose voices to train")
    p.add_argument("--out", required=True, help="checkpoint to write (for --init-from)")
    p.add_argument(
        "--dilation-depth",
        type=int,
        help="keep only the first D layers of each dilation cycle (a shorter receptive field)",
    )
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        model, speakers = rebuild(args.model)
        err = check(model, args.model)
        wanted = Dataset(args.data).speakers
        if args.dilation_depth is not None:
            model = truncate_layers(model, args.dilation_depth)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = remap_speakers(model, speakers, wanted)
    torch.save(
        {"model_config": to_dict(model.cfg), "model": model.state_dict(), "speakers": wanted},
        args.out,
    )

    def names(voices) -> str:
        return ", ".join(sorted(voices)) or "none"

    print(f"rebuilt {args.model} (largest log-probability difference {err:.1e}); wrote {args.out}")
    print(
        f"voices kept: {names(set(wanted) & set(speakers))}; new: "
        f"{names(set(wanted) - set(speakers))}; dropped: {names(set(speakers) - set(wanted))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
