"""Primed segment starts (`vqwavenet.primer`, ``Codec(warmup="primed")``): the state is the one a
stepped decode of the primer reaches, later segments start loud from it, and model
directories without a primer (or with a damaged one) behave as they say."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import DATA
from tests.test_export import clip
from vqwavenet import BUNDLED_MODEL, Codec, DecodeRequest, ModelDirError
from vqwavenet.audio import mulaw_decode, mulaw_encode
from vqwavenet.model_dir import PRIMER_FILE, file_sha256
from vqwavenet.primer import choose_excerpt, main
from vqwavenet.steps import Stream

BUNDLED = BUNDLED_MODEL


def test_choose_excerpt_takes_typical_speech_not_a_pause_or_the_loudest_part():
    """A clip of a loud burst, a pause and a long stretch at a middle level: the window, and
    its end, sit in the stretch (RMS near the clip's speech level), not in the burst."""
    rng = np.random.default_rng(0)
    loud, pause = 0.6 * rng.standard_normal(3000), np.zeros(3000)
    typical, fading = 0.15 * rng.standard_normal(8000), np.linspace(0.15, 0, 2000)
    typical[-2000:] *= fading  # a window ending here would end quieter than it began
    x = np.concatenate([loud, pause, typical]).clip(-1, 1).astype(np.float32)
    start, end = choose_excerpt(x, 2000)
    assert end - start == 2000
    assert 6000 <= start and end <= len(x) - 1000
    tail = x[end - 320 : end]
    assert 0.12 < np.sqrt(np.mean(tail**2)) < 0.18
    with pytest.raises(ValueError, match="needs 2000"):
        choose_excerpt(x[:1999], 2000)
    with pytest.raises(ValueError, match="no speech"):
        choose_excerpt(np.zeros(5000, np.float32), 2000)


def test_a_primed_start_continues_the_primer_as_a_stepped_decode_does():
    """`Codec.primed_state`'s rings (one parallel warm-up over the primer) are those of a decode
    stepped through the primer's last ``context`` samples: teacher-forced on the same inputs
    after it, both give the same logits. Control: the stepped decode fed the primer one
    sample late differs, so the comparison sees an off-by-one."""
    codec = Codec(BUNDLED, workers=1)
    assert codec.warmup == "primed"
    ctx, speaker = codec.context, 2
    state, first = codec.primed_state(speaker)
    x = codec.primer(speaker)
    g = len(x)
    cond = codec.condition(codec.encode(x), speaker)
    classes = mulaw_encode(x, codec.q)
    assert first == classes[-1]
    after = np.random.default_rng(1).integers(0, codec.q, 40)

    def logits(forced: np.ndarray, primed=None) -> np.ndarray:
        stream = Stream(
            request=0,
            tau0=codec.geometry.pad_left + g - ctx,
            length=1 + len(after),
            cond_offset=0,
            cond_count=len(cond),
            seed=(0, 0),
            forced=forced,
            primed=primed,
        )
        return codec.engine.run([stream], cond, None)[0]

    codec.parallel_warmup = False  # the reference steps through the warm-up
    inputs = np.concatenate([classes[g - ctx - 1 :], after])
    stepped = logits(inputs)
    primed = logits(inputs, (state, first))
    np.testing.assert_allclose(primed, stepped, atol=1e-4, rtol=0)
    late = logits(np.concatenate([classes[:1], classes[: ctx - 1], classes[-1:], after]))
    assert np.abs(late - primed).max() > 1e-2


def quiet_primers(model_dir, out, scale: float):
    """A copy of ``model_dir`` whose primers are ``scale`` times as loud (hashes updated)."""
    shutil.copytree(model_dir, out)
    meta = json.loads((out / "model.json").read_text())
    for entry in [meta["primer"], *meta["primer"].get("speakers", {}).values()]:
        wave, sr = sf.read(out / entry["file"], dtype="float32")
        sf.write(out / entry["file"], wave * scale, sr, subtype="PCM_16")
        entry["sha256"] = file_sha256(out / entry["file"])
    (out / "model.json").write_text(json.dumps(meta))
    return out


def test_primed_segments_start_as_loud_as_an_unbroken_decode(tmp_path):
    """What the primer is for: sampled, the bundled model's later segments are about as loud
    as the unbroken decode over their first 160 samples. The primer's level carries into
    them: from primers at a tenth of their level (the control) they start far quieter. (From
    silence, ``"steady"``, every bundled model so far started at another loudness, and the
    present one also from its primers at their excerpts' own level, which is why they are
    scaled by +3.5 dB: `benchmarks.segment_loudness`, the bundled PRIMERS.md.)"""
    quiet = quiet_primers(BUNDLED, tmp_path / "quiet", 0.1)
    codecs = {"primed": Codec(BUNDLED), "quiet": Codec(quiet)}
    n, segment, head = 10000, 2500, 160
    reqs = [
        DecodeRequest(codecs["primed"].encode(clip(name, n)), 0, n, seed)
        for name in ("activated", "auth-incorrect", "agent-newlocation")
        for seed in (0, 1)
    ]
    unfolded = codecs["primed"].decode_many(reqs, segment=n + 1)
    ratio = {}
    for name, codec in codecs.items():
        assert codec.warmup == "primed"
        plan = codec.plan(reqs, segment, 0, 0)
        outs, folds = codec.engine.run(plan.streams, plan.cond, None), plan.folds
        seg, ref = 0.0, 0.0
        for fold, whole in zip(folds, unfolded):
            for k in range(1, len(fold.bounds)):
                g = fold.start(k)
                seg += np.sum(mulaw_decode(outs[fold.first + k][:head], codec.q) ** 2)
                ref += np.sum(whole[g : g + head].astype(np.float64) ** 2)
        ratio[name] = np.sqrt(seg / ref)
    assert 0.7 < ratio["primed"] < 1.3, ratio
    assert ratio["quiet"] < 0.7, ratio


def test_model_dirs_without_a_primer_start_from_silence_and_damaged_ones_fail(tmp_path):
    """No primer: steady starts with the long burn-in (and ``warmup="primed"`` says how to
    add one). A primer that fails its hash or is too short is an error, not a quiet
    fallback."""
    primed = Codec(BUNDLED)
    assert (primed.warmup, primed.burn_in) == ("primed", 160)
    bare = tmp_path / "bare"
    shutil.copytree(BUNDLED, bare)
    meta = json.loads((bare / "model.json").read_text())
    entry = meta.pop("primer")
    (bare / "model.json").write_text(json.dumps(meta))
    (bare / PRIMER_FILE).unlink()
    steady = Codec(bare)
    assert (steady.warmup, steady.burn_in) == ("steady", 960)
    with pytest.raises(ModelDirError, match="vqwavenet.primer"):
        Codec(bare, warmup="primed")

    edited = tmp_path / "edited"
    shutil.copytree(BUNDLED, edited)
    wave, sr = sf.read(edited / PRIMER_FILE, dtype="int16")
    sf.write(edited / PRIMER_FILE, wave[::-1], sr, subtype="PCM_16")
    with pytest.raises(ModelDirError, match="sha256"):
        Codec(edited)
    assert Codec(edited, check_hashes=True, warmup="steady").warmup == "steady"
    sf.write(edited / PRIMER_FILE, wave[:100], sr, subtype="PCM_16")
    with pytest.raises(ModelDirError, match="at least"):
        Codec(edited, check_hashes=False)
    assert entry["samples"] == primed.context + 1


def test_primer_cli_writes_the_primer_the_codec_then_starts_from(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(BUNDLED, model)
    assert main(["--model", str(model), "--wav", str(DATA / "auth-incorrect.wav")]) == 0
    assert "auth-incorrect.wav" in capsys.readouterr().out
    meta = json.loads((model / "model.json").read_text())
    assert meta["primer"]["source"].startswith("auth-incorrect.wav [")
    assert not any(p.name.endswith(".tmp") for p in model.iterdir())
    codec = Codec(model)  # its hash checks out
    wave, sr = sf.read(model / PRIMER_FILE, dtype="float32")
    assert sr == codec.sample_rate and len(wave) == codec.context + 1
    start = int(meta["primer"]["source"].split("[")[1].split(":")[0])
    want = clip("auth-incorrect")[start : start + len(wave)]
    np.testing.assert_allclose(wave, want, atol=1 / 32768)
    assert not np.array_equal(codec.primed_state(0)[0], Codec(BUNDLED).primed_state(0)[0])

    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(8000, np.float32) + 1e-4, 16000)
    assert main(["--model", str(model), "--wav", str(silent)]) == 1
    assert "no speech" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "none"), "--wav", str(silent)]) == 1
    assert "no model.json" in capsys.readouterr().err


def test_a_primer_gain_scales_the_same_excerpt_and_refuses_to_clip(tmp_path, capsys):
    """``--gain-db`` scales the excerpt the clip's level would give (the choice does not
    depend on the level), says so in ``"source"``, and refuses a gain that would clip. The
    bundled primers are their excerpts at +3.5 dB (PRIMERS.md)."""
    plain, louder = tmp_path / "plain", tmp_path / "louder"
    for out in (plain, louder):
        shutil.copytree(BUNDLED, out)
    wav = str(DATA / "auth-incorrect.wav")
    assert main(["--model", str(plain), "--wav", wav]) == 0
    assert main(["--model", str(louder), "--wav", wav, "--gain-db", "3.5"]) == 0
    capsys.readouterr()
    a, b = (json.loads((m / "model.json").read_text())["primer"] for m in (plain, louder))
    assert b["source"] == a["source"] + " at +3.5 dB"
    quiet, _ = sf.read(plain / PRIMER_FILE, dtype="float64")
    loud, _ = sf.read(louder / PRIMER_FILE, dtype="float64")
    np.testing.assert_allclose(loud, quiet * 10 ** (3.5 / 20), atol=2 / 32768)
    assert not np.array_equal(Codec(louder).primed_state(0)[0], Codec(plain).primed_state(0)[0])
    assert main(["--model", str(louder), "--wav", wav, "--gain-db", "40"]) == 1
    assert "clips" in capsys.readouterr().err
    assert json.loads((louder / "model.json").read_text())["primer"] == b  # unchanged
    bundled = json.loads((BUNDLED / "model.json").read_text())["primer"]
    assert bundled["source"].endswith(" at +3.5 dB")


def test_a_voice_with_its_own_primer_starts_from_it(tmp_path, capsys):
    """``--speaker`` writes a voice's own primer; a decode in that voice starts from it, the
    others from the shared one. The bundled model has one for each voice but Allison's, whose
    voice the shared primer is."""
    bundled = Codec(BUNDLED)
    assert np.array_equal(bundled.primer(0), bundled.primers[None])
    for speaker in (1, 2, 3):
        own, _ = sf.read(BUNDLED / f"primer.{speaker}.wav", dtype="float32")
        np.testing.assert_array_equal(bundled.primer(speaker), own)

    model = tmp_path / "model"
    shutil.copytree(BUNDLED, model)
    meta = json.loads((model / "model.json").read_text())
    del meta["primer"]["speakers"]
    (model / "model.json").write_text(json.dumps(meta))
    shared = Codec(model)
    assert shared.primers.keys() == {None}
    args = ["--model", str(model), "--wav", str(DATA / "auth-incorrect.wav")]
    assert main([*args, "--speaker", "Carlo"]) == 0
    assert "primer.1.wav" in capsys.readouterr().out
    meta = json.loads((model / "model.json").read_text())
    assert meta["primer"]["speakers"]["Carlo"]["source"].startswith("auth-incorrect.wav [")
    carlo = Codec(model)
    assert not np.array_equal(carlo.primed_state(1)[0], shared.primed_state(1)[0])
    np.testing.assert_array_equal(carlo.primed_state(3)[0], shared.primed_state(3)[0])
    assert main([*args]) == 0  # a new shared primer keeps the voices' own
    assert "Carlo" in json.loads((model / "model.json").read_text())["primer"]["speakers"]

    assert main([*args, "--speaker", "Nobody"]) == 1
    assert "no speaker 'Nobody'" in capsys.readouterr().err
    (model / "primer.1.wav").write_bytes((model / "primer.2.wav").read_bytes())
    with pytest.raises(ModelDirError, match="primer.1.wav: sha256"):
        Codec(model)
    bare = tmp_path / "bare"
    shutil.copytree(BUNDLED, bare)
    meta = json.loads((bare / "model.json").read_text())
    del meta["primer"]
    (bare / "model.json").write_text(json.dumps(meta))
    assert main(["--model", str(bare), "--wav", args[-1], "--speaker", "June"]) == 1
    assert "default primer" in capsys.readouterr().err
