"""The instance wrapper's output shipping (stdlib code that runs on rented instances), against a small
local HTTP server standing in for our API: batches stay under the body limit, a refused batch still
delivers its checkpoint lines, and an unreachable API holds up the end of the run for a bounded time."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

WRAPPER = Path(__file__).resolve().parents[2] / "providers" / "instance" / "wrapper.py"


def _wrapper() -> Any:
    spec = importlib.util.spec_from_file_location("gpufleet_wrapper", WRAPPER)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class _Api(ThreadingHTTPServer):
    limit = 10**9  # bodies larger than this get a 413
    bodies: list[dict[str, Any]]


class _Handler(BaseHTTPRequestHandler):
    server: _Api

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if len(raw) > self.server.limit:
            self.send_response(413)
            self.end_headers()
            return
        self.server.bodies.append(json.loads(raw))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[_Api]:
    server = _Api(("127.0.0.1", 0), _Handler)
    server.bodies = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _lines(api: _Api) -> list[str]:
    return [line for body in api.bodies for chunk in body["chunks"] for line in chunk["text"].splitlines()]


def test_batches_stay_small_and_long_lines_are_cut(api: _Api) -> None:
    shipper = _wrapper().Shipper(f"http://127.0.0.1:{api.server_port}/out", "token")
    for i in range(40):
        shipper.add("stdout", f"{i} " + "x" * 20000 + "\n")
    shipper.close()
    assert len(_lines(api)) == 40 and all(line.endswith("[gpufleet: line cut]") for line in _lines(api))
    assert all(len(json.dumps(body)) < 400_000 for body in api.bodies) and len(api.bodies) > 1


def test_a_refused_batch_still_delivers_its_checkpoints(api: _Api) -> None:
    api.limit = 2000
    shipper = _wrapper().Shipper(f"http://127.0.0.1:{api.server_port}/out", "token")
    shipper.add("stdout", "y" * 5000 + "\n")
    shipper.add("stdout", 'GPUFLEET_CHECKPOINT {"step": 7, "uri": "s3://b/7"}\n')
    shipper.close()
    assert _lines(api) == ['GPUFLEET_CHECKPOINT {"step": 7, "uri": "s3://b/7"}']


def test_an_unreachable_api_delays_the_end_of_the_run_only_so_long() -> None:
    shipper = _wrapper().Shipper("http://127.0.0.1:9/unreachable", "token")
    for i in range(30_000):
        shipper.add("stdout", f"line {i}\n")
    assert len(shipper.pending) <= shipper.MAX_PENDING  # bounded while the API is away
    started = time.monotonic()
    shipper.close(deadline_seconds=2.0)
    assert time.monotonic() - started < 20
