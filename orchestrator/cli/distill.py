"""`gpufleet distill …` (pairs, export, training, traffic routes) and `gpufleet models …` (the registry)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from orchestrator.cli.render import console

distill_app = typer.Typer(help="Teacher/student pairs, exports, student training and traffic routes.",
                          no_args_is_help=True)
models_app = typer.Typer(help="The model registry: student versions and their stages.", invoke_without_command=True)

ClientFactory = Callable[[], Any]
_client: ClientFactory


def install(app: typer.Typer, client: ClientFactory) -> None:
    global _client
    _client = client
    app.add_typer(distill_app, name="distill")
    app.add_typer(models_app, name="models")


Tag = Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable).")]


@distill_app.command("query")
def query(teacher: str, student: str, prompt: str, tag: Tag = None) -> None:
    """Ask the teacher and the student; print the teacher's answer as soon as it arrives."""
    with _client() as client:
        out = client.distill_query(teacher, student, prompt, tags=tag or [])
    console.print(out["text"] or f"[red]{out['status']}[/]: {out['error']}", highlight=False)
    console.print(f"[dim]pair {out['pair_id']} · {out['provider']} · ${out['cost']:.6f}[/]")


@distill_app.command("pairs")
def pairs(teacher: str | None = None, student: str | None = None, status: str | None = None, limit: int = 20) -> None:
    """Recent pairs with their score and agreement."""
    with _client() as client:
        rows = client.pairs(teacher_model=teacher, student_model=student, status=status, limit=limit)
    table = Table(header_style="bold")
    for column in ("pair", "status", "source", "teacher", "student", "score", "agreement", "accepted", "cost"):
        table.add_column(column)
    for p in rows:
        cost = (p["teacher_cost"] or 0) + (p["student_cost"] or 0)
        table.add_row(p["id"][:8], p["status"], p["source"], p["teacher_model"], p["student_model"],
                      _num(p["score"]), _num(p["agreement"]), "yes" if p["accepted"] else "", f"${cost:.6f}")
    console.print(table)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@distill_app.command("export")
def export(out: Annotated[Path | None, typer.Option(help="File to write (default: stdout).")] = None,
           split: str = "train", teacher: str | None = None, student: str | None = None, tag: Tag = None,
           min_score: float | None = None, test_fraction: float = 0.1, limit: int | None = None,
           manifest: Annotated[bool, typer.Option(help="Print the manifest (counts, hashes) instead.")] = False,
           to_storage: Annotated[bool, typer.Option(help="Write train/test/manifest to object storage.")] = False) -> None:
    """Accepted pairs as OpenAI chat fine-tuning JSONL (deterministic train/test split)."""
    filters = {"teacher_model": teacher, "student_model": student, "tags": tag, "min_score": min_score,
               "test_fraction": test_fraction, "limit": limit}
    with _client() as client:
        if manifest or to_storage:
            result = client.export_to_storage(**filters) if to_storage else client.export_manifest(**filters)
            console.print_json(data=result)
            return
        if out is None:
            lines = client.export(sys.stdout.buffer, split=split, **filters)
        else:
            with out.open("wb") as handle:
                lines = client.export(handle, split=split, **filters)
    if out is not None:
        console.print(f"wrote {lines} examples to {out}")


@distill_app.command("train")
def train(student_name: str, teacher: str | None = None, student_model: str | None = None,
          base_model: str = "standin", examples: int | None = None, validation_split: float = 0.1,
          gpu: Annotated[list[str] | None, typer.Option(help="Acceptable GPU (repeatable).")] = None,
          max_price: Annotated[float | None, typer.Option(help="Max $/hour.")] = None,
          wait: Annotated[bool, typer.Option(help="Wait for the training job.")] = False) -> None:
    """Export the accepted pairs and train the student through the normal pipeline."""
    with _client() as client:
        out = client.train_student(student_name, teacher_model=teacher, student_model=student_model,
                                   base_model=base_model, examples=examples, validation_split=validation_split,
                                   requirements={"gpu": gpu} if gpu else None, max_price_per_hour=max_price)
        counts = out["dataset"]["counts"]
        console.print(f"training job {out['job_id']} on {counts['train']} examples ({counts['test']} held out)")
        if wait:
            job = client.wait(out["job_id"], timeout=24 * 3600)
            console.print(f"{job.status.value} on {job.provider}/{job.offer_id}, cost ${job.cost:.4f}")
            if job.status.value != "succeeded":
                raise typer.Exit(1)


@distill_app.command("routes")
def routes() -> None:
    """Traffic routes: the share of each teacher's requests its production student takes."""
    with _client() as client:
        rows = client.routes()
    table = Table(header_style="bold")
    for column in ("teacher", "student", "share", "shadow", "auto", "step", "max", "min agreement"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["teacher_model"], r["student_name"], f"{r['share']:.0%}", f"{r['shadow_rate']:.0%}",
                      "yes" if r["auto"] else "no", f"{r['step']:.0%}", f"{r['max_share']:.0%}", f"{r['min_agreement']:.2f}")
    console.print(table)


@distill_app.command("route")
def route(teacher: str, student: Annotated[str, typer.Option(help="Registry name of the student.")],
          share: float | None = None, shadow_rate: float | None = None,
          auto: Annotated[bool | None, typer.Option("--auto/--manual")] = None,
          step: float | None = None, max_share: float | None = None, min_agreement: float | None = None) -> None:
    """Send a share of TEACHER's requests to the production version of a student."""
    with _client() as client:
        r = client.set_route(teacher, student, share=share, shadow_rate=shadow_rate, auto=auto, step=step,
                             max_share=max_share, min_agreement=min_agreement)
    console.print(f"{r['teacher_model']} → {r['student_name']}: {r['share']:.0%} of requests "
                  f"({'automatic' if r['auto'] else 'manual'}, shadowed {r['shadow_rate']:.0%})")


# --- models -----------------------------------------------------------------------------------


@models_app.callback()
def models_list(ctx: typer.Context, name: Annotated[str | None, typer.Option(help="Only this name.")] = None) -> None:
    """Registered versions, with stage and evaluation metrics."""
    if ctx.invoked_subcommand is not None:
        return
    with _client() as client:
        rows = client.models(name)
    table = Table(header_style="bold")
    for column in ("name", "version", "stage", "agreement", "latency", "$/1K tok", "served as"):
        table.add_column(column)
    for v in rows:
        m = v["metrics"] or {}
        table.add_row(v["name"], str(v["version"]), v["stage"], _num(m.get("agreement")),
                      f"{m['latency_ms']:.0f} ms" if m.get("latency_ms") is not None else "-",
                      _num(m.get("cost_per_1k_tokens")), v["served_model"] or "-")
    console.print(table)


@models_app.command("register")
def register(name: str, served_model: Annotated[str, typer.Option(help="Model name inference uses to reach it.")],
             artifact_uri: str | None = None) -> None:
    with _client() as client:
        v = client.register_model(name, served_model=served_model, artifact_uri=artifact_uri)
    console.print(f"registered {v['name']} v{v['version']} ({v['stage']})")


@models_app.command("promote")
def promote(name: str, version: int) -> None:
    with _client() as client:
        v = client.promote_model(name, version)
    console.print(f"{v['name']} v{v['version']} is in production")


@models_app.command("rollback")
def rollback(name: str) -> None:
    with _client() as client:
        v = client.rollback_model(name)
    console.print(f"{v['name']} rolled back to v{v['version']}")


@models_app.command("production")
def production(name: str) -> None:
    with _client() as client:
        v = client.production_model(name)
    console.print(f"{v['name']} v{v['version']}: served as {v['served_model']}, metrics {v['metrics']}", highlight=False)


@models_app.command("evaluate")
def evaluate(name: str, version: int) -> None:
    """Evaluate a version on the held-out pairs (in the background; see `gpufleet models`)."""
    with _client() as client:
        client.evaluate_model(name, version)
    console.print(f"evaluating {name} v{version} on the held-out pairs")
