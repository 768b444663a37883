"""What the web server checks before Gradio sees a request, and who is still listening.

Two jobs that Gradio leaves open, done by one ASGI middleware (`Guard`) in front of its app:

- **Request size.** Gradio bounds each uploaded file, not a request, so one upload request can
  carry many files of the largest size. `Guard` refuses any request body over ``max_body``
  bytes: with 413 when it says its length, by ending it (as a disconnect) when it streams.
- **Listeners.** A result nobody reads is work wasted on cores other requests wait for. Results
  reach clients through streams: the browser and ``gradio_client`` read a session's events from
  ``GET .../queue/data?session_hash=S``; the REST flow reads one event from
  ``GET .../call/<api>/<event_id>``. `Guard` counts the open streams per session (and event) in
  `Listeners`, and a running job asks `Listeners.watch` whether anyone still reads it: nobody
  for ``grace`` seconds (since the job started, or since the last reader left) means abandoned.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qs

DEFAULT_GRACE_S = 10.0


class Listeners:
    """Open result streams per key (a session hash or an event id), thread-safe."""

    def __init__(self, grace: float = DEFAULT_GRACE_S, clock: Callable[[], float] = time.monotonic):
        self.grace = grace
        self.clock = clock
        self._open: Counter[str] = Counter()
        self._left: dict[str, float] = {}  # key -> when its last stream closed
        self._lock = threading.Lock()

    def opened(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._open[key] += 1

    def closed(self, keys: list[str]) -> None:
        with self._lock:
            now = self.clock()
            for key in keys:
                self._open[key] -= 1
                if self._open[key] <= 0:
                    del self._open[key]
                    self._left[key] = now
            if len(self._left) > 10_000:  # forget old departures
                cutoff = now - 10 * self.grace
                self._left = {k: t for k, t in self._left.items() if t >= cutoff}

    def listening(self, key: str) -> bool:
        with self._lock:
            return self._open[key] > 0

    def watch(self, key: str | None) -> Callable[[], bool]:
        """A predicate for a job of session ``key``: false once nobody has read the session's
        results for ``grace`` seconds. Without a key (a direct call, not through the server)
        the job is always wanted."""
        if key is None:
            return lambda: True
        started = self.clock()

        def wanted() -> bool:
            with self._lock:
                if self._open[key] > 0:
                    return True
                since = max(started, self._left.get(key, started))
            return self.clock() - since < self.grace

        return wanted


class Guard:
    """ASGI middleware: the request-size bound and the listener count (see the module doc).

    ``session_of``: the session hash of an event id, where the server still knows it (the
    REST flow's stream names the event, the job knows its session)."""

    def __init__(
        self,
        app,
        *,
        listeners: Listeners,
        max_body: int | None = None,
        session_of: Callable[[str], str | None] | None = None,
    ):
        self.app = app
        self.listeners = listeners
        self.max_body = max_body
        self.session_of = session_of or (lambda event_id: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.max_body is not None and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await _too_large(send, self.max_body)
            receive = _bounded(receive, self.max_body)
        keys = self._stream_keys(scope) if scope["method"] == "GET" else []
        if not keys:
            return await self.app(scope, receive, send)
        self.listeners.opened(keys)
        try:
            await self.app(scope, receive, send)
        finally:
            self.listeners.closed(keys)

    def _stream_keys(self, scope) -> list[str]:
        """The keys a results stream request reads: its session (and event)."""
        parts = scope["path"].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2:] == ["queue", "data"]:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            return query.get("session_hash", [])[:1]
        if len(parts) >= 4 and "call" in parts[:-2]:  # .../call/[v2/]<api>/<event_id>
            event_id = parts[-1]
            session = self.session_of(event_id)
            return [event_id] + ([session] if session and session != event_id else [])
        return []


def _bounded(receive, limit: int):
    """``receive`` that ends the request (a disconnect) once its body passes ``limit`` bytes."""
    seen = 0

    async def bounded():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return bounded


async def _too_large(send, limit: int) -> None:
    body = f"request body over the server's limit of {limit} bytes".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
