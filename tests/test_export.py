"""ONNX export: graphs equal PyTorch, the incremental step equals the parallel decoder, the
verification and the CLI fail loudly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from export.__main__ import main as export_main
from export.onnx_export import (
    ExportMismatch,
    export_model,
    load_checkpoint,
    sha256,
    step_feeds,
    verify,
)
from model.autoencoder import Autoencoder, Windows
from model.config import to_dict
from model.decoder_step import DecoderStep
from training.config import load_model_config
from vqwavenet import Codec

DATA = Path(__file__).parent / "data"


def make_checkpoint(path: Path, config: str = "tiny", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Autoencoder(load_model_config(config))
    dim = model.features.dim
    model.features.set_statistics(torch.linspace(-20, 20, dim), torch.linspace(5, 30, dim))
    n = model.cfg.decoder.n_speakers
    ckpt = {
        "model_config": to_dict(model.cfg),
        "model": model.state_dict(),
        "speakers": [f"spk{i}" for i in range(n)],
        "step": 0,
    }
    torch.save(ckpt, path)
    return path


def clip(name: str, n: int | None = None) -> np.ndarray:
    x, _ = sf.read(DATA / f"{name}.wav", dtype="float32")
    return x[:n] if n else x


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "tiny.pt")
    model, speakers, _ = load_checkpoint(ckpt)
    meta = export_model(model, speakers, root / "out")
    return model, root / "out", meta, ckpt


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def teacher_forced_reference(model: Autoencoder, wave: torch.Tensor, speaker: int):
    """Parallel teacher-forced logits ``[n, Q]`` of a whole utterance, and its padding."""
    geo = model.geometry
    left, right, n_frames = geo.padding(len(wave))
    padded = torch.nn.functional.pad(wave, (left, right))[None]
    one = torch.tensor([0])
    win = Windows(
        start=one * 0,
        frame0=one * 0,
        n_frames=torch.tensor([n_frames]),
        t0=torch.tensor([left]),
        n_valid=torch.tensor([len(wave)]),
        utt=one * 0,
        speaker=torch.tensor([speaker]),
    )
    with torch.no_grad():
        logits = model(padded, win, len(wave)).logits[0].T
    return logits, padded[0], left, n_frames


# --- the graphs ----------------------------------------------------------------------------------


def test_export_writes_graphs_with_hashes_and_geometry(tiny):
    model, out, meta, _ = tiny
    assert not model.training  # the exporter must not leave the model in training mode
    on_disk = json.loads((out / "model.json").read_text())
    assert on_disk["model_id"] == meta["model_id"]
    for name in ("encoder.onnx", "conditioner.onnx", "decoder_step.onnx", "decoder_warmup.onnx"):
        assert on_disk["files"][name] == sha256(out / name)
    assert on_disk["verification"]["warmup_state_max_abs"] < 1e-4
    assert not (out / "decoder_step.int8.onnx").exists()
    assert not (out / "decoder_warmup.int8.onnx").exists()
    assert on_disk["hop"] == model.geometry.hop
    assert on_disk["codebook_size"] == model.cfg.quantizer.codebook_size
    assert on_disk["speakers"] == [f"spk{i}" for i in range(model.cfg.decoder.n_speakers)]
    wavenet = on_disk["geometry"]["wavenet"]
    assert [x["dilation"] for x in wavenet] == model.cfg.decoder.dilations


def test_onnx_encoder_codes_equal_pytorch_on_speech_at_two_batch_sizes(tiny):
    model, out, _, _ = tiny
    enc = session(out / "encoder.onnx")
    clips = [clip("activated", 12000), clip("auth-incorrect", 12000), clip("agent-newlocation")]
    for rows in (clips[:1], clips):
        n = min(len(c) for c in rows)
        left, right, _ = model.geometry.padding(n)
        wave = torch.nn.functional.pad(
            torch.from_numpy(np.stack([c[:n] for c in rows])), (left, right)
        )
        codes = enc.run(None, {"wave": wave.numpy()})[0]
        ref = model.encode(wave).numpy()
        assert codes.shape == ref.shape
        differ = codes != ref
        if differ.any():  # only at float32 distance ties
            z = model.encoder(model.features(wave)).transpose(1, 2).double()
            d = torch.cdist(z, model.quantizer.codebook.double()[None].expand(len(z), -1, -1)) ** 2
            two = d.topk(2, largest=False).values
            assert bool(((two[..., 1] - two[..., 0])[torch.from_numpy(differ)] < 1e-5).all())
        assert differ.mean() < 0.01


def test_conditioner_and_step_match_pytorch_to_1e4(tiny):
    model, out, _, _ = tiny
    step = DecoderStep(model.decoder).eval()
    g = torch.Generator().manual_seed(5)
    b, frames = 5, 9
    codes = torch.randint(model.cfg.quantizer.codebook_size, (b, frames), generator=g)
    speaker = torch.randint(model.cfg.decoder.n_speakers, (b,), generator=g)
    cond = session(out / "conditioner.onnx").run(
        None, {"codes": codes.numpy(), "speaker": speaker.numpy()}
    )[0]
    with torch.no_grad():
        vecs = model.quantizer.codebook[codes].transpose(1, 2)
        ref = model.decoder.condition(vecs, speaker) + step.gate_bias[None, :, None]
    assert cond.shape == ref.shape == (b, step.n_layers * 2 * step.gate, frames - 2)
    np.testing.assert_allclose(cond, ref.numpy(), atol=1e-4, rtol=0)

    past = torch.randn(step.n_layers, b, step.residual_channels, generator=g)
    args = (
        torch.randint(256, (b,), generator=g),
        past,
        torch.from_numpy(cond[:, :, 3]),
        torch.rand(b, generator=g),
    )
    sample, logits, *current = session(out / "decoder_step.onnx").run(None, step_feeds(step, *args))
    with torch.no_grad():
        ref = step(*args)
        sample2, logits2, current2 = step.layers(
            args[0], list(past), list(args[2].split(2 * step.gate, 1)), args[3], fused=True
        )
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.concatenate(current, 1), ref.current.numpy(), atol=1e-4, rtol=0)
    assert (sample == ref.sample.numpy()).all()
    # The fused form (addmm, exported as Gemm) computes the same function as the unfused one.
    torch.testing.assert_close(logits2, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(current2, 1), ref.current, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_step_samples_by_inverse_cdf_of_the_softmax(tiny, temperature):
    model, _, _, _ = tiny
    step = DecoderStep(model.decoder, temperature).eval()
    b = 20000
    g = torch.Generator().manual_seed(1)
    args = (
        torch.full((b,), 100),
        torch.zeros(step.n_layers, b, step.residual_channels),
        torch.zeros(b, step.n_layers * 2 * step.gate),
        torch.rand(b, generator=g),
    )
    with torch.no_grad():
        out = step(*args)
    cdf = torch.softmax(out.logits[0].double() / temperature, 0).cumsum(0)
    c, u = out.sample, args[3].double()
    # Each class is the first whose CDF reaches the noise ...
    assert bool((cdf[c] >= u - 1e-6).all())
    below = torch.where(c > 0, cdf[(c - 1).clamp(min=0)], torch.zeros_like(u))
    assert bool((below <= u + 1e-6).all())
    # ... so the draws follow the softmax (Kolmogorov-Smirnov, alpha ~ 1e-3).
    empirical = torch.bincount(c, minlength=256).double().cumsum(0) / b
    assert (empirical - cdf).abs().max() < 1.95 / b**0.5


def inverse_cdf(logits: np.ndarray, noise: np.ndarray, temperature: float) -> np.ndarray:
    """The class each row's noise picks from ``softmax(logits / temperature)``."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    cdf = np.cumsum(p / p.sum(1, keepdims=True), 1)
    return np.minimum((cdf < noise[:, None]).sum(1), logits.shape[1] - 1)


def test_cli_temperature_sharpens_the_fp32_and_int8_steps(tiny, tmp_path, capsys):
    """``--temperature`` changes what the step graphs draw, not the distribution they report:
    the logits equal a plain export's, the samples follow ``softmax(logits / T)`` in fp32 and
    int8, and a plain export's samples (the control) follow ``softmax(logits)``."""
    model, plain, _, ckpt = tiny
    out = tmp_path / "sharp"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--int8", "--eval-samples", "500"]
    assert export_main([*args, "--temperature", "0.5"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["sampling_temperature"] == 0.5 and Codec(out).sampling_temperature == 0.5
    assert Codec(plain).sampling_temperature == 1.0
    assert Codec(out).codes_hash == Codec(plain).codes_hash  # each decodes the other's codes
    step = DecoderStep(model.decoder).eval()
    b, g = 4000, torch.Generator().manual_seed(2)
    past = torch.randn(step.n_layers, b, (step.kernel - 1) * step.residual_channels, generator=g)
    cond = torch.randn(b, step.n_layers * 2 * step.gate, generator=g)
    prev = torch.randint(0, 256, (b,), generator=g)
    feeds = step_feeds(step, prev, past, cond, torch.rand(b, generator=g))
    noise = feeds["noise"]
    _, ref_logits, *_ = session(plain / "decoder_step.onnx").run(None, feeds)
    for name, atol in (("decoder_step.onnx", 1e-5), ("decoder_step.int8.onnx", 0.5)):
        sample, logits, *_ = session(out / name).run(None, feeds)
        np.testing.assert_allclose(logits, ref_logits, atol=atol, rtol=0)
        assert (sample == inverse_cdf(logits, noise, 0.5)).mean() > 0.999
        assert (sample != inverse_cdf(logits, noise, 1.0)).mean() > 0.05
    sample, logits, *_ = session(plain / "decoder_step.onnx").run(None, feeds)
    assert (sample == inverse_cdf(logits, noise, 1.0)).mean() > 0.999
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            export_main([*args, "--force", "--temperature", bad])
        assert "--temperature must be a positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive"):
        DecoderStep(model.decoder, 0.0)


# --- incremental generation equals the parallel model ---------------------------------------------


def run_incremental_torch(step: DecoderStep, cond: torch.Tensor, classes, tau0, n_steps, ci):
    """Teacher-forced incremental PyTorch generation with per-layer ring buffers (lists)."""
    b = 1
    rings = [torch.zeros(size, b, step.residual_channels) for size in step.ring_sizes()]
    logits = []
    for s in range(n_steps):
        past = torch.stack([ring[s % len(ring)] for ring in rings])  # x_i[tau - d_i]
        c = cond[:, :, int(ci[s])]
        out = step(classes[tau0 + s - 1].reshape(1), past, c, torch.zeros(b))
        current = out.current.reshape(b, step.n_layers, -1)
        for i, ring in enumerate(rings):
            ring[s % len(ring)] = current[:, i]
        logits.append(out.logits[0])
    return torch.stack(logits)


@pytest.fixture
def one_thread():
    """Per-step work is tiny: threads only add contention (10x slower on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("config,n", [("tiny", 3000), ("small", 1100)])
def test_incremental_pytorch_reproduces_parallel_logits(tmp_path, one_thread, config, n):
    """Several thousand steps (with the warm-up over the receptive field): every ring
    (dilations up to 4 in tiny, 512 in small) wraps more than twice."""
    ckpt = make_checkpoint(tmp_path / "m.pt", config, seed=3)
    model, _, _ = load_checkpoint(ckpt)
    step = DecoderStep(model.decoder).eval()
    assert n + model.geometry.wavenet_context > 2 * max(step.ring_sizes()) + 2000
    wave = torch.from_numpy(clip("agent-newlocation")[8000 : 8000 + n])
    ref, padded, left, _ = teacher_forced_reference(model, wave, speaker=2)
    from model import mulaw

    classes = mulaw.encode(padded, model.cfg.decoder.quantization_channels)
    geo = model.geometry
    ctx = geo.wavenet_context
    tau0 = left - ctx
    times = np.arange(tau0, left + n)
    with torch.no_grad():
        vecs = model.quantizer.codebook[model.encode(padded[None])].transpose(1, 2)
        cond = step.condition(vecs, torch.tensor([2]))
        ci = np.clip(geo.cond_index(times), 0, cond.shape[-1] - 1)
        got = run_incremental_torch(step, cond, classes, tau0, ctx + n, ci)[ctx:]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def _step_through(step: DecoderStep, prev, cond, index, rings):
    """The rings after stepping ``T`` times from the given contents (the generator's way)."""
    b, t_steps = prev.shape
    k, r = step.kernel, step.residual_channels
    rows = torch.arange(b)
    for t in range(t_steps):
        past = torch.stack(
            [
                torch.cat([ring[(t - j * d) % len(ring)] for j in range(k - 1, 0, -1)], 1)
                for ring, d in zip(rings, step.dilations)
            ]
        )
        noise = torch.rand(b, dtype=cond.dtype)
        current = step(prev[:, t], past, cond[rows, index[:, t]], noise).current
        for i, ring in enumerate(rings):
            ring[t % len(ring)] = current.reshape(b, step.n_layers, r)[:, i]
    sizes = step.ring_sizes()
    return torch.cat(
        [
            torch.stack([ring[(t_steps + j) % n] for j in range(n)], 1)
            for ring, n in zip(rings, sizes)
        ],
        1,
    )


@pytest.mark.parametrize("config, extra", [("tiny", 7), ("tiny", 0), ("tiny", -1), ("small", 0)])
def test_parallel_warm_up_equals_stepping_from_any_ring_contents(config, extra):
    """`DecoderStep.warm` gives the rings that ``T`` steps leave, whatever they held before,
    once ``T >= sum((k-1) d)``. Controls that the comparison can fail: conditioning read one
    step off differs, and with one step fewer the result still remembers the initial contents
    (measurable through tiny's six layers; through small's twenty it fades below float64)."""
    torch.manual_seed(3)
    model = Autoencoder(load_model_config(config)).double().eval()
    step = DecoderStep(model.decoder).double()
    need, b, frames = sum(step.ring_sizes()), 2, 9
    t_steps = need + extra
    cond = torch.randn(b, frames, step.n_layers * 2 * step.gate, dtype=torch.float64)
    prev = torch.randint(256, (b, t_steps))
    index = torch.randint(frames, (b, t_steps)).sort(1).values
    rings = [
        torch.randn(n, b, step.residual_channels, dtype=torch.float64) for n in step.ring_sizes()
    ]
    with torch.no_grad():
        stepped = _step_through(step, prev, cond, index, rings)
        if t_steps < need:
            with pytest.raises(ValueError, match="at least"):
                step.warm(prev, cond, index)
            other = [torch.randn_like(ring) for ring in rings]
            assert (stepped - _step_through(step, prev, cond, index, other)).abs().max() > 1e-8
            return
        got = step.warm(prev, cond, index)
        off_by_one = step.warm(prev, cond, index.roll(1, 1))
    assert got.shape == (b, need, step.residual_channels)
    assert (got - stepped).abs().max() < 1e-12
    assert (off_by_one - stepped).abs().max() > 1e-6


# --- failure paths -------------------------------------------------------------------------------


def test_verify_fails_loudly_when_graphs_differ_from_the_model(tiny):
    model, out, _, ckpt = tiny
    changed, _, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        changed.decoder.head[3].bias += 0.01  # the exported step no longer matches
    with pytest.raises(ExportMismatch, match="step_logits"):
        verify(changed, DecoderStep(changed.decoder), out)
    verify(model, DecoderStep(model.decoder), out)  # the control: the original passes


def test_cli_exports_int8_and_prints_its_quality(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--int8", "--eval-samples", "1500"]
    args += ["--notice", "random weights"]
    assert export_main(args) == 0
    printed = capsys.readouterr().out
    assert "int8 quality" in printed
    meta = json.loads((out / "model.json").read_text())
    q = meta["int8_quality"]
    assert meta["notice"] == "random weights"
    for name in ("decoder_step.int8.onnx", "decoder_warmup.int8.onnx"):
        assert meta["files"][name] == sha256(out / name)
    assert q["samples"] == 3 * 1500 and abs(q["ce_increase"]) < 0.05
    # The primer, cut from the first held-out clip; the engine starts later segments from it.
    assert meta["primer"]["source"].startswith("activated.wav [")
    assert "primer: " in printed
    assert Codec(out).warmup == "primed"
    assert export_main(args) == 1  # no overwrite without --force
    assert "--force" in capsys.readouterr().err
    other = ["--primer-wav", str(DATA / "auth-incorrect.wav"), "--force"]
    assert export_main([*args, *other]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["primer"]["source"].startswith("auth-incorrect.wav [")
    assert export_main([*args, "--primer-wav", str(tmp_path / "none.wav"), "--force"]) == 1
    assert "no primer clip" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_exports_only_the_voices_asked_for(tiny, tmp_path, capsys):
    """``--voices`` keeps those rows of the speaker table, in the order given: each kept voice
    decodes exactly as in the full export; a voice the checkpoint lacks is refused."""
    _, full, meta, ckpt = tiny
    assert len(meta["speakers"]) >= 2
    last, first = meta["speakers"][-1], meta["speakers"][0]
    out = tmp_path / "two"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--voices", last, first]) == 0
    sub = json.loads((out / "model.json").read_text())
    assert sub["speakers"] == [last, first]
    assert sub["model_config"]["decoder"]["n_speakers"] == 2
    wave = clip("activated", 3000)
    for name in (last, first):
        (want,) = Codec(full).teacher_forced([wave], name)
        (got,) = Codec(out).teacher_forced([wave], name)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (other,) = Codec(full).teacher_forced([wave], meta["speakers"][1])
    assert not np.allclose(Codec(out).teacher_forced([wave], 0)[0], other, atol=1e-3)
    for bad in (["nobody"], [first, first]):
        args = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "bad"), "--voices", *bad]
        assert export_main(args) == 1
        assert "voices must be distinct voices" in capsys.readouterr().err
