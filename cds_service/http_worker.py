"""The gunicorn worker ``cds-service serve`` runs, and ``BodyErrorsAs400``, the WSGI wrapper for
body framing gunicorn finds broken while the application reads it.

``BufferingThreadWorker`` is gunicorn's threaded worker (gthread) with one change: a request is
read whole (head and body) by the worker's event loop, without blocking, before a thread takes
it. gthread hands a connection to a thread as soon as it has sent a byte, and that thread then
blocks reading the rest: eight clients dripping a header line every few seconds held every
thread of two workers, and every normal call timed out. Here a slow client holds a file
descriptor in the poller and nothing else, for at most ``CDS_REQUEST_READ_TIMEOUT_SECONDS``;
threads only ever run requests that have fully arrived. This is the buffering gunicorn's
documentation asks a proxy in front to provide, done in the worker itself. (TLS and HTTP/2
connections, which ``serve`` does not configure, are left to gthread as they are.)

It also answers what gunicorn refuses before the application sees it (oversized headers,
broken framing) in JSON like every other error of the service, never gunicorn's HTML page.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker
from werkzeug.exceptions import BadRequest

log = logging.getLogger(__name__)

# How long a client may take to send a whole request once it has begun (or, on a kept-alive
# connection, once the next one has begun). It then gets 408 and the connection is closed.
# ``serve`` sets BufferingThreadWorker.request_read_timeout from CDS_REQUEST_READ_TIMEOUT_SECONDS.
REQUEST_READ_TIMEOUT_S = 30.0
# A request head longer than this is handed over as it is: gunicorn's parser refuses it (431).
MAX_HEAD_BYTES = 64 * 1024
# The request body size limit when the application does not say (Flask's MAX_CONTENT_LENGTH).
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
RECV_BYTES = 256 * 1024
# Closing a connection, the worker reads (and discards) what the client still sends for this
# long, at most this much, so that the kernel does not reset the connection under the last
# answer (RFC 9112 9.6). gunicorn does it blocking, in the event loop: a client that never
# closes its side held every connection of the worker for 2 s each.
LINGER_S = 2.0
LINGER_MAX_BYTES = 64 * 1024
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class RequestBuffer:
    """The bytes of one HTTP/1.1 request as they arrive, and whether they are all there.

    "All there" is judged leniently: whatever cannot be judged (a malformed head, a body over
    the limit, ``Expect: 100-continue``) counts as complete, so that gunicorn's parser and the
    application answer it exactly as before. Only a request that is well-formed so far and
    still incomplete is kept waiting.
    """

    def __init__(self, max_body_bytes: int) -> None:
        self.data = bytearray()
        self.max_body_bytes = max_body_bytes
        self._head_end: int | None = None  # index just past the blank line ending the head
        self._body_length: int | None = None  # Content-Length
        self._chunk_at: int | None = None  # chunked: where the next chunk-size line starts
        self.complete = False
        # The body is over the limit: answered 413 at once, never read on (a thread would
        # otherwise drain what the client keeps sending).
        self.too_large = False

    def feed(self, data: bytes) -> bool:
        self.data += data
        if not self.complete:
            self.complete = self._judge()
        return self.complete

    def _judge(self) -> bool:
        if self._head_end is None:
            # Blank lines before a request line are allowed (RFC 9112 2.2): skip them.
            start = 0
            while self.data.startswith(b"\r\n", start):
                start += 2
            end = self.data.find(b"\r\n\r\n", start)
            if end < 0:
                return len(self.data) > MAX_HEAD_BYTES
            self._head_end = end + 4
            framing = self._framing(bytes(self.data[start:end]))
            if framing is None:
                return True
            if isinstance(framing, str):  # chunked
                self._chunk_at = self._head_end
            else:
                self._body_length = framing
                if framing > self.max_body_bytes:
                    self.too_large = True
                    return True
        if self._chunk_at is not None:
            return self._chunks_complete()
        return len(self.data) - self._head_end >= (self._body_length or 0)

    @staticmethod
    def _framing(head: bytes) -> int | str | None:
        """The body's Content-Length, "chunked", or None: no judging (hand it over now)."""
        lengths: list[bytes] = []
        codings: list[bytes] = []
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif name == b"expect":
                return None  # the client waits for "100 Continue" before it sends the body
        if codings:
            return "chunked" if codings[-1] == b"chunked" and not lengths else None
        if not lengths:
            return 0
        if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            return None
        return int(lengths[0])

    def _chunks_complete(self) -> bool:
        assert self._chunk_at is not None and self._head_end is not None
        while True:
            at = self._chunk_at
            if at - self._head_end > self.max_body_bytes:
                self.too_large = True
                return True
            line_end = self.data.find(b"\r\n", at)
            if line_end < 0:
                return len(self.data) - at > 4096  # no chunk-size line is that long
            size = bytes(self.data[at:line_end]).split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                return True  # malformed: gunicorn's parser refuses it (400)
            length = int(size, 16)
            if length == 0:  # the last chunk, then trailer fields, then a blank line
                if self.data.startswith(b"\r\n", line_end + 2):
                    return True
                return self.data.find(b"\r\n\r\n", line_end) >= 0
            self._chunk_at = line_end + 2 + length + 2
            if self._chunk_at > len(self.data):
                return False


# Exception class -> (status, reason phrase, error code, message for the client). Only
# gunicorn's own words about the request's shape: never a header value (a token) echoed.
_REFUSALS: tuple[tuple[type[Exception], int, str, str, str], ...] = (
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large",
     "request-headers-too-large", "a request header, or the headers together, are larger than "
     "this service accepts"),
    (http_errors.LimitRequestLine, 414, "URI Too Long", "request-line-too-long",
     "the request line is longer than this service accepts"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "unsupported-transfer-coding",
     "the request's Transfer-Encoding is not supported; send chunked or a Content-Length"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "forbidden", "request forbidden"),
    (http_errors.ParseException, 400, "Bad Request", "bad-request",
     "the request is not well-formed HTTP/1.1"),
)


def refusal_for(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """(status, reason phrase, JSON body) for an error gunicorn raised reading a request."""
    for kind, status, reason, code, message in _REFUSALS:
        if isinstance(exc, kind):
            return status, reason, {"error": code, "message": message}
    return 500, "Internal Server Error", {
        "error": "internal-error", "message": "the service failed to answer"
    }


def write_json_error(sock: socket.socket, status: int, reason: str, body: dict[str, str]) -> None:
    payload = json.dumps(body).encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + payload)


class JsonErrorThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn is untyped
    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: Exception) -> None:
        status, reason, body = refusal_for(exc)
        if status == 500:
            log.error("error handling a request outside the application: %s",
                      type(exc).__name__, exc_info=exc)
        else:
            # The class only: gunicorn's message can quote a header, and headers hold tokens.
            log.warning("request refused before the application: %s (%d)",
                        type(exc).__name__, status)
        try:
            write_json_error(client, status, reason, body)
        except OSError:
            log.debug("could not send the error answer")


class _CheckedInput:
    """``wsgi.input`` whose framing errors (a bad chunk size, a missing chunk terminator, a
    client gone mid-body) are a 400 for the application, not an unexpected exception."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def _guard(self, read: Callable[..., Any], *args: Any) -> Any:
        try:
            return read(*args)
        except (http_errors.ParseException, http_errors.NoMoreData) as exc:
            raise BadRequest(
                f"the request body's framing is broken ({type(exc).__name__})"
            ) from None

    def read(self, *args: Any) -> bytes:
        return self._guard(self._raw.read, *args)  # type: ignore[no-any-return]

    def readline(self, *args: Any) -> bytes:
        return self._guard(self._raw.readline, *args)  # type: ignore[no-any-return]

    def readlines(self, *args: Any) -> list[bytes]:
        return self._guard(self._raw.readlines, *args)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BodyErrorsAs400:
    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if "wsgi.input" in environ:
            environ["wsgi.input"] = _CheckedInput(environ["wsgi.input"])
        return self.app(environ, start_response)


class _Connection(TConn):  # type: ignore[misc]  # gunicorn is untyped
    """gthread's connection, closed gracefully by the event loop without blocking it."""

    def __init__(self, worker: BufferingThreadWorker, *args: Any) -> None:
        super().__init__(*args)
        self.worker = worker
        self.request_buffer: RequestBuffer | None = None

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.worker.linger(self)
        else:
            super().close()


class BufferingThreadWorker(JsonErrorThreadWorker):
    """gthread whose event loop reads each request whole before a thread runs it."""

    request_read_timeout: float = REQUEST_READ_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (deadline, connection, its buffer), in deadline order: every entry gets the same
        # timeout, so appending keeps the order.
        self.reading: deque[tuple[float, Any, RequestBuffer]] = deque()
        self.lingering: deque[tuple[float, socket.socket]] = deque()  # closing, in time order
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES

    def load_wsgi(self) -> None:
        super().load_wsgi()
        limit = getattr(self.wsgi, "config", {}).get("MAX_CONTENT_LENGTH")
        if isinstance(limit, int):
            self.max_body_bytes = limit

    def accept(self, listener: socket.socket) -> None:
        # gthread's accept, with the connection class above.
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(
            _Connection(self, self.cfg, client, address, listener.getsockname())
        )

    def linger(self, conn: Any) -> None:
        """Close ``conn`` after its answer: FIN now, discard what still arrives, close on the
        client's FIN, after LINGER_MAX_BYTES, or after LINGER_S, whichever comes first."""
        sock = conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self.lingering.append((time.monotonic() + LINGER_S, sock))
        self.poller.register(sock, selectors.EVENT_READ, partial(self._drain, [0]))

    def _drain(self, drained: list[int], sock: socket.socket) -> None:
        try:
            while drained[0] < LINGER_MAX_BYTES:
                data = sock.recv(65536)
                if not data:  # the client closed its side too
                    break
                drained[0] += len(data)
        except (BlockingIOError, InterruptedError):
            return  # nothing more for now
        except OSError:
            pass
        self.poller.unregister(sock)
        sock.close()

    def enqueue_req(self, conn: Any) -> None:
        """gthread calls this whenever a connection has (or may have) request bytes: a new
        connection, a kept-alive one turning readable, bytes left over from the last request."""
        if self.cfg.is_ssl or conn.is_http2 or negotiation.prior_knowledge_allowed(
            self.cfg, conn.client
        ):
            super().enqueue_req(conn)
            return
        buffer = RequestBuffer(self.max_body_bytes)
        conn.request_buffer = buffer
        if conn.parser is not None:  # pipelined bytes the last request's parser read ahead
            buffer.feed(conn.parser.unreader.take_buffered())
        conn.sock.setblocking(False)
        self._advance(conn, buffer, registered=False)

    def _on_readable(self, conn: Any, buffer: RequestBuffer, _sock: Any) -> None:
        self._advance(conn, buffer, registered=True)

    def _advance(self, conn: Any, buffer: RequestBuffer, *, registered: bool) -> None:
        """Read what has arrived; then keep waiting, or hand the whole request to a thread,
        or close. Runs in the event loop: nothing here may raise (it would end the worker)."""
        try:
            outcome = self._receive(conn, buffer)
            if outcome == "wait":
                if not registered:
                    self.reading.append(
                        (time.monotonic() + self.request_read_timeout, conn, buffer)
                    )
                    self.poller.register(
                        conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn, buffer)
                    )
                return
            if registered:  # before the socket is closed, handed over or registered anew
                self.poller.unregister(conn.sock)
            if outcome == "gone":
                self._discard(conn)
            elif buffer.too_large:
                self._refuse(conn, 413, "Content Too Large", {
                    "error": "request-too-large",
                    "message": "the request body is larger than this service accepts",
                })
            else:
                self._hand_over(conn, buffer)
        except Exception:
            log.exception("error reading a request in the event loop; connection closed")
            with contextlib.suppress(Exception):
                self.poller.unregister(conn.sock)
            self._discard(conn)

    @staticmethod
    def _receive(conn: Any, buffer: RequestBuffer) -> str:
        """"complete", "wait" (nothing more has arrived yet) or "gone" (the client closed
        before its request was whole)."""
        while not buffer.complete:
            try:
                data = conn.sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return "wait"
            except OSError:
                return "gone"
            if not data:
                return "gone"
            buffer.feed(data)
        return "complete"

    def _hand_over(self, conn: Any, buffer: RequestBuffer) -> None:
        conn.request_buffer = None
        conn.init()  # the parser (a no-op on a kept-alive connection)
        conn.sock.setblocking(True)
        conn.parser.unreader.unread(bytes(buffer.data))
        conn.data_ready = True  # gthread's handle() must not wait for the socket again
        super().enqueue_req(conn)

    def _refuse(self, conn: Any, status: int, reason: str, body: dict[str, str]) -> None:
        with contextlib.suppress(OSError):
            write_json_error(conn.sock, status, reason, body)
        conn.request_buffer = None
        self.nr_conns -= 1
        self.linger(conn)

    def _discard(self, conn: Any) -> None:
        conn.request_buffer = None
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.lingering and (not self.alive or self.lingering[0][0] <= now):
            _, sock = self.lingering.popleft()
            if sock.fileno() >= 0:  # not closed by _drain meanwhile
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.poller.unregister(sock)
                sock.close()
        # A stopping worker does not wait for requests still arriving: none has begun to run.
        while self.reading and (not self.alive or self.reading[0][0] <= now):
            _, conn, buffer = self.reading.popleft()
            if conn.request_buffer is not buffer:
                continue  # handed over or closed meanwhile
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
            if not buffer.data:
                self._discard(conn)  # an idle connection: nothing to answer
                continue
            self._refuse(conn, 408, "Request Timeout", {
                "error": "request-timeout",
                "message": "the request did not arrive whole within "
                f"{self.request_read_timeout:g} s",
            })
