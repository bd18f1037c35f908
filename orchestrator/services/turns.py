"""Whose turn it is under ``round_robin``: one counter for every worker, not one per process.

Placement runs in every worker process (and in every thread of a thread pool). Counted in each
process, turns are not turns: with four workers the same provider can get four jobs in a row, and
which provider serves depends on which worker picked the message. So the count lives where every
worker can reach it atomically: an ``INCR`` on the Redis the deployment already runs (the result
store if it is Redis, else the broker), one key per candidate set of providers. That is one round
trip per placement, paid only by ``round_robin`` jobs (``place`` asks for the counter only then).

Embedded (SQLite and the filesystem broker, no Redis) one process places every job, so a counter in
that process already is the global one. If Redis stops answering, turns fall back to this process's
counter for ``RETRY_SECONDS`` rather than stall placement: turns are about fairness, and a
briefly per-process rotation is better than jobs waiting on a dead connection.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from orchestrator.scheduling.strategies import LocalTurns, TurnCounter
from orchestrator.settings import Settings, get_settings

__all__ = ["KEY_PREFIX", "LocalTurns", "RedisTurns", "TurnCounter", "redis_url", "shared_turns"]

log = logging.getLogger(__name__)

KEY_PREFIX = "gpufleet:turn:"
# A candidate set nobody has used for a day is forgotten (a job's own provider list makes its own set).
KEY_TTL_SECONDS = 86_400
# Placement must stay in single milliseconds: a Redis that does not answer within this is treated as down.
SOCKET_TIMEOUT_SECONDS = 0.25
RETRY_SECONDS = 30.0


def redis_url(settings: Settings) -> str | None:
    """The Redis this deployment already uses, if any: the result store (the cache) first, else the broker."""
    for url in (settings.result_url, settings.broker_url):
        if url.startswith(("redis://", "rediss://")):
            return url
    return None


class RedisTurns:
    """Turns counted by ``INCR`` on Redis, shared by every process that talks to it; this process's own
    count (``fallback``) while Redis is unreachable."""

    def __init__(self, url: str, *, fallback: TurnCounter | None = None, client: Any = None) -> None:
        self.url = url
        # redis-py's pool notices a fork and reconnects in the child, so one client serves a prefork worker.
        self._client = client or redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_SECONDS,
                                                      socket_connect_timeout=SOCKET_TIMEOUT_SECONDS)
        self._fallback = fallback or LocalTurns()
        self._down_until = 0.0

    def __call__(self, key: str) -> int:
        if time.monotonic() < self._down_until:
            return self._fallback(key)
        name = KEY_PREFIX + key
        try:
            pipe = self._client.pipeline(transaction=False)  # INCR and EXPIRE in one round trip
            pipe.incr(name)
            pipe.expire(name, KEY_TTL_SECONDS)
            count, _ = pipe.execute()
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + RETRY_SECONDS
            log.warning("round_robin: Redis unreachable (%s); taking turns in this process for %.0fs",
                        type(exc).__name__, RETRY_SECONDS)
            return self._fallback(key)
        return int(count) - 1  # INCR answers 1 for the first turn


_counters: dict[str | None, TurnCounter] = {}
_lock = threading.Lock()


def shared_turns(settings: Settings | None = None) -> TurnCounter:
    """The turn counter every worker of this deployment shares (one per process, made on first use)."""
    url = redis_url(settings or get_settings())
    counter = _counters.get(url)
    if counter is None:
        with _lock:
            counter = _counters.get(url)
            if counter is None:
                counter = RedisTurns(url) if url else LocalTurns()
                _counters[url] = counter
    return counter
