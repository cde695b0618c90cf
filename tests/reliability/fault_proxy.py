"""A fault-injecting HTTP proxy on loopback, put between the unmodified client (HttpSink / `mldbg sync`) and a
real server process, for the remote-delivery fault tests.

Each request whose path contains ``match`` takes the next fault from the queue given to ``inject()``
(then requests pass again):

- ``"pass"``: forwarded unchanged;
- ``"error_500"`` / ``"error_503"``: answered with that status, never forwarded (the server is broken);
- ``"slow"``: forwarded, then the answer is held back ``slow_s`` seconds (the server did the work, the
  client times out and retries: the retry must not store anything twice);
- ``"drop_before"``: the connection is closed before forwarding (the request never arrived);
- ``"drop_after"``: forwarded, then the connection is closed without an answer (the request was handled,
  the client cannot know).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}
FAULTS = ("pass", "error_500", "error_503", "slow", "drop_before", "drop_after")


class FaultProxy:
    """``with FaultProxy(server.url) as proxy:`` then point the client at ``proxy.url``."""

    def __init__(self, upstream: str, *, match: str = "/traces/", slow_s: float = 1.5):
        self.upstream = urlsplit(upstream)
        self.match = match
        self.slow_s = slow_s
        self.applied: Counter = Counter()  # fault -> how many requests got it
        self._faults: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def inject(self, *faults: str) -> None:
        """Queue faults for the next matching requests, one each, in order."""
        unknown = set(faults) - set(FAULTS)
        assert not unknown, f"unknown faults {unknown}; known: {FAULTS}"
        with self._lock:
            self._faults.extend(faults)

    def recover(self) -> None:
        """Drop the faults not applied yet: from now on every request passes."""
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def next_fault(self, path: str) -> str:
        with self._lock:
            fault = self._faults.pop(0) if self.match in path and self._faults else "pass"
            self.applied[fault] += 1
            return fault

    def forward(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as requests' sessions use it

        def log_message(self, *args) -> None:  # quiet
            pass

        def handle_any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy.next_fault(self.path)
            if fault.startswith("error_"):
                status = int(fault.split("_")[1])
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                payload = b'{"detail": "injected fault"}'
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if fault == "drop_before":
                self.close_connection = True
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            status, response_headers, content = proxy.forward(self.command, self.path, headers, body)
            if fault == "drop_after":
                self.close_connection = True
                return
            if fault == "slow":
                time.sleep(proxy.slow_s)
            self.send_response(status)
            for name, value in response_headers:
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_PUT = do_POST = do_DELETE = handle_any

    return Handler
