"""The warm pools' scaling decision (``aws_pool``, ``gcp_pool``), a pure function of the group's
size, its limits, the work in sight and a little remembered state, so it can be read and tested
apart from any cloud API. Each adapter keeps the state its own way (ASG tags, a state file).

Grow: queued jobs need ceil(queue / member_concurrency) members on top of the members busy with
work in flight, ceil(in_flight / member_concurrency); that many, clamped to [min_size, max_size],
at once, unless the last resize was less than ``cooldown_seconds`` ago — and even then once the
oldest queued job has waited longer than the cooldown (waiting time is a signal, not just depth), or
when the group is at zero (nothing can serve the work at all).
A group above max_size is brought down to it.

Shrink: only when the pool has been idle (no queue, nothing in flight) for ``idle_seconds``, and
then straight to min_size (zero if allowed). A partial shrink while work runs is never attempted:
the cloud picks which member to delete and may pick a busy one. The first look at a pool starts
its idle clock; it does not act on a guess of how long the pool has been idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    min_size: int
    max_size: int
    member_concurrency: int  # requests one member serves at once
    idle_seconds: float  # idle this long before shrinking to min_size
    cooldown_seconds: float  # no resize sooner than this after the last one


@dataclass(frozen=True)
class ScaleState:
    """What the decision remembers between calls: when the group was last resized, and when the
    pool last had work (its idle clock)."""

    last_resize_at: float | None = None
    last_active_at: float | None = None


@dataclass(frozen=True)
class Decision:
    size: int | None  # the new target size, or None to leave the group as it is
    reason: str  # one line: what was decided and why
    active_at: float  # the idle clock to remember (ScaleState.last_active_at)
    needed: int = 0  # members the work in sight asks for, before the limits
    steady: bool = False  # nothing to do and nothing waited for (no cooldown, no idle clock running)


def decide(limits: Limits, state: ScaleState, *, current: int, queue_depth: int, in_flight: int,
           now: float, waited_seconds: float = 0.0) -> Decision:
    """What to do with a group of ``current`` target size; see the module's docstring for the policy.
    ``waited_seconds``: how long the oldest queued job has waited — once that exceeds the cooldown,
    growing no longer waits for it. Whoever applies a resize records it as ``last_resize_at``."""
    queue_depth, in_flight = max(0, queue_depth), max(0, in_flight)
    busy = queue_depth > 0 or in_flight > 0
    first_look = state.last_active_at is None
    active_at = now if busy or state.last_active_at is None else state.last_active_at
    needed = math.ceil(queue_depth / limits.member_concurrency) + math.ceil(in_flight / limits.member_concurrency)
    wanted = min(max(needed, limits.min_size), limits.max_size)
    since_resize = None if state.last_resize_at is None else now - state.last_resize_at
    cooling = since_resize is not None and since_resize < limits.cooldown_seconds
    facts = f"queue {queue_depth}, {in_flight} in flight, target {current}"

    def hold(reason: str, steady: bool = False) -> Decision:
        return Decision(None, f"{reason} ({facts})", active_at, needed, steady)

    def resize(size: int, reason: str) -> Decision:
        return Decision(size, f"{reason} ({facts})", active_at, needed)

    if wanted > current:
        # From zero nothing can serve the work at all: no cooldown is worth that wait (work placed straight
        # onto a scaled-to-zero endpoint waits there, unseen by waited_seconds).
        if current > 0 and since_resize is not None and cooling and waited_seconds < limits.cooldown_seconds:
            return hold(f"would grow to {wanted} but cooling down for {limits.cooldown_seconds - since_resize:.0f}s more")
        capped = f" (capped at max_size {limits.max_size}, {needed} wanted)" if needed > limits.max_size else ""
        return resize(wanted, f"grow from {current} to {wanted}{capped}")
    if current > limits.max_size and not cooling:
        return resize(limits.max_size, f"shrink from {current} to max_size {limits.max_size}")
    if busy or current <= limits.min_size:
        return hold(f"steady at {current}", steady=True)
    idle_for = now - active_at
    if first_look or idle_for < limits.idle_seconds:
        return hold(f"idle for {idle_for:.0f}s of {limits.idle_seconds:g}s before shrinking")
    if cooling:
        return hold("idle, but cooling down before shrinking")
    return resize(limits.min_size, f"shrink from {current} to min_size {limits.min_size} after {idle_for:.0f}s idle")
