"""`gpufleet demo`: a realistic mix of jobs through SDK → API → queues → workers → providers.

Runs entirely on this machine: SQLite, the filesystem broker, the local provider and the
sandbox marketplace. One training job is deliberately sent to a flaky H100 offer so the
failover to the next offer shows up in its event history; another runs on spot capacity that is
reclaimed mid-run, and resumes elsewhere from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.cli.render import console, jobs_table, money

TRAIN_SCRIPT = (
    "import time\n"
    "for epoch in range(1, 4):\n"
    "    time.sleep(0.2)\n"
    "    print(f'epoch {epoch} loss {1.0 / epoch:.3f}', flush=True)\n"
)


def _trainer(time_scale: float) -> list[str]:
    """The stand-in training loop that checkpoints as docs/training.md asks (providers/sandbox/trainer.py),
    paced with the sandbox so the spot host is reclaimed about halfway through."""
    import providers.sandbox

    script = Path(providers.sandbox.__file__).parent / "trainer.py"
    return [sys.executable, str(script), "--steps", "24", "--step-seconds", f"{0.12 * time_scale:.4f}", "--every", "3"]


def _mix(client: object, time_scale: float) -> list[dict[str, object]]:
    body = client.job_body  # type: ignore[attr-defined]
    prompts = ["Explain spot instances in one line.", "What is a teacher model?", "Summarise: GPUs are scarce.",
               "Name a cheap GPU for inference.", "Why checkpoint training runs?"]
    return [
        body("inference", {"model": "llama-3-70b", "messages": [{"role": "user", "content": "Route me to a GPU."}]},
             priority="high", labels={"demo": "interactive"}),
        body("inference", {"model": "llama-3-8b", "prompt": "Say hello to the operator.", "max_tokens": 32},
             priority="high", labels={"demo": "interactive"}),
        *(body("transcription", {"audio_url": f"s3://demo/calls/call-{i:02d}.wav", "duration_seconds": 30 + 10 * i},
               labels={"demo": "batch"}) for i in range(6)),
        body("training", {"base_model": "llama-3-8b", "dataset_uri": "s3://demo/sft.jsonl",
                          "command": ["python", "-c", TRAIN_SCRIPT]},
             requirements={"gpu": ["A100"], "min_gpu_memory_gb": 40}, labels={"demo": "training"}),
        body("training", {"base_model": "llama-3-70b", "dataset_uri": "s3://demo/sft.jsonl", "max_steps": 40},
             requirements={"gpu": ["H100"]}, labels={"demo": "failover"}),
        body("training", {"base_model": "qwen-2.5-7b", "dataset_uri": "s3://demo/sft.jsonl", "command": _trainer(time_scale)},
             requirements={"gpu": ["A10"]}, labels={"demo": "preemption"}),
        body("distillation", {"teacher_model": "llama-3-70b", "student_model": "llama-3-8b", "prompts": prompts,
                              "tags": ["demo"]}, labels={"demo": "distillation"}),
        body("command", {"command": ["python", "-c", "import platform; print('hello from', platform.node())"]},
             priority="low", labels={"demo": "command"}),
    ]


DEMO_BUDGET = 25.0


def _distillation_report(client: object, job: object) -> None:
    result = job.result  # type: ignore[attr-defined]
    console.print(f"\n[bold]distillation[/] — {result['pairs']} teacher/student pairs (each pair two inference jobs, "
                  f"placed like any other), {result['accepted']} accepted, mean agreement {result['mean_agreement']}")
    pairs = client.pairs(parent_job_id=str(job.id), limit=1)  # type: ignore[attr-defined]
    if pairs:
        pair = client._request("GET", f"/v1/distillation/pairs/{pairs[0]['id']}")  # type: ignore[attr-defined]
        shown = {"prompt": pair["messages"][-1]["content"], "teacher": pair["teacher_output"] or "",
                 "student": pair["student_output"] or ""}
        for role, text in shown.items():
            console.print(f"  {role + ':':<8} {text if len(text) < 100 else text[:97] + '...'}", highlight=False)
    console.print("  gpufleet distill export --out train.jsonl   then: gpufleet distill train my-student", highlight=False)


def _why_report(client: object, job_id: object) -> None:
    """The answer to "why there?" for the failed-over job, as `gpufleet why` gives it in full."""
    why = client.placement(job_id)  # type: ignore[attr-defined]
    console.print(f"\n[bold]why there?[/] — gpufleet why {str(job_id)[:8]}: strategy {why.get('strategy')}, "
                  f"{why.get('considered', 0)} offers considered", highlight=False)
    console.print(f"  chosen: {why.get('rationale')}", highlight=False)
    for score in (why.get("scores") or [])[:3]:
        console.print(f"  ranked: {score['offer']:<22} ${score['price_per_hour'] or 0:.2f}/h  "
                      f"est. ${score['estimated_cost']:.4f}  {score.get('region') or ''}", highlight=False)
    for offer, reason in list((why.get("rejected") or {}).items())[:4]:
        console.print(f"  rejected: {offer:<20} {reason}", highlight=False)
    if why.get("excluded_after_failures"):
        console.print(f"  set aside after failing this job: {', '.join(why['excluded_after_failures'])}", highlight=False)


def _preemption_report(client: object, job: object) -> None:
    found = client.checkpoints(job.id)  # type: ignore[attr-defined]
    result = job.result or {}  # type: ignore[attr-defined]
    console.print(f"\n[bold]preemption[/] — training job {str(job.id)[:8]} on spot A10s: "  # type: ignore[attr-defined]
                  f"{found['restarts']} restart(s), {len(found['checkpoints'])} checkpoints, "
                  f"{found['lost_seconds']:.1f}s of work lost, finished {result.get('steps', '?')} steps "
                  f"(the last run resumed at step {result.get('resumed_from_step', '?')})", highlight=False)
    for event in client.get(job.id).events or []:  # type: ignore[attr-defined]
        if "restart" in event.reason:
            console.print(f"  {event.reason}", highlight=False)
    console.print(f"  gpufleet logs {job.id}   gpufleet checkpoints {job.id}", highlight=False)  # type: ignore[attr-defined]


def _write_calls(directory: Path, count: int) -> None:
    """Short silent WAV files to transcribe (the sandbox transcriber reads their length), and one empty
    file: a batch lists a bad item with its reason and carries on."""
    import wave

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with wave.open(str(directory / f"call-{i:02d}.wav"), "wb") as audio:
            audio.setnchannels(1)
            audio.setsampwidth(2)
            audio.setframerate(8000)
            audio.writeframes(b"\0\0" * 8000 * (4 + i % 5))
    (directory / "call-broken.wav").write_bytes(b"")


def _batch_report(client: object, data_dir: Path) -> None:
    from orchestrator.cli.batch import print_estimate, print_failed
    from orchestrator.sdk.batches import BatchRun, transcription_items

    calls, out = data_dir / "demo" / "calls", data_dir / "demo" / "transcripts"
    _write_calls(calls, 8)
    console.print("\n[bold]batch transcription[/] — gpufleet batch transcribe calls/ --format srt --format vtt")
    run = BatchRun(client, transcription_items(calls, language="en", formats=("text", "srt", "vtt")), out,
                   priority="low", name="demo calls")
    print_estimate(run.estimate(), "transcription")
    summary = run.run()
    final = summary.progress
    print_failed(summary.failed, summary.batch_id)
    console.print(f"  {final.succeeded} transcribed, {final.failed} failed; cost {money(final.cost)} (estimate "
                  f"{money((final.estimate or {}).get('estimated_cost'))}); {summary.files} subtitle and text files "
                  f"in {out}", highlight=False)
    console.print(f"  gpufleet batch status {summary.batch_id}   (re-running the same command resumes, never redoes)",
                  highlight=False)


def _money_report(client: object) -> None:
    costs = client.costs()  # type: ignore[attr-defined]
    mine = next((b for b in client.budgets() if b["scope"] == "tenant"), None)  # type: ignore[attr-defined]
    by_provider = ", ".join(f"{name} {money(v)}" for name, v in costs["by_provider"].items())
    by_kind = ", ".join(f"{name} {money(v)}" for name, v in costs["by_kind"].items())
    console.print("\n[bold]money[/] — every rented slot was a reservation with a budget hold, settled on release")
    console.print(f"  spend by provider: {by_provider}", highlight=False)
    console.print(f"  spend by job kind: {by_kind}", highlight=False)
    if mine:
        console.print(f"  tenant budget: {money(mine['spent'])} spent, {money(mine['held'])} held "
                      f"of ${mine['monthly_limit']:.2f} this month", highlight=False)


def run_demo(time_scale: float = 1.0) -> None:
    # Configuring one provider replaces the default set, so name both.
    os.environ.setdefault("GPUFLEET_PROVIDERS__LOCAL__ENABLED", "true")
    os.environ.setdefault("GPUFLEET_PROVIDERS__SANDBOX__TIME_SCALE", str(time_scale))
    from orchestrator.sdk import Client
    from orchestrator.settings import get_settings

    get_settings.cache_clear()

    console.print("[bold]gpufleet demo[/] — embedded stack: SQLite + filesystem broker, providers local + sandbox")
    with Client.local() as client:
        # A hard cap for this tenant: every placement holds price × max duration against it first.
        client.set_budget(monthly_limit=DEMO_BUDGET)
        batch = client.submit_batch(_mix(client, time_scale))
        console.print(f"submitted {batch.created} jobs as batch {batch.batch_id} through the HTTP API at {client.url}")
        with Progress(TextColumn("running"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("jobs", total=len(batch.job_ids))
            jobs = client.wait_all(batch.job_ids, timeout=300,
                                   on_progress=lambda done, total: progress.update(task, completed=done))
        console.print(jobs_table(jobs, title="results"))
        total = sum(j.cost for j in jobs)
        by_status: dict[str, int] = {}
        for job in jobs:
            by_status[job.status.value] = by_status.get(job.status.value, 0) + 1
        console.print(f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
                      + f"; total cost {money(total)}")
        failover = next((j for j in jobs if j.labels.get("demo") == "failover"), None)
        if failover is not None:
            failover = client.get(failover.id)
            console.print(f"\n[bold]failover[/] — job {str(failover.id)[:8]} ({failover.kind}, H100):")
            for event in failover.events or []:
                console.print(f"  {event.from_status or '-':>9} → {event.to_status:<9} {event.reason}", highlight=False)
        if failover is not None:
            _why_report(client, failover.id)
        preempted = next((j for j in jobs if j.labels.get("demo") == "preemption"), None)
        if preempted is not None:
            _preemption_report(client, preempted)
        _batch_report(client, get_settings().data_dir)
        _money_report(client)
        distill = next((j for j in jobs if j.kind == "distillation" and j.result), None)
        if distill is not None:
            _distillation_report(client, distill)
    console.print("\n[bold]where to look next[/]")
    console.print("  gpufleet jobs                      the jobs you just ran (they are kept in the local database)")
    if failover is not None:
        console.print(f"  gpufleet job {failover.id}   one job's full event history")
    console.print("  gpufleet costs / gpufleet budgets  spend by provider, kind and day; hard limits")
    console.print("  gpufleet offers --gpu A100         offers across every configured marketplace")
    console.print("  gpufleet up                        API at http://127.0.0.1:8000/docs, workers and sweeper")
    console.print("  README.md                          production setup: Postgres + Redis + docker-compose")
