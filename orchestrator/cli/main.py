"""The `gpufleet` command. Every failure a user can cause ends as one line on stderr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from orchestrator.cli import distill as distill_cli
from orchestrator.cli.batch import batch_app
from orchestrator.cli.render import console, err_console, job_detail, jobs_table
from orchestrator.errors import GpufleetError
from orchestrator.settings import get_settings

app = typer.Typer(help="gpufleet: run AI jobs on the cheapest capacity that fits.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Manage API keys (stored hashed; a key is shown once).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
budgets_app = typer.Typer(help="Hard spending limits: global, per provider, per tenant.", invoke_without_command=True)
app.add_typer(budgets_app, name="budgets")


LONG_QUEUES = {"training", "distillation", "low_priority"}


class UsageError(GpufleetError):
    pass


# --- the client the job commands use ------------------------------------------------------


def _client() -> Any:
    """A client for the configured API; on the embedded default with no API running, start one in-process."""
    from orchestrator.sdk import Client, ConnectionFailed

    settings = get_settings()
    key = settings.api_key
    if not key and settings.embedded:
        from orchestrator.bootstrap import ensure_local_key, prepare_database

        prepare_database(settings)
        key = ensure_local_key(settings)
    client = Client(settings.api_url, key)
    try:
        client.health()
        return client
    except ConnectionFailed:
        if not settings.embedded:
            raise
    client.close()
    return Client.local()


distill_cli.install(app, _client)
app.add_typer(batch_app, name="batch")


# --- services -----------------------------------------------------------------------------


@app.command()
def demo(
    time_scale: Annotated[float, typer.Option(help="Speed of emulated work: 1 is realistic, 0 instant.")] = 1.0,
) -> None:
    """Run a realistic mix of jobs through the whole pipeline on this machine (no services needed)."""
    from orchestrator.cli.demo import run_demo

    run_demo(time_scale)


@app.command()
def up(
    host: str = "127.0.0.1",
    port: int = 8000,
    concurrency: Annotated[int, typer.Option(help="Worker threads (embedded) or processes.")] = 8,
) -> None:
    """API + workers + beat. Embedded default: one process; configured stack: a process tree."""
    settings = get_settings()
    if settings.embedded:
        from orchestrator.embedded import EmbeddedStack

        stack = EmbeddedStack(settings, concurrency=concurrency, port=port, host=host).start()
        console.print(f"gpufleet is up at [bold]{stack.url}[/] (docs: {stack.url}/docs)")
        console.print(f"API key: {stack.api_key}  — stop with Ctrl-C")
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            stack.stop()
        return
    from orchestrator.scheduling.queues import all_queues

    gpufleet = [sys.executable, "-m", "orchestrator.cli"]
    commands = [
        [*gpufleet, "api", "--host", host, "--port", str(port)],
        [*gpufleet, "worker", "--queues", ",".join(all_queues()), "--concurrency", str(concurrency)],
        [*gpufleet, "beat"],
    ]
    procs = [subprocess.Popen(cmd) for cmd in commands]
    console.print(f"gpufleet is up at http://{host}:{port} ({len(procs)} processes) — stop with Ctrl-C")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@app.command()
def api(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the HTTP API."""
    import uvicorn

    uvicorn.run("orchestrator.api.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level=get_settings().log_level.lower())


@app.command()
def worker(
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues (default: all).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Default: the sum of the queues' configured concurrency.")] = None,
    pool: Annotated[str, typer.Option(help="prefork (CPU-bound steps, default) or threads (I/O-bound providers)")] = "prefork",
    hostname: str | None = None,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker on the given queues."""
    from orchestrator.scheduling.queues import all_queues
    from workers.celery_app import get_app

    settings = get_settings()
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else all_queues()
    if concurrency is None:
        concurrency = sum(settings.queue_concurrency.get(q, 2) for q in names)
    if pool not in ("prefork", "threads", "solo"):
        raise UsageError(f"--pool must be prefork, threads or solo, not {pool!r}")
    # Prefetch 1 where a message may wait behind a slow one; short queues batch a little.
    prefetch = 1 if set(names) & LONG_QUEUES else 4
    argv = ["worker", "-Q", ",".join(names), "-c", str(concurrency), "-P", pool, "-l", loglevel,
            "--prefetch-multiplier", str(prefetch), "--without-mingle", "--without-gossip"]
    if hostname:
        argv += ["-n", hostname]
    get_app().worker_main(argv)


@app.command()
def beat(loglevel: str = "INFO") -> None:
    """Run the scheduler for control tasks (the outbox sweeper)."""
    from workers.celery_app import get_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    get_app().start(["beat", "-l", loglevel, "-s", str(settings.data_dir / "celerybeat-schedule")])


@app.command()
def flower(port: int = 5555, address: str = "0.0.0.0") -> None:
    """Serve Flower (the live Celery dashboard), always behind basic auth."""
    from workers.celery_app import get_app

    auth = get_settings().flower_basic_auth
    if ":" not in auth:
        raise UsageError("GPUFLEET_FLOWER_BASIC_AUTH must be set to user:password; Flower is never served open")
    # Through Flower's own environment variable, so the password never shows in the process list.
    os.environ["FLOWER_BASIC_AUTH"] = auth
    get_app().start(["flower", f"--port={port}", f"--address={address}"])


@app.command()
def migrate() -> None:
    """Apply database migrations (and create bootstrap API keys)."""
    from orchestrator.bootstrap import prepare_database
    from orchestrator.db.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    prepare_database(settings)
    console.print("database is at the latest schema")


# --- keys ---------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(tenant: str, name: str = "") -> None:
    """Create an API key for TENANT (created if new). The key is printed once."""
    from orchestrator.bootstrap import prepare_database
    from orchestrator.db.engine import session_scope
    from orchestrator.services import keys

    prepare_database(get_settings())
    with session_scope() as s:
        key = keys.create_key(s, tenant, name)
    console.print(key, soft_wrap=True)


@keys_app.command("list")
def keys_list(tenant: str | None = None) -> None:
    from orchestrator.db.engine import session_scope
    from orchestrator.services import keys

    table = Table(header_style="bold")
    for column in ("id", "tenant", "name", "prefix", "created", "revoked"):
        table.add_column(column)
    with session_scope() as s:
        for k in keys.list_keys(s, tenant):
            table.add_row(str(k.id), k.tenant, k.name, k.prefix + "…", f"{k.created_at:%Y-%m-%d %H:%M}",
                          f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id, or its prefix as listed.")]) -> None:
    from orchestrator.db.engine import session_scope
    from orchestrator.services import keys

    with session_scope() as s:
        info = keys.revoke_key(s, key_id)
    console.print(f"revoked key {info.prefix}… of tenant {info.tenant}")


# --- jobs ---------------------------------------------------------------------------------


def _parse_spec(spec: str | None, spec_file: Path | None) -> dict[str, Any]:
    text = spec_file.read_text() if spec_file else spec
    if not text:
        raise UsageError("give the job spec as JSON: gpufleet submit KIND '{\"...\": ...}' or --spec-file FILE")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"spec is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(value, dict):
        raise UsageError("spec must be a JSON object")
    return value


@app.command()
def submit(
    kind: Annotated[str, typer.Argument(help="inference | transcription | training | distillation | command")],
    spec: Annotated[str | None, typer.Argument(help="The job spec as JSON.")] = None,
    spec_file: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    priority: str = "normal",
    gpu: Annotated[list[str] | None, typer.Option(help="Acceptable GPU model (repeatable).")] = None,
    max_price: Annotated[float | None, typer.Option(help="Max $/hour.")] = None,
    idempotency_key: str | None = None,
    reservation: Annotated[str | None, typer.Option(help="Run on this reservation's capacity (see 'gpufleet reserve').")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the result.")] = False,
    timeout: float = 600.0,
) -> None:
    """Submit a job."""
    requirements: dict[str, Any] = {}
    if gpu:
        requirements["gpu"] = gpu
    if max_price is not None:
        requirements["max_price_per_hour"] = max_price
    with _client() as client:
        job = client.submit(kind, _parse_spec(spec, spec_file), priority=priority,
                            requirements=requirements or None, idempotency_key=idempotency_key,
                            reservation_id=reservation)
        console.print(f"submitted job {job.id} ({job.kind}, queue {job.queue})")
        if wait:
            with console.status(f"waiting for job {str(job.id)[:8]}…"):
                job = client.wait(job.id, timeout=timeout)
            job_detail(job)
            if job.status.value != "succeeded":
                raise typer.Exit(1)


@app.command("jobs")
def list_jobs(status: str | None = None, kind: str | None = None, batch: str | None = None, limit: int = 20) -> None:
    """List recent jobs."""
    with _client() as client:
        page = client.list(status=status, kind=kind, batch_id=batch, limit=limit)
    console.print(jobs_table(page.jobs))


@app.command("job")
def show_job(job_id: str) -> None:
    """Show a job with its result and event history."""
    with _client() as client:
        job_detail(client.get(job_id))


@app.command()
def why(job_id: str) -> None:
    """Why a job went where it did: the ranked offers with their scores, the rejected ones with reasons."""
    from orchestrator.cli.render import placement_explanation

    with _client() as client:
        placement_explanation(client.placement(job_id))


@app.command()
def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """A job's output (every attempt's, in order); restarts are marked."""
    with _client() as client:
        chunks = client.follow_logs(job_id, follow=follow)
        attempt = None
        for chunk in chunks:
            if attempt is not None and chunk["attempt"] != attempt:
                console.print(f"[dim]--- attempt {chunk['attempt']} ---[/dim]", highlight=False)
            attempt = chunk["attempt"]
            (sys.stderr if chunk["stream"] == "stderr" else sys.stdout).write(chunk["text"])
            sys.stdout.flush()


@app.command()
def checkpoints(job_id: str) -> None:
    """The checkpoints a training job reported, its restarts and the time they lost."""
    with _client() as client:
        found = client.checkpoints(job_id)
    table = Table("step", "attempt", "reported", "uri")
    for c in found["checkpoints"]:
        table.add_row(str(c["step"]), str(c["attempt"]), c["reported_at"], c["uri"])
    console.print(table)
    console.print(f"restarts: {found['restarts']}, time lost to them: {found['lost_seconds']:.1f}s")


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job; rented capacity is released."""
    with _client() as client:
        job = client.cancel(job_id)
    console.print(f"job {job.id} is {job.status.value}")


# --- marketplaces, reservations, money ----------------------------------------------------


@app.command()
def offers(
    gpu: Annotated[list[str] | None, typer.Option(help="Acceptable GPU model (repeatable).")] = None,
    count: Annotated[int, typer.Option(help="GPUs per offer.")] = 1,
    max_price: Annotated[float | None, typer.Option(help="Max $/hour.")] = None,
    region: Annotated[list[str] | None, typer.Option(help="Region, country or continent, e.g. EU, DE, us-east.")] = None,
    min_reliability: Annotated[float | None, typer.Option()] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--on-demand", help="Only interruptible / only on-demand.")] = None,
    kind: Annotated[str, typer.Option(help="Job kind the capacity must run.")] = "training",
    limit: int = 30,
) -> None:
    """Offers across every configured provider, cheapest first (asks the providers directly)."""
    from orchestrator.services.offers import search

    found, unavailable = search(kind, gpu, count, max_price, region, min_reliability,
                                None if spot is None else spot)
    table = Table(header_style="bold")
    for column in ("provider", "offer", "gpu", "count", "memory", "region", "$/h", "reliability", "spot"):
        table.add_column(column, justify="right" if column in ("count", "memory", "$/h", "reliability") else "left")
    for o in found[:limit]:
        table.add_row(o.provider, o.offer_id, o.gpu or "-", str(o.gpu_count), f"{o.gpu_memory_gb:g} GB", o.region,
                      f"{o.price_per_hour:.3f}", f"{o.reliability:.3f}", "yes" if o.interruptible else "")
    console.print(table)
    console.print(f"{len(found)} offers" + (f" (showing {limit})" if len(found) > limit else ""))
    for name, why in unavailable.items():
        err_console.print(f"[yellow]{name}[/]: {why}", highlight=False)


@app.command("providers")
def list_providers() -> None:
    """Each configured provider: health, latency, capacity and cheapest prices (asks the providers directly),
    and the health monitor's circuit breaker, error rate and latency (average / p95) over time."""
    from orchestrator.services.provider_status import status_all

    table = Table(header_style="bold")
    numeric = ("latency", "errors", "avg / p95", "capacity", "from $/h", "from $/1K tok")
    for column in ("provider", "kind", "health", "latency", "breaker", "errors", "avg / p95", "capacity", "gpus",
                   "regions", "from $/h", "from $/1K tok"):
        table.add_column(column, justify="right" if column in numeric else "left")
    colours = {"closed": "green", "half_open": "yellow", "open": "red"}
    for p in status_all():
        health = "[green]ok[/]" if p.healthy else f"[red]down[/] {p.detail}"
        breaker = f"[{colours.get(p.breaker, 'white')}]{p.breaker}[/]" if p.breaker else "-"
        errors = f"{p.error_rate:.0%}" if p.error_rate is not None else "-"
        measured = " / ".join("-" if v is None else f"{v:.0f}" for v in (p.latency_ewma_ms, p.latency_p95_ms))
        table.add_row(p.name, p.kind, health, f"{p.latency_ms:.0f} ms", breaker, errors,
                      f"{measured} ms" if p.breaker else "-", str(p.capacity), ", ".join(p.gpus) or "-",
                      ", ".join(p.regions) or "-",
                      f"{p.min_price_per_hour:.3f}" if p.min_price_per_hour is not None else "-",
                      f"{p.min_price_per_1k_tokens:.5f}" if p.min_price_per_1k_tokens is not None else "-")
    console.print(table)


@app.command()
def costs(
    since: Annotated[str | None, typer.Option(help="ISO date/time, e.g. 2026-11-01.")] = None,
    until: Annotated[str | None, typer.Option()] = None,
    all_tenants: Annotated[bool, typer.Option(help="Operator view from the database: every tenant.")] = False,
) -> None:
    """Settled spend by provider, tenant, job kind and day."""
    if all_tenants:
        from datetime import datetime

        from orchestrator.db.engine import session_scope
        from orchestrator.services.costs import summary

        def parse(value: str | None, name: str) -> datetime | None:
            try:
                return datetime.fromisoformat(value) if value else None
            except ValueError:
                raise UsageError(f"--{name} must be an ISO date or date-time, not {value!r}") from None

        with session_scope() as s:
            report = summary(s, None, parse(since, "since"), parse(until, "until"))
    else:
        with _client() as client:
            report = client.costs(since, until)
    console.print(f"[bold]total ${report['total']:.4f}[/] over {report['entries']} charges")
    for group in ("provider", "tenant", "kind", "day"):
        values = report.get(f"by_{group}") or {}
        if not values or (group == "tenant" and not all_tenants):
            continue
        table = Table(header_style="bold", title=f"by {group}", title_justify="left")
        table.add_column(group)
        table.add_column("USD", justify="right")
        for key, amount in values.items():
            table.add_row(key, f"{amount:.4f}")
        console.print(table)


@budgets_app.callback()
def budgets_list(ctx: typer.Context) -> None:
    """Show every budget with this month's spend and holds."""
    if ctx.invoked_subcommand:
        return
    from orchestrator.bootstrap import prepare_database
    from orchestrator.db.engine import session_scope
    from orchestrator.services import budgets

    prepare_database(get_settings())
    table = Table(header_style="bold")
    for column in ("scope", "key", "month limit", "spent", "held", "$/h limit", "$/h held"):
        table.add_column(column)
    with session_scope() as s:
        for b in budgets.status(s):
            table.add_row(b["scope"], b["key"] or "-", _usd(b["monthly_limit"]), f"{b['spent']:.4f}",
                          f"{b['held']:.4f}", _usd(b["hourly_limit"]), f"{b['rate_held']:.4f}")
    console.print(table)


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@budgets_app.command("set")
def budgets_set(
    scope: Annotated[str, typer.Argument(help="global | provider | tenant")],
    key: Annotated[str, typer.Argument(help="Provider or tenant name (not for global).")] = "",
    monthly: Annotated[float | None, typer.Option(help="USD per calendar month (UTC).")] = None,
    hourly: Annotated[float | None, typer.Option(help="USD per hour of capacity held at once.")] = None,
) -> None:
    """Set a hard limit (operator; writes the database directly)."""
    from orchestrator.bootstrap import prepare_database
    from orchestrator.db.engine import session_scope
    from orchestrator.services import budgets

    prepare_database(get_settings())
    with session_scope() as s:
        budgets.set_budget(s, scope, key, monthly, hourly)
    console.print(f"{scope} budget{' ' + key if key else ''}: monthly {_usd(monthly)}, hourly {_usd(hourly)}")


@app.command()
def reserve(
    gpu: Annotated[list[str], typer.Argument(help="Acceptable GPU model(s).")],
    duration: Annotated[int, typer.Option(help="Seconds to hold the capacity.")] = 3600,
    count: int = 1,
    max_price: Annotated[float | None, typer.Option(help="Max $/hour.")] = None,
    provider: Annotated[str, typer.Option(help="auto, or a provider name.")] = "auto",
    fallback: Annotated[list[str] | None, typer.Option(help="Fallback provider (repeatable).")] = None,
) -> None:
    """Reserve GPUs for a duration (waits in the queue until capacity fits)."""
    with _client() as client:
        out = client.reserve(gpu, duration_seconds=duration, gpu_count=count, max_price_per_hour=max_price,
                             provider=provider, fallback_providers=fallback or [])
    console.print(f"reservation {out['id']} {out['state']}")


@app.command()
def reservations(state: str | None = None, limit: int = 20) -> None:
    """List reservations with their state, price and cost."""
    with _client() as client:
        rows = client.reservations(state, limit)
    table = Table(header_style="bold")
    for column in ("id", "state", "provider/offer", "gpu", "$/h", "held", "cost", "job", "note"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["id"][:8], r["state"], f"{r['provider'] or '-'}/{r['offer_id'] or '-'}",
                      f"{r['gpu_count']}x {r['gpu'] or '-'}", f"{r['price_per_hour']:.3f}", f"{r['hold_amount']:.4f}",
                      f"{r['cost']:.4f}", (r["job_id"] or "")[:8], (r["error"] or "")[:60])
    console.print(table)


@app.command("release")
def release_reservation(reservation_id: str) -> None:
    """Give a reservation back now."""
    with _client() as client:
        out = client.release_reservation(reservation_id)
    console.print(f"reservation {out['id']} is being released ({out['state']})")


def run() -> None:
    """Entry point: turn known errors into one line on stderr, never a traceback."""
    from orchestrator.sdk.errors import GpufleetClientError

    try:
        app(standalone_mode=True)
    except (GpufleetError, GpufleetClientError) as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
