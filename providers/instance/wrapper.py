"""Runs on the rented instance (stdlib only, any python3): runs the job's command, then reports
its exit code and output tail to GPUFLEET_CALLBACK_URL with the job-scoped token.

A line ``GPUFLEET_RESULT {json}`` on stdout becomes the job's result. The instance's own exit
code mirrors the command's, so a provider that shows exit status agrees with the report.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

COMMAND = None  # replaced by the adapter: an argv list or a shell string
TAIL = 4000


def report(body):
    url, token = os.environ.get("GPUFLEET_CALLBACK_URL"), os.environ.get("GPUFLEET_JOB_TOKEN", "")
    if not url:
        return
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    for attempt in range(6):
        try:
            urllib.request.urlopen(request, timeout=30).read()
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                print(f"gpufleet: report refused: {exc.code}", file=sys.stderr)
                return
        except OSError:
            pass
        time.sleep(min(30, 2 ** attempt))
    print("gpufleet: could not report the outcome", file=sys.stderr)


def main():
    proc = subprocess.run(COMMAND, shell=isinstance(COMMAND, str), capture_output=True, text=True)
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
        report({"state": "succeeded", "result": result})
    else:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:500]
        report({"state": "failed", "result": result, "error": f"exit code {proc.returncode}: {tail}"})
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
