"""Real HTTP listeners on 127.0.0.1 whose GET behaviour a test scripts: FHIR servers that
redirect, page, drip or hang, and "attackers" that record whatever reaches them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hook_calls import send_json

PATIENT = {"resourceType": "Patient", "id": "p1"}

Handler = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """An HTTP server whose GET behaviour is a function; records every request's headers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.handler: Handler = lambda h: send_json(h, PATIENT)
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.connections = 0  # TCP connections accepted, requests or not
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Authorization")))
                with contextlib.suppress(OSError):  # the client gave up, as it should
                    server.handler(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.base = f"http://{host}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def redirect(h: BaseHTTPRequestHandler, location: str) -> None:
    h.send_response(302)
    h.send_header("Location", location)
    h.send_header("Content-Length", "0")
    h.end_headers()
