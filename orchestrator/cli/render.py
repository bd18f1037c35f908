"""Rich tables for jobs, events and keys — shared by the CLI commands and the demo."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.domain import JobOut

# Piped output (CI logs, `| less`) gets a wide fixed width instead of Rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
                "placing": "blue", "queued": "white"}


def money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:.6f}" if value < 0.01 else f"${value:.4f}"


def jobs_table(jobs: Iterable[JobOut], title: str | None = None) -> Table:
    table = Table(title=title, header_style="bold")
    for column in ("job", "kind", "queue", "provider / offer", "$/h", "cost", "duration", "tries", "status"):
        table.add_column(column, justify="right" if column in ("$/h", "cost", "duration", "tries") else "left")
    for job in jobs:
        where = f"{job.provider}/{job.offer_id}" if job.provider else "-"
        table.add_row(
            str(job.id)[:8], job.kind, job.queue, where,
            f"{job.price_per_hour:.2f}" if job.price_per_hour is not None else "-",
            money(job.cost),
            f"{job.duration_seconds:.2f}s" if job.duration_seconds is not None else "-",
            str(job.attempt),
            f"[{STATUS_STYLE.get(job.status.value, 'white')}]{job.status.value}[/]",
        )
    return table


def job_detail(job: JobOut) -> None:
    console.print(f"[bold]job {job.id}[/]  {job.kind} on {job.queue}  "
                  f"[{STATUS_STYLE.get(job.status.value, 'white')}]{job.status.value}[/]")
    if job.provider:
        console.print(f"placed on {job.provider}/{job.offer_id}  cost {money(job.cost)}  "
                      f"attempt {job.attempt}/{job.max_attempts}")
    if job.error:
        console.print(f"[red]error:[/] {job.error}")
    if job.result is not None:
        console.print("result:", job.result)
    if job.events:
        table = Table(title="events", header_style="bold")
        for column in ("at", "transition", "try", "actor", "reason"):
            table.add_column(column)
        for e in job.events:
            table.add_row(e.at.strftime("%H:%M:%S.%f")[:-3], f"{e.from_status or '-'} → {e.to_status}",
                          str(e.attempt), e.actor, e.reason)
        console.print(table)


def placement_explanation(why: dict[str, Any]) -> None:
    """``gpufleet why``: the choice, the ranked options with score components, the rejections, the history."""
    console.print(f"[bold]job {why['job_id']}[/] {why['status']} (attempt {why['attempt']})")
    if why.get("rationale"):
        console.print(f"placed with [bold]{why['strategy']}[/] (data class {why['data_class']}): {why['rationale']}")
    if why.get("waiting_for"):
        console.print(f"[yellow]waiting:[/] {why['waiting_for']}")
    if why.get("scores"):
        table = Table(title="fitting offers, best first", header_style="bold")
        for column in ("#", "offer", "tier", "region", "est. cost", "latency", "errors", "free", "score", "score parts"):
            table.add_column(column, justify="right" if column in ("#", "est. cost", "latency", "errors", "free", "score")
                             else "left")
        for i, row in enumerate(why["scores"], 1):
            parts = " ".join(f"{k} {v:g}" for k, v in (row.get("components") or {}).items())
            latency = f"{row['latency_ms']:.0f} ms" if row.get("latency_ms") is not None else "-"
            table.add_row(str(i), row["offer"], row["tier"], row["region"], money(row["estimated_cost"]), latency,
                          f"{row['error_rate']:.0%}", str(row["free_capacity"]), f"{row['score']:.3f}", parts)
        console.print(table)
    rejected = why.get("rejected") or {}
    total = why.get("rejected_total", len(rejected))
    if rejected:
        title = "rejected" if total <= len(rejected) else f"rejected ({len(rejected):,} of {total:,} listed)"
        table = Table(title=title, header_style="bold")
        table.add_column("offer or provider")
        table.add_column("why not")
        for name, reason in sorted(rejected.items()):
            table.add_row(name, reason)
        console.print(table)
    if total > len(rejected) and why.get("rejected_summary"):
        # Thousands of offers: the rest are counted, per provider and reason.
        table = Table(title="rejected offers by provider and reason", header_style="bold")
        for column in ("provider", "why not", "offers", "listed"):
            table.add_column(column, justify="right" if column in ("offers", "listed") else "left")
        for row in why["rejected_summary"]:
            table.add_row(row["provider"], row["reason"], f"{row['count']:,}", str(row["listed"]))
        console.print(table)
    history = [h for h in why.get("history", []) if h["actor"] != "api"]
    if history:
        console.print("[bold]history[/]")
        for h in history:
            console.print(f"  attempt {h['attempt']} {h['actor']}: {h['reason']}", highlight=False)
