"""The app on the engine's shared scheduler: concurrent decodes share step batches and each
gets exactly its own samples, Gradio runs as many requests at once as the scheduler takes, a
decode nobody reads frees its rows, and a request the engine refuses as busy gets a message
that says so."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.conftest import APP_MAX_FILE_SIZE, DATA, free_port
from tests.test_app_hardening import post_call
from vqwavenet import steps
from vqwavenet.audio import to_int16
from vqwavenet.codes_file import CodesFile
from vqwavenet.steps import Scheduler, StepEngine

FROM_FILE = "(the file's speaker)"
pytestmark = pytest.mark.filterwarnings(
    "ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated"
)


def client(url: str, tmp_path: Path) -> Client:
    return Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)


def long_codes(service, path: Path, seconds: float = 1.9) -> Path:
    """A codes file of ``seconds`` of speech (two test clips back to back)."""
    waves = [
        sf.read(DATA / name, dtype="int16")[0] for name in ("activated.wav", "auth-incorrect.wav")
    ]
    wave = np.concatenate(waves)[: int(seconds * 16000)]
    service.encode((16000, wave)).codes.write(path)
    return path


@pytest.fixture()
def served(app_model_dir):
    """The app with the default concurrency (what the scheduler takes) and a listen grace of
    half a second; yields ``(url, service, demo)``."""
    from app.service import CodecService
    from app.ui import serve

    service = CodecService(app_model_dir, max_seconds=2.0)
    demo = serve(
        service, port=free_port(), max_file_size=APP_MAX_FILE_SIZE, block=False, listen_grace=0.5
    )
    try:
        yield demo.local_url, service, demo
    finally:
        demo.close()


def test_concurrent_decodes_share_batches_and_each_gets_its_own_audio(
    served, tmp_path, monkeypatch
):
    """Six clients decode the same codes file with six seeds at once. Gradio runs them all at
    once (its limit is the scheduler's), their segments share step blocks, and each wav is
    exactly what the engine decodes alone for its seed. Control: the seeds give six
    different wavs, so equality is not vacuous."""
    url, service, demo = served
    assert service.codec.max_requests == StepEngine.max_requests
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    for api in ("encode", "decode", "resynthesize"):
        assert fns[api].concurrency_limit == StepEngine.max_requests
    codes = long_codes(service, tmp_path / "long.vqwc")
    cf = CodesFile.read(codes)
    blocks: list[set[int]] = []
    block = Scheduler._block

    def spy(sched, batch, tracks, busy, *args):
        blocks.append({tracks[r].job.seq for r in busy})
        return block(sched, batch, tracks, busy, *args)

    monkeypatch.setattr(Scheduler, "_block", spy)

    def decode(seed: int) -> np.ndarray:
        c = client(url, tmp_path / f"client{seed}")
        wav = c.predict(handle_file(str(codes)), FROM_FILE, seed, api_name="/decode")[1]
        return sf.read(wav, dtype="int16")[0]

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(decode, range(6)))
    assert max(len(b) for b in blocks) >= 2
    for seed, wave in enumerate(got):
        alone = service.codec.decode(cf.codes, cf.speaker_index, seed, n_samples=cf.num_samples)
        np.testing.assert_array_equal(wave, to_int16(alone))
    assert len({w.tobytes() for w in got}) == 6


def test_a_decode_nobody_reads_frees_its_rows(served, tmp_path, monkeypatch):
    """A decode posted through the REST flow and never read is cancelled once the grace has
    passed: its request leaves the scheduler within a block, long before the decode would
    end. Control: the same decode with its results stream open runs to the end."""
    url, service, _ = served
    step = steps.StepBatch.run  # steps as slow as a large model's: the decode takes seconds
    monkeypatch.setattr(steps.StepBatch, "run", lambda b, s: (time.sleep(1e-3), step(b, s)))
    jobs = []
    submit = service.codec.engine.submit
    monkeypatch.setattr(
        service.codec.engine, "submit", lambda *a, **k: jobs.append(submit(*a, **k)) or jobs[-1]
    )
    codes = long_codes(service, tmp_path / "long.vqwc")
    scheduler = service.codec.engine.scheduler

    post_call(url, codes)  # and never read
    started = time.monotonic()
    while not jobs:
        time.sleep(0.01)
    job = jobs[0]
    assert job.done.wait(timeout=5), "still decoding"
    assert time.monotonic() - started < 3
    assert job.live.cancelled and job not in scheduler.jobs
    assert any(r is None for r in job.live.results)  # it stopped before the end

    monkeypatch.setattr(steps.StepBatch, "run", step)  # the control, at full speed
    event = post_call(url, codes)
    with httpx.stream("GET", f"{url}gradio_api/call/decode/{event}", timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: complete", events
    assert not jobs[1].live.cancelled and all(r is not None for r in jobs[1].live.results)


def test_a_request_refused_as_busy_gets_a_message(served, app_inputs, tmp_path):
    """When the engine already holds all the requests it takes (here two, held by another
    user of the same codec), a decode through the app is refused at once with a message that
    says so, not an internal error, and the app serves again once they end."""
    url, service, _ = served
    codec = service.codec
    codec.max_requests = 2
    plan = codec.plan([codec_request(codec, 30.0)], None, None, None)
    held = [codec.engine.submit(plan.streams, plan.cond) for _ in range(2)]
    c = client(url, tmp_path)
    try:
        with pytest.raises(AppError, match="busy.*try again") as e:
            c.predict(handle_file(str(app_inputs.codes)), FROM_FILE, 0, api_name="/decode")
        assert "internal error" not in str(e.value)
    finally:
        for job in held:
            codec.engine.cancel(job)
            job.scheduler.settle(job)
    wav = c.predict(handle_file(str(app_inputs.codes)), FROM_FILE, 0, api_name="/decode")[1]
    assert sf.read(wav)[0].shape == (sf.info(app_inputs.clip).frames,)


def codec_request(codec, seconds: float):
    from vqwavenet import DecodeRequest

    n = round(seconds * codec.sample_rate)
    codes = np.random.default_rng(0).integers(0, codec.codebook_size, codec.geometry.padding(n)[2])
    return DecodeRequest(codes, 0, n, 1)


def test_app_flags_set_the_schedulers_row_limits(app_model_dir, monkeypatch, capsys):
    """--max-rows and --playback-rows reach the codec the app serves; a limit below one is
    refused before the model loads. The server runs with a short GIL switch interval."""
    import os

    import app.__main__
    import app.ui

    served_services, switch_intervals = [], []

    def serve(service, **kwargs):
        served_services.append(service)
        switch_intervals.append(sys.getswitchinterval())

    monkeypatch.setattr(app.ui, "serve", serve)
    # main() sets a server's SIGTERM handler and umask: not the test runner's
    monkeypatch.setattr(app.__main__, "_stop_on_sigterm", lambda: None)
    umask, switch_interval = os.umask(0o022), sys.getswitchinterval()
    try:
        argv = ["--model", str(app_model_dir), "--port", "0"]
        assert app.__main__.main([*argv, "--max-rows", "24", "--playback-rows", "3"]) == 0
        codec = served_services[-1].codec
        assert (codec.max_rows, codec.playback_rows, codec.engine.max_rows) == (24, 3, 24)
        assert app.__main__.main(argv) == 0
        codec = served_services[-1].codec
        defaults = (StepEngine.max_rows, type(codec).playback_rows)
        assert (codec.max_rows, codec.playback_rows) == defaults
        for flag in ("--max-rows", "--playback-rows"):
            with pytest.raises(SystemExit) as e:
                app.__main__.main([*argv, flag, "0"])
            assert e.value.code == 2
            assert "must be >= 1" in capsys.readouterr().err
        # the engine's workers get the GIL back soon after each step (app.__main__)
        assert switch_intervals == [pytest.approx(app.__main__.GIL_SWITCH_INTERVAL_S)] * 2
    finally:
        os.umask(umask)
        sys.setswitchinterval(switch_interval)
