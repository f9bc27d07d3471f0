"""A loopback HTTP server for download tests: fabricated files, dead URLs, slow URLs.

Listens on 127.0.0.1 only, is started and stopped by its user (a context manager), counts every
request per path, and bounds each handler's delay.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

MAX_DELAY = 5.0


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay: float = 0.0


@dataclass
class Loopback:
    routes: dict[str, Route] = field(default_factory=dict)
    latency: float = 0.0  # added to every request, as real hosts have
    requests: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    base: str = ""

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"


def _handler(state: Loopback):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.lstrip("/")
            with state.lock:
                state.requests[path] += 1
            route = state.routes.get(path, Route(b"not found", 404))
            time.sleep(min(route.delay + state.latency, MAX_DELAY))
            try:
                self.send_response(route.status)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout under test)

        def log_message(self, *args) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serve(routes: dict[str, Route], *, latency: float = 0.0) -> Iterator[Loopback]:
    state = Loopback(routes=dict(routes), latency=latency)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=MAX_DELAY)
