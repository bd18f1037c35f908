"""Backing off a rate-limited API: after a 429 the provider offers nothing until Retry-After passes.

The deadline lives in memory and, when a state directory is configured, in a small file, so every
worker process on the machine stops sending to the API, not only the one that was told to wait.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path


def retry_after_seconds(value: str | None, default: float, cap: float, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date; ``default`` if absent or unreadable."""
    wait: float | None = None
    if value:
        value = value.strip()
        try:
            wait = float(value)
        except ValueError:
            try:
                wait = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError, IndexError, OverflowError):
                wait = None
    if wait is None or wait != wait:  # missing, unreadable or NaN
        wait = default
    return min(max(wait, 0.0), cap)


class Cooldown:
    """A per-provider "do not call before" time, shared through ``path`` between processes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._until = 0.0
        self._lock = threading.Lock()

    def start(self, seconds: float) -> float:
        """Cool down for ``seconds`` from now (never shortening a longer cooldown); returns the deadline."""
        with self._lock:
            until = max(self._until, self._read(), time.time() + seconds)
            self._until = until
            self._write(until)
            return until

    def remaining(self) -> float:
        """Seconds left to wait, 0 when the API may be called."""
        with self._lock:
            self._until = max(self._until, self._read())
            return max(0.0, self._until - time.time())

    def _read(self) -> float:
        if self.path is None:
            return 0.0
        try:
            return float(json.loads(self.path.read_text())["until"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def _write(self, until: float) -> None:
        """Atomically replace the file: a reader in another process sees the old or the new deadline, never half."""
        if self.path is None:
            return
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w") as f:
                json.dump({"until": until}, f)
            os.replace(tmp, self.path)
        except OSError:
            # Sharing is best effort: this process still honours its own cooldown.
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
