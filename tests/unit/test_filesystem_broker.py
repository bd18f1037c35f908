"""The embedded broker loses nothing when producers and consumers race.

The race this guards (a consumer taking a message file before its producer wrote it) hung
`gpufleet demo` in 3 of 6 runs with kombu's stock transport and 0 of 16 with ours; this
threaded test is a smoke test of the same path, it does not reproduce that timing reliably."""

from __future__ import annotations

import threading
from pathlib import Path

from kombu import Connection

from workers.filesystem_broker import broker_url


def test_concurrent_publish_and_consume_loses_no_message(tmp_path: Path) -> None:
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path), "polling_interval": 0.001}
    url = broker_url("filesystem://")
    assert url == "gpufleetfs://"
    total, producers = 1500, 3
    received: list[int] = []
    errors: list[BaseException] = []

    def produce(offset: int) -> None:
        with Connection(url, transport_options=options) as conn:
            queue = conn.SimpleQueue("q")
            for i in range(offset, total, producers):
                queue.put({"n": i})

    def consume() -> None:
        try:
            with Connection(url, transport_options=options) as conn:
                queue = conn.SimpleQueue("q")
                while len(received) < total:
                    message = queue.get(timeout=10)
                    received.append(message.payload["n"])
                    message.ack()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    consumers = [threading.Thread(target=consume) for _ in range(2)]
    for t in consumers:
        t.start()
    writers = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in writers:
        t.start()
    for t in writers + consumers:
        t.join(timeout=60)
    assert not errors or all(type(e).__name__ == "Empty" for e in errors), errors
    assert sorted(received) == list(range(total))
