"""What every provider emulator shares: an HTTP server on a loopback port that can go down and come
back on the same port (an API outage), with state that carries on meanwhile."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    host: str
    port: int
    _lock: threading.RLock
    _stop: threading.Event
    _server: ThreadingHTTPServer | None = None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def up(self) -> None:
        """Accept connections (again), on the same port as before."""
        with self._lock:
            if self._server is not None:
                return
            server = ThreadingHTTPServer((self.host, self.port), self._handler_class())
            server.daemon_threads = True
            self.port = server.server_address[1]
            self._server = server
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True,
                             name=f"{type(self).__name__}-http").start()

    def down(self, seconds: float | None = None) -> None:
        """Refuse connections (the listening socket is closed); ``seconds`` brings it back up later."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if seconds is not None and not self._stop.is_set():
            timer = threading.Timer(seconds, self.up)
            timer.daemon = True
            timer.start()
