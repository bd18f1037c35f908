"""The warm pool's sizing rule, apart from any API so it can be read (and tested) on its own.

Up: enough members for the queue plus the ones busy now, within [min_size, max_size].
Down: only to ``min_size`` and only after the pool has been idle (no queue, nothing in flight)
for ``scale_down_idle_seconds`` — a MIG resize down deletes members of its own choosing, which
could be serving a request, so we never shrink a busy pool. Any resize starts a cooldown.

The little state this needs (last resize, last activity) is kept in a JSON file under the
provider's ``state_dir`` when there is one, so a restarted beat worker keeps its cooldown.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ScaleState:
    last_resize_at: float | None = None
    last_active_at: float | None = None


@dataclass(frozen=True)
class Limits:
    min_size: int
    max_size: int
    member_concurrency: int
    idle_seconds: float
    cooldown_seconds: float


@dataclass(frozen=True)
class Decision:
    size: int | None  # the new target size, or None to leave the group as it is
    reason: str


def decide(limits: Limits, state: ScaleState, *, current: int, queue_depth: int, in_flight: int, now: float) -> Decision:
    """What to do with a group of ``current`` target size; updates ``state.last_active_at``."""
    if queue_depth > 0 or in_flight > 0 or state.last_active_at is None:
        state.last_active_at = now
    busy = math.ceil(in_flight / limits.member_concurrency)
    needed = math.ceil(queue_depth / limits.member_concurrency) + busy
    wanted = min(max(needed, limits.min_size), limits.max_size)
    cooling = state.last_resize_at is not None and now - state.last_resize_at < limits.cooldown_seconds
    facts = f"queue {queue_depth}, {in_flight} in flight, target {current}"
    if wanted > current:
        if cooling:
            left = limits.cooldown_seconds - (now - state.last_resize_at)  # type: ignore[operator]
            return Decision(None, f"would grow to {wanted} but cooling down for {left:.0f}s more ({facts})")
        capped = f" (capped at max_size {limits.max_size}, {needed} wanted)" if needed > limits.max_size else ""
        return Decision(wanted, f"grow from {current} to {wanted}{capped} ({facts})")
    if current > limits.max_size and not cooling:
        return Decision(limits.max_size, f"shrink from {current} to max_size {limits.max_size} ({facts})")
    idle_for = now - state.last_active_at
    if current > limits.min_size and queue_depth == 0 and in_flight == 0:
        if idle_for < limits.idle_seconds:
            return Decision(None, f"idle for {idle_for:.0f}s of {limits.idle_seconds:g}s before shrinking ({facts})")
        if cooling:
            return Decision(None, f"idle, but cooling down before shrinking ({facts})")
        return Decision(limits.min_size, f"shrink from {current} to min_size {limits.min_size} after "
                                         f"{idle_for:.0f}s idle ({facts})")
    if current < limits.min_size and not cooling:
        return Decision(limits.min_size, f"grow from {current} to min_size {limits.min_size} ({facts})")
    return Decision(None, f"steady at {current} ({facts})")


class StateFile:
    """ScaleState persisted as JSON (atomic replace); in memory only when there is no directory."""

    def __init__(self, directory: str | None, name: str) -> None:
        self.path = Path(directory) / f"{name}-autoscale.json" if directory else None
        self._memory = ScaleState()

    def load(self) -> ScaleState:
        if self.path is None or not self.path.exists():
            return self._memory
        try:
            raw = json.loads(self.path.read_text())
            return ScaleState(last_resize_at=raw.get("last_resize_at"), last_active_at=raw.get("last_active_at"))
        except (OSError, ValueError, AttributeError):
            return self._memory

    def save(self, state: ScaleState) -> None:
        self._memory = state
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autoscale-")
            with os.fdopen(fd, "w") as fh:
                json.dump(asdict(state), fh)
            os.replace(tmp, self.path)
        except OSError:
            pass  # the in-memory copy still holds; a lost cooldown is not worth failing the beat
