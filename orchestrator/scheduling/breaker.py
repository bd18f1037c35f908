"""The circuit breaker of one provider, as pure values and functions (no I/O, no clock of its own).

A provider that keeps failing should stop receiving work at once, and get it back as soon as it
recovers — without every placement asking it. The health monitor (``services/health.py``) keeps
one of these states per provider in Postgres, so every worker sees the same breaker; this module
only says how a state changes:

    closed ──N consecutive failures, or error-rate EWMA > threshold after M observations──► open
    open ──open_seconds after opening──► half_open (the next observation is the trial)
    half_open ──success──► closed        half_open ──failure──► open (re-timed)

While open, observations still update the measurements but not the state: a late answer from work
started before the provider broke says nothing about whether it works now.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# Weight of the newest observation in the moving averages: ~the last 5 failures/successes count for
# the error rate, the last 3 latencies for the latency average (p95 comes from the raw samples).
ERROR_ALPHA = 0.2
LATENCY_ALPHA = 0.3
MAX_SAMPLES = 50


@dataclass(frozen=True)
class BreakerConfig:
    """Thresholds (from settings: ``breaker_*``)."""

    failures: int = 3
    error_rate: float = 0.5
    min_samples: int = 10
    open_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> BreakerConfig:
        return cls(failures=settings.breaker_failures, error_rate=settings.breaker_error_rate,
                   min_samples=settings.breaker_min_samples, open_seconds=settings.breaker_open_seconds)


@dataclass(frozen=True)
class BreakerState:
    breaker: str = CLOSED
    consecutive_failures: int = 0
    error_rate: float = 0.0
    # Observations since the breaker last closed: the error-rate rule needs at least min_samples.
    observations: int = 0
    opened_at: datetime | None = None
    latency_ewma_ms: float | None = None
    latency_samples: tuple[float, ...] = field(default_factory=tuple)


def ewma(previous: float | None, value: float, alpha: float) -> float:
    """Exponentially weighted moving average; the first value starts it."""
    return value if previous is None else previous * (1 - alpha) + value * alpha


def p95(samples: Sequence[float]) -> float | None:
    """95th percentile by nearest rank (no interpolation: with 50 samples it is the 3rd slowest)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def effective(state: BreakerState, now: datetime, config: BreakerConfig) -> str:
    """The breaker as of ``now``: an open breaker whose time is up is half-open (awaiting its trial)."""
    if state.breaker == OPEN and (state.opened_at is None or now - state.opened_at >= timedelta(seconds=config.open_seconds)):
        return HALF_OPEN
    return state.breaker


def trips(consecutive_failures: int, error_rate: float, observations: int, config: BreakerConfig) -> bool:
    """Whether a closed breaker opens with these counts."""
    return consecutive_failures >= config.failures or (observations >= config.min_samples and error_rate > config.error_rate)


def observe(state: BreakerState, ok: bool, now: datetime, config: BreakerConfig,
            latency_ms: float | None = None) -> BreakerState:
    """The state after one observation (a health probe, or the outcome of real work)."""
    failures = 0 if ok else state.consecutive_failures + 1
    rate = ewma(state.error_rate, 0.0 if ok else 1.0, ERROR_ALPHA)
    seen = state.observations + 1
    latency, samples = state.latency_ewma_ms, state.latency_samples
    if latency_ms is not None:
        latency = ewma(latency, latency_ms, LATENCY_ALPHA)
        samples = (*samples, round(latency_ms, 3))[-MAX_SAMPLES:]
    new = replace(state, consecutive_failures=failures, error_rate=rate, observations=seen,
                  latency_ewma_ms=latency, latency_samples=samples)
    current = effective(state, now, config)
    if current == HALF_OPEN:
        if ok:  # recovered: start counting afresh, so the old error rate needs M new observations to re-open it
            return replace(new, breaker=CLOSED, opened_at=None, observations=0)
        return replace(new, breaker=OPEN, opened_at=now)
    if current == CLOSED and not ok and trips(failures, rate, seen, config):
        return replace(new, breaker=OPEN, opened_at=now)
    return new


@dataclass(frozen=True)
class HealthView:
    """What placement and ``gpufleet providers`` need to know about one provider, from the monitor."""

    provider: str
    healthy: bool
    breaker: str
    latency_ewma_ms: float | None
    latency_p95_ms: float | None
    error_rate: float
    consecutive_failures: int
    detail: str
    checked_at: datetime | None
    # Checked recently enough to trust instead of asking the provider (health_max_age_seconds).
    fresh: bool


def routable(view: HealthView) -> tuple[bool, str]:
    """Whether placement may send work there and, if not, why (the reason lands in the job's placement)."""
    detail = view.detail or "no detail"
    if view.breaker == OPEN:
        failures = f"{view.consecutive_failures} consecutive failure{'' if view.consecutive_failures == 1 else 's'}"
        return False, f"circuit open: {failures} (error rate {view.error_rate:.0%}): {detail}"
    if view.breaker == HALF_OPEN:
        return False, f"circuit half-open: waiting for the trial check: {detail}"
    if not view.healthy:
        return False, f"unhealthy: {detail}"
    return True, ""
