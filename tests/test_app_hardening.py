"""The app against a careless or hostile client: one concurrency group for all model work,
work nobody reads stops, a login where the app is exposed, request-size bounds, messages that
quote file contents safely, and nothing left behind or readable by others when it stops."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file

from app.__main__ import is_loopback, read_auth
from app.__main__ import main as app_main
from app.guard import Listeners
from app.ui import safe_message
from tests.conftest import APP_MAX_FILE_SIZE, free_port
from vqwavenet.safe_text import show_path

ROOT = Path(__file__).resolve().parent.parent
FROM_FILE = "(the file's speaker)"
pytestmark = pytest.mark.filterwarnings(
    "ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated"
)


def client(url: str, tmp_path: Path, **kwargs) -> Client:
    return Client(
        url, verbose=False, download_files=str(tmp_path), analytics_enabled=False, **kwargs
    )


class Running:
    """Counts the calls running at once of the functions it wraps."""

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def enter(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self):
        with self.lock:
            self.now -= 1


def test_all_endpoints_share_one_concurrency_limit(app_server, app_inputs, tmp_path, monkeypatch):
    """The fixture serves with concurrency 2: two encodes, two decodes and two resyntheses at
    once run the model at most two at a time (per-endpoint limits would allow six)."""
    url, service = app_server
    running = Running()
    encode, stream = service.encode, service.decode_stream

    def slow_encode(*args, **kwargs):
        running.enter()
        try:
            time.sleep(0.6)
            return encode(*args, **kwargs)
        finally:
            running.leave()

    def slow_stream(*args, **kwargs):
        running.enter()
        try:
            time.sleep(0.6)
            yield from stream(*args, **kwargs)
        finally:
            running.leave()

    monkeypatch.setattr(service, "decode_stream", slow_stream)
    # resynthesize encodes too: count only the slow part of each request once.
    monkeypatch.setattr(service, "encode", slow_encode)
    c = client(url, tmp_path)
    clip, codes = handle_file(str(app_inputs.clip)), handle_file(str(app_inputs.codes))
    jobs = [c.submit(clip, "Allison", api_name="/encode") for _ in range(2)]
    jobs += [c.submit(codes, FROM_FILE, 0, api_name="/decode") for _ in range(2)]
    jobs += [c.submit(clip, "Carlo", 0, api_name="/resynthesize") for _ in range(2)]
    for job in jobs:
        job.result(timeout=120)
    assert running.most == 2, running.most


@pytest.fixture()
def quick_grace_server(app_model_dir):
    """The app with a listen grace of half a second (the default waits ten)."""
    from app.service import CodecService
    from app.ui import serve

    service = CodecService(app_model_dir, max_seconds=2.0)
    demo = serve(
        service,
        port=free_port(),
        concurrency=1,
        max_file_size=APP_MAX_FILE_SIZE,
        block=False,
        listen_grace=0.5,
    )
    try:
        yield demo.local_url, service
    finally:
        demo.close()


def _endless_decode(log: dict):
    """A stand-in for the engine's stream that works for up to 20 s, reporting progress every
    50 ms as the engine does per step block; ``log`` records how long it ran."""

    def decode_stream(cf, speaker, seed, progress=None, **kwargs):
        start = time.monotonic()
        try:
            for i in range(400):
                time.sleep(0.05)
                progress(i, 400)
                if log.get("until") and time.monotonic() - start > log["until"]:
                    break
            yield np.zeros(cf.num_samples, np.float32)
        finally:
            log["ran"] = time.monotonic() - start

    return decode_stream


def post_call(url: str, codes: Path) -> str:
    """A decode through the REST flow (``POST /call/decode``); returns the event id."""
    with open(codes, "rb") as f:
        up = httpx.post(f"{url}gradio_api/upload", files={"files": ("c.vqwc", f)}, timeout=30)
    up.raise_for_status()
    data = [{"path": up.json()[0], "meta": {"_type": "gradio.FileData"}}, FROM_FILE, 0]
    r = httpx.post(f"{url}gradio_api/call/decode", json={"data": data}, timeout=30)
    r.raise_for_status()
    return r.json()["event_id"]


def test_a_decode_nobody_reads_stops(quick_grace_server, app_inputs, monkeypatch):
    url, service = quick_grace_server
    log: dict = {}
    monkeypatch.setattr(service, "decode_stream", _endless_decode(log))
    post_call(url, app_inputs.codes)  # and never read
    deadline = time.monotonic() + 25
    while "ran" not in log and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.get("ran", 99) < 5, log  # stopped after the grace, not after 20 s


def test_a_decode_being_read_runs_to_the_end(quick_grace_server, app_inputs, monkeypatch):
    """The control: the same decode with its results stream open is not stopped."""
    url, service = quick_grace_server
    log: dict = {"until": 2.0}
    monkeypatch.setattr(service, "decode_stream", _endless_decode(log))
    event_id = post_call(url, app_inputs.codes)
    with httpx.stream("GET", f"{url}gradio_api/call/decode/{event_id}", timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: complete", events
    assert log["ran"] >= 2.0


def test_listeners_grace_counts_from_the_start_and_from_the_last_reader_leaving():
    now = [0.0]
    ls = Listeners(grace=5, clock=lambda: now[0])
    wanted = ls.watch("s")
    now[0] = 4.9
    assert wanted()
    now[0] = 5.1
    assert not wanted()
    ls.opened(["s"])
    now[0] = 100
    assert wanted()
    ls.closed(["s"])
    now[0] = 104
    assert wanted()
    now[0] = 106
    assert not wanted()
    assert ls.watch(None)()  # a direct call, not through the server


def test_one_upload_request_cannot_carry_many_files(app_server, app_inputs):
    url, _ = app_server
    part = np.random.default_rng(0).bytes(APP_MAX_FILE_SIZE * 9 // 10)  # each under the limit
    files = [("files", (f"f{i}.bin", part)) for i in range(4)]
    r = httpx.post(f"{url}gradio_api/upload", files=files, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert "limit" in r.text
    # One file of the same size still goes through.
    r = httpx.post(f"{url}gradio_api/upload", files=files[:1], timeout=60)
    assert r.status_code == 200, r.text[:300]


def test_a_streamed_upload_is_cut_at_the_request_limit(app_server):
    """The same four files as a body of unknown length (chunked): cut at the bound."""
    url, _ = app_server
    part = np.random.default_rng(0).bytes(APP_MAX_FILE_SIZE * 9 // 10)

    def body():
        for i in range(4):
            yield (
                f'--b\r\nContent-Disposition: form-data; name="files"; filename="f{i}.bin"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            for k in range(0, len(part), 1 << 16):
                yield part[k : k + (1 << 16)]
            yield b"\r\n"
        yield b"--b--\r\n"

    def post(chunks):
        headers = {"content-type": "multipart/form-data; boundary=b"}
        return httpx.post(f"{url}gradio_api/upload", content=chunks, headers=headers, timeout=60)

    try:
        r = post(body())
        assert r.status_code >= 400, (r.status_code, r.text[:300])
    except httpx.HTTPError:
        pass  # the server ended the request: also refused
    assert httpx.get(f"{url}gradio_api/info", timeout=30).status_code == 200  # still serving
    # The control: one such file, streamed the same way, is stored.
    one = list(body())
    r = post(iter(one[: 1 + len(range(0, len(part), 1 << 16)) + 1] + [b"--b--\r\n"]))
    assert r.status_code == 200 and len(r.json()) == 1, (r.status_code, r.text[:300])


def test_safe_message_escapes_surrogates_html_and_server_paths():
    message = safe_message(
        "bad speaker name 'a\ud800<b>' in /tmp/gradio/abc123/upload.vqwc (see /srv/app/x.py)",
        upload="/tmp/gradio/abc123/upload.vqwc",
    )
    message.encode("utf-8")  # a lone surrogate would raise here, and break the event stream
    json.dumps(message, ensure_ascii=False).encode("utf-8")
    assert "\\ud800" in message and "&lt;b&gt;" in message
    assert "/tmp" not in message and "/srv" not in message
    assert "upload.vqwc" in message and "x.py" in message
    # An upload whose name the reader escaped (a newline in it) is still cut to its name.
    upload = "/tmp/gradio/d e f/odd\nname.vqwc"
    message = safe_message(f"cannot read {show_path(upload)}: truncated", upload=upload)
    assert message == "cannot read odd\\nname.vqwc: truncated", message


def test_an_error_quoting_a_lone_surrogate_reaches_the_client(
    app_server, app_inputs, tmp_path, monkeypatch
):
    """A message built from file contents with a lone surrogate arrives as a message, not as
    a dropped connection, and the server keeps serving."""
    from gradio_client.exceptions import AppError

    from app.service import InputError

    url, service = app_server

    def refuse(source):
        raise InputError("the file's speaker 'x\udcff' is unknown")

    monkeypatch.setattr(service, "read_codes", refuse)
    c = client(url, tmp_path)
    with pytest.raises(AppError, match=r"speaker 'x\\udcff' is unknown"):
        c.predict(handle_file(str(app_inputs.codes)), FROM_FILE, 0, api_name="/decode")
    monkeypatch.undo()
    codes = c.predict(handle_file(str(app_inputs.clip)), "Allison", api_name="/encode")[0]
    assert Path(codes).stat().st_size > 0


def test_exposed_app_needs_a_login(tmp_path, capsys):
    for argv in (["--host", "0.0.0.0"], ["--share"], ["--host", "example.org"]):
        with pytest.raises(SystemExit) as e:
            app_main(argv)
        assert e.value.code == 2
        assert "--auth-file" in capsys.readouterr().err
    bad = tmp_path / "auth"
    bad.write_text("no-colon-here\n")
    assert app_main(["--host", "0.0.0.0", "--auth-file", str(bad), "--port", "0"]) == 1
    assert "line 1" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    good = tmp_path / "auth2"
    good.write_text("# users\nann:pa:ss\n\nbob:x\n")
    assert read_auth(good) == [("ann", "pa:ss"), ("bob", "x")]


def test_login_is_enforced(app_model_dir, app_inputs, tmp_path):
    from app.service import CodecService
    from app.ui import serve

    demo = serve(
        CodecService(app_model_dir), port=free_port(), block=False, auth=[("ann", "secret")]
    )
    try:
        url = demo.local_url
        assert httpx.get(f"{url}gradio_api/info", timeout=30).status_code == 401
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.wav", b"RIFF")}, timeout=30)
        assert r.status_code == 401
        c = client(url, tmp_path, auth=("ann", "secret"))
        codes = c.predict(handle_file(str(app_inputs.clip)), "Allison", api_name="/encode")[0]
        assert Path(codes).stat().st_size > 0
        with pytest.raises(Exception, match="(?i)login|auth|401|credentials"):
            client(url, tmp_path, auth=("ann", "wrong"))
    finally:
        demo.close()


def _wait_serving(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}gradio_api/info", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the app did not start")


def _everything_under(root: Path) -> list[Path]:
    """What the app left under ``root``, but onnxruntime's telemetry session marker (``.ses``,
    one per temporary folder, written by the runtime when it starts, for every program)."""
    return [p for p in root.rglob("*") if p.name != ".ses"]


def test_sigterm_leaves_nothing_behind_and_results_are_the_owners_only(
    app_model_dir, app_inputs, tmp_path
):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "TMPDIR": str(tmp),  # where the app's temporary folders go
        "PYTHONPATH": str(ROOT),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--model", str(app_model_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_serving(url, proc)
        c = client(url, tmp_path / "client")
        codes = c.predict(handle_file(str(app_inputs.clip)), "Allison", api_name="/encode")[0]
        c.predict(handle_file(codes), FROM_FILE, 0, api_name="/decode")
        left = _everything_under(tmp)
        files = [p for p in left if p.is_file()]
        assert any(p.suffix == ".wav" for p in files), left  # the upload and the result
        assert any(p.suffix == ".vqwc" for p in files), left
        # Gradio's copies keep the source's mode: the shipped example clips (public anyway)
        # stay as they are in the package, inside folders only the owner can open.
        examples = {p.name for p in (ROOT / "app" / "examples").glob("*")}
        for p in left:
            if p.is_file() and p.name in examples:
                assert stat.S_IMODE(p.parent.stat().st_mode) & 0o077 == 0, p
                continue
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _everything_under(tmp) == []


def test_eight_readers_at_once_are_all_served(app_server, app_inputs, tmp_path):
    """Listening is per session: concurrent clients, each reading, all complete."""
    url, _ = app_server

    def one(i: int):
        c = client(url, tmp_path / f"c{i}")
        return c.predict(handle_file(str(app_inputs.codes)), FROM_FILE, i, api_name="/decode")

    with ThreadPoolExecutor(8) as pool:
        assert all(r[1] for r in pool.map(one, range(8)))
