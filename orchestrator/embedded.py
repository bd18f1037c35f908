"""The whole stack inside one process: API on a loopback port, a Celery worker thread, and
the sweeper. Used by `gpufleet demo`, `Client.local()` and `gpufleet up` on the embedded
default, so a laptop runs the same code path as production, only without services."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from orchestrator.bootstrap import ensure_local_key, prepare_database
from orchestrator.scheduling.queues import all_queues
from orchestrator.settings import Settings, get_settings

log = logging.getLogger(__name__)


class EmbeddedStack:
    def __init__(self, settings: Settings | None = None, concurrency: int = 8, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.settings = settings or get_settings()
        self.concurrency = concurrency
        self.host = host
        self.port = port
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: uvicorn.Server | None = None
        self._worker: Any = None
        self.api_key = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmbeddedStack:
        prepare_database(self.settings)
        self.api_key = ensure_local_key(self.settings)
        self._start_api()
        self._start_worker()
        self._spawn(self._sweep_forever, "gpufleet-sweeper")
        return self

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_api(self) -> None:
        from orchestrator.api.app import create_app

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.settings), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._spawn(lambda: self._server.run(sockets=[sock]), "gpufleet-api")  # type: ignore[union-attr]
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the embedded API did not start within 20 s")
            time.sleep(0.02)

    def _start_worker(self) -> None:
        from workers.celery_app import get_app

        app = get_app(self.settings)
        self._worker = app.WorkController(
            concurrency=self.concurrency, pool="threads", queues=all_queues(), loglevel="WARNING",
            hostname=f"embedded-{id(self)}@localhost", without_heartbeat=True, without_mingle=True,
            without_gossip=True, optimization="fair",
        )
        self._spawn(self._worker.start, "gpufleet-worker")

    def _sweep_forever(self) -> None:
        from orchestrator.services.reaper import reap
        from orchestrator.services.sweeper import sweep

        while not self._stop.wait(self.settings.sweep_interval_seconds):
            try:
                sweep()
                reap()
            except Exception:
                log.exception("sweep failed")

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._worker is not None:
            try:
                self._worker.stop(in_sighandler=False)
            except Exception:
                log.debug("worker stop", exc_info=True)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
