"""The warm pools' scaling decision (providers.pools.scaling), shared by the ASG and MIG pools."""

from __future__ import annotations

import pytest

from providers.pools.scaling import Decision, Limits, ScaleState, decide

LIMITS = Limits(min_size=0, max_size=4, member_concurrency=2, idle_seconds=300, cooldown_seconds=60)
T = 1_000_000.0


def at(current: int, queue: int = 0, in_flight: int = 0, *, state: ScaleState | None = None, now: float = T,
       limits: Limits = LIMITS) -> Decision:
    return decide(limits, state or ScaleState(), current=current, queue_depth=queue, in_flight=in_flight, now=now)


def test_grows_for_the_queue_plus_the_members_busy_now() -> None:
    grow = at(0, queue=3)  # 3 queued / 2 per member
    assert grow.size == 2 and grow.needed == 2 and "grow from 0 to 2" in grow.reason and grow.active_at == T
    grow = at(1, queue=1, in_flight=3)  # 1 member for the queue + 2 busy with the 3 in flight
    assert grow.size == 3 and grow.needed == 3


def test_growth_is_clamped_to_max_size() -> None:
    capped = at(1, queue=20)
    assert capped.size == 4 and capped.needed == 10 and "capped at max_size 4, 10 wanted" in capped.reason
    assert at(4, queue=20).size is None  # already at the maximum
    above = at(6, queue=20)  # lowered by hand below the group's size
    assert above.size == 4 and "shrink from 6 to max_size 4" in above.reason


def test_nothing_grows_during_the_cooldown() -> None:
    state = ScaleState(last_resize_at=T - 10, last_active_at=T - 10)
    held = at(2, queue=8, state=state)
    assert held.size is None and not held.steady and "cooling down for 50s more" in held.reason
    assert at(2, queue=8, state=state, now=T + 50).size == 4  # 60 s after the last resize


def test_a_pool_at_zero_grows_at_once_even_in_its_cooldown() -> None:
    # Scaled to zero a moment ago, work arrives: nothing at all can serve it, so no cooldown holds it back.
    state = ScaleState(last_resize_at=T - 10, last_active_at=T - 10)
    grow = at(0, queue=1, state=state)
    assert grow.size == 1 and "grow from 0 to 1" in grow.reason


def test_never_shrinks_while_busy() -> None:
    long_ago = ScaleState(last_resize_at=T - 5000, last_active_at=T - 5000)
    for queue, in_flight in ((1, 0), (0, 1), (1, 7)):
        held = at(4, queue=queue, in_flight=in_flight, state=long_ago)
        assert held.size is None and held.steady and held.active_at == T  # and the idle clock restarts


def test_shrinks_to_min_size_only_after_idle_seconds() -> None:
    limits = Limits(min_size=1, max_size=4, member_concurrency=2, idle_seconds=300, cooldown_seconds=60)
    first = at(3, limits=limits)  # first look: the idle clock starts now, nothing is guessed
    assert first.size is None and first.active_at == T and "idle for 0s of 300s" in first.reason
    state = ScaleState(last_active_at=T)
    waiting = at(3, state=state, now=T + 299, limits=limits)
    assert waiting.size is None and waiting.active_at == T and "idle for 299s" in waiting.reason
    down = at(3, state=state, now=T + 300, limits=limits)
    assert down.size == 1 and "shrink from 3 to min_size 1 after 300s idle" in down.reason
    assert at(1, state=state, now=T + 900, limits=limits).steady  # at min_size: nothing to do


def test_an_idle_shrink_waits_for_the_cooldown_too() -> None:
    state = ScaleState(last_resize_at=T - 10, last_active_at=T - 1000)
    held = at(3, state=state)
    assert held.size is None and "cooling down before shrinking" in held.reason
    assert at(3, state=state, now=T + 50).size == 0


def test_first_look_never_shrinks_even_with_no_idle_time_required() -> None:
    eager = Limits(min_size=0, max_size=4, member_concurrency=2, idle_seconds=0, cooldown_seconds=0)
    assert at(3, limits=eager).size is None
    assert at(3, state=ScaleState(last_active_at=T), limits=eager).size == 0


def test_below_min_size_grows_to_it_and_negative_counts_are_zero() -> None:
    limits = Limits(min_size=2, max_size=4, member_concurrency=2, idle_seconds=300, cooldown_seconds=60)
    grow = at(0, queue=-3, in_flight=-1, limits=limits)
    assert grow.size == 2 and grow.needed == 0 and "queue 0, 0 in flight" in grow.reason


@pytest.mark.parametrize("current", [0, 2])
def test_an_idle_pool_at_min_size_is_steady(current: int) -> None:
    limits = Limits(min_size=current, max_size=4, member_concurrency=2, idle_seconds=300, cooldown_seconds=60)
    steady = at(current, state=ScaleState(last_active_at=T - 1000), limits=limits)
    assert steady.size is None and steady.steady and steady.active_at == T - 1000


def test_jobs_waiting_longer_than_the_cooldown_override_it() -> None:
    from providers.pools.scaling import Limits, ScaleState, decide

    limits = Limits(min_size=0, max_size=4, member_concurrency=2, idle_seconds=60, cooldown_seconds=120)
    state = ScaleState(last_resize_at=1000.0, last_active_at=1000.0)
    cooling = decide(limits, state, current=1, queue_depth=4, in_flight=2, now=1030.0, waited_seconds=10)
    assert cooling.size is None and "cooling down" in cooling.reason
    waited = decide(limits, state, current=1, queue_depth=4, in_flight=2, now=1030.0, waited_seconds=150)
    assert waited.size == 3
