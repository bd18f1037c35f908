"""/metrics against what the database says: routing, providers, capacity, spend and distillation.

One isolated stack (its own Postgres database and Redis DB 2) runs a small, known mix: per-token
inference on two providers priced 10x apart, a command, a job pinned to a region, one over a provider
budget, one asking for a GPU nobody has, a standalone reservation of 2 GPUs, distillation queries with a
judge, and a request a traffic route sends to the student. Once everything has settled, every figure
scraped is recomputed here from the rows — row by row in Python, not with the collectors' SQL."""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import KEY_A, Stack, isolated_stack

REDIS_DB = 2
TEACHER, STUDENT, OTHER_STUDENT, BOT = "teacher-70b", "tiny-8b", "other-3b", "tiny-bot"
PROVIDERS = """
providers:
  local:
    slots: 8
  sandbox:
    time_scale: 0.0
    state_dir: {state}
    offers:
      - {{offer_id: tok-premium, gpu: L4, gpu_memory_gb: 24, region: us-east, price_per_hour: 0.5,
         price_per_1k_tokens: 0.002, capacity: 200, kinds: [inference, transcription]}}
  cheapbox:
    type: sandbox
    time_scale: 0.0
    state_dir: {state}
    offers:
      - {{offer_id: tok-cheap, gpu: L4, gpu_memory_gb: 24, region: eu-se, price_per_hour: 0.5,
         price_per_1k_tokens: 0.0002, capacity: 200, kinds: [inference, transcription]}}
  gpubox:
    type: sandbox
    time_scale: 0.0
    state_dir: {state}
    offers:
      - {{offer_id: a100x2, gpu: A100, gpu_count: 2, gpu_memory_gb: 80, region: us-east, price_per_hour: 2.4,
         capacity: 4, kinds: [training, command]}}
"""
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("metrics")
    env = {"GPUFLEET_DISTILL_QUALITY_THRESHOLD": "0.0", "GPUFLEET_DISTILL_JUDGE_MODEL": "judge-sandbox"}
    with isolated_stack(data, REDIS_DB, PROVIDERS.format(state=Path(data) / "sandbox-state"), env) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(stack.url, KEY_A) as c:
        yield c


def _api(stack: Stack, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, f"{stack.url}{path}", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60,
                             **kwargs)
    assert response.status_code < 400, response.text
    return response.json()


def _until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def _scrape(stack: Stack) -> Samples:
    response = httpx.get(f"{stack.url}/metrics", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert response.status_code == 200, response.text
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = frozenset(sample.labels.items())
            assert key not in out[sample.name], f"duplicate series {sample.name}{sample.labels}"
            out[sample.name][key] = sample.value
    return out


def _series(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """A metric's samples keyed by the values of ``labels``, in that order."""
    return {tuple(dict(key)[name_] for name_ in labels): value for key, value in samples.get(name, {}).items()}


def _approx(expected: dict[Any, float]) -> Any:
    return pytest.approx(expected, rel=1e-9, abs=1e-12)


# --- the workload -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workload(stack: Stack, client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from orchestrator.db.engine import session_scope
    from orchestrator.services import budgets

    done: dict[str, Any] = {}
    plain = [client.submit("inference", {"model": "llama-3-8b", "prompt": f"hello {i}", "max_tokens": 32})
             for i in range(3)]
    pinned = client.submit("inference", {"model": "llama-3-8b", "prompt": "in the US please", "max_tokens": 16},
                           requirements={"regions": ["us-east"]})
    command = client.submit("command", {"command": "echo metrics"})
    no_fit = client.submit("training", {"base_model": "m", "dataset_uri": "d"}, requirements={"gpu": ["B200"]})
    for job in [*plain, pinned, command, no_fit]:
        client.wait(job.id, timeout=60)
    done["pinned"] = client.get(pinned.id)
    assert done["pinned"].provider == "sandbox" and all(client.get(j.id).provider == "cheapbox" for j in plain)
    assert client.get(command.id).status.value == "succeeded"
    assert client.get(no_fit.id).error.startswith("no offer meets the job's constraints")

    with session_scope() as s:
        budgets.set_budget(s, "provider", "gpubox", monthly_limit=0.01, hourly_limit=None)
    try:
        over = client.wait(client.submit("training", {"base_model": "m", "dataset_uri": "d"},
                                         requirements={"gpu": ["A100"], "providers": ["gpubox"]}).id, timeout=60)
    finally:
        with session_scope() as s:
            budgets.set_budget(s, "provider", "gpubox", monthly_limit=None, hourly_limit=None)
    assert over.status.value == "failed" and over.error.startswith("over budget: gpubox/a100x2: over the provider")

    reserved = client.reserve("A100", duration_seconds=900, provider="gpubox")
    done["reservation"] = _until(lambda: (row := client.reservation(reserved["id"]))["state"] == "active" and row,
                                 "the reservation to become active")

    # Distillation: teacher and student both on the premium provider; the judge goes wherever is cheapest.
    for student, prompt in ((STUDENT, "why is the sky blue"), (STUDENT, "what is a transformer"),
                            (OTHER_STUDENT, "name three rivers")):
        out = _api(stack, "POST", "/v1/distillation/query", json={
            "teacher_model": TEACHER, "student_model": student, "prompt": prompt,
            "requirements": {"providers": ["sandbox"]}})
        assert out["status"] == "succeeded" and out["provider"] == "sandbox"
    _until(lambda: len([p for p in client.pairs(limit=100) if p["status"] == "complete"]) == 3, "the pairs to complete")

    # A traffic route sends every request for the teacher to the production student (on the cheap provider).
    assert client.register_model(BOT, served_model=STUDENT)["version"] == 1
    client.promote_model(BOT, 1)
    client.set_route(TEACHER, BOT, share=1.0, shadow_rate=0.0, auto=False)
    routed = client.wait(client.submit("inference", {"model": TEACHER, "prompt": "a routed question", "max_tokens": 64},
                                       requirements={"providers": ["cheapbox"]}).id, timeout=60)
    assert routed.status.value == "succeeded" and routed.spec["model"] == STUDENT
    assert routed.labels["route"] == f"student {BOT} v1" and routed.provider == "cheapbox"
    done["routed"] = routed
    _until(_settled, "every job to finish and be released")
    return done


def _settled() -> bool:
    from sqlalchemy import func, or_, select

    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import DistillationPair, Job

    with session_scope() as s:
        busy = s.scalar(select(func.count()).select_from(Job).where(or_(
            Job.status.not_in(("succeeded", "failed", "cancelled")),
            Job.reservation_id.is_not(None) & Job.released_at.is_(None))))
        pending = s.scalar(select(func.count()).select_from(DistillationPair).where(DistillationPair.status == "pending"))
    return busy == 0 and pending == 0


def _rows(model: Any) -> list[Any]:
    from sqlalchemy import select

    from orchestrator.db.engine import session_scope

    with session_scope() as s:
        return list(s.scalars(select(model)))


def _usage(job: Any) -> tuple[float, float, float]:
    usage = (job.result or {}).get("usage") or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if total is None:
        total = (prompt or 0) + (completion or 0)
    return float(prompt or 0), float(completion or 0), float(total)


# --- the checks ----------------------------------------------------------------------------------


def test_provider_requests_tokens_cost_and_durations_match_the_jobs(stack: Stack, workload: dict[str, Any]) -> None:
    from orchestrator.db.models import Job

    samples = _scrape(stack)
    jobs = _rows(Job)
    finished = Counter((j.provider, j.kind, j.status) for j in jobs
                       if j.provider and j.status in ("succeeded", "failed", "cancelled"))
    assert _series(samples, "gpufleet_provider_requests_total", "provider", "kind", "status") == _approx(
        {k: float(v) for k, v in finished.items()})
    assert finished[("sandbox", "inference", "succeeded")] >= 7  # pinned + 3 teachers + 3 students

    tokens: dict[tuple[str, str], float] = defaultdict(float)
    cost: dict[str, float] = defaultdict(float)
    for j in jobs:
        if j.status != "succeeded" or not j.provider or j.result is None:
            continue
        prompt, completion, total = _usage(j)
        for kind, value in (("prompt", prompt), ("completion", completion), ("total", total)):
            tokens[(j.provider, kind)] += value
        cost[j.provider] += j.cost if total > 0 else 0.0
    assert _series(samples, "gpufleet_provider_tokens", "provider", "type") == _approx(dict(tokens))
    per_1k = {(p,): cost[p] / tokens[(p, "total")] * 1000 for p in cost if tokens[(p, "total")]}
    assert _series(samples, "gpufleet_provider_cost_per_1k_tokens_dollars", "provider") == _approx(per_1k)
    # Recorded cost per token is the offers' price: 10x apart.
    assert per_1k[("sandbox",)] == pytest.approx(0.002, rel=1e-3) and per_1k[("cheapbox",)] == pytest.approx(0.0002, rel=1e-3)

    runs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for j in jobs:
        if j.provider and j.duration_seconds is not None:
            runs[(j.provider, j.kind)].append(j.duration_seconds)
    counts = _series(samples, "gpufleet_provider_job_duration_seconds_count", "provider", "kind")
    sums = _series(samples, "gpufleet_provider_job_duration_seconds_sum", "provider", "kind")
    assert counts == {k: float(len(v)) for k, v in runs.items()}
    assert sums == _approx({k: sum(v) for k, v in runs.items()})
    under_1s = _series(samples, "gpufleet_provider_job_duration_seconds_bucket", "provider", "kind", "le")
    assert under_1s[("local", "command", "1.0")] == sum(1 for d in runs[("local", "command")] if d <= 1.0)


def test_routing_decisions_rejections_and_failures_match_the_placements(stack: Stack, workload: dict[str, Any]) -> None:
    from orchestrator.db.models import Job
    from orchestrator.services.provider_metrics import provider_of, rejection_category, rejections_in_error

    samples = _scrape(stack)
    jobs = _rows(Job)
    decisions: Counter[tuple[str, str, str]] = Counter()
    rejected: Counter[tuple[str, str]] = Counter()
    failures: Counter[tuple[str]] = Counter()
    for j in jobs:
        if j.placement and j.provider:
            rationale = j.placement.get("rationale", "")
            why = ("last_resort" if rationale.startswith("last resort") else "reservation"
                   if rationale.startswith("on reservation") else "budget_fallback"
                   if "cheaper offer(s) over budget" in rationale else "best")
            decisions[(j.provider, j.placement.get("strategy") or "none", why)] += 1
            for key, reason in (j.placement.get("rejected") or {}).items():
                rejected[(provider_of(key), rejection_category(reason))] += 1
            for row in j.placement.get("rejected_summary") or []:  # offers counted, not listed one by one
                if row["count"] > row.get("listed", 0):
                    rejected[(row["provider"], rejection_category(row["reason"]))] += row["count"] - row.get("listed", 0)
        if j.status == "failed" and j.error:
            for key, reason, times in rejections_in_error(j.error):
                rejected[(provider_of(key), rejection_category(reason))] += times
            for prefix, name in (("no offer meets", "no_fit"), ("over budget:", "over_budget"),
                                 ("no capacity within", "no_capacity")):
                if j.error.startswith(prefix):
                    failures[(name,)] += 1
    assert _series(samples, "gpufleet_routing_decisions", "provider", "strategy", "reason") == _approx(
        {k: float(v) for k, v in decisions.items()})
    assert _series(samples, "gpufleet_routing_rejections", "provider", "reason") == _approx(
        {k: float(v) for k, v in rejected.items()})
    assert _series(samples, "gpufleet_placement_failures", "reason") == {("no_fit",): 1.0, ("over_budget",): 1.0}
    assert failures == Counter({("no_fit",): 1, ("over_budget",): 1})
    # The reasons the workload provoked, by name: the region pin, the budget, the missing GPU model.
    rejections = _series(samples, "gpufleet_routing_rejections", "provider", "reason")
    assert rejections[("cheapbox", "region_not_allowed")] >= 1
    assert rejections[("gpubox", "over_budget")] == 1 and rejections[("gpubox", "gpu")] >= 1
    assert decisions[("sandbox", "lowest_cost", "best")] >= 1


def test_capacity_spend_and_queues_match_reservations_and_cost_entries(stack: Stack, workload: dict[str, Any]) -> None:
    from orchestrator.clock import as_utc, utcnow
    from orchestrator.db.models import CostEntry, Job, Reservation

    samples = _scrape(stack)
    reservations = _rows(Reservation)
    gpus: dict[tuple[str, str, str], float] = defaultdict(float)
    rate: dict[tuple[str, str], float] = defaultdict(float)
    for r in reservations:
        if r.state in ("provisioning", "active"):
            if r.gpu:
                gpus[(r.provider, r.gpu, r.state)] += r.gpu_count
            rate[(r.provider, r.state)] += r.price_per_hour
    assert _series(samples, "gpufleet_active_gpus", "provider", "gpu", "state") == _approx(dict(gpus))
    assert gpus[("gpubox", "A100", "active")] == 2  # the standalone reservation
    assert _series(samples, "gpufleet_spend_rate_dollars_per_hour", "provider", "state") == _approx(dict(rate))
    assert rate[("gpubox", "active")] == pytest.approx(2.4)
    requested = Counter(r.provider or "none" for r in reservations if r.state == "requested")
    assert _series(samples, "gpufleet_reservation_queue_depth", "provider") == {(k,): float(v) for k, v in requested.items()}
    queued = Counter(j.queue for j in _rows(Job) if j.status == "queued")
    assert sum(_series(samples, "gpufleet_jobs_waiting", "queue", "reason").values()) == sum(queued.values())

    hour_ago = utcnow().timestamp() - 3600
    settled: dict[tuple[str, str], float] = defaultdict(float)
    for entry in _rows(CostEntry):
        if as_utc(entry.at).timestamp() >= hour_ago:  # type: ignore[union-attr]
            settled[(entry.provider, entry.kind)] += entry.amount
    assert _series(samples, "gpufleet_cost_settled_last_hour_dollars", "provider", "kind") == _approx(dict(settled))
    assert settled[("sandbox", "inference")] > 0 and settled[("cheapbox", "inference")] > 0


def test_provider_health_matches_the_monitor_rows(stack: Stack, workload: dict[str, Any]) -> None:
    from orchestrator.db.models import ProviderHealth
    from orchestrator.services.health import Latencies

    names = {"local", "sandbox", "cheapbox", "gpubox"}
    _until(lambda: {r.provider for r in _rows(ProviderHealth) if r.checked_at} >= names, "the beat's first health checks")
    for _ in range(5):  # the beat rewrites latencies every few seconds: compare a scrape taken between equal reads
        before = {r.provider: (r.latency_ewma_ms, r.latency_samples, r.error_rate) for r in _rows(ProviderHealth)}
        samples = _scrape(stack)
        rows = {r.provider: r for r in _rows(ProviderHealth)}
        if before == {p: (r.latency_ewma_ms, r.latency_samples, r.error_rate) for p, r in rows.items()}:
            break
    else:
        pytest.fail("provider_health kept changing under the scrape")
    assert _series(samples, "gpufleet_provider_up", "provider") == {(p,): float(r.healthy) for p, r in rows.items()}
    states = _series(samples, "gpufleet_provider_breaker_state", "provider", "state")
    assert {p for (p, state), on in states.items() if on == 1.0 and state == "closed"} == set(rows) >= names
    assert _series(samples, "gpufleet_provider_error_rate", "provider") == _approx({(p,): r.error_rate for p, r in rows.items()})
    assert _series(samples, "gpufleet_provider_consecutive_failures", "provider") == {
        (p,): float(r.consecutive_failures) for p, r in rows.items()}
    latency = _series(samples, "gpufleet_provider_latency_ms", "provider", "source", "stat")
    for p, r in rows.items():
        assert latency[(p, "check", "ewma")] == pytest.approx(r.latency_ewma_ms)
        probes = sorted(Latencies.load(r.latency_samples).probe)
        assert min(probes) <= latency[(p, "check", "p95")] <= max(probes)
    assert set(_series(samples, "gpufleet_provider_health_age_seconds", "provider")) == {(p,) for p in rows}


def test_distillation_traffic_pairs_and_agreement_match_the_pairs(stack: Stack, workload: dict[str, Any]) -> None:
    from orchestrator.db.models import DistillationPair, Job

    samples = _scrape(stack)
    jobs = _rows(Job)
    pairs = _rows(DistillationPair)
    sides = Counter((j.pair_role, j.spec.get("model"), j.status) for j in jobs if j.pair_role)
    assert _series(samples, "gpufleet_distillation_requests", "role", "model", "status") == {
        k: float(v) for k, v in sides.items()}
    # One judge per pair, even when both sides end together.
    assert sides[("teacher", TEACHER, "succeeded")] == 3 and sides[("judge", "judge-sandbox", "succeeded")] == 3
    assert _series(samples, "gpufleet_distillation_routed_requests", "teacher", "student", "status") == {
        (TEACHER, BOT, "succeeded"): 1.0}

    captured = Counter((p.teacher_model, p.student_model, p.source, p.status) for p in pairs)
    assert _series(samples, "gpufleet_distillation_pairs", "teacher", "student", "source", "status") == {
        k: float(v) for k, v in captured.items()}
    assert captured == Counter({(TEACHER, STUDENT, "query", "complete"): 2, (TEACHER, OTHER_STUDENT, "query", "complete"): 1})
    accepted = Counter((p.teacher_model, p.student_model) for p in pairs if p.accepted)
    assert _series(samples, "gpufleet_distillation_pairs_accepted", "teacher", "student") == {
        k: float(v) for k, v in accepted.items()}

    agreements: dict[tuple[str, str], list[float]] = defaultdict(list)
    for p in pairs:
        if p.status == "complete" and p.agreement is not None:
            agreements[(p.teacher_model, p.student_model)].append(p.agreement)
    scraped = _series(samples, "gpufleet_distillation_agreement", "teacher", "student", "window")
    counted = _series(samples, "gpufleet_distillation_agreement_pairs", "teacher", "student", "window")
    for window in ("1h", "24h", "all"):  # every pair is minutes old: all three windows hold them all
        assert {k[:2]: v for k, v in scraped.items() if k[2] == window} == _approx(
            {k: statistics.fmean(v) for k, v in agreements.items()})
        assert {k[:2]: v for k, v in counted.items() if k[2] == window} == {k: float(len(v)) for k, v in agreements.items()}


def test_savings_of_a_routed_request_follow_the_documented_formula(stack: Stack, workload: dict[str, Any]) -> None:
    """saved = tokens of the routed request x the teacher's measured cost per token (its completed pairs with
    that student model) - the routed request's recorded cost."""
    from orchestrator.db.models import DistillationPair, Job

    samples = _scrape(stack)
    pairs = [p for p in _rows(DistillationPair) if (p.teacher_model, p.student_model) == (TEACHER, STUDENT)
             and p.status == "complete"]
    teacher_per_token = sum(p.teacher_cost for p in pairs) / sum((p.prompt_tokens or 0) + p.teacher_tokens for p in pairs)
    routed = next(j for j in _rows(Job) if j.id == workload["routed"].id)
    tokens = _usage(routed)[2]
    equivalent = tokens * teacher_per_token
    key = {(TEACHER, BOT): equivalent}
    assert _series(samples, "gpufleet_distillation_teacher_equivalent_cost_dollars", "teacher", "student") == _approx(key)
    assert _series(samples, "gpufleet_distillation_routed_cost_dollars", "teacher", "student") == _approx(
        {(TEACHER, BOT): routed.cost})
    savings = _series(samples, "gpufleet_distillation_savings_dollars", "teacher", "student")
    assert savings == _approx({(TEACHER, BOT): equivalent - routed.cost})
    # The teacher ran at $0.002/1K tokens, the student at $0.0002/1K: about 90% saved.
    assert savings[(TEACHER, BOT)] == pytest.approx(0.9 * equivalent, rel=1e-3)
    rates = _series(samples, "gpufleet_distillation_teacher_cost_per_1k_tokens_dollars", "teacher", "student")
    assert rates[(TEACHER, STUDENT)] == pytest.approx(teacher_per_token * 1000) == pytest.approx(0.002, rel=1e-3)
    assert set(rates) == {(TEACHER, STUDENT), (TEACHER, OTHER_STUDENT)}


def test_metrics_need_an_api_key(stack: Stack, workload: dict[str, Any]) -> None:
    assert httpx.get(f"{stack.url}/metrics").status_code == 401
