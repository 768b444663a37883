"""The web app: encode speech to codes, decode codes, resynthesise in any speaker's voice.

    python -m app [--model vqwavenet/models/bundled] [--host 127.0.0.1] [--port 7860]

Runs on the onnxruntime engine (no torch). Requests wait in a queue and at most
``--concurrency`` run at once; uploads over ``--max-file-size`` are refused by the server and
audio over ``--max-seconds`` by the app, with a message, while the server goes on serving.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from app.service import DEFAULT_MAX_SECONDS, DEFAULT_MODEL, CodecService, ModelLoadError


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
        "--int8", action="store_true", help="decode with the int8 graphs (export --int8): faster"
    )
    p.add_argument("--concurrency", type=int, default=2, help="requests run at once")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting at most")
    p.add_argument("--share", action="store_true", help="also open a public Gradio link")
    return p


def fatal(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        parser.error(f"--max-seconds must be a positive number, got {args.max_seconds}")
    if args.concurrency < 1 or args.queue_size < 1:
        parser.error("--concurrency and --queue-size must be >= 1")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        service = CodecService(args.model, max_seconds=args.max_seconds, int8=args.int8)
    except ModelLoadError as e:
        return fatal(str(e))
    from app.ui import serve  # gradio is slow to import: only after the model loads

    try:
        serve(
            service,
            host=args.host,
            port=args.port,
            concurrency=args.concurrency,
            queue_size=args.queue_size,
            max_file_size=args.max_file_size,
            share=args.share,
        )
    except (OSError, ValueError) as e:
        return fatal(f"cannot serve on {args.host}:{args.port}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
