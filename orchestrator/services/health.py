"""The provider health monitor: checks on the beat, a circuit breaker per provider, shared through Postgres.

Without it placement asks every provider's ``health()`` for every job: slow (one API round trip per
provider per job) and forgetful (a provider failing every other request looks fine half the time).
Here the beat checks each provider every ``health_interval_seconds`` and the pipeline reports what
real work saw; both feed the breaker in ``scheduling/breaker.py``, stored one row per provider so
every worker agrees. Placement reads all rows in one cached select (``snapshot``) and asks a provider
itself only when its row is stale — the beat is down, so the monitor knows nothing recent.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, not_, null, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import rows_changed, session_scope, single_statement
from orchestrator.db.models import PROVIDER_HEALTH, ProviderHealth
from orchestrator.scheduling import breaker
from orchestrator.scheduling.breaker import (
    CLOSED,
    ERROR_ALPHA,
    LATENCY_ALPHA,
    OPEN,
    BreakerConfig,
    BreakerState,
    HealthView,
    routable,
)
from orchestrator.settings import Settings, get_settings
from providers.base import Provider, ProviderError
from providers.registry import get_providers

__all__ = ["HealthView", "probe_all", "record_outcome", "routable", "snapshot", "stats"]

log = logging.getLogger(__name__)

# Placement reads the monitor for every job; a second-old view is as good as a fresh one.
CACHE_SECONDS = 1.0
MAX_PARALLEL_CHECKS = 8
# Below this a closed breaker's error rate is noise: a success there writes nothing (the hot path).
QUIET_ERROR_RATE = 0.01
_cache: tuple[float, dict[str, HealthView]] | None = None
_cache_lock = threading.Lock()


def _insert(session: Any) -> Any:
    """An INSERT that can say ON CONFLICT DO NOTHING on either database we run on."""
    return (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(ProviderHealth)


def config(settings: Settings | None = None) -> BreakerConfig:
    return BreakerConfig.from_settings(settings or get_settings())


def _max_age(settings: Settings) -> float:
    return settings.health_max_age_seconds or 3 * settings.health_interval_seconds


# --- checks (the beat) ------------------------------------------------------------------


def _check(provider: Provider) -> tuple[bool, float, str]:
    """(ok, latency ms, detail) of one ``health()`` call. Provider errors carry no credentials by
    contract; anything else is named by its type only, since its message might quote a URL or key."""
    started = time.perf_counter()
    try:
        answer = provider.health()
        ok, detail = answer.ok, answer.detail
    except ProviderError as exc:
        ok, detail = False, f"health check failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    except Exception as exc:  # an adapter bug is a failed check, not a dead monitor
        log.warning("health check of %s raised %s", provider.name, type(exc).__name__)
        ok, detail = False, f"health check failed: {type(exc).__name__}"
    return ok, (time.perf_counter() - started) * 1000, detail


def probe_all() -> dict[str, str]:
    """Check every configured provider (in parallel) and record each result; returns provider → breaker.

    An open breaker whose ``open_seconds`` have not passed is not asked (it is resting); once they have,
    this check is its half-open trial."""
    settings = get_settings()
    cfg = config(settings)
    providers = get_providers()
    now = utcnow()
    current = snapshot(max_age=0)
    resting = {name for name, view in current.items() if view.breaker == OPEN and name in providers}
    outcomes: dict[str, tuple[bool, float | None, str]] = {}
    to_check = [p for name, p in providers.items() if name not in resting]
    timeout = max(5.0, settings.health_interval_seconds)
    if to_check:
        pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CHECKS, len(to_check)), thread_name_prefix="health")
        futures = {pool.submit(_check, p): p.name for p in to_check}
        done, _ = wait(futures, timeout=timeout)
        pool.shutdown(wait=False, cancel_futures=True)  # a hung check must not hold up the beat
        for future, name in futures.items():
            outcomes[name] = future.result() if future in done else (False, None, f"health check took over {timeout:.0f}s")
    result: dict[str, str] = {}
    for name in providers:
        if name in resting:
            result[name] = _touch(name, now)
        else:
            ok, latency, detail = outcomes[name]
            result[name] = _record(name, ok, latency, detail, cfg, probe=True)
    _forget()
    return result


def _state(row: Any) -> BreakerState:
    """The breaker of a ``provider_health`` row (ORM object or plain row)."""
    return BreakerState(breaker=row.breaker, consecutive_failures=row.consecutive_failures, error_rate=row.error_rate,
                        observations=row.observations, opened_at=as_utc(row.opened_at),
                        latency_ewma_ms=row.latency_ewma_ms, latency_samples=tuple(row.latency_samples or ()))


def _record(name: str, ok: bool, latency_ms: float | None, detail: str, cfg: BreakerConfig, *, probe: bool) -> str:
    """Apply one observation under the row's lock: concurrent beats (or a beat and a worker) serialise
    here (FOR UPDATE on Postgres, BEGIN IMMEDIATE on SQLite) instead of overwriting each other."""
    now = utcnow()
    with session_scope() as s:
        s.execute(_insert(s).values(
            provider=name, healthy=True, breaker=CLOSED, consecutive_failures=0, error_rate=0.0, observations=0,
            latency_samples=[], detail="", updated_at=now).on_conflict_do_nothing())
        row = s.execute(select(ProviderHealth).where(ProviderHealth.provider == name).with_for_update()).scalar_one()
        before = breaker.effective(_state(row), now, cfg)
        after = breaker.observe(_state(row), ok, now, cfg, latency_ms)
        row.breaker, row.consecutive_failures, row.error_rate = after.breaker, after.consecutive_failures, after.error_rate
        row.observations, row.opened_at = after.observations, after.opened_at
        row.latency_ewma_ms, row.latency_samples = after.latency_ewma_ms, list(after.latency_samples)
        if probe:
            row.healthy, row.checked_at = ok, now
        if probe or not ok:
            row.detail = detail[:500]
        row.updated_at = now
    if after.breaker != before:
        log.log(logging.WARNING if after.breaker == OPEN else logging.INFO,
                "provider %s: circuit %s → %s (%d consecutive failures, error rate %.0f%%): %s", name, before,
                after.breaker, after.consecutive_failures, after.error_rate * 100, detail)
    return after.breaker


def _touch(name: str, now: datetime) -> str:
    """A resting (open) breaker was looked at: its decision stands and is current, so placement keeps
    trusting it instead of asking the provider."""
    with single_statement() as conn:
        conn.execute(update(PROVIDER_HEALTH).where(PROVIDER_HEALTH.c.provider == name).values(checked_at=now))
    return OPEN


# --- outcomes of real work (the pipeline) -------------------------------------------------


def record_outcome(provider: str, ok: bool, latency_ms: float | None = None, detail: str = "") -> None:
    """What real work on ``provider`` showed: a TransientProviderError is a failure, a finished run a
    success (NoCapacity is not health: a full provider works). One UPDATE, the breaker rules of
    ``breaker.observe`` written as SQL, so the hot path costs one statement; a success on a quiet,
    closed breaker matches nothing and writes nothing. Never raises: health bookkeeping must not fail a job."""
    cfg = config()
    now = utcnow()
    c = PROVIDER_HEALTH.c
    rate = c.error_rate * (1 - ERROR_ALPHA) + (0.0 if ok else ERROR_ALPHA)
    failures = c.consecutive_failures + 1
    # Half-open: open, and resting long enough; its next observation decides.
    trial = and_(c.breaker == OPEN, c.opened_at <= now - timedelta(seconds=cfg.open_seconds))
    values: dict[str, Any] = {"error_rate": rate, "updated_at": now}
    guard: Any = c.provider == provider
    if ok:
        values.update(consecutive_failures=0, breaker=case((trial, CLOSED), else_=c.breaker),
                      opened_at=case((trial, null()), else_=c.opened_at),
                      observations=case((trial, 0), else_=c.observations + 1))
        if latency_ms is None:
            guard = and_(guard, not_(and_(c.breaker == CLOSED, c.consecutive_failures == 0,
                                          c.error_rate < QUIET_ERROR_RATE)))
    else:
        opens = or_(trial, and_(c.breaker == CLOSED, or_(failures >= cfg.failures, and_(
            c.observations + 1 >= cfg.min_samples, rate > cfg.error_rate))))
        values.update(consecutive_failures=failures, observations=c.observations + 1,
                      breaker=case((opens, OPEN), else_=c.breaker), opened_at=case((opens, now), else_=c.opened_at),
                      detail=detail[:500])
    if latency_ms is not None:
        values["latency_ewma_ms"] = case((c.latency_ewma_ms.is_(None), latency_ms),
                                         else_=c.latency_ewma_ms * (1 - LATENCY_ALPHA) + latency_ms * LATENCY_ALPHA)
    try:
        with single_statement() as conn:
            changed = rows_changed(conn.execute(update(PROVIDER_HEALTH).where(guard).values(**values)))
        if not changed and not ok:  # never checked yet: the first failure creates the row
            _record(provider, ok, latency_ms, detail, cfg, probe=False)
    except SQLAlchemyError as exc:
        log.warning("could not record the outcome on %s (%s)", provider, type(exc).__name__)


# --- reading (placement, GET /v1/providers) -----------------------------------------------


def _view(row: Any, now: datetime, cfg: BreakerConfig, max_age: float) -> HealthView:
    checked = as_utc(row.checked_at)
    return HealthView(
        provider=row.provider, healthy=row.healthy, breaker=breaker.effective(_state(row), now, cfg),
        latency_ewma_ms=row.latency_ewma_ms, latency_p95_ms=breaker.p95(row.latency_samples or []),
        error_rate=row.error_rate, consecutive_failures=row.consecutive_failures, detail=row.detail,
        checked_at=checked, fresh=checked is not None and (now - checked).total_seconds() <= max_age)


def snapshot(max_age: float = CACHE_SECONDS) -> dict[str, HealthView]:
    """Every provider's row in one select, reused by this process for ``max_age`` seconds. Empty when the
    database cannot say (table not migrated yet, database down): placement then asks providers itself."""
    global _cache
    cached = _cache
    if cached is not None and time.monotonic() - cached[0] < max_age:
        return cached[1]
    settings = get_settings()
    cfg, stale_after, now = config(settings), _max_age(settings), utcnow()
    try:
        with single_statement() as conn:
            views = {row.provider: _view(row, now, cfg, stale_after) for row in conn.execute(select(PROVIDER_HEALTH))}
    except SQLAlchemyError as exc:
        log.debug("health snapshot unavailable: %s", exc)
        views = {}
    with _cache_lock:
        _cache = (time.monotonic(), views)
    return views


def _forget() -> None:
    global _cache
    with _cache_lock:
        _cache = None


def stats(provider: str) -> tuple[float | None, float]:
    """(p95 latency ms, error rate) measured by the monitor: placement's ``stats`` hook (latency limits, score)."""
    view = snapshot().get(provider)
    return (view.latency_p95_ms, view.error_rate) if view is not None and view.fresh else (None, 0.0)
