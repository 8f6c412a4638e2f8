"""`cds-service serve` holds against slow clients by itself: a request is read whole by the
worker's event loop before a thread runs it, so clients dripping headers or bodies hold
sockets, not threads. Real processes, real sockets on loopback."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import Served, free_port, run_cds

from cds_service.http_worker import RequestBuffer

ROOT = Path(__file__).resolve().parent.parent
MG_REQUEST = json.loads(
    (ROOT / "fixtures" / "requests" / "mg-pyridostigmine.order-select.json").read_text("utf-8")
)
MG_REQUEST.pop("fhirServer", None)
SERVICE = "/cds-services/magnesium-order-select"
HEAD = b"POST /x HTTP/1.1\r\nHost: h\r\n"


# --- when a request is whole ---------------------------------------------------------------


def whole_after(*pieces: bytes, max_body: int = 1000) -> list[bool]:
    buffer = RequestBuffer(max_body)
    return [buffer.feed(piece) for piece in pieces]


def test_a_request_is_whole_once_its_head_and_body_are_in() -> None:
    assert whole_after(b"GET / HTTP/1.1\r\n", b"Host: h\r\n", b"\r\n") == [False, False, True]
    assert whole_after(HEAD + b"Content-Length: 4\r\n\r\n", b"ab", b"cd") == [False, False, True]
    assert whole_after(b"\r\n" + HEAD + b"\r\n") == [True]  # blank lines before the request


def test_a_chunked_body_is_whole_at_its_last_chunk() -> None:
    head = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    assert whole_after(head, b"4\r\nab", b"cd\r\n", b"0\r\n", b"\r\n") == [
        False, False, False, False, True
    ]
    assert whole_after(head + b"3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n", b"\r\n") == [False, True]


@pytest.mark.parametrize(
    "request_bytes",
    [
        HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk size: parser says 400
        HEAD + b"Content-Length: 5000\r\n\r\n",  # over the body limit: the app says 413
        HEAD + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\n",  # ambiguous framing
        HEAD + b"Content-Length: -1\r\n\r\n",
        HEAD + b"Transfer-Encoding: gzip\r\n\r\n",  # unsupported: gunicorn says 501
        HEAD + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n",  # waits for "100 Continue"
        HEAD + b"X: " + b"a" * 70_000,  # a head too large, unfinished: gunicorn says 431
    ],
)
def test_what_cannot_be_judged_is_handed_over_at_once(request_bytes: bytes) -> None:
    assert whole_after(request_bytes) == [True]


# --- the real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("slow-clients")
    port = free_port()
    env = {
        "CDS_AUTH": "off",
        "CDS_WORKERS": "2",
        "CDS_THREADS": "4",
        "CDS_LOG_LEVEL": "WARNING",
        "CDS_DATABASE_URL": f"sqlite:///{directory / 'cds.sqlite3'}",
        "CDS_REQUEST_READ_TIMEOUT_SECONDS": "20",
    }
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, directory / "serve.log", port=port, workers=2) as process:
        yield process


def timed_call(port: int) -> tuple[float, int]:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", SERVICE, json.dumps(MG_REQUEST),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return time.monotonic() - started, response.status
    finally:
        connection.close()


def test_two_hundred_dripping_clients_do_not_delay_normal_calls(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    drippers: list[tuple[socket.socket, bytes]] = []  # (client, what it drips)
    stop = threading.Event()
    try:
        for n in range(200):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            if n % 4 == 3:  # some drip a body instead: the head is whole, the body never is
                client.sendall(b"POST " + SERVICE.encode() + b" HTTP/1.1\r\nHost: h\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 100000\r\n"
                               b"\r\n{")
                drippers.append((client, b" "))
            else:
                client.sendall(b"POST " + SERVICE.encode() + b" HTTP/1.1\r\nHost: h\r\n")
                drippers.append((client, b"X-Drip: y\r\n"))

        def drip() -> None:
            while not stop.wait(0.5):
                for client, piece in drippers:
                    with contextlib.suppress(OSError):  # a closed one fails the check below
                        client.sendall(piece)

        threading.Thread(target=drip, daemon=True).start()
        time.sleep(1.0)  # every dripper has been accepted and has sent more than once
        answers = [timed_call(port) for _ in range(30)]
        assert {status for _, status in answers} == {200}
        slowest = max(seconds for seconds, _ in answers)
        assert slowest < 1.0, f"slowest normal call {slowest:.2f} s with 200 dripping clients"
        # The drippers are all still connected and waiting: held by the event loop, not shut.
        for client, _ in drippers:
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(1)
    finally:
        stop.set()
        for client, _ in drippers:
            client.close()


def test_a_request_that_never_finishes_gets_408_after_the_read_timeout(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "CDS_AUTH": "off",
        "CDS_WORKERS": "1",
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}",
        "CDS_REQUEST_READ_TIMEOUT_SECONDS": "1",
    }
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, tmp_path / "serve.log", port=port, workers=1):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\n")
            started = time.monotonic()
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert 0.9 < time.monotonic() - started < 5
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert b"Content-Type: application/json" in head
        assert json.loads(body)["error"] == "request-timeout"
        # A request sent whole and at once is answered as ever, on the same server.
        assert timed_call(port)[1] == 200


def test_pipelined_and_kept_alive_requests_are_all_answered(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    one = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(one * 3)  # three at once: the parser reads ahead into the next
        time.sleep(0.3)
        client.sendall(one[:10])  # a fourth, in two pieces, on the kept-alive connection
        time.sleep(0.3)
        client.sendall(one[10:])
        answer = b""
        deadline = time.monotonic() + 10
        while answer.count(b"HTTP/1.1 200") < 4 and time.monotonic() < deadline:
            answer += client.recv(65536)
    assert answer.count(b"HTTP/1.1 200") == 4


def test_a_graceful_stop_does_not_wait_for_dripping_clients(tmp_path: Path) -> None:
    port = free_port()
    env = {"CDS_AUTH": "off", "CDS_WORKERS": "2",
           "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"}
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, tmp_path / "serve.log", port=port, workers=2) as served:
        drippers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        for client in drippers:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\n")
        time.sleep(0.5)
        started = time.monotonic()
        served.process.terminate()
        served.process.wait(timeout=15)
        # gunicorn's graceful timeout is 10 s: the unfinished requests do not hold it that long.
        assert time.monotonic() - started < 5
        for client in drippers:
            client.close()


def test_clients_that_never_close_after_their_answer_do_not_stall_the_worker(
    served: Served,
) -> None:
    # gunicorn lingers up to 2 s on each closing connection for the client's FIN, blocking its
    # event loop: 100 such clients made one normal call wait 20 s.
    port = int(served.url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        for _ in range(100):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            held.append(client)
        answers = [timed_call(port) for _ in range(10)]
        assert {status for _, status in answers} == {200}
        assert max(seconds for seconds, _ in answers) < 1.0
        for client in held:  # each got its answer, then the server's FIN
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        for client in held:
            client.close()


def test_a_body_announced_over_the_limit_is_refused_before_it_is_read(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"POST " + SERVICE.encode() + b" HTTP/1.1\r\nHost: h\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(body)["error"] == "request-too-large"
