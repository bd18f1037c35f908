"""Runs on the rented instance (stdlib only, any python3).

With a command: runs it, then reports its exit code and output tail to GPUFLEET_CALLBACK_URL
with the job-scoped token; the instance's own exit code mirrors the command's, so a provider
that shows exit status agrees with the report.

Without one (a standalone reservation's capacity): an agent that takes jobs submitted onto the
reservation from GPUFLEET_AGENT_URL, one at a time, runs and reports each, and exits when the
reservation ends (the endpoint answers 410).

A line ``GPUFLEET_RESULT {json}`` on stdout becomes the job's result.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

COMMAND = None  # replaced by the adapter: an argv list or a shell string
TAIL = 4000


def post(url, token, body):
    """(status, parsed body or None)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
        return response.status, (json.loads(raw) if raw else None)


def report(body, url, token):
    if not url:
        return
    for attempt in range(6):
        try:
            post(url, token, body)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                print(f"gpufleet: report refused: {exc.code}", file=sys.stderr)
                return
        except OSError:
            pass
        time.sleep(min(30, 2 ** attempt))
    print("gpufleet: could not report the outcome", file=sys.stderr)


def run(command, env=None):
    """Run the command; returns (exit code, the report body)."""
    proc = subprocess.run(command, shell=isinstance(command, str), capture_output=True, text=True, env=env)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    result = {"exit_code": proc.returncode, "stdout": proc.stdout[-TAIL:], "stderr": proc.stderr[-TAIL:]}
    for line in proc.stdout.splitlines():
        if line.startswith("GPUFLEET_RESULT "):
            try:
                result.update(json.loads(line[len("GPUFLEET_RESULT "):]))
            except ValueError:
                pass
    if proc.returncode == 0:
        return 0, {"state": "succeeded", "result": result}
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:500]
    return proc.returncode, {"state": "failed", "result": result, "error": f"exit code {proc.returncode}: {tail}"}


def agent():
    url, token = os.environ["GPUFLEET_AGENT_URL"], os.environ.get("GPUFLEET_AGENT_TOKEN", "")
    # Past this, nobody is coming back for us (the API was unreachable for the whole reservation).
    give_up = time.time() + float(os.environ.get("GPUFLEET_AGENT_SECONDS", "3600")) + 600
    idle = 0.5
    while time.time() < give_up:
        try:
            status, job = post(url, token, {})
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 404, 410):
                return  # the reservation ended (or was never ours): stop
            status, job = exc.code, None
        except OSError:
            status, job = 0, None
        if status != 200 or not job:
            time.sleep(idle)
            idle = min(5.0, idle * 1.5)
            continue
        idle = 0.5
        env = {**os.environ, **{k: str(v) for k, v in job.get("env", {}).items()}}
        _, body = run(job["command"], env)
        report(body, env.get("GPUFLEET_CALLBACK_URL"), env.get("GPUFLEET_JOB_TOKEN", ""))


def main():
    if COMMAND is None:
        agent()
        return
    code, body = run(COMMAND)
    report(body, os.environ.get("GPUFLEET_CALLBACK_URL"), os.environ.get("GPUFLEET_JOB_TOKEN", ""))
    sys.exit(code)


if __name__ == "__main__":
    main()
