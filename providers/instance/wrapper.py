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
    waits on us, and output we could not send is still in the instance's own log. Checkpoint lines
    come first: the buffer drops other lines when the API is away, and a refused batch is sent again
    as its checkpoint lines alone."""

    MAX_LINE = 16000  # characters kept of one line (checkpoint lines are short and kept whole)
    MAX_BATCH = 256000  # characters per request, well under the API's body limit
    MAX_PENDING = 20000  # lines held while the API is unreachable

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
        checkpoint = line.startswith("GPUFLEET_CHECKPOINT ")
        if not checkpoint and len(line) > self.MAX_LINE:
            line = line[: self.MAX_LINE] + " [gpufleet: line cut]\n"
        with self.lock:
            if len(self.pending) >= self.MAX_PENDING:  # keep the checkpoints, drop the oldest chatter
                drop = next((i for i, item in enumerate(self.pending) if not item["checkpoint"]), None)
                if drop is not None:
                    del self.pending[drop]
            self.pending.append({"stream": stream, "text": line, "checkpoint": checkpoint})
        if checkpoint:
            self.wake.set()

    def _take(self):
        with self.lock:
            size, count = 0, 0
            for item in self.pending:
                if count and size + len(item["text"]) > self.MAX_BATCH:
                    break
                size, count = size + len(item["text"]), count + 1
            batch, self.pending = self.pending[:count], self.pending[count:]
        return batch

    @staticmethod
    def _chunks(batch):
        chunks = []
        for item in batch:  # consecutive lines of one stream travel as one chunk
            if chunks and chunks[-1]["stream"] == item["stream"] and len(chunks[-1]["text"]) < 32000:
                chunks[-1]["text"] += item["text"]
            else:
                chunks.append({"stream": item["stream"], "text": item["text"]})
        return chunks

    def _post(self, batch, tries=3):
        """True when delivered (or refused for good because the job moved on)."""
        for attempt in range(tries):
            try:
                post(self.url, self.token, {"chunks": self._chunks(batch)})
                return True
            except urllib.error.HTTPError as exc:
                if exc.code in (413, 422):  # too big or unreadable: the checkpoint lines alone, then give up
                    checkpoints = [item for item in batch if item["checkpoint"]]
                    if checkpoints and len(checkpoints) < len(batch):
                        return self._post(checkpoints, tries)
                    return True
                if exc.code < 500 and exc.code != 429:
                    return True  # refused (the job moved on): nobody wants it
            except OSError:
                pass
            time.sleep(0.5 * (attempt + 1))
        return False

    def _send(self):
        batch = self._take()
        if batch and not self._post(batch):
            with self.lock:  # the API is away: keep the lines for the next round (the buffer is bounded)
                self.pending[:0] = batch[-self.MAX_PENDING:]
            return False
        return True

    def _loop(self):
        while not self.done:
            self.wake.wait(1.0)
            self.wake.clear()
            self._send()

    def close(self, deadline_seconds=30.0):
        """Send what is left, for at most ``deadline_seconds``: the outcome report (and the release of
        the capacity, which is billed meanwhile) must not wait on an unreachable API."""
        if not self.url:
            return
        self.done = True
        self.wake.set()
        self.thread.join(timeout=10)
        give_up = time.time() + deadline_seconds
        while self.pending and time.time() < give_up:
            if not self._send():
                break


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
