"""Rich tables for jobs, events and keys — shared by the CLI commands and the demo."""

from __future__ import annotations

import sys
from collections.abc import Iterable

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
