"""`gpufleet batch …`: batch transcription and inference with an estimate first, a live progress bar,
resume after any restart, cancel, and the failures listed with their reasons at the end.

Every failure a user can cause (a bad source, an output location holding another run, an API error)
ends as one line on stderr through ``orchestrator.cli.main.run``; Ctrl-C while watching only stops
watching — the batch keeps running and ``gpufleet batch resume`` picks it up.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.batch_models import BatchRunOut, Estimate
from orchestrator.cli.render import console, err_console, money
from orchestrator.errors import GpufleetError

batch_app = typer.Typer(help="Batch runs: transcribe a folder, run a prompts file; progress, resume, cancel, outputs.",
                        no_args_is_help=True)

FAILED_SHOWN = 20


class BatchUsageError(GpufleetError):
    pass


def _client() -> Any:
    # Imported late: main imports this module to register it.
    from orchestrator.cli.main import _client as make_client

    return make_client()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _check_priority(priority: str) -> str:
    if priority not in ("high", "normal", "low"):
        raise BatchUsageError(f"--priority must be high, normal or low, not {priority!r}")
    return priority


# --- printing --------------------------------------------------------------------------------


def print_estimate(est: Estimate, kind: str) -> None:
    console.print(f"[bold]estimate[/] for {est.items} {kind} items (placement as of now, nothing reserved"
                  f"{f'; from a sample of {est.sampled}' if est.sampled < est.items else ''}):", highlight=False)
    for g in est.groups:
        model = f"{g.model}: " if g.model else ""
        if g.unplaceable:
            console.print(f"  [yellow]{model}{g.items} items: nothing takes them now[/] — {g.unplaceable}", highlight=False)
            continue
        price = f"${g.price_per_1k_tokens:g}/1K tokens" if g.price_per_1k_tokens is not None else f"${g.price_per_hour:.2f}/h"
        console.print(f"  {model}{g.items} items → {g.offer} ({g.gpu or 'cpu'}, {price}): ~{money(g.cost_per_item)} per item, "
                      f"~{_duration(g.seconds_per_item)} each ({g.seconds_source}), up to {g.parallel} at once "
                      f"(queue {g.queue})", highlight=False)
    console.print(f"  total ~{money(est.estimated_cost)}, ~{_duration(est.estimated_seconds)}", highlight=False)


def print_progress(p: BatchRunOut) -> None:
    table = Table(title=f"batch {p.id}" + (f" — {p.name}" if p.name else ""), header_style="bold", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    status = "[yellow]cancelled[/]" if p.state == "cancelled" else ("[green]finished[/]" if p.finished else "running")
    table.add_row("kind / state", f"{p.kind} · {status}")
    table.add_row("items", f"{p.done}/{p.size} ended · {p.submitted} submitted")
    table.add_row("by status", f"[green]{p.succeeded} succeeded[/] · [red]{p.failed} failed[/] · "
                               f"[yellow]{p.cancelled} cancelled[/] · [cyan]{p.running} running[/] · {p.queued} queued")
    if not p.finished:
        rate = f"{p.throughput_per_second:.2f} items/s" if p.throughput_per_second else "-"
        table.add_row("throughput / ETA", f"{rate} · ETA {_duration(p.eta_seconds)}")
    est = p.estimate or {}
    table.add_row("cost", f"{money(p.cost)}" + (f" (estimate {money(est.get('estimated_cost'))})" if est else ""))
    table.add_row("time", f"{_duration(p.elapsed_seconds)}"
                  + (f" (estimate {_duration(est.get('estimated_seconds'))})" if est else ""))
    if p.output_uri:
        table.add_row("output", p.output_uri)
    console.print(table)


def print_failed(items: list[Any], batch_id: str, total: int | None = None) -> None:
    if not items:
        return
    table = Table(title=f"failed items ({total if total is not None else len(items)})", header_style="bold")
    for column in ("item", "reason", "tries", "job"):
        table.add_column(column, overflow="fold")
    for item in items[:FAILED_SHOWN]:
        table.add_row(item.key, item.error or item.status, str(item.attempt), str(item.job_id)[:8])
    console.print(table)
    shown = total if total is not None else len(items)
    if shown > FAILED_SHOWN:
        console.print(f"… and {shown - FAILED_SHOWN} more: gpufleet batch failed {batch_id}", highlight=False)


class _LiveBar:
    """A Rich progress bar fed by the batch's progress: ended/total, ok/failed/running, throughput, ETA."""

    def __init__(self, total: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[green]✓ {task.fields[ok]}[/] [red]✗ {task.fields[failed]}[/] [cyan]▶ {task.fields[running]}[/]"
                       " · {task.fields[queued]} queued"),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
            console=console, transient=False, refresh_per_second=4)
        self.task = self.progress.add_task("batch", total=total, ok=0, failed=0, running=0, queued=0, rate="-", eta="-")

    def __enter__(self) -> _LiveBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, p: BatchRunOut) -> None:
        rate = f"{p.throughput_per_second:.1f}/s" if p.throughput_per_second else "-"
        self.progress.update(self.task, total=p.size, completed=p.done, ok=p.succeeded, failed=p.failed + p.cancelled,
                             running=p.running, queued=p.queued + max(0, p.size - p.submitted), rate=rate,
                             eta=_duration(p.eta_seconds) if not p.finished else "0s")


def _finish(run: Any, client: Any, poll_interval: float) -> None:
    """Send what is missing, watch, gather, report; Ctrl-C leaves the batch running."""
    batch_id = run.batch_id
    try:
        if run.items is not None:
            with console.status("sending items…") as status:
                def sent(done: int, total: int, out: Any) -> None:
                    status.update(f"sending items: chunk {done}/{total} ({out.submitted}/{out.size} in the batch)")

                run.submit(sent)
        with _LiveBar(run.total) as bar:
            final = run.wait(bar.update, poll_interval=poll_interval)
    except KeyboardInterrupt:
        err_console.print(f"stopped watching; batch {batch_id} keeps running — resume with: "
                          f"gpufleet batch resume {batch_id} --out {run.out}", highlight=False)
        raise typer.Exit(130) from None
    summary = run.gather()
    failed = summary.failed
    print_failed(failed, batch_id)
    print_progress(final)
    files = f", {summary.files} transcript files under {run.out}/transcripts/" if summary.files else ""
    console.print(f"results: {run.out}/results.jsonl ({summary.results} lines){files}, summary: {run.out}/summary.json",
                  highlight=False)
    if summary.not_submitted:
        console.print(f"[yellow]{len(summary.not_submitted)} items were never sent (the batch was cancelled)[/]")
    if final.succeeded < final.size:
        raise typer.Exit(1)


def _start(items: Any, out: str, *, priority: str, requirements: dict[str, Any], max_attempts: int | None,
           timeout: int | None, name: str | None, chunk_size: int, yes: bool, estimate_only: bool,
           poll_interval: float) -> None:
    from orchestrator.sdk.batches import BatchRun

    with _client() as client:
        run = BatchRun(client, items, out, priority=priority, requirements=requirements, max_attempts=max_attempts,
                       timeout_seconds=timeout, name=name, chunk_size=chunk_size)
        existing = run.existing()
        if existing and not estimate_only:
            console.print(f"resuming batch {existing} ({run.out} holds it): sending what is missing, then watching",
                          highlight=False)
        else:
            print_estimate(run.estimate(), items.kind)
            if estimate_only:
                return
            if not yes:
                if not sys.stdin.isatty():
                    raise BatchUsageError("not starting without confirmation: pass --yes (or --estimate-only)")
                typer.confirm(f"start {len(items)} {items.kind} items?", abort=True)
        batch = run.create()
        console.print(f"batch {batch.id}: {run.total} {items.kind} items → {run.out}", highlight=False)
        _finish(run, client, poll_interval)


Out = Annotated[str, typer.Option("--out", "-o", help="Output directory or s3://bucket/prefix (holds the state to resume).")]
Priority = Annotated[str, typer.Option(help="high | normal | low (low_priority queue).")]
MaxPrice = Annotated[float | None, typer.Option(help="Max $/hour of capacity.")]
MaxAttempts = Annotated[int | None, typer.Option(help="Tries per item when its capacity fails (lost host).")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Start without asking after the estimate.")]
EstimateOnly = Annotated[bool, typer.Option(help="Show the estimate and stop.")]
ChunkSize = Annotated[int, typer.Option(min=1, max=1000, help="Items per request.")]
Timeout = Annotated[int | None, typer.Option(help="Seconds each item may run.")]
Poll = Annotated[float, typer.Option(help="Seconds between progress updates.")]


def _requirements(max_price: float | None, gpu: list[str] | None) -> dict[str, Any]:
    req: dict[str, Any] = {}
    if max_price is not None:
        req["max_price_per_hour"] = max_price
    if gpu:
        req["gpu"] = gpu
    return req


@batch_app.command("transcribe")
def transcribe(
    source: Annotated[str, typer.Argument(help="A directory of audio files, a manifest (paths/URLs, or JSONL with "
                                               "audio_url), or s3://bucket/prefix.")],
    out: Out,
    language: Annotated[str | None, typer.Option(help="Language code for every file, e.g. en.")] = None,
    fmt: Annotated[list[str] | None, typer.Option("--format", "-f", help="text | srt | vtt | json (repeatable).")] = None,
    model: Annotated[str | None, typer.Option(help="Transcription model.")] = None,
    priority: Priority = "normal",
    max_price: MaxPrice = None,
    gpu: Annotated[list[str] | None, typer.Option(help="Acceptable GPU model (repeatable).")] = None,
    max_attempts: MaxAttempts = None,
    timeout: Timeout = None,
    name: Annotated[str | None, typer.Option(help="A name to recognise the batch by.")] = None,
    chunk_size: ChunkSize = 250,
    yes: Yes = False,
    estimate_only: EstimateOnly = False,
    poll_interval: Poll = 1.0,
) -> None:
    """Transcribe every audio file of SOURCE; transcripts and results.jsonl are gathered into --out."""
    from orchestrator.sdk.batches import transcription_items

    items = transcription_items(source, language=language, formats=fmt or ("text",), model=model)
    _start(items, out, priority=_check_priority(priority), requirements=_requirements(max_price, gpu),
           max_attempts=max_attempts, timeout=timeout, name=name, chunk_size=chunk_size, yes=yes,
           estimate_only=estimate_only, poll_interval=poll_interval)


@batch_app.command("infer")
def infer(
    prompts: Annotated[str, typer.Argument(help="JSONL: one {\"prompt\": …} or {\"messages\": […]} per line "
                                                "(optional id, max_tokens, temperature, model).")],
    out: Out,
    model: Annotated[str | None, typer.Option(help="Model for lines that do not name one.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Default max_tokens per item.")] = None,
    priority: Priority = "normal",
    max_price: MaxPrice = None,
    max_attempts: MaxAttempts = None,
    timeout: Timeout = None,
    name: Annotated[str | None, typer.Option(help="A name to recognise the batch by.")] = None,
    chunk_size: ChunkSize = 250,
    yes: Yes = False,
    estimate_only: EstimateOnly = False,
    poll_interval: Poll = 1.0,
) -> None:
    """Run every prompt of PROMPTS; answers are gathered into --out/results.jsonl."""
    from orchestrator.sdk.batches import inference_items

    items = inference_items(prompts, model=model, max_tokens=max_tokens)
    _start(items, out, priority=_check_priority(priority), requirements=_requirements(max_price, None),
           max_attempts=max_attempts, timeout=timeout, name=name, chunk_size=chunk_size, yes=yes,
           estimate_only=estimate_only, poll_interval=poll_interval)


@batch_app.command("resume")
def resume(
    batch_id: Annotated[str | None, typer.Argument(help="The batch (default: the one --out holds).")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output location (default: the batch's own).")] = None,
    poll_interval: Poll = 1.0,
) -> None:
    """Continue a batch after the client or the stack restarted: send the missing items, watch, gather."""
    from orchestrator.sdk.batches import BatchRun

    if batch_id is None and out is None:
        raise BatchUsageError("give a batch id or --out DIR")
    with _client() as client:
        run = BatchRun.resume(client, out, batch_id)
        console.print(f"resuming batch {run.batch_id} → {run.out}", highlight=False)
        _finish(run, client, poll_interval)


@batch_app.command("status")
def status(batch_id: str) -> None:
    """Progress, cost and time so far next to the estimate."""
    with _client() as client:
        print_progress(client.batch_progress(batch_id))


@batch_app.command("cancel")
def cancel(batch_id: str) -> None:
    """Cancel every item that has not ended; rented capacity is released."""
    with _client() as client:
        p = client.cancel_batch(batch_id)
    console.print(f"batch {p.id} cancelled: {p.cancelled} items cancelled, {p.succeeded} succeeded and {p.failed} "
                  f"failed before", highlight=False)


@batch_app.command("failed")
def failed(batch_id: str) -> None:
    """Every failed item with the reason."""
    with _client() as client:
        items = list(client.iter_batch_items(batch_id, status="failed"))
    if not items:
        console.print(f"batch {batch_id}: no failed items")
        return
    table = Table(title=f"failed items ({len(items)})", header_style="bold")
    for column in ("item", "reason", "tries", "job"):
        table.add_column(column, overflow="fold")
    for item in items:
        table.add_row(item.key, item.error or "", str(item.attempt), str(item.job_id))
    console.print(table)
