"""Runs on the rented instance (stdlib only, any python3).

With a command: runs it, sending its output as it comes to GPUFLEET_OUTPUT_URL (where checkpoint
lines are recorded), then reports its exit code and output tail to GPUFLEET_CALLBACK_URL
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
import threading
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


class Shipper:
    """Sends the run's output to GPUFLEET_OUTPUT_URL as it comes: every second, and at once after a
    checkpoint line (the instance may be preempted the next moment). Best effort: the run never
    waits on us, and output we could not send is still in the instance's own log."""

    def __init__(self, url, token):
        self.url, self.token = url, token
        self.pending = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        if url:
            self.thread.start()

    def add(self, stream, line):
        if not self.url:
            return
        with self.lock:
            self.pending.append({"stream": stream, "text": line})
        if line.startswith("GPUFLEET_CHECKPOINT "):
            self.wake.set()

    def _send(self):
        with self.lock:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
        if not batch:
            return
        chunks = []
        for item in batch:  # consecutive lines of one stream travel as one chunk
            if chunks and chunks[-1]["stream"] == item["stream"] and len(chunks[-1]["text"]) < 32000:
                chunks[-1]["text"] += item["text"]
            else:
                chunks.append(dict(item))
        for attempt in range(3):
            try:
                post(self.url, self.token, {"chunks": chunks})
                return
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    return  # refused (the job moved on): nobody wants it
            except OSError:
                pass
            time.sleep(0.5 * (attempt + 1))

    def _loop(self):
        while not self.done:
            self.wake.wait(1.0)
            self.wake.clear()
            self._send()

    def close(self):
        if self.url:
            self.done = True
            self.wake.set()
            self.thread.join(timeout=10)
            while self.pending:
                self._send()


def _pump(source, sink, stream, shipper, tail, results):
    for line in iter(source.readline, ""):
        sink.write(line)
        sink.flush()
        shipper.add(stream, line)
        tail.append(line)
        while len(tail) > 200:
            tail.pop(0)
        if line.startswith("GPUFLEET_RESULT "):
            results.append(line)
    source.close()


def run(command, env=None):
    """Run the command, passing its output on as it comes; returns (exit code, the report body)."""
    env = env if env is not None else dict(os.environ)
    shipper = Shipper(env.get("GPUFLEET_OUTPUT_URL"), env.get("GPUFLEET_JOB_TOKEN", ""))
    proc = subprocess.Popen(command, shell=isinstance(command, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", env=env)
    tails, results = {"stdout": [], "stderr": []}, []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, "stdout", shipper, tails["stdout"], results)),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, "stderr", shipper, tails["stderr"], []))]
    for pump in pumps:
        pump.start()
    code = proc.wait()
    for pump in pumps:
        pump.join(timeout=10)  # something the command left running in the background may hold the pipe
    shipper.close()
    stdout, stderr = "".join(tails["stdout"]), "".join(tails["stderr"])
    result = {"exit_code": code, "stdout": stdout[-TAIL:], "stderr": stderr[-TAIL:]}
    for line in results:
        if line.startswith("GPUFLEET_RESULT "):
            try:
                result.update(json.loads(line[len("GPUFLEET_RESULT "):]))
            except ValueError:
                pass
    if code == 0:
        return 0, {"state": "succeeded", "result": result}
    tail = (stderr.strip().splitlines() or [""])[-1][:500]
    return code, {"state": "failed", "result": result, "error": f"exit code {code}: {tail}"}


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
    code, body = run(COMMAND, dict(os.environ))
    report(body, os.environ.get("GPUFLEET_CALLBACK_URL"), os.environ.get("GPUFLEET_JOB_TOKEN", ""))
    sys.exit(code)


if __name__ == "__main__":
    main()
