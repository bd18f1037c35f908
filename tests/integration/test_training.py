"""Training runs that survive preemption, end to end: our API, Postgres, Redis, Celery workers, and
sandbox spot offers whose hosts are really taken away mid-run (the run's process is killed), with
the stand-in trainer (providers/sandbox/trainer.py) writing and reporting real checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import KEY_A, KEY_B, Stack, isolated_stack

TRAINER = str(Path(__file__).resolve().parents[2] / "providers" / "sandbox" / "trainer.py")
# Two spot offers reclaimed 1.2 s into a run, and an on-demand one that is never taken away.
PROVIDERS = """
providers:
  sandbox:
    time_scale: 1
    offers:
      - {offer_id: a10-spot-us, gpu: A10, region: us-east, price_per_hour: 0.20, capacity: 4, boot_seconds: 0.1,
         preempt_after_seconds: 1.2, kinds: [training, command]}
      - {offer_id: a10-spot-eu, gpu: A10, region: eu-de, price_per_hour: 0.25, capacity: 4, boot_seconds: 0.1,
         preempt_after_seconds: 1.2, kinds: [training, command]}
      - {offer_id: a10-ondemand, gpu: A10, region: us-east, price_per_hour: 0.90, capacity: 4, boot_seconds: 0.1,
         kinds: [training, command]}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with isolated_stack(tmp_path_factory.mktemp("training"), 4, PROVIDERS, {}) as running:
        yield running


@pytest.fixture()
def client(trained: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(trained.url, KEY_A) as c:
        yield c


def _training(client, checkpoints: Path, steps: int = 40, **spec):  # type: ignore[no-untyped-def]
    body = {"base_model": "llama-3-8b", "dataset_uri": "file:///data/train.jsonl",
            "command": [sys.executable, TRAINER, "--steps", str(steps), "--step-seconds", "0.1", "--every", "3"],
            "checkpoint_uri": str(checkpoints), **spec}
    return client.submit("training", body, requirements={"gpu": ["A10"], "gpu_count": 1})


def test_preempted_twice_resumes_from_the_latest_checkpoint_each_time(client, tmp_path: Path) -> None:
    job = client.wait(_training(client, tmp_path / "ckpt").id, timeout=90)
    assert job.status.value == "succeeded", job.error
    # Cheapest first; each preempted offer is avoided on the next run.
    assert [job.attempt, job.offer_id, job.restarts] == [3, "a10-ondemand", 2]
    assert job.result["steps"] == 40 and job.lost_seconds > 0
    found = client.checkpoints(job.id)
    steps = [c["step"] for c in found["checkpoints"]]
    assert steps == sorted(steps) and steps[-1] == 40 and {c["attempt"] for c in found["checkpoints"]} == {1, 2, 3}
    # Each restart resumed from the latest checkpoint its predecessor reported, so no step ran twice.
    last_of = {a: max(c["step"] for c in found["checkpoints"] if c["attempt"] == a) for a in (1, 2)}
    restarts = [e.reason for e in job.events if "restart" in e.reason]
    assert [f"from checkpoint step {last_of[1]}" in restarts[0], f"from checkpoint step {last_of[2]}" in restarts[1]] \
        == [True, True], restarts
    assert "preempted" in restarts[0]
    assert job.result["resumed_from_step"] == last_of[2] and job.result["steps_this_run"] == 40 - last_of[2]
    assert all((tmp_path / "ckpt" / f"step-{s:08d}.json").exists() for s in steps)
    text = "".join(c["text"] for c in client.logs(job.id)["chunks"])
    assert f"resuming from step {last_of[1]}" in text and f"resuming from step {last_of[2]}" in text
    assert "step 40/40" in text


def test_max_restarts_is_honoured(client, tmp_path: Path) -> None:
    job = client.wait(_training(client, tmp_path / "ckpt", max_restarts=1).id, timeout=60)
    assert job.status.value == "failed" and job.restarts == 1
    assert "max_restarts 1" in job.error and "preempted" in job.error


def test_user_code_failures_are_retried_only_when_their_exit_code_says_so(client, tmp_path: Path) -> None:
    flaky = tmp_path / "flaky.sh"
    flaky.write_text('n=$(cat "$1" 2>/dev/null || echo 0); echo $((n+1)) > "$1"; [ "$n" -ge 1 ] || exit 75\n'
                     'echo "GPUFLEET_RESULT {\\"runs\\": $((n+1))}"\n')
    spec = {"base_model": "m", "dataset_uri": "file:///d", "max_restarts": 3}
    req = {"gpu": ["A10"], "gpu_count": 1, "providers": ["sandbox"]}
    retried = client.submit("training", {**spec, "command": ["sh", str(flaky), str(tmp_path / "n1")],
                                         "retry_exit_codes": [75]}, requirements=req)
    failed = client.submit("training", {**spec, "command": ["sh", str(flaky), str(tmp_path / "n2")]},
                           requirements=req)
    retried, failed = client.wait(retried.id, timeout=60), client.wait(failed.id, timeout=60)
    assert retried.status.value == "succeeded" and retried.result["runs"] == 2 and retried.restarts == 1
    reasons = " ".join(e.reason for e in retried.events)
    # The user's code asked to run again: the offer it ran on is not held against it.
    assert "exit code 75 is retryable); retrying again" in reasons and not retried.placement["rejected"].get(
        f"sandbox/{retried.offer_id}")
    assert failed.status.value == "failed" and failed.attempt == 1 and "exit code 75" in failed.error


def test_logs_follow_from_the_cli(client, trained: Stack, tmp_path: Path) -> None:
    job = _training(client, tmp_path / "ckpt", steps=12)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "logs", str(job.id), "--follow"],
                         env={**trained.env, "GPUFLEET_API_URL": trained.url, "GPUFLEET_API_KEY": KEY_A},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "step 12/12" in out.stdout and "GPUFLEET_CHECKPOINT" in out.stdout
    listed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "checkpoints", str(job.id)],
                            env={**trained.env, "GPUFLEET_API_URL": trained.url, "GPUFLEET_API_KEY": KEY_A},
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "restarts:" in listed.stdout, listed.stderr
    assert os.path.exists(tmp_path / "ckpt" / "step-00000012.json")


def test_logs_of_another_tenants_job_are_not_found(client, trained: Stack, tmp_path: Path) -> None:
    from orchestrator.sdk import Client
    from orchestrator.sdk.errors import NotFoundError

    job = _training(client, tmp_path / "ckpt", steps=3)
    with Client(trained.url, KEY_B) as other, pytest.raises(NotFoundError):
        other.logs(job.id)


def test_the_run_is_told_what_to_train_and_where_to_checkpoint(client, tmp_path: Path) -> None:
    show = ("import json, os; print('GPUFLEET_RESULT ' + json.dumps({k: os.environ.get('GPUFLEET_' + k) for k in "
            "('DATASET_URI', 'BASE_MODEL', 'MAX_STEPS', 'CHECKPOINT_URI', 'CHECKPOINT_INTERVAL', 'RESUME_FROM')}))")
    job = client.wait(client.submit("training", {
        "base_model": "qwen-2.5-7b", "dataset_uri": "file:///data/sft.jsonl", "max_steps": 7,
        "checkpoint_interval_seconds": 60, "command": [sys.executable, "-c", show]},
        requirements={"gpu": ["A10"], "providers": ["sandbox"]}).id, timeout=60)
    assert job.status.value == "succeeded", job.error
    got = {k: job.result[k] for k in ("DATASET_URI", "BASE_MODEL", "MAX_STEPS", "CHECKPOINT_INTERVAL", "RESUME_FROM")}
    assert got == {"DATASET_URI": "file:///data/sft.jsonl", "BASE_MODEL": "qwen-2.5-7b", "MAX_STEPS": "7",
                   "CHECKPOINT_INTERVAL": "60", "RESUME_FROM": None}
    # No checkpoint_uri given: the job's own place in the deployment's storage, the same for every attempt.
    assert job.result["CHECKPOINT_URI"].endswith(f"/jobs/{job.id}/checkpoints/")
