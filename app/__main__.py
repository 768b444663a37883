"""The web app: encode speech to codes, decode codes, resynthesise in any speaker's voice.

    python -m app [--model vqwavenet/models/bundled] [--host 127.0.0.1] [--port 7860]

Runs on the onnxruntime engine (no torch). Requests wait in a queue and at most
``--concurrency`` run the model at once (all endpoints together; by default as many as the
decoder's scheduler takes, whose step batches concurrent decodes share); uploads over
``--max-file-size`` are refused by the server and audio over ``--max-seconds`` by the app, with
a message, while the server goes on serving.

Listening beyond this machine (``--share``, or a ``--host`` that is not loopback) needs
``--auth-file`` (Gradio's login; one ``user:password`` per line), or ``--insecure-no-auth``
where a front end in front of the app authenticates. Uploads and results are the owner's only
and removed when the process ends, on Ctrl-C and on SIGTERM alike.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import signal
import sys
from pathlib import Path

from app.scratch import private_gradio_cache
from app.service import DEFAULT_MAX_SECONDS, DEFAULT_MODEL, CodecService, ModelLoadError
from vqwavenet.codec import Codec
from vqwavenet.steps import StepEngine


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="exported model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help="longest audio accepted (and longest a codes file may decode to), seconds",
    )
    p.add_argument(
        "--max-file-size",
        default="50mb",
        help="largest upload, e.g. 50mb (a minute of 48 kHz stereo float is 23 MB)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="decode with the int8 graphs (export --int8): faster in large batches",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests run at once (default: what the decoder's scheduler takes, "
        f"{StepEngine.max_requests}); decodes share its step batches",
    )
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting at most")
    p.add_argument(
        "--max-rows",
        type=int,
        default=StepEngine.max_rows,
        help="rows each decoding worker runs in one step batch (more suit more cores)",
    )
    p.add_argument(
        "--playback-rows",
        type=int,
        default=Codec.playback_rows,
        help="segments one streamed playback decodes at once (more: faster alone, "
        "fewer: fairer beside others)",
    )
    p.add_argument("--share", action="store_true", help="also open a public Gradio link")
    p.add_argument(
        "--auth-file",
        type=Path,
        help="require a login: a file of user:password lines (needed with --share or a "
        "non-loopback --host)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve beyond loopback without a login (only behind a front end that authenticates)",
    )
    return p


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def read_auth(path: Path) -> list[tuple[str, str]]:
    """The (user, password) pairs of an auth file: one ``user:password`` per line; blank lines
    and lines starting with # are skipped. Raises ValueError with the line number of a bad one."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not (sep and user and password):
            raise ValueError(f"{path}, line {number}: expected user:password")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"{path} holds no user:password line")
    return pairs


def _stop_on_sigterm() -> None:
    """SIGTERM (how services are stopped) ends the server as Ctrl-C does, so the exit
    handlers remove the uploads, results and scratch files."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


# The engine's workers release the GIL inside onnxruntime and take it back after every decoder
# step (about a millisecond). A web-server thread that holds it (the event loop, a request's
# handler) makes them wait, cores idle, until CPython forces a hand-over after the switch
# interval: 5 ms by default. A fifth of a millisecond lets the server's threads run as before
# while the workers get the GIL back within a fraction of a step (benchmarks.gil_contention).
GIL_SWITCH_INTERVAL_S = 0.0002


def fatal(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        parser.error(f"--max-seconds must be a positive number, got {args.max_seconds}")
    if (args.concurrency is not None and args.concurrency < 1) or args.queue_size < 1:
        parser.error("--concurrency and --queue-size must be >= 1")
    if args.max_rows < 1 or args.playback_rows < 1:
        parser.error("--max-rows and --playback-rows must be >= 1")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    exposed = args.share or not is_loopback(args.host)
    if exposed and args.auth_file is None and not args.insecure_no_auth:
        where = "--share" if args.share else f"--host {args.host}"
        parser.error(
            f"{where} serves beyond this machine: give --auth-file FILE (user:password lines) "
            "for a login, or --insecure-no-auth if a front end authenticates"
        )
    auth = None
    if args.auth_file is not None:
        try:
            auth = read_auth(args.auth_file)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return fatal(f"--auth-file: {e}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.umask(0o077)  # uploads, results and caches: the owner's only
    private_gradio_cache()  # before Gradio is imported: some of its modules read it then
    _stop_on_sigterm()
    try:
        service = CodecService(
            args.model,
            max_seconds=args.max_seconds,
            int8=args.int8,
            max_rows=args.max_rows,
            playback_rows=args.playback_rows,
        )
    except ModelLoadError as e:
        return fatal(str(e))
    from app.ui import serve  # gradio is slow to import: only after the model loads

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    try:
        serve(
            service,
            host=args.host,
            port=args.port,
            concurrency=args.concurrency,
            queue_size=args.queue_size,
            max_file_size=args.max_file_size,
            share=args.share,
            auth=auth,
        )
    except (OSError, ValueError) as e:
        return fatal(f"cannot serve on {args.host}:{args.port}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
