"""The file CLI (`python -m app.cli`): outputs, folders, bad inputs and the exit codes scripts
rely on (0 ok, 1 some inputs failed, 2 usage error, 3 model unusable)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from app.cli import EXIT_FAILED, EXIT_MODEL, EXIT_OK, EXIT_USAGE, main
from tests.conftest import APP_MAX_SECONDS
from vqwavenet.codes_file import CodesFile

ROOT = Path(__file__).resolve().parent.parent


def cli(model_dir, *args) -> int:
    return main([*args, "--model", str(model_dir), "--max-seconds", str(APP_MAX_SECONDS), "-q"])


def test_cli_encode_decode_resynth_round_trip(app_model_dir, app_inputs, tmp_path, capsys):
    clip = shutil.copy(app_inputs.clip, tmp_path / "speech.wav")
    n = sf.info(clip).frames

    assert cli(app_model_dir, "encode", str(clip), "--speaker", "Carlo") == EXIT_OK
    cf = CodesFile.read(tmp_path / "speech.vqwc")
    assert cf.speaker_name == "Carlo" and cf.num_samples == n
    np.testing.assert_array_equal(cf.codes, app_inputs.clip_codes)

    assert cli(app_model_dir, "decode", str(tmp_path / "speech.vqwc")) == EXIT_OK
    wave, sr = sf.read(tmp_path / "speech.decoded.wav", dtype="int16")
    assert sr == 16000 and wave.shape == (n,) and np.any(wave)

    out = tmp_path / "voice.wav"
    assert cli(app_model_dir, "resynth", str(clip), "--speaker", "2", "-o", str(out)) == EXIT_OK
    resynth, sr = sf.read(out, dtype="int16")
    assert sr == 16000 and resynth.shape == (n,)
    assert f"{clip} -> {out}" in capsys.readouterr().out


def test_cli_decode_is_reproducible_per_seed(app_model_dir, app_inputs, tmp_path):
    waves = []
    for name, seed in (("a.wav", "7"), ("b.wav", "7"), ("c.wav", "8")):
        out = tmp_path / name
        assert (
            cli(app_model_dir, "decode", str(app_inputs.codes), "--seed", seed, "-o", str(out)) == 0
        )
        waves.append(sf.read(out, dtype="int16")[0])
    np.testing.assert_array_equal(waves[0], waves[1])
    assert not np.array_equal(waves[0], waves[2])


def test_cli_encodes_a_folder_of_odd_but_valid_formats(app_model_dir, app_inputs, tmp_path):
    folder = next(iter(app_inputs.odd.values()))[0].parent
    out = tmp_path / "codes"
    assert cli(app_model_dir, "encode", str(folder), "-o", str(out)) == EXIT_OK
    for name, (path, lossless) in app_inputs.odd.items():
        cf = CodesFile.read(out / (path.stem + ".vqwc"))
        info = sf.info(path)
        expected = round(info.frames * 16000 / info.samplerate)
        assert abs(cf.num_samples - expected) <= 1, name
        if lossless:  # the same samples as the int16 clip: the same codes
            np.testing.assert_array_equal(cf.codes, app_inputs.clip_codes, err_msg=name)


def test_cli_names_every_bad_audio_file_and_processes_the_rest(
    app_model_dir, app_inputs, tmp_path, capsys
):
    folder = tmp_path / "in"
    folder.mkdir()
    for path, _ in app_inputs.bad_audio.values():
        shutil.copy(path, folder / path.name)
    shutil.copy(app_inputs.clip, folder / "good.wav")
    out = tmp_path / "out"
    assert cli(app_model_dir, "encode", str(folder), "-o", str(out)) == EXIT_FAILED
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == len(app_inputs.bad_audio)
    for name, (_, phrase) in app_inputs.bad_audio.items():
        line = next(x for x in lines if name in x)
        assert phrase in line, line
    assert f"{len(app_inputs.bad_audio)} of {len(app_inputs.bad_audio) + 1} input(s) failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["good.vqwc"]  # no partial outputs


def test_cli_resynth_rejects_bad_audio(app_model_dir, app_inputs, tmp_path, capsys):
    path, phrase = app_inputs.bad_audio["not_audio.wav"]
    out = tmp_path / "x.wav"
    assert cli(app_model_dir, "resynth", str(path), "-o", str(out)) == EXIT_FAILED
    assert phrase in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "name",
    [
        "truncated.vqwc",
        "empty.vqwc",
        "garbage.vqwc",
        "wav.vqwc",
        "foreign.vqwc",
        "other_hash.vqwc",
        "out_of_range.vqwc",
        "inconsistent.vqwc",
        "too_long.vqwc",
        "bad_speaker.vqwc",
    ],
)
def test_cli_decode_rejects_bad_codes_file(app_model_dir, app_inputs, tmp_path, capsys, name):
    path, phrase = app_inputs.bad_codes[name]
    out = tmp_path / "out.wav"
    assert cli(app_model_dir, "decode", str(path), "-o", str(out)) == EXIT_FAILED
    err = capsys.readouterr().err
    assert phrase in err and name in err, err
    assert not out.exists()


def test_cli_never_overwrites_without_force(app_model_dir, app_inputs, tmp_path, capsys):
    target = tmp_path / "clip.vqwc"
    target.write_bytes(b"precious")
    assert cli(app_model_dir, "encode", str(app_inputs.clip), "-o", str(target)) == EXIT_FAILED
    assert "--force" in capsys.readouterr().err
    assert target.read_bytes() == b"precious"
    args = ("encode", str(app_inputs.clip), "-o", str(target), "--force")
    assert cli(app_model_dir, *args) == EXIT_OK
    assert CodesFile.read(target).num_samples == sf.info(app_inputs.clip).frames
    assert [p.name for p in tmp_path.iterdir()] == ["clip.vqwc"]  # no temporary left behind


def test_cli_usage_errors_exit_2(app_model_dir, app_inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(app_model_dir, "encode", str(empty)) == EXIT_USAGE
    assert "no input files" in capsys.readouterr().err
    assert cli(app_model_dir, "encode", str(app_inputs.clip), "--speaker", "Nobody") == EXIT_USAGE
    assert "unknown speaker" in capsys.readouterr().err
    for sub in ("a", "b"):  # two inputs, one output name
        (tmp_path / sub).mkdir()
        shutil.copy(app_inputs.clip, tmp_path / sub / "x.wav")
    args = ("encode", str(tmp_path / "a" / "x.wav"), str(tmp_path / "b" / "x.wav"))
    assert cli(app_model_dir, *args, "-o", str(tmp_path / "out")) == EXIT_USAGE
    assert "would both be written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        main(["transmogrify", "x.wav"])
    assert e.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as e:
        cli(app_model_dir, "decode", str(app_inputs.codes), "--seed", "-1")
    assert e.value.code == EXIT_USAGE


def test_cli_missing_input_fails_but_others_run(app_model_dir, app_inputs, tmp_path, capsys):
    missing = tmp_path / "missing.wav"
    args = ("encode", str(missing), str(app_inputs.clip), "-o", str(tmp_path / "out"))
    assert cli(app_model_dir, *args) == EXIT_FAILED
    assert "no such file" in capsys.readouterr().err
    assert (tmp_path / "out" / "clip.vqwc").is_file()


def test_cli_unusable_model_exits_3(app_inputs, tmp_path, capsys):
    assert cli(tmp_path / "nothing", "encode", str(app_inputs.clip)) == EXIT_MODEL
    assert "no model" in capsys.readouterr().err


def test_cli_process_exit_codes_and_help(app_model_dir, app_inputs, tmp_path):
    """The real process, as a script sees it: documented exit codes, status on stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "app.cli"]
    help_text = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env)
    assert help_text.returncode == 0
    for line in ("0  every input", "1  some inputs failed", "2  usage error", "3  the model"):
        assert line in help_text.stdout
    bad = app_inputs.bad_audio["not_audio.wav"][0]
    args = ["encode", str(bad), "--model", str(app_model_dir), "-o", str(tmp_path / "x.vqwc")]
    proc = subprocess.run([*run, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == EXIT_FAILED
    assert "not audio" in proc.stderr and proc.stdout == ""
    assert "torch" not in proc.stderr


def test_cli_decodes_a_folder_in_batches_and_names_the_bad_file(
    app_model_dir, app_inputs, tmp_path, capsys, monkeypatch
):
    """A folder of codes files decodes as one batch of ``--batch-seconds`` (one engine call),
    a bad file among them is named and skipped, and ``--batch-seconds 0`` goes file by file."""
    from app.service import CodecService

    calls = []
    real = CodecService.decode_many

    def spy(self, requests, progress=None):
        calls.append(len(requests))
        return real(self, requests, progress)

    monkeypatch.setattr(CodecService, "decode_many", spy)
    folder = tmp_path / "codes"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(app_inputs.codes, folder / f"{name}.vqwc")
    (folder / "bad.vqwc").write_bytes(b"not a codes file")
    n = CodesFile.read(app_inputs.codes).num_samples

    assert cli(app_model_dir, "decode", str(folder), "-o", str(tmp_path / "one")) == EXIT_FAILED
    assert calls == [3]
    assert "bad.vqwc" in capsys.readouterr().err
    for name in ("a", "b", "c"):
        wave, sr = sf.read(tmp_path / "one" / f"{name}.decoded.wav", dtype="int16")
        assert sr == 16000 and wave.shape == (n,) and np.any(wave)

    calls.clear()
    out = str(tmp_path / "each")
    assert cli(app_model_dir, "decode", str(folder), "-o", out, "--batch-seconds", "0") == 1
    assert calls == [1, 1, 1]
    alone = sf.read(tmp_path / "each" / "a.decoded.wav", dtype="int16")[0]
    assert alone.shape == (n,)


def test_cli_int8_decodes_and_needs_an_int8_export(app_model_dir, app_inputs, tmp_path, capsys):
    out = tmp_path / "q.wav"
    assert cli(app_model_dir, "decode", str(app_inputs.codes), "--int8", "-o", str(out)) == 0
    n = CodesFile.read(app_inputs.codes).num_samples
    assert sf.read(out, dtype="int16")[0].shape == (n,)
    plain = tmp_path / "plain"
    shutil.copytree(app_model_dir, plain)
    for name in ("decoder_step.int8.onnx", "decoder_warmup.int8.onnx"):
        (plain / name).unlink()
    args = ("decode", str(app_inputs.codes), "--int8", "-o", str(tmp_path / "x.wav"))
    assert cli(plain, *args) == EXIT_MODEL
    assert "missing decoder_step.int8.onnx (export with --int8)" in capsys.readouterr().err


def test_cli_outputs_get_the_usual_file_mode(app_model_dir, app_inputs, tmp_path):
    """Outputs are written aside and renamed; they must not keep the temporary file's 0600."""
    out = tmp_path / "speech.vqwc"
    old = os.umask(0o022)
    try:
        assert cli(app_model_dir, "encode", str(app_inputs.clip), "-o", str(out)) == EXIT_OK
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_cli_has_no_default_length_limit_and_decodes_silence(app_model_dir, app_inputs, tmp_path):
    """Without --max-seconds a file longer than the app's limit encodes, and a silent file
    encodes and decodes to silence-length audio (silence is audio). Control: with the app's
    limit the long file is refused."""
    long_path, _ = app_inputs.bad_audio["too_long.wav"]
    silent, _ = app_inputs.odd["silence"]
    out = tmp_path / "out"
    assert cli(app_model_dir, "encode", str(long_path), "-o", str(out)) == EXIT_FAILED
    args = ["--model", str(app_model_dir), "-q", "-o", str(out)]
    assert main(["encode", str(long_path), str(silent), *args]) == EXIT_OK
    assert main(["decode", str(out / "silence.vqwc"), *args]) == EXIT_OK
    assert sf.info(out / "silence.decoded.wav").frames == sf.info(silent).frames


# --- corners: odd file names, the tool's own outputs, output names, the prog --------------------


def test_cli_handles_file_names_that_are_not_utf8(app_model_dir, app_inputs, tmp_path, capsys):
    """A Linux file name that is not UTF-8 (b'caf\\xe9.wav', which Python holds as
    'caf\\udce9.wav') encodes, decodes and resynthesises; what the CLI prints about it is
    printable (the byte shows as \\xe9) and names it once."""
    if sys.platform == "win32" or sys.getfilesystemencoding() != "utf-8":
        pytest.skip("file names that are not UTF-8 are a POSIX matter")
    folder = os.fsencode(tmp_path)
    clip = os.fsdecode(folder + b"/caf\xe9.wav")
    try:
        shutil.copy(app_inputs.clip, clip)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    assert cli(app_model_dir, "encode", clip) == EXIT_OK
    assert cli(app_model_dir, "decode", os.fsdecode(folder + b"/caf\xe9.vqwc")) == EXIT_OK
    assert cli(app_model_dir, "resynth", str(tmp_path)) == EXIT_OK
    made = sorted(os.listdir(folder))
    assert made == [b"caf\xe9.decoded.wav", b"caf\xe9.resynth.wav", b"caf\xe9.vqwc", b"caf\xe9.wav"]
    out = capsys.readouterr().out
    assert "caf\\xe9.wav -> " in out and "caf\\xe9.vqwc" in out
    assert all(line.isprintable() for line in out.splitlines())
    broken = os.fsdecode(folder + b"/bad \xff.wav")
    Path(broken).write_bytes(b"not audio at all")
    assert cli(app_model_dir, "encode", broken, "-o", str(tmp_path / "o")) == EXIT_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].isprintable(), err
    assert err[0].count("bad \\xff.wav") == 1 and "not audio or unreadable" in err[0], err


def test_cli_folders_skip_the_tools_own_outputs(app_model_dir, app_inputs, tmp_path, capsys):
    """``resynth DIR`` run twice (or encode after decode) does not take the outputs it wrote
    beside the inputs as new inputs; named explicitly, such a file is still processed."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(app_inputs.clip, folder / "a.wav")
    shutil.copy(app_inputs.clip, folder / "sub" / "b.wav")
    for _ in range(2):
        assert cli(app_model_dir, "resynth", str(folder), "--force") == EXIT_OK
    assert cli(app_model_dir, "encode", str(folder)) == EXIT_OK
    assert cli(app_model_dir, "decode", str(folder)) == EXIT_OK
    assert cli(app_model_dir, "encode", str(folder), "--force") == EXIT_OK
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "a.decoded.wav",
        "a.resynth.wav",
        "a.vqwc",
        "a.wav",
        "sub/b.decoded.wav",
        "sub/b.resynth.wav",
        "sub/b.vqwc",
        "sub/b.wav",
    ]
    named = str(folder / "a.resynth.wav")
    assert cli(app_model_dir, "encode", named, "-o", str(tmp_path / "x.vqwc")) == EXIT_OK
    only_outputs = tmp_path / "outputs"
    only_outputs.mkdir()
    shutil.copy(folder / "a.resynth.wav", only_outputs)
    capsys.readouterr()
    assert cli(app_model_dir, "resynth", str(only_outputs)) == EXIT_USAGE
    assert "1 output of this tool skipped" in capsys.readouterr().err


def test_cli_refuses_an_output_file_name_for_several_inputs(app_inputs, tmp_path, capsys):
    """``-o NAME.EXT`` with several inputs (or a folder) would silently make a folder called
    NAME.EXT: a usage error instead; a name ending in a separator, or an existing folder,
    is a folder whatever it looks like."""
    model = str(tmp_path / "no-model")  # usage errors come before the model is loaded
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    for path in (a, b):
        shutil.copy(app_inputs.clip, path)
    for inputs in ([str(a), str(b)], [str(tmp_path)]):
        out = tmp_path / "out.vqwc"
        assert main(["encode", *inputs, "-o", str(out), "--model", model, "-q"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "out.vqwc" in err and "file name" in err and "folder" in err, err
        assert not out.exists()
    (tmp_path / "v1.0").mkdir()
    for out in (str(tmp_path / "v1.0"), str(tmp_path / "v2.0") + os.sep):
        assert main(["encode", str(a), str(b), "-o", out, "--model", model]) == EXIT_MODEL


def test_cli_help_names_the_command_it_was_run_as(capsys):
    """``vqwavenet encode --help`` says ``vqwavenet encode``; ``python -m app.cli`` still
    says itself."""
    from vqwavenet.__main__ import main as vqwavenet_main

    for run, prog in ((vqwavenet_main, "vqwavenet encode"), (main, "python -m app.cli encode")):
        with pytest.raises(SystemExit) as e:
            run(["encode", "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {prog} "), prog
    with pytest.raises(SystemExit):
        vqwavenet_main(["decode", "--seed", "-1", "x.vqwc"])
    assert "vqwavenet decode: error: --seed must be >= 0" in capsys.readouterr().err
