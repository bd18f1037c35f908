"""The README's first command, and the CLI's promise: errors are one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import KEY_A


def _gpufleet(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env["GPUFLEET_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_demo_runs_on_the_embedded_default_with_no_services(tmp_path: Path) -> None:
    env = _embedded_env(tmp_path)
    result = _gpufleet("demo", "--time-scale", "0.2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "13 jobs: 13 succeeded" in out
    for queue in ("high_priority", "inference", "training", "distillation", "low_priority"):
        assert queue in out
    assert "h100-spot-us was lost mid-job; retrying elsewhere" in out and "sandbox/h100-de" in out
    assert "teacher/student pairs" in out
    # Why the failed-over job went where it did: the choice, and each rejected offer with its reason.
    assert "why there?" in out and "rejected: sandbox/h100-spot-us failed this job before" in out
    # Spot capacity reclaimed mid-run: the training resumed elsewhere from its latest checkpoint.
    assert "1 restart(s)" in out and "a10-spot-us was reclaimed (preempted)" in out
    assert "restart 1 from checkpoint step" in out and "finished 24 steps" in out
    # A batch transcription with an estimate first, a bad file listed with its reason, subtitles written.
    assert "estimate for 9 transcription items" in out and "8 transcribed, 1 failed" in out
    assert "call-broken.wav" in out and "is empty" in out
    assert len(list((tmp_path / "data" / "demo" / "transcripts").rglob("*.srt"))) == 8
    assert "spend by provider: local $0.000000, sandbox $" in out and "of $25.00 this month" in out
    assert (tmp_path / "data" / "gpufleet.db").exists()
    # The jobs stay in the local database for the CLI to show afterwards.
    listed = _gpufleet("jobs", "--limit", "50", env=env)
    # The 13 submitted, the distillation job's 5 pairs (a teacher and a student inference job each),
    # and the 8 transcribed files of the batch.
    assert listed.returncode == 0 and listed.stdout.count("succeeded") == 31


def test_cli_errors_are_one_line(tmp_path: Path, stack) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "GPUFLEET_API_URL": stack.url, "GPUFLEET_API_KEY": KEY_A}
    cases = [
        (("submit", "command", "{not json"), "error: spec is not valid JSON"),
        (("submit", "inference", json.dumps({"model": "m"})), "error: spec: give either 'messages' or 'prompt'"),
        (("job", "00000000-0000-0000-0000-000000000000"), "error: job 00000000-0000-0000-0000-000000000000 not found"),
    ]
    for args, message in cases:
        result = _gpufleet(*args, env=env)
        assert result.returncode == 1, result
        assert result.stderr.strip().startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    bad_key = _gpufleet("jobs", env={**env, "GPUFLEET_API_KEY": "gf_nope"})
    assert bad_key.returncode == 1 and bad_key.stderr.strip() == "error: invalid or revoked API key"
    bad_setting = _gpufleet("jobs", env={**env, "GPUFLEET_VISIBILITY_TIMEOUT": "5"})
    assert bad_setting.returncode == 1
    assert bad_setting.stderr.strip().startswith("error: GPUFLEET_VISIBILITY_TIMEOUT:")


def test_cli_submit_wait_and_show(stack) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "GPUFLEET_API_URL": stack.url, "GPUFLEET_API_KEY": KEY_A}
    result = _gpufleet("submit", "command", json.dumps({"command": ["echo", "from-cli"]}), "--wait", env=env)
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout and "from-cli" in result.stdout
    job_id = result.stdout.split("submitted job ", 1)[1].split()[0]
    shown = _gpufleet("job", job_id, env=env)
    assert shown.returncode == 0 and "queued → placing" in shown.stdout


def test_keys_create_list_revoke(stack) -> None:  # type: ignore[no-untyped-def]
    import httpx

    env = dict(os.environ)
    created = _gpufleet("keys", "create", "initech", "--name", "ci", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("gf_")
    assert httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    listed = _gpufleet("keys", "list", "--tenant", "initech", env=env)
    assert key[:10] in listed.stdout and key not in listed.stdout  # never shown again
    revoked = _gpufleet("keys", "revoke", key[:10], env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_offers_budgets_and_costs_commands(tmp_path: Path) -> None:
    env = _embedded_env(tmp_path)
    offers = _gpufleet("offers", "--gpu", "H100", "--region", "EU", env=env)
    assert offers.returncode == 0, offers.stderr
    assert "h100-de" in offers.stdout and "h100-spot-us" not in offers.stdout and "1 offers" in offers.stdout
    listing = _gpufleet("providers", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 5}
    assert {"local", "sandbox"} <= set(rows) and "ok" in rows["sandbox"] and "H100" in listing.stdout
    cheap = _gpufleet("offers", "--max-price", "0.45", env=env)
    assert "rtx4090-se" in cheap.stdout and "a100-us" not in cheap.stdout
    assert _gpufleet("budgets", "set", "provider", "sandbox", "--monthly", "12.5", env=env).returncode == 0
    listed = _gpufleet("budgets", env=env)
    assert "sandbox" in listed.stdout and "12.50" in listed.stdout
    bad = _gpufleet("budgets", "set", "planet", "x", env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: scope: must be one of global, provider, tenant"
    bad_date = _gpufleet("costs", "--all-tenants", "--since", "yesterday", env=env)
    assert bad_date.returncode == 1 and "Traceback" not in bad_date.stderr and "--since" in bad_date.stderr
    report = _gpufleet("costs", "--all-tenants", env=env)
    assert report.returncode == 0 and "total $0.0000 over 0 charges" in report.stdout
