"""A local S3-compatible server (moto) behind a WSGI layer that can fail requests (an HTTP error,
a connection reset before any response, or a response cut off halfway) and counts bytes, for the
object-store fault tests and the storage benchmark.

The layer runs in the process that starts the server, so a test arms faults with plain Python
calls, and every client (the driver, Ray workers) goes through it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field


RESET = "reset"  # the connection is cut before any response: the client sees it closed under it
TRUNCATE = "truncate"  # the response's headers and half its body are sent, then the connection is closed


@dataclass
class Rule:
    match: str  # substring of "METHOD /path?query"
    times: int  # requests it fails (-1: until removed)
    status: int | str = 503  # an HTTP status, RESET or TRUNCATE


@dataclass
class Layer:
    """What the layer does to requests: failing rules, a timed outage, and byte counters."""

    rules: list[Rule] = field(default_factory=list)
    outage_until: float = 0.0
    outage_match: str = ""
    bytes_out: int = 0  # response body bytes of GET requests
    requests: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, match: str, times: int = 1, status: int | str = 503) -> None:
        with self.lock:
            self.rules.append(Rule(match, times, status))

    def outage(self, seconds: float, match: str = "") -> None:
        """Every request (matching `match`) fails with 503 for `seconds` from now."""
        with self.lock:
            self.outage_until, self.outage_match = time.time() + seconds, match

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.outage_until, self.outage_match = 0.0, ""
            self.bytes_out = 0
            self.requests.clear()
            self.failed.clear()

    def _verdict(self, line: str) -> int | str | None:
        with self.lock:
            self.requests[line.split(" ", 1)[0]] = self.requests.get(line.split(" ", 1)[0], 0) + 1
            if time.time() < self.outage_until and self.outage_match in line:
                self.failed.append(line)
                return 503
            for rule in self.rules:
                if rule.times != 0 and rule.match in line:
                    rule.times -= 1
                    self.failed.append(line)
                    return rule.status
        return None

    def wrap(self, app):
        def layered(environ, start_response):
            line = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}?{environ.get('QUERY_STRING', '')}"
            status = self._verdict(line)
            if status == RESET:
                _drop(environ)
                return []
            if status == TRUNCATE:
                return self._truncated(app, environ, start_response)
            if status is not None:
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>injected fault</Message></Error>")
                start_response(f"{status} Injected", [("Content-Type", "application/xml"),
                                                      ("Content-Length", str(len(body)))])
                return [body]
            chunks = app(environ, start_response)
            if environ["REQUEST_METHOD"] != "GET":
                return chunks
            return self._count(chunks)
        return layered

    @staticmethod
    def _truncated(app, environ, start_response):
        """The real response's status and headers (its full Content-Length), half its body, then
        the connection closed."""
        body = b"".join(app(environ, start_response))
        yield body[: len(body) // 2]
        _drop(environ)

    def _count(self, chunks):
        try:
            for chunk in chunks:
                with self.lock:
                    self.bytes_out += len(chunk)
                yield chunk
        finally:
            if hasattr(chunks, "close"):
                chunks.close()


def _drop(environ) -> None:
    """Cut the request's connection both ways (werkzeug's development server exposes its socket)."""
    import socket

    with contextlib.suppress(OSError):
        environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)


class Server:
    """moto on 127.0.0.1:port behind a Layer, in a thread of this process."""

    def __init__(self, port: int):
        self.port, self.layer = port, Layer()
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> "Server":
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from moto.server import MotoRequestHandler
        from werkzeug.serving import make_server

        # a cut connection makes werkzeug log the 500 it can no longer send; the client sees the cut
        logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
        app = self.layer.wrap(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
        if self._thread:
            self._thread.join()
