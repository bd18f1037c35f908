"""The provider health monitor: checks on the beat, a circuit breaker per provider, shared through Postgres.

Without it placement asks every provider's ``health()`` for every job: slow (one API round trip per
provider per job) and forgetful (a provider failing every other request looks fine half the time).
Here the beat checks each provider every ``health_interval_seconds`` and the pipeline reports what
real work saw; both feed the breaker in ``scheduling/breaker.py``, stored one row per provider so
every worker agrees. Placement reads all rows in one cached select (``snapshot``) and asks a provider
itself only when its row is stale — the beat is down, so the monitor knows nothing recent.

Two latencies are kept per provider: the checks' (how long ``health()`` took: a model API's model
list, a marketplace's listing) and real requests' (how long finished jobs took, as the pipeline
measured them: ``request_latency_ms``). A check says how fast a provider answers a trivial call, not
how fast it serves; so latency limits and the score use requests' p95 once there are
``MIN_REQUEST_SAMPLES`` recent ones, and the checks' p95 otherwise. Both live in the row's
``latency_samples`` JSON (``Latencies``).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
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
    MAX_SAMPLES,
    OPEN,
    BreakerConfig,
    BreakerState,
    HealthView,
    routable,
)
from orchestrator.settings import Settings, get_settings
from providers.base import Provider, ProviderError, RunHandle
from providers.registry import get_providers

__all__ = ["HealthView", "Latencies", "MonitorView", "flush_request_latencies", "probe_all", "record_outcome",
           "request_latency_ms", "routable", "snapshot", "stats"]

log = logging.getLogger(__name__)

# Placement reads the monitor for every job; a second-old view is as good as a fresh one.
CACHE_SECONDS = 1.0
MAX_PARALLEL_CHECKS = 8
# Below this a closed breaker's error rate is noise: a success there writes nothing (the hot path).
QUIET_ERROR_RATE = 0.01
# Request latency is trusted over the checks' from this many samples on, while the newest is this
# recent. The age limit matters: a provider skipped for being slow gets no requests, so without it
# its old latency would keep it skipped forever; once it ages out, the checks decide again.
MIN_REQUEST_SAMPLES = 5
REQUEST_MAX_AGE_SECONDS = 600.0
# Each process writes a provider's request latencies at most this often (a batch under one row lock),
# so finishing jobs does not queue every worker on the provider's row.
REQUEST_FLUSH_SECONDS = 1.0
# Kinds whose run is one request a caller waits for; a training or command run's length is the job's size.
REQUEST_KINDS = frozenset({"inference", "transcription"})
_cache: tuple[float, dict[str, MonitorView]] | None = None
_cache_lock = threading.Lock()


# --- latencies: the shape of provider_health.latency_samples ------------------------------------


@dataclass(frozen=True)
class Latencies:
    """The ``latency_samples`` JSON of a row: the checks' last latencies (ms) and real requests' last
    latencies with their moving average and when they were last written. Stored as
    ``{"probe": [...], "request": [...], "request_ewma_ms": x, "request_at": iso}``; a plain list is
    the shape before request latency was kept (checks only), read as such."""

    probe: tuple[float, ...] = ()
    request: tuple[float, ...] = ()
    request_ewma_ms: float | None = None
    request_at: datetime | None = None

    @classmethod
    def load(cls, raw: Any) -> Latencies:
        if isinstance(raw, list):
            return cls(probe=_numbers(raw))
        if not isinstance(raw, Mapping):
            return cls()
        ewma = raw.get("request_ewma_ms")
        at = raw.get("request_at")
        try:
            when = as_utc(datetime.fromisoformat(at)) if isinstance(at, str) else None
        except ValueError:
            when = None
        return cls(probe=_numbers(raw.get("probe")), request=_numbers(raw.get("request")),
                   request_ewma_ms=float(ewma) if isinstance(ewma, int | float) and math.isfinite(ewma) else None,
                   request_at=when)

    def dump(self) -> dict[str, Any]:
        return {"probe": list(self.probe), "request": list(self.request), "request_ewma_ms": self.request_ewma_ms,
                "request_at": self.request_at.isoformat() if self.request_at else None}

    def with_probe(self, samples: Sequence[float]) -> Latencies:
        return Latencies(tuple(samples), self.request, self.request_ewma_ms, self.request_at)

    def with_requests(self, samples: Sequence[float], now: datetime) -> Latencies:
        """These request latencies (oldest first) added: moving average as in ``breaker.observe``,
        the last ``MAX_SAMPLES`` kept for the p95."""
        ewma, kept = self.request_ewma_ms, self.request
        for ms in samples:
            ewma = breaker.ewma(ewma, ms, LATENCY_ALPHA)
            kept = (*kept, round(ms, 3))
        return Latencies(self.probe, kept[-MAX_SAMPLES:], ewma, now)

    def requests_trusted(self, now: datetime) -> bool:
        """Enough recent request latencies to prefer them over the checks'."""
        return (len(self.request) >= MIN_REQUEST_SAMPLES and self.request_at is not None
                and (now - self.request_at).total_seconds() <= REQUEST_MAX_AGE_SECONDS)


def _numbers(raw: Any) -> tuple[float, ...]:
    """The finite numbers of a JSON list (anything else in it is ignored rather than break placement)."""
    if not isinstance(raw, list):
        return ()
    return tuple(float(v) for v in raw if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))


@dataclass(frozen=True)
class MonitorView(HealthView):
    """A ``HealthView`` (whose ``latency_*`` fields are the checks') plus what real requests measured,
    and which of the two placement uses."""

    request_latency_ewma_ms: float | None = None
    request_latency_p95_ms: float | None = None
    request_samples: int = 0
    request_measured_at: datetime | None = None
    request_trusted: bool = False

    @property
    def latency_source(self) -> str | None:
        """``requests`` (enough recent samples), ``health checks`` (fresh ones), or None: unmeasured."""
        if self.request_trusted:
            return "requests"
        if self.fresh and self.latency_p95_ms is not None:
            return "health checks"
        return None

    @property
    def latency_ms(self) -> float | None:
        """The p95 latency placement uses (``max_latency_ms``, the score, ``lowest_latency``)."""
        source = self.latency_source
        return self.request_latency_p95_ms if source == "requests" else self.latency_p95_ms if source else None


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
    result: dict[str, str] = {name: _touch(name, now) for name in providers if name in resting}
    to_check = [p for name, p in providers.items() if name not in resting]
    # Half a period: a provider whose API hangs is out of routing soon after the check that found it,
    # not a whole period later; each result is written as it comes, not after the slowest check.
    timeout = max(1.0, settings.health_interval_seconds / 2)
    if to_check:
        pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CHECKS, len(to_check)), thread_name_prefix="health")
        futures = {pool.submit(_check, p): p.name for p in to_check}
        try:
            for future in as_completed(futures, timeout=timeout):
                ok, latency, detail = future.result()
                result[futures[future]] = _record(futures[future], ok, latency, detail, cfg, probe=True)
        except FuturesTimeout:
            pass
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a hung check must not hold up the beat
        for name in futures.values():
            if name not in result:
                result[name] = _record(name, False, None, f"health check took over {timeout:.0f}s", cfg, probe=True)
    _forget()
    return result


def _state(row: Any) -> BreakerState:
    """The breaker of a ``provider_health`` row (ORM object or plain row)."""
    return BreakerState(breaker=row.breaker, consecutive_failures=row.consecutive_failures, error_rate=row.error_rate,
                        observations=row.observations, opened_at=as_utc(row.opened_at),
                        latency_ewma_ms=row.latency_ewma_ms,
                        latency_samples=Latencies.load(row.latency_samples).probe)


def _locked_row(s: Any, name: str, now: datetime) -> ProviderHealth:
    """The provider's row, created if it has none yet, locked for this transaction: concurrent writers
    (beats, workers) serialise here (FOR UPDATE on Postgres, BEGIN IMMEDIATE on SQLite) instead of
    overwriting each other's samples."""
    s.execute(_insert(s).values(
        provider=name, healthy=True, breaker=CLOSED, consecutive_failures=0, error_rate=0.0, observations=0,
        latency_samples=[], detail="", updated_at=now).on_conflict_do_nothing())
    row: ProviderHealth = s.execute(
        select(ProviderHealth).where(ProviderHealth.provider == name).with_for_update()).scalar_one()
    return row


def _store(row: ProviderHealth, latencies: Latencies) -> None:
    """Write the JSON object form (the model still declares the column's older list form)."""
    row.latency_samples = latencies.dump()


def _record(name: str, ok: bool, latency_ms: float | None, detail: str, cfg: BreakerConfig, *, probe: bool) -> str:
    """Apply one observation (``latency_ms``: a check's) under the row's lock."""
    now = utcnow()
    with session_scope() as s:
        row = _locked_row(s, name, now)
        before = breaker.effective(_state(row), now, cfg)
        after = breaker.observe(_state(row), ok, now, cfg, latency_ms)
        row.breaker, row.consecutive_failures, row.error_rate = after.breaker, after.consecutive_failures, after.error_rate
        row.observations, row.opened_at = after.observations, after.opened_at
        row.latency_ewma_ms = after.latency_ewma_ms
        # Requests' latencies share the JSON column: keep them, replace only the checks'.
        _store(row, Latencies.load(row.latency_samples).with_probe(after.latency_samples))
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
    closed breaker matches nothing and writes nothing. Never raises: health bookkeeping must not fail a job.

    ``latency_ms``: how long the request took (``request_latency_ms``), kept apart from the checks'
    latency and written in per-process batches (``REQUEST_FLUSH_SECONDS``). Only successes count: a
    fast error is not a fast provider, and failures already weigh through the error rate."""
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
        guard = and_(guard, not_(and_(c.breaker == CLOSED, c.consecutive_failures == 0,
                                      c.error_rate < QUIET_ERROR_RATE)))
    else:
        opens = or_(trial, and_(c.breaker == CLOSED, or_(failures >= cfg.failures, and_(
            c.observations + 1 >= cfg.min_samples, rate > cfg.error_rate))))
        values.update(consecutive_failures=failures, observations=c.observations + 1,
                      breaker=case((opens, OPEN), else_=c.breaker), opened_at=case((opens, now), else_=c.opened_at),
                      detail=detail[:500])
    try:
        with single_statement() as conn:
            changed = rows_changed(conn.execute(update(PROVIDER_HEALTH).where(guard).values(**values)))
        if not changed and not ok:  # never checked yet: the first failure creates the row
            _record(provider, ok, None, detail, cfg, probe=False)
    except SQLAlchemyError as exc:
        log.warning("could not record the outcome on %s (%s)", provider, type(exc).__name__)
    if ok and latency_ms is not None and math.isfinite(latency_ms) and latency_ms >= 0:
        _requests.add(provider, float(latency_ms))


def request_latency_ms(kind: str, handle: RunHandle, result: Mapping[str, Any] | None = None,
                       now: float | None = None) -> float | None:
    """How long a finished job's request took, in ms, or None when its run is not a request.

    The provider's own figure when its result carries one (``latency_ms``: it knows when the model
    answered); else, for inference and transcription, the wall time since the capacity was reserved.
    Not the run's ``duration_seconds``: a model API answers inside ``start``, so its run "starts" once
    the answer is in and lasts ~0 ms. Training and command runs last as long as the job is big, which
    says nothing about the provider, and a job on a standalone reservation reserved nothing itself."""
    reported = (result or {}).get("latency_ms")
    if isinstance(reported, int | float) and not isinstance(reported, bool) and math.isfinite(reported) and reported >= 0:
        return float(reported)
    if kind not in REQUEST_KINDS or handle.data.get("on_reservation") or handle.lease.reserved_at <= 0:
        return None
    elapsed = (time.time() if now is None else now) - handle.lease.reserved_at
    return round(elapsed * 1000, 3) if elapsed >= 0 else None  # another host's clock ran ahead: no figure


class _RequestLatencies:
    """Request latencies this process measured and has not written yet, per provider.

    A provider's first latency in a while is written at once; those that follow within
    ``REQUEST_FLUSH_SECONDS`` wait for a timer and go in one transaction. A provider serving hundreds
    of jobs a second then costs each worker process one row lock a second, not one per job. A process
    killed outright loses at most that last second of samples: a statistic, not a record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[float]] = {}
        self._written: dict[str, float] = {}  # provider → monotonic time of this process's last write
        self._timer: threading.Timer | None = None

    def reset(self) -> None:
        """Start empty, as a forked child must: the parent's samples, lock and timer thread are the parent's."""
        self._lock = threading.Lock()
        self._pending, self._written, self._timer = {}, {}, None

    def add(self, provider: str, ms: float) -> None:
        now = time.monotonic()
        with self._lock:
            pending = self._pending.setdefault(provider, [])
            pending.append(ms)
            del pending[:-MAX_SAMPLES]  # older ones would leave no trace in the p95 window or the average
            last = self._written.get(provider)
            if last is not None and now - last < REQUEST_FLUSH_SECONDS:
                if self._timer is None:
                    self._timer = threading.Timer(REQUEST_FLUSH_SECONDS - (now - last), self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            batch = self._pending.pop(provider)
            self._written[provider] = now
        _write_requests(provider, batch)

    def flush(self) -> None:
        """Write everything pending now (the timer, exit, tests)."""
        with self._lock:
            batches, self._pending = self._pending, {}
            now = time.monotonic()
            for provider in batches:
                self._written[provider] = now
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()  # flushed before it fired (a no-op when this is the timer's own thread)
        for provider, batch in batches.items():
            _write_requests(provider, batch)


def _write_requests(name: str, samples: list[float]) -> None:
    """Fold a batch of request latencies into the provider's row, under its lock (the beat rewrites the
    same JSON with its checks' samples). Never raises."""
    now = utcnow()
    try:
        with session_scope() as s:
            row = _locked_row(s, name, now)
            _store(row, Latencies.load(row.latency_samples).with_requests(samples, now))
    except Exception as exc:  # a statistic: never worth failing a job or killing the timer thread
        log.warning("could not record request latency on %s (%s)", name, type(exc).__name__)


_requests = _RequestLatencies()
os.register_at_fork(after_in_child=_requests.reset)
atexit.register(_requests.flush)


def flush_request_latencies() -> None:
    """Write this process's pending request latencies now instead of within ``REQUEST_FLUSH_SECONDS``."""
    _requests.flush()


# --- reading (placement, GET /v1/providers) -----------------------------------------------


def _view(row: Any, now: datetime, cfg: BreakerConfig, max_age: float) -> MonitorView:
    checked = as_utc(row.checked_at)
    latencies = Latencies.load(row.latency_samples)
    return MonitorView(
        provider=row.provider, healthy=row.healthy, breaker=breaker.effective(_state(row), now, cfg),
        latency_ewma_ms=row.latency_ewma_ms, latency_p95_ms=breaker.p95(latencies.probe),
        error_rate=row.error_rate, consecutive_failures=row.consecutive_failures, detail=row.detail,
        checked_at=checked, fresh=checked is not None and (now - checked).total_seconds() <= max_age,
        request_latency_ewma_ms=latencies.request_ewma_ms, request_latency_p95_ms=breaker.p95(latencies.request),
        request_samples=len(latencies.request), request_measured_at=latencies.request_at,
        request_trusted=latencies.requests_trusted(now))


def snapshot(max_age: float = CACHE_SECONDS) -> dict[str, MonitorView]:
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
    """(p95 latency ms, error rate) measured by the monitor: placement's ``stats`` hook (latency limits, score).

    The latency is real requests' once there are enough recent ones (they need no beat), else the checks'
    while they are fresh; the error rate is trusted only while the checks are."""
    view = snapshot().get(provider)
    if view is None:
        return None, 0.0
    return view.latency_ms, view.error_rate if view.fresh else 0.0
