"""Placement latency, and how quickly an unhealthy provider leaves routing.

(a) ``place()`` timed in-process for 10, 1,000 and 10,000 offers (p50/p99 over many calls, each size
    repeated to show the spread on a shared machine). Providers are in-process objects handing out
    pre-built offer lists — a marketplace with thousands of hosts, clouds, a self-hosted pool, a
    serverless endpoint and model APIs priced per 1K tokens — so what is timed is placement itself:
    health/breaker gating from a monitor snapshot, filtering (GPU names, regions, prices, spot,
    capacity, residency), scoring, the strategy's order and building the explanation. Called as
    ``pipeline.dispatch`` calls it (fresh ``Requirements`` per job, ``seed``, ``busy``, ``stats``,
    ``monitor``); ``round_robin`` gets the in-process turn counter, not Redis.
(b) provider down → out of routing: the health monitor's real code (``services.health.probe_all``,
    writing ``provider_health`` in a Postgres database of its own) runs in a child process on the
    health period, as the beat would; this process places jobs continuously the way a worker does
    (``monitor=health.snapshot()``, ``stats=health.stats``, with the snapshot's per-process cache).
    A provider that placement is choosing starts failing its checks at a random moment of the
    period; the figure is the time until placement stops choosing it, in seconds and in periods.
    Two failure modes: checks that fail at once (an error answer) and checks that hang (an API
    that stopped answering: the monitor gives up after its check timeout).

    python bench/placement.py [--sizes 10 1000 10000] [--repeat 3] [--iterations N]
                              [--health-periods 2 10] [--health-trials 5] [--skip-timing] [--skip-health]

Part (b) needs the local PostgreSQL (creates and drops ``gpufleet_bench_<id>``); ``BENCH_PG`` overrides
the admin URL (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.scheduling.breaker import CLOSED, OPEN, HealthView  # noqa: E402
from orchestrator.scheduling.placement import RoutingPolicy, place  # noqa: E402
from orchestrator.scheduling.residency import DataClassRule, Policy  # noqa: E402
from orchestrator.scheduling.strategies import LocalTurns  # noqa: E402
from providers.base import Health, Offer, Provider, ProviderKind, Requirements  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
GOAL_P99_MS = 5.0
ALL_KINDS = ["training", "inference", "transcription", "command"]

# --- the offer mix ---------------------------------------------------------------------------------

# GPU model → (GB per GPU, rough $/h per GPU on demand), spelled the way each provider lists them.
GPUS: dict[str, tuple[float, float]] = {
    "RTX 4090": (24, 0.45), "RTX 3090": (24, 0.25), "A100 SXM4": (80, 1.40), "A100 PCIE": (40, 1.10),
    "H100 SXM": (80, 2.60), "H100 NVL": (94, 2.80), "L40S": (48, 0.95), "RTX A6000": (48, 0.60), "A40": (48, 0.50),
    "NVIDIA A100 80GB PCIe": (80, 1.60), "NVIDIA A100-SXM4-80GB": (80, 1.75), "NVIDIA H100 80GB HBM3": (80, 2.90),
    "NVIDIA GeForce RTX 4090": (24, 0.70), "NVIDIA L40S": (48, 1.00), "NVIDIA RTX A6000": (48, 0.80),
    "A100": (40, 3.70), "H100": (80, 6.90), "A10G": (24, 1.20), "L4": (24, 0.80), "V100": (16, 3.00), "T4": (16, 0.55),
    "NVIDIA A100 80GB": (80, 3.90), "NVIDIA H100 80GB": (80, 7.20), "NVIDIA L4": (24, 0.75), "NVIDIA T4": (16, 0.40),
}


@dataclass(frozen=True)
class Style:
    """How one provider's offers look: its GPU names, region vocabulary and pricing."""

    gpus: tuple[str, ...]
    regions: tuple[str, ...]
    counts: tuple[int, ...] = (1,)
    spot_share: float = 0.0
    per_1k: tuple[float, float] | None = None  # usage-priced ($/1K tokens range)
    kinds: tuple[str, ...] = tuple(ALL_KINDS)
    capacity: tuple[int, ...] = (1,)
    full_share: float = 0.03


STYLES: dict[str, Style] = {
    "vastai": Style(("RTX 4090", "RTX 3090", "A100 SXM4", "A100 PCIE", "H100 SXM", "H100 NVL", "L40S", "RTX A6000", "A40"),
                    ("US", "CA", "DE", "SE", "FR", "NL", "GB", "NO", "JP", "KR", "BR", "PL", "Texas, US", "Quebec, CA"),
                    counts=(1, 1, 1, 2, 4, 8), spot_share=0.35),
    "runpod": Style(("NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090",
                     "NVIDIA L40S", "NVIDIA RTX A6000"),
                    ("EU-RO-1", "EU-SE-1", "EU-NL-1", "US-TX-3", "US-GA-1", "CA-MTL-1", "EUR-IS-1"),
                    counts=(1, 1, 2, 4, 8), spot_share=0.4, capacity=(1, 2, 4)),
    "aws": Style(("A100", "H100", "A10G", "L4", "V100", "T4"),
                 ("us-east-1", "us-west-2", "eu-west-1", "eu-west-2", "eu-central-1", "ap-northeast-1", "ca-central-1"),
                 counts=(1, 4, 8), spot_share=0.3, capacity=(1, 2, 8)),
    "gcp": Style(("NVIDIA A100 80GB", "NVIDIA H100 80GB", "NVIDIA L4", "NVIDIA T4"),
                 ("europe-west4-a", "europe-west3-b", "us-central1-a", "us-east4-c", "asia-east1-c", "europe-west2-a"),
                 counts=(1, 2, 4, 8), spot_share=0.3, capacity=(1, 4)),
    "pool": Style(("A100", "H100", "L4"), ("eu-se", "us-east"), counts=(1, 2), capacity=(2, 4, 8), full_share=0.2),
    "serverless": Style(("L4", "NVIDIA A100 80GB PCIe", "NVIDIA GeForce RTX 4090"), ("US", "EU-RO-1"), per_1k=(0.0002, 0.001),
                        kinds=("inference", "transcription"), capacity=(4, 16)),
    "openai": Style((), ("us", "eu-west-1"), per_1k=(0.0003, 0.015), kinds=("inference", "transcription"), capacity=(64,),
                    full_share=0.0),
    "anthropic": Style((), ("us", "eu-central-1"), per_1k=(0.0008, 0.02), kinds=("inference",), capacity=(64,),
                       full_share=0.0),
    "flaky": Style(("A100 SXM4", "H100 SXM"), ("US", "DE"), counts=(1, 2)),
}
# Share of the offers each provider lists; "flaky" has its circuit open in the monitor's snapshot.
SHARES = {"vastai": 0.40, "runpod": 0.20, "aws": 0.12, "gcp": 0.10, "pool": 0.05, "serverless": 0.05,
          "openai": 0.03, "anthropic": 0.02, "flaky": 0.03}
KINDS = {"vastai": ProviderKind.marketplace, "runpod": ProviderKind.marketplace, "aws": ProviderKind.marketplace,
         "gcp": ProviderKind.marketplace, "pool": ProviderKind.self_hosted, "serverless": ProviderKind.serverless,
         "openai": ProviderKind.model_api, "anthropic": ProviderKind.model_api, "flaky": ProviderKind.marketplace}
CAPABILITIES = {"openai": ("reasoning", "large-context"), "anthropic": ("reasoning", "large-context")}
MODELS = ("gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet", "claude-haiku", "llama-3-70b", "llama-3-8b", "mistral-large")


def make_offers(provider: str, count: int, rng: random.Random) -> list[Offer]:
    style = STYLES[provider]
    offers = []
    for i in range(count):
        region = rng.choice(style.regions)
        capacity = 0 if rng.random() < style.full_share else rng.choice(style.capacity)
        if not style.gpus:  # a model API: one offer per model, priced per token
            model = MODELS[i % len(MODELS)]
            offers.append(Offer(provider=provider, offer_id=f"{model}-{i}", region=region, price_per_hour=0.0,
                                price_per_1k_tokens=round(rng.uniform(*(style.per_1k or (0.001, 0.01))), 6),
                                capacity=capacity, kinds=list(style.kinds), context_window=rng.choice((128_000, 200_000)),
                                capabilities=["json"], data={"model": model}))
            continue
        gpu = rng.choice(style.gpus)
        gpus = rng.choice(style.counts)
        memory, hourly = GPUS[gpu]
        spot = rng.random() < style.spot_share
        price = hourly * gpus * rng.uniform(0.7, 1.5) * (0.45 if spot else 1.0)
        offers.append(Offer(
            provider=provider, offer_id=f"{i}-{gpu.replace(' ', '_').lower()}-x{gpus}", gpu=gpu, gpu_count=gpus,
            gpu_memory_gb=memory, region=region, price_per_hour=round(price, 4),
            price_per_1k_tokens=round(rng.uniform(*style.per_1k), 6) if style.per_1k else None, capacity=capacity,
            reliability=round(rng.uniform(0.85, 0.999), 4), kinds=list(style.kinds), interruptible=spot,
            data={"host": rng.randrange(1_000_000)}))
    return offers


def split(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    """``total`` offers over the providers by share (largest remainder), so 10 means 10."""
    exact = {name: total * share for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[:total - sum(counts.values())]:
        counts[name] += 1
    return counts


class BenchProvider(Provider):
    """Hands out a pre-built offer list: the time spent here is a list copy, not an API call."""

    def __init__(self, name: str, kind: ProviderKind, offers: list[Offer], health: Callable[[], Health] | None = None) -> None:
        super().__init__(name, {})
        self.kind = kind  # type: ignore[misc]
        self._offers = offers
        self._health = health

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        return list(self._offers)

    def health(self) -> Health:
        return self._health() if self._health else Health(ok=True)


def fleet(total: int, seed: int = 7) -> dict[str, Provider]:
    rng = random.Random(seed)
    providers: dict[str, Provider] = {}
    for name, count in split(total, SHARES).items():
        provider = BenchProvider(name, KINDS[name], make_offers(name, count, rng))
        provider.capabilities = CAPABILITIES.get(name, ())
        providers[name] = provider
    return providers


def monitor_views(providers: Sequence[str]) -> dict[str, HealthView]:
    """What ``health.snapshot()`` would return: fresh rows, closed breakers, "flaky" open."""
    now = datetime.now(UTC)
    return {name: HealthView(provider=name, healthy=name != "flaky", breaker=OPEN if name == "flaky" else CLOSED,
                             latency_ewma_ms=40.0 + 10 * i, latency_p95_ms=60.0 + 15 * i,
                             error_rate=0.6 if name == "flaky" else 0.01 * i,
                             consecutive_failures=4 if name == "flaky" else 0,
                             detail="HTTP 503" if name == "flaky" else "", checked_at=now, fresh=True)
            for i, name in enumerate(providers)}


# --- (a) placement latency -------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    name: str
    kind: str
    spec: dict[str, Any]
    requirements: dict[str, Any]
    policy: RoutingPolicy | None = None


EU_POLICY = RoutingPolicy(residency=Policy(default_class="public", classes={
    "public": DataClassRule(), "pii-eu": DataClassRule(regions=["EU"], replication=False)}))
GPU_REQ = {"gpu": ["A100", "H100"], "gpu_count": 1, "max_price_per_hour": 4.0, "regions": ["EU", "US"]}
PROFILES = {
    "gpu": Profile("gpu", "training", {"base_model": "llama-3-8b", "dataset_uri": "s3://d/train.jsonl"}, GPU_REQ),
    "inference": Profile("inference", "inference", {"model": "llama-3-70b", "prompt": "hi", "max_tokens": 256},
                         {"max_price_per_1k_tokens": 0.004, "max_price_per_hour": 2.5, "regions": ["EU", "US"]}),
    "gpu pii-eu": Profile("gpu pii-eu", "training", {"base_model": "llama-3-8b", "dataset_uri": "s3://d/train.jsonl"},
                          {**GPU_REQ, "data_class": "pii-eu"}, EU_POLICY),
}
# (profile, strategy, retry) rows timed at every size. A first attempt (as most dispatches are) has no
# failed or busy offers; a retry excludes the offer that failed and one that was full moments ago, which
# costs placement a look-up per offer.
ROWS = [("gpu", "lowest_cost", False), ("gpu", "score", False), ("gpu", "round_robin", False),
        ("inference", "lowest_cost", False), ("gpu pii-eu", "lowest_cost", False), ("gpu", "lowest_cost", True)]


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 2nd slowest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def time_row(providers: Mapping[str, Provider], profile: Profile, strategy: str, iterations: int,
             monitor: Mapping[str, HealthView], stats: Callable[[str], tuple[float | None, float]],
             failed: set[str], busy: set[str]) -> tuple[list[float], Any]:
    """Milliseconds per ``place()`` call, and the last placement (for its counts)."""
    turns = LocalTurns()
    raw = {**profile.requirements, "strategy": strategy}
    samples: list[float] = []
    placement = None
    warmup = max(3, iterations // 20)
    gc.collect()
    for i in range(warmup + iterations):
        requirements = Requirements(**raw)  # as dispatch does: a fresh object per job
        started = time.perf_counter()
        placement = place(providers, profile.kind, profile.spec, requirements, 3600, failed, policy=profile.policy,
                          seed=f"job-{i}:1", busy=busy, stats=stats, monitor=monitor, turns=turns)
        elapsed = (time.perf_counter() - started) * 1000
        if i >= warmup:
            samples.append(elapsed)
    return samples, placement


def _lookup(measured: dict[str, tuple[float | None, float]]) -> Callable[[str], tuple[float | None, float]]:
    """The ``stats`` hook: (p95 latency ms, error rate) per provider, as ``health.stats`` answers it."""
    return lambda name: measured.get(name, (None, 0.0))


def _retry(providers: Mapping[str, Provider], profile: Profile) -> tuple[set[str], set[str]] | None:
    """A second attempt: the cheapest fitting offer failed this job, the next was full moments ago
    (None when fewer than three offers fit: a retry would leave nothing to time)."""
    first = place(providers, profile.kind, profile.spec, Requirements(**profile.requirements), 3600,
                  policy=profile.policy, monitor=monitor_views(list(providers)))
    if len(first.candidates) < 3:
        return None
    keys = [f"{c.offer.provider}/{c.offer.offer_id}" for c in first.candidates[:2]]
    return set(keys[:1]), set(keys[1:2])


def default_iterations(size: int) -> int:
    return 2000 if size <= 100 else 400 if size <= 2000 else 200


def run_timing(sizes: Sequence[int], repeat: int, iterations: int | None) -> list[dict[str, Any]]:
    results = []
    for size in sizes:
        providers = fleet(size)
        monitor = monitor_views(list(providers))
        measured: dict[str, tuple[float | None, float]] = {
            name: (view.latency_p95_ms, view.error_rate) for name, view in monitor.items()}
        for profile_name, strategy, retry in ROWS:
            profile = PROFILES[profile_name]
            excluded = _retry(providers, profile) if retry else (set(), set())
            if excluded is None:
                continue
            failed, busy = excluded
            p50s, p99s, means = [], [], []
            placement = None
            for _ in range(repeat):
                samples, placement = time_row(providers, profile, strategy, iterations or default_iterations(size),
                                              monitor, _lookup(measured), failed, busy)
                p50s.append(percentile(samples, 0.50))
                p99s.append(percentile(samples, 0.99))
                means.append(statistics.fmean(samples))
            assert placement is not None
            row = {"offers": size, "profile": profile_name + (" (retry)" if retry else ""), "strategy": strategy,
                   "fitting": len(placement.candidates), "considered": placement.considered,
                   "listed": len(placement.rejected), "p50": p50s, "p99": p99s, "mean": means,
                   "samples": iterations or default_iterations(size),
                   "winner": f"{placement.provider}/{placement.offer.offer_id}"}
            results.append(row)
            print(f"  {size:>6,} offers  {row['profile']:<11} {strategy:<12} p50 {_range(p50s)} ms  p99 {_range(p99s)} ms"
                  f"  ({row['fitting']} fit, {row['considered']} considered)", flush=True)
    return results


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3f}" if abs(high - low) < 0.0005 else f"{low:.3f}–{high:.3f}"


# --- (b) provider down → out of routing --------------------------------------------------------------

HEALTH_OFFERS = 1000
TRIAL_PREFIX = "p"
# A hanging API answers nothing until the client's timeout (the model-API adapters' health call: 10 s).
HANG_SECONDS = 10.0


def health_fleet(trials: int, down_at: Any, hang: bool) -> dict[str, Provider]:
    """``trials`` providers whose cheapest A100 is dearer by 10 cents each, plus an always-healthy
    "dear" one: while provider i is up, and every provider before it is down, placement picks i.
    ``down_at[i]``: wall-clock moment provider i starts failing its checks."""
    rng = random.Random(11)
    per = HEALTH_OFFERS // (trials + 1)
    providers: dict[str, Provider] = {}
    for i in range(trials + 1):
        name = f"{TRIAL_PREFIX}{i}" if i < trials else "dear"
        offers = []
        for j in range(per):
            cheapest = j == 0
            price = 0.50 + 0.10 * i if cheapest else rng.uniform(3.0, 6.0)
            offers.append(Offer(provider=name, offer_id=f"a100-{j}", gpu=rng.choice(("A100 SXM4", "A100 PCIE")),
                                gpu_count=1, gpu_memory_gb=80, region=rng.choice(("US", "DE", "SE")),
                                price_per_hour=round(price, 4), capacity=4, kinds=list(ALL_KINDS)))
        check = _check(i, down_at, hang) if i < trials else None
        providers[name] = BenchProvider(name, ProviderKind.marketplace, offers, check)
    return providers


# health() calls made in this process. The monitor runs in its own process, so these are placement's
# own: it asks a provider itself when the monitor's row is stale (older than 3 periods).
INLINE_CHECKS = [0]


def _check(index: int, down_at: Any, hang: bool) -> Callable[[], Health]:
    def health() -> Health:
        INLINE_CHECKS[0] += 1
        if time.time() < down_at[index]:
            return Health(ok=True)
        if hang:  # an API that stopped answering: the call hangs until the HTTP client gives up
            time.sleep(HANG_SECONDS)
            return Health(ok=False, detail=f"timed out after {HANG_SECONDS:g}s")
        return Health(ok=False, detail="HTTP 503 from the API")
    return health


def monitor_process(period: float, trials: int, down_at: Any, hang: bool, ready: Any, stop: Any, ticks: Any) -> None:
    """The beat + the control worker: ``health.probe_all()`` every ``period`` seconds, each run in its own
    thread (beat sends the task on schedule whether or not the last one finished)."""
    import logging

    from orchestrator.services import health

    logging.getLogger("orchestrator.services.health").setLevel(logging.ERROR)  # breakers opening is the point
    providers = health_fleet(trials, down_at, hang)
    health.get_providers = lambda settings=None: providers  # type: ignore[assignment]  # the bench's fleet, not the file's

    def probe(tick: float) -> None:
        health.probe_all()
        ticks.put((tick, time.time()))

    start = time.time()
    k = 0
    while not stop.is_set():
        tick = start + k * period
        delay = tick - time.time()
        if delay > 0 and stop.wait(delay):
            break
        threading.Thread(target=probe, args=(time.time(),), daemon=True).start()
        if k == 0:
            time.sleep(0.5)
            ready.set()
        k += 1
    os._exit(0)  # hung check threads must not hold the exit


@dataclass
class Trial:
    provider: str
    went_down: float
    out_after: float  # seconds from going down until placement stopped choosing it
    check_after: float | None  # seconds from going down until the first failing check was written
    inline_checks: int  # health() calls placement made itself meanwhile (stale monitor rows)


def run_health(admin_url: str, periods: Sequence[float], trials: int, modes: Sequence[str]) -> list[dict[str, Any]]:
    db = f"gpufleet_bench_{uuid.uuid4().hex[:8]}"
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    data = Path(tempfile.mkdtemp(prefix="gpufleet-bench-placement-"))
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    os.environ.update({"GPUFLEET_DATABASE_URL": f"{base}/{db}", "GPUFLEET_DATA_DIR": str(data),
                       "GPUFLEET_BROKER_URL": "", "GPUFLEET_LOG_LEVEL": "WARNING"})
    os.environ.pop("GPUFLEET_PROVIDERS_FILE", None)
    os.environ.pop("GPUFLEET_HEALTH_MAX_AGE_SECONDS", None)
    results = []
    try:
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "migrate"], cwd=ROOT, check=True, capture_output=True)
        for mode in modes:
            for period in periods:
                outcome = _health_run(period, trials, hang=mode == "hang")
                results.append({"mode": mode, "period": period, "trials": outcome})
                _print_health(mode, period, outcome)
    finally:
        from orchestrator.db.engine import get_engine

        get_engine.cache_clear()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return results


def _health_run(period: float, trials: int, hang: bool) -> list[Trial]:
    from sqlalchemy import text

    from orchestrator.db.engine import get_engine, single_statement
    from orchestrator.services import health
    from orchestrator.settings import get_settings

    os.environ["GPUFLEET_HEALTH_INTERVAL_SECONDS"] = str(period)
    get_settings.cache_clear()
    with single_statement() as conn:
        conn.execute(text("DELETE FROM provider_health"))
    get_engine.cache_clear()  # the child starts its own pool; ours reconnects
    ctx = mp.get_context("spawn")
    down_at = ctx.Array("d", [math.inf] * trials, lock=False)
    ready, stop, ticks = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=monitor_process, args=(period, trials, down_at, hang, ready, stop, ticks), daemon=True)
    child.start()
    providers = health_fleet(trials, down_at, hang)
    requirements: dict[str, Any] = {"gpu": ["A100"], "max_price_per_hour": 10.0}
    spec = {"base_model": "m", "dataset_uri": "d"}
    outcome: list[Trial] = []
    seen: list[tuple[float, float]] = []
    try:
        if not ready.wait(60):
            raise RuntimeError("the monitor process did not start")

        def choose() -> str:
            return place(providers, "training", spec, Requirements(**requirements), 3600, set(),
                         stats=health.stats, monitor=health.snapshot()).provider

        deadline = time.monotonic() + 30
        while choose() != f"{TRIAL_PREFIX}0":  # the monitor's first checks are in: p0 is the cheapest healthy
            if time.monotonic() > deadline:
                raise RuntimeError("placement never chose p0")
            time.sleep(0.05)
        for i in range(trials):
            name = f"{TRIAL_PREFIX}{i}"
            went_down = time.time() + random.uniform(0.2, 0.2 + period)  # a random moment of the period
            down_at[i] = went_down
            asked = INLINE_CHECKS[0]
            out = None
            limit = time.time() + 4 * period + 30
            while time.time() < limit:
                chosen, now = choose(), time.time()
                if now >= went_down:
                    if chosen == name:
                        out = None
                    elif out is None:
                        out = now
                    if out is not None and now - out > 1.5 * health.CACHE_SECONDS:
                        break  # it stayed out past a whole snapshot cache lifetime
                time.sleep(0.005)
            if out is None:
                raise RuntimeError(f"{name} was still chosen {limit - went_down:.0f}s after going down")
            while not ticks.empty():
                seen.append(ticks.get())
            first = min((end for start, end in seen if start >= went_down), default=None)
            outcome.append(Trial(name, went_down, out - went_down, None if first is None else first - went_down,
                                 INLINE_CHECKS[0] - asked))
    finally:
        stop.set()
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    return outcome


def _print_health(mode: str, period: float, trials: list[Trial]) -> None:
    outs = [t.out_after for t in trials]
    print(f"  checks {mode:<5} period {period:g}s: out of routing after {min(outs):.2f}–{max(outs):.2f}s "
          f"(median {statistics.median(outs):.2f}s = {statistics.median(outs) / period:.2f} periods, "
          f"max {max(outs) / period:.2f} periods; placement's own health calls {sum(t.inline_checks for t in trials)})",
          flush=True)


# --- report ------------------------------------------------------------------------------------------

def report(timing: list[dict[str, Any]], healthy: list[dict[str, Any]], repeat: int) -> None:
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{datetime.now(UTC):%Y-%m-%d}")
    if timing:
        print(f"\nplace(): ms per call, range over {repeat} runs (goal p99 ≤ {GOAL_P99_MS:g} ms at 10,000 offers)\n")
        print("| offers | requirements | strategy | fit / considered | p50 ms | p99 ms | mean ms "
              f"| runs with p99 ≤ {GOAL_P99_MS:g} ms |")
        print("|---:|---|---|---:|---:|---:|---:|---:|")
        for r in timing:
            met = sum(p99 <= GOAL_P99_MS for p99 in r["p99"])
            print(f"| {r['offers']:,} | {r['profile']} | {r['strategy']} | {r['fitting']:,} / {r['considered']:,} "
                  f"| {_range(r['p50'])} | {_range(r['p99'])} | {_range(r['mean'])} | {met} of {len(r['p99'])} |")
    if healthy:
        print("\nprovider down → out of routing (seconds from its first failing moment to the first placement "
              "that no longer chose it; goal ≤ 1 health period)\n")
        print("| checks | period | trials | min s | median s | max s | max (periods) "
              "| first failing check written after (median s) | placement's own health calls |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for run in healthy:
            trials: list[Trial] = run["trials"]
            outs = [t.out_after for t in trials]
            checks = [t.check_after for t in trials if t.check_after is not None]
            written = f"{statistics.median(checks):.2f}" if checks else "-"
            print(f"| {run['mode']} | {run['period']:g} s | {len(trials)} | {min(outs):.2f} | {statistics.median(outs):.2f} "
                  f"| {max(outs):.2f} | {max(outs) / run['period']:.2f} | {written} "
                  f"| {sum(t.inline_checks for t in trials)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10_000])
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (the machine is shared: report the range)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed calls per run (default: 2000 / 400 / 200 for 10 / 1,000 / 10,000 offers)")
    parser.add_argument("--health-periods", type=float, nargs="+", default=[2.0, 10.0])
    parser.add_argument("--health-trials", type=int, default=5)
    parser.add_argument("--health-modes", nargs="+", choices=["error", "hang"], default=["error", "hang"])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-health", action="store_true")
    args = parser.parse_args()
    timing = [] if args.skip_timing else run_timing(args.sizes, args.repeat, args.iterations)
    healthy = [] if args.skip_health else run_health(PG_ADMIN, args.health_periods, args.health_trials, args.health_modes)
    report(timing, healthy, args.repeat)


if __name__ == "__main__":
    main()
