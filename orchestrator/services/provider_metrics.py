"""Prometheus metrics about routing and providers, computed from Postgres at scrape time.

Like ``services.metrics``: every replica reports the same figures and they survive restarts. Three
horizons, chosen by what each figure costs to compute:

- **now** — reservations, queued jobs and ``provider_health`` rows, read through their indexes (or a
  one-row-per-provider table);
- **all time** — plain-column aggregates over jobs (requests by outcome, run-time histograms), the
  same kind of query as ``gpufleet_jobs``;
- **last 24 h** — anything that looks inside each job's JSON (placement, result usage), over the jobs
  submitted in ``metrics.WINDOW``, so a scrape's cost follows recent traffic, not the table's age.

Rejection reasons are free text written by ``scheduling/placement.py``, ``residency.py``,
``breaker.py`` and ``budgets.py``; ``rejection_category`` folds them into a small fixed set so a
dashboard can show *why* offers are passed over without a series per price or region.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select, true, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import session_scope
from orchestrator.db.models import CostEntry, Job, Reservation
from orchestrator.domain import TERMINAL
from orchestrator.services.metrics import (
    add_histogram,
    bucket_columns,
    json_number,
    label,
    recent,
    window_start,
)

log = logging.getLogger(__name__)

# --- rejection reasons ----------------------------------------------------------------------

REJECTION_CATEGORIES = ("over_budget", "region_not_allowed", "provider_not_allowed", "unhealthy", "circuit_open",
                        "no_capacity", "too_slow", "missing_capability", "price", "gpu", "failed_before", "other")
# First match wins. Each pattern is anchored on the start of a reason as the code that writes it phrases
# it (named on the right), so a reason that merely mentions a word ("…GPU…") lands in the right place.
_CATEGORY_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("circuit_open", r"^circuit (open|half-open)\b"),                         # breaker.routable
    ("unhealthy", r"^(unhealthy|unavailable):"),                              # breaker.routable, placement.place
    ("over_budget", r"^over (the .*budget|budget\b)"),                         # budgets.hold
    ("no_capacity", r"^no free capacity\b"),                                  # placement.NO_FREE_CAPACITY
    ("too_slow", r"^too slow:"),                                              # placement.place (max_latency_ms)
    ("region_not_allowed", r"^region\b.*\bnot (in|allowed)\b"),              # placement.rejection, residency
    ("provider_not_allowed", r"^(provider (not allowed|excluded|denied)\b|not a configured provider"
                             r"|data class .* (does not allow|denies) provider)"),
    ("price", r"^(\$\S+/(h|1K tokens) > max\b|over max \$)"),                # max_price_per_hour / _per_1k_tokens
    ("gpu", r"^(no GPU$|GPU\b.*\bnot in\b|\d+ GPUs < |fewer GPUs than\b|\S+ GB GPU memory < |GPU memory < )"),
    ("missing_capability", r"^(missing capability|context window\b|does not run \S+ jobs)"),
    ("failed_before", r"^failed this job before"),
))
# The second phrasing of several rules (``GPU not in …``, ``over max $…``, ``provider denied for data class``)
# is how placement words a whole group of rejected offers when it counts them instead of listing each one.
# Only the start of a reason decides its category: grouping on it keeps the number of distinct reasons
# a scrape reads small however many prices, latencies or regions the full texts quote.
REASON_PREFIX = 64
MAX_FAILURE_TEXTS = 200


def rejection_category(reason: str) -> str:
    """The category of one rejection reason (``REJECTION_CATEGORIES``): ``other`` when none fits."""
    text = reason.strip()
    for name, pattern in _CATEGORY_RULES:
        if pattern.search(text):
            return name
    return "other"


_FAILED_PLACEMENT = re.compile(
    r"^(?:no offer meets the job's constraints|no capacity within \d+s: (?:every fitting offer is full"
    r"|nothing fits now and a provider is unavailable)) \((?P<detail>.*)\)(?: after trying .*)?$", re.S)
_FAILED_BUDGET = re.compile(r"^(?:over budget|no capacity within \d+s: budget): (?P<detail>.*)$", re.S)
# Placement lists at most so many rejected offers one by one and counts the rest per provider and reason:
# "…; and 1,234 more offers (sandbox: 1,200 × GPU not in ['B200']; cheapbox: 34 × no free capacity)".
_COUNTED = re.compile(r"(?:^|; )and [\d,]+ more offers \((?P<counted>.*)\)$", re.S)
_TIMES = re.compile(r"^(?P<n>\d[\d,]*) × (?P<reason>.*)$", re.S)
_ENTRY = re.compile(r"^(?P<key>\S+?): (?P<reason>.*)$", re.S)


def rejections_in_error(error: str) -> list[tuple[str, str, int]]:
    """The ``(offer or provider, reason, how many)`` entries a failed placement lists in the job's error
    (``pipeline.dispatch`` and ``_hold_and_record`` join them with ``; ``); [] for any other error.

    Best effort by construction: entries are split on ``; `` and a piece that does not start with
    ``key: `` is taken as the rest of the previous reason (a reason that itself contains ``; ``)."""
    match = _FAILED_PLACEMENT.match(error) or _FAILED_BUDGET.match(error)
    if not match:
        return []
    detail = match.group("detail")
    counted = _COUNTED.search(detail)
    listed = [(key, reason, 1) for key, reason in _entries(detail[:counted.start()] if counted else detail)]
    if counted is None:
        return listed
    for key, reason in _entries(counted.group("counted")):
        times = _TIMES.match(reason)
        listed.append((key, times.group("reason"), int(times.group("n").replace(",", ""))) if times else (key, reason, 1))
    return listed


def _entries(detail: str) -> list[tuple[str, str]]:
    out: list[list[str]] = []
    for piece in detail.split("; ") if detail else []:
        entry = _ENTRY.match(piece)
        if entry:
            out.append([entry.group("key"), entry.group("reason")])
        elif out:
            out[-1][1] = f"{out[-1][1]}; {piece}"
    return [(key, reason) for key, reason in out]


def provider_of(key: str) -> str:
    """``provider/offer`` (an offer) or ``provider`` (a whole provider) → the provider."""
    return key.split("/", 1)[0]


# --- routing ----------------------------------------------------------------------------------

class RoutingCollector(Collector):
    """Where placement sent the jobs of the last 24 h, by which strategy and why, and what it set aside."""

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "gpufleet_routing_decisions",
                "Jobs submitted in the last 24 h that placement sent to a provider, by its strategy and why that "
                "offer: best (first as ranked), budget_fallback (cheaper offers over budget), last_resort, "
                "reservation (run on an existing reservation). The job's latest placement counts.",
                labels=["provider", "strategy", "reason"]),
            GaugeMetricFamily(
                "gpufleet_routing_rejections",
                "Offers (or whole providers) placement set aside for jobs submitted in the last 24 h, by provider and "
                "reason category; from placed jobs' rejections (listed or only counted) and those failed placements "
                "name in their error (the 200 most common errors).",
                labels=["provider", "reason"]),
            GaugeMetricFamily(
                "gpufleet_placement_failures",
                "Jobs submitted in the last 24 h that failed because placement found nowhere to run them: no_fit "
                "(no offer meets the constraints), over_budget, no_capacity (gave up waiting).",
                labels=["reason"]),
        )

    def collect(self) -> Iterator[Metric]:
        decisions, rejections, failures = self._families()
        with session_scope() as s:
            window = recent(s, Job.tenant_id, Job.created_at, window_start())
            rationale = Job.placement["rationale"].as_string()
            reason = case((rationale.like("last resort%"), "last_resort"),
                          (rationale.like("on reservation%"), "reservation"),
                          (rationale.like("%cheaper offer(s) over budget%"), "budget_fallback"), else_="best")
            strategy = func.coalesce(Job.placement["strategy"].as_string(), "none")
            for provider, how, why, n in s.execute(
                    select(Job.provider, strategy, reason, func.count())
                    .where(window, Job.placement.is_not(None), Job.provider.is_not(None))
                    .group_by(Job.provider, strategy, reason)):
                decisions.add_metric([label(provider), label(how), label(why)], n)

            counts: Counter[tuple[str, str]] = Counter()
            for key, text, n in _placed_rejections(s, window):
                counts[(provider_of(label(key)), rejection_category(label(text)))] += n
            failure = case((Job.error.like("no offer meets%"), "no_fit"), (Job.error.like("over budget:%"), "over_budget"),
                           (Job.error.like("no capacity within%"), "no_capacity"), else_=None)
            failed = select(Job.error, func.count()).where(window, Job.status == "failed", failure.is_not(None))
            for error, n in s.execute(failed.group_by(Job.error).order_by(func.count().desc()).limit(MAX_FAILURE_TEXTS)):
                for key, text, times in rejections_in_error(error or ""):
                    counts[(provider_of(key), rejection_category(text))] += n * times
            for (provider, category), n in sorted(counts.items()):
                rejections.add_metric([provider, category], n)

            for why, n in s.execute(select(failure, func.count()).where(window, Job.status == "failed", failure.is_not(None))
                                    .group_by(failure)):
                failures.add_metric([why], n)
        yield decisions
        yield rejections
        yield failures


def _placed_rejections(s: Session, window: Any) -> list[tuple[Any, Any, int]]:
    """(offer key or provider, start of reason, offers) over placed jobs' rejections, expanded by the database's
    own JSON table functions, so the maps are never shipped to Python one job at a time: each entry of the
    ``rejected`` map, plus, where placement counted rather than listed offers (``rejected_summary``: provider,
    reason, count, listed), the ``count - listed`` offers the map leaves out."""
    postgres = s.get_bind().dialect.name == "postgresql"
    if postgres:
        entries = func.jsonb_each_text(Job.placement["rejected"]).table_valued("key", "value").alias("rejected")
        is_map = func.jsonb_typeof(Job.placement["rejected"]) == "object"
    else:
        entries = func.json_each(Job.placement, "$.rejected").table_valued("key", "value").alias("rejected")
        is_map = func.json_type(Job.placement, "$.rejected") == "object"
    prefix = func.substr(entries.c.value, 1, REASON_PREFIX)
    rows = [(key, text, int(n)) for key, text, n in s.execute(
        select(entries.c.key, prefix, func.count()).select_from(Job).join(entries, true())
        .where(window, Job.placement.is_not(None), is_map).group_by(entries.c.key, prefix))]

    if postgres:
        items = func.jsonb_array_elements(Job.placement["rejected_summary"]).table_valued("value").alias("summary")
        is_list = func.jsonb_typeof(Job.placement["rejected_summary"]) == "array"
        item = type_coerce(items.c.value, JSONB)
        provider, reason = item["provider"].as_string(), item["reason"].as_string()
        unlisted = item["count"].as_float() - func.coalesce(item["listed"].as_float(), 0)
    else:
        items = func.json_each(Job.placement, "$.rejected_summary").table_valued("value").alias("summary")
        is_list = func.json_type(Job.placement, "$.rejected_summary") == "array"
        provider, reason = func.json_extract(items.c.value, "$.provider"), func.json_extract(items.c.value, "$.reason")
        unlisted = func.json_extract(items.c.value, "$.count") - func.coalesce(func.json_extract(items.c.value, "$.listed"), 0)
    summary_prefix = func.substr(reason, 1, REASON_PREFIX)
    for key, text, n in s.execute(
            select(provider, summary_prefix, func.sum(unlisted)).select_from(Job).join(items, true())
            .where(window, Job.placement.is_not(None), is_list).group_by(provider, summary_prefix)):
        if n and n > 0:
            rows.append((key, text, int(n)))
    return rows


# --- providers: health, usage, latency, cost ---------------------------------------------------

PROVIDER_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0)
BREAKER_STATES = ("closed", "open", "half_open")


class ProviderHealthCollector(Collector):
    """The health monitor's row per provider (``provider_health``), as placement reads it (``health.snapshot``)."""

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("gpufleet_provider_up", "1 if the provider's last health check passed, else 0",
                              labels=["provider"]),
            GaugeMetricFamily("gpufleet_provider_breaker_state",
                              "Circuit breaker: 1 for the provider's current state (closed, open, half_open), 0 for the others",
                              labels=["provider", "state"]),
            GaugeMetricFamily("gpufleet_provider_error_rate",
                              "Moving average of failures (0..1) over health checks and real work", labels=["provider"]),
            GaugeMetricFamily("gpufleet_provider_consecutive_failures", "Failures in a row (checks and real work)",
                              labels=["provider"]),
            GaugeMetricFamily("gpufleet_provider_latency_ms",
                              "Latency in ms: source check (health checks) or request (real inference/transcription "
                              "requests), stat ewma (moving average) or p95 (of the last 50); source placement is the "
                              "p95 placement uses now", labels=["provider", "source", "stat"]),
            GaugeMetricFamily("gpufleet_provider_health_age_seconds",
                              "Seconds since the monitor last checked the provider (large: the beat is not running)",
                              labels=["provider"]),
        )

    def collect(self) -> Iterator[Metric]:
        from orchestrator.services import health

        up, state, errors, failures, latency, age = self._families()
        now = utcnow()
        for name, view in sorted(health.snapshot(max_age=0).items()):
            up.add_metric([name], 1.0 if view.healthy else 0.0)
            for candidate in BREAKER_STATES:
                state.add_metric([name, candidate], 1.0 if view.breaker == candidate else 0.0)
            errors.add_metric([name], view.error_rate)
            failures.add_metric([name], view.consecutive_failures)
            for source, stat, value in (("check", "ewma", view.latency_ewma_ms), ("check", "p95", view.latency_p95_ms),
                                        ("request", "ewma", view.request_latency_ewma_ms),
                                        ("request", "p95", view.request_latency_p95_ms),
                                        ("placement", "p95", view.latency_ms)):
                if value is not None:
                    latency.add_metric([name, source, stat], value)
            checked = as_utc(view.checked_at)
            if checked is not None:
                age.add_metric([name], max(0.0, (now - checked).total_seconds()))
        yield from (up, state, errors, failures, latency, age)


class ProviderUsageCollector(Collector):
    """What each provider did: requests by outcome and their run time (all time), tokens and cost per 1K tokens
    (jobs submitted in the last 24 h)."""

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily("gpufleet_provider_requests",
                                "Finished jobs by the provider that ran them (their last attempt), kind and outcome "
                                "(status succeeded, failed or cancelled); failures are status=\"failed\"",
                                labels=["provider", "kind", "status"]),
            HistogramMetricFamily("gpufleet_provider_job_duration_seconds",
                                  "Run time of finished jobs by provider and kind, from start to finish (a model API "
                                  "answers inside the start, so its runs are near 0: see gpufleet_provider_latency_ms "
                                  "for request latency)", labels=["provider", "kind"]),
            GaugeMetricFamily("gpufleet_provider_tokens",
                              "Tokens reported by succeeded jobs submitted in the last 24 h, by provider and type "
                              "(prompt, completion, total: total_tokens, else prompt + completion)",
                              labels=["provider", "type"]),
            GaugeMetricFamily("gpufleet_provider_cost_per_1k_tokens_dollars",
                              "Recorded cost per 1000 tokens of succeeded jobs submitted in the last 24 h that "
                              "reported tokens: sum(cost) / sum(total tokens) * 1000", labels=["provider"]),
        )

    def collect(self) -> Iterator[Metric]:
        requests, durations, tokens, per_1k = self._families()
        terminal = sorted(status.value for status in TERMINAL)
        with session_scope() as s:
            for provider, kind, status, n in s.execute(
                    select(Job.provider, Job.kind, Job.status, func.count())
                    .where(Job.provider.is_not(None), Job.status.in_(terminal))
                    .group_by(Job.provider, Job.kind, Job.status)):
                requests.add_metric([label(provider), kind, status], n)
            for provider, kind, count, total, *cumulative in s.execute(
                    select(Job.provider, Job.kind, func.count(), func.sum(Job.duration_seconds),
                           *bucket_columns(Job.duration_seconds, PROVIDER_DURATION_BUCKETS))
                    .where(Job.provider.is_not(None), Job.duration_seconds.is_not(None))
                    .group_by(Job.provider, Job.kind)):
                add_histogram(durations, [label(provider), kind], PROVIDER_DURATION_BUCKETS, count, total, cumulative)

            prompt = json_number(s, Job.result, "usage", "prompt_tokens")
            completion = json_number(s, Job.result, "usage", "completion_tokens")
            total = func.coalesce(json_number(s, Job.result, "usage", "total_tokens"),
                                  func.coalesce(prompt, 0) + func.coalesce(completion, 0))
            for provider, p, c, t, cost in s.execute(
                    select(Job.provider, func.sum(prompt), func.sum(completion), func.sum(total),
                           func.sum(case((total > 0, Job.cost), else_=0.0)))
                    .where(recent(s, Job.tenant_id, Job.created_at, window_start()), Job.status == "succeeded",
                           Job.provider.is_not(None), Job.result.is_not(None))
                    .group_by(Job.provider)):
                name = label(provider)
                for kind, value in (("prompt", p), ("completion", c), ("total", t)):
                    tokens.add_metric([name, kind], float(value or 0))
                if t:
                    per_1k.add_metric([name], float(cost or 0) / float(t) * 1000)
        yield from (requests, durations, tokens, per_1k)


# --- capacity and spend ------------------------------------------------------------------------

RUNNING_STATES = ("provisioning", "active")


class CapacityCollector(Collector):
    """Rented capacity now, what waits for capacity, and what it costs: reservations, queued jobs, cost entries."""

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("gpufleet_active_gpus",
                              "GPUs held by reservations now, by provider, GPU model and state (active: running; "
                              "provisioning: rented, not yet running)", labels=["provider", "gpu", "state"]),
            GaugeMetricFamily("gpufleet_spend_rate_dollars_per_hour",
                              "Current burn rate: summed $/h of reservations by provider and state (usage-priced "
                              "capacity counts 0 here; it is charged per token)", labels=["provider", "state"]),
            GaugeMetricFamily("gpufleet_reservation_queue_depth",
                              "Reservations requested and not yet placed or started, by provider (none: a standalone "
                              "request not yet placed)", labels=["provider"]),
            GaugeMetricFamily("gpufleet_jobs_waiting",
                              "Queued jobs by queue and what they wait for: dispatch (not placed yet, or retrying), "
                              "capacity (every fitting offer full), provider_unavailable, budget, reservation",
                              labels=["queue", "reason"]),
            GaugeMetricFamily("gpufleet_cost_settled_last_hour_dollars",
                              "Cost settled in the last hour (cost_entries) by provider and kind",
                              labels=["provider", "kind"]),
        )

    def collect(self) -> Iterator[Metric]:
        gpus, rate, requested, waiting, settled = self._families()
        with session_scope() as s:
            rates: dict[tuple[str, str], float] = defaultdict(float)
            for provider, gpu, state, count, per_hour in s.execute(
                    select(Reservation.provider, Reservation.gpu, Reservation.state, func.sum(Reservation.gpu_count),
                           func.sum(Reservation.price_per_hour))
                    .where(Reservation.state.in_(RUNNING_STATES))
                    .group_by(Reservation.provider, Reservation.gpu, Reservation.state)):
                if gpu:
                    gpus.add_metric([label(provider), gpu, state], float(count or 0))
                rates[(label(provider), state)] += float(per_hour or 0)
            for (provider, state), value in sorted(rates.items()):
                rate.add_metric([provider, state], value)
            for provider, n in s.execute(select(Reservation.provider, func.count())
                                         .where(Reservation.state == "requested").group_by(Reservation.provider)):
                requested.add_metric([provider or "none"], n)
            reason = case((Job.error.like("waiting for capacity: budget:%"), "budget"),
                          (Job.error.like("waiting for capacity: reservation %"), "reservation"),
                          (Job.error.like("waiting for capacity: nothing fits now%"), "provider_unavailable"),
                          (Job.error.like("waiting for capacity:%"), "capacity"), else_="dispatch")
            for queue, why, n in s.execute(select(Job.queue, reason, func.count()).where(Job.status == "queued")
                                           .group_by(Job.queue, reason)):
                waiting.add_metric([queue, why], n)
            since = utcnow() - timedelta(hours=1)
            for provider, kind, amount in s.execute(
                    select(CostEntry.provider, CostEntry.kind, func.sum(CostEntry.amount))
                    .where(CostEntry.at >= since).group_by(CostEntry.provider, CostEntry.kind)):
                settled.add_metric([label(provider), label(kind)], float(amount or 0))
        yield from (gpus, rate, requested, waiting, settled)
