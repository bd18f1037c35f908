"""The pool's scaling decision, as a pure function of the group and the work in sight.

Scale-up is immediate (after the cooldown): queued jobs need ceil(queue / member_concurrency)
members on top of the members busy with work in flight, clamped to the group's MinSize and
MaxSize (moto, unlike AWS, does not refuse a desired capacity above MaxSize). Scale-in happens
only when the pool has been idle — no queue, nothing in flight — for ``idle_seconds``, and then
to MinSize (zero if the group allows): partial scale-in while work runs is not attempted,
because the group picks which member to terminate and may pick a busy one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from providers.aws.asg import BUSY_AT_TAG, SCALED_AT_TAG, Group

# Refresh the "busy at" tag at most this often while the pool is busy: one write per beat is waste.
BUSY_TAG_REFRESH_SECONDS = 30.0


@dataclass
class Decision:
    desired: int | None = None  # new desired capacity, None to leave it
    tags: dict[str, float] = field(default_factory=dict)  # state to write on the group
    note: str | None = None  # one line for the log when capacity changes


def decide(group: Group, *, queue_depth: int, in_flight: int, member_concurrency: int, now: float,
           cooldown: float, idle_seconds: float) -> Decision:
    queue_depth, in_flight = max(0, queue_depth), max(0, in_flight)
    busy_at = group.tag_time(BUSY_AT_TAG)
    scaled_at = group.tag_time(SCALED_AT_TAG)
    cooling = scaled_at is not None and now - scaled_at < cooldown
    decision = Decision()
    if queue_depth or in_flight:
        refresh = min(BUSY_TAG_REFRESH_SECONDS, idle_seconds / 4)
        if busy_at is None or now - busy_at >= refresh:
            decision.tags[BUSY_AT_TAG] = now
        asked = math.ceil(queue_depth / member_concurrency) + math.ceil(in_flight / member_concurrency)
        wanted = min(max(asked, group.min_size), group.max_size)
        if wanted > group.desired and not cooling:
            capped = f", capped at MaxSize {group.max_size}" if asked > group.max_size else ""
            decision.desired = wanted
            decision.note = (f"scaled {group.name} up from {group.desired} to {wanted} "
                             f"({queue_depth} queued, {in_flight} in flight{capped})")
        return _stamp(decision, now)
    if busy_at is None:  # first look at an idle pool: start its idle clock, do not act on a guess
        decision.tags[BUSY_AT_TAG] = now
        return decision
    idle_for = now - busy_at
    if idle_for >= idle_seconds and group.desired > group.min_size and not cooling:
        decision.desired = group.min_size
        decision.note = f"scaled {group.name} down from {group.desired} to {group.min_size} after {idle_for:.0f}s idle"
    return _stamp(decision, now)


def _stamp(decision: Decision, now: float) -> Decision:
    if decision.desired is not None:
        decision.tags[SCALED_AT_TAG] = now
    return decision
