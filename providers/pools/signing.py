"""HMAC-SHA256 request signing between gpufleet and the self-hosted servers it sends work to.

A pool endpoint is usually reachable from more than our workers (a VPN, a cluster ingress), so
each request carries proof that it came from a holder of the pool's shared secret, when it was
made, and a one-time nonce. The secret itself never crosses the wire. Standard library only:
the verifier also runs inside our emulators and the small chat service deployed next to pools.

What is signed (one line each, joined by ``\\n``)::

    v1
    <METHOD upper-case>
    <path as sent, including the query string, e.g. /v1/chat/completions>
    <timestamp: integer Unix seconds>
    <nonce>
    <hex SHA-256 of the exact body bytes>

The signature header is ``v1=<hex HMAC-SHA256(secret, that text)>``. A proxy that rewrites the
path in front of the server breaks signatures: sign and verify the path the server receives.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping

TIMESTAMP_HEADER = "X-Gpufleet-Timestamp"
NONCE_HEADER = "X-Gpufleet-Nonce"
SIGNATURE_HEADER = "X-Gpufleet-Signature"
VERSION = "v1"
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


class SignatureError(Exception):
    """The request is not provably ours and fresh. ``reason`` is safe to send back to the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if not key:
        raise ValueError("the signing secret is empty")
    return key


def _signature(key: bytes, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    text = "\n".join([VERSION, method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest()])
    return f"{VERSION}=" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sign(secret: str | bytes, method: str, path: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """Headers that prove this exact request (method, path, body) was made now by a holder of ``secret``."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = secrets.token_urlsafe(18)
    return {
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: _signature(_key(secret), method, path, timestamp, nonce, body),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header lookup that works for plain dicts as well as case-insensitive header objects."""
    for candidate in (name, name.lower()):
        value = headers.get(candidate)
        if value is not None:
            return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


class Verifier:
    """Checks signed requests and refuses replays.

    A nonce is remembered until its timestamp leaves the skew window, after which the timestamp
    check alone refuses it. Memory is bounded by ``max_nonces``: on overflow the oldest nonce is
    forgotten and every request no newer than it is refused as stale, so a flood can cost
    availability for about a second but never reopen a replay. Thread-safe.
    """

    def __init__(self, secret: str | bytes, max_skew_seconds: float = 300, *, max_nonces: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        if max_skew_seconds <= 0 or max_nonces <= 0:
            raise ValueError("max_skew_seconds and max_nonces must be positive")
        self._key = _key(secret)
        self.max_skew_seconds = max_skew_seconds
        self.max_nonces = max_nonces
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._expiry: list[tuple[int, str]] = []  # (timestamp, nonce), a heap: the oldest first
        self._floor = -1  # timestamps at or below this are refused (set when memory overflowed)

    def verify(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Return if the request is signed with our secret, fresh and new; else raise ``SignatureError``."""
        timestamp, nonce, signature = (_header(headers, h) for h in (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER))
        if not (timestamp and nonce and signature):
            raise SignatureError("missing signature headers")
        if not timestamp.isdigit() or not _NONCE_RE.match(nonce):
            raise SignatureError("malformed signature headers")
        expected = _signature(self._key, method, path, timestamp, nonce, body)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise SignatureError("bad signature")
        ts, now = int(timestamp), self._clock()
        if abs(now - ts) > self.max_skew_seconds:
            raise SignatureError("stale timestamp")
        with self._lock:
            self._forget_expired(now)
            if ts <= self._floor:
                raise SignatureError("stale timestamp")
            if nonce in self._seen:
                raise SignatureError("replayed nonce")
            self._seen.add(nonce)
            heapq.heappush(self._expiry, (ts, nonce))
            while len(self._seen) > self.max_nonces:
                old_ts, old_nonce = heapq.heappop(self._expiry)
                self._seen.discard(old_nonce)
                self._floor = max(self._floor, old_ts)

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now - self.max_skew_seconds:
            _, nonce = heapq.heappop(self._expiry)
            self._seen.discard(nonce)
