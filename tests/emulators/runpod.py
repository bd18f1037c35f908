"""A stateful emulator of RunPod's serverless REST API and its GraphQL API, for adapter tests.

One HTTP server on 127.0.0.1 answers both, in the shapes the ``runpod`` SDK reads (see
/work/shared/reference/provider-apis.md):

- serverless: ``/v2/{endpoint}/run|runsync|status/{id}|stream/{id}|cancel/{id}|health|purge-queue``.
  A request goes IN_QUEUE → IN_PROGRESS → COMPLETED after its endpoint's delay; the output is
  computed from the input (inference through ``providers.sandbox.models``, anything else echoed).
  An endpoint with ``"worker": "faster_whisper"`` (the default ``whisper`` one), or a request to an
  endpoint naming no worker whose input is that worker's (``audio``/``audio_base64``, no ``kind``;
  another ``worker`` value, e.g. ``"echo"``, turns this off), behaves as RunPod's faster-whisper
  worker (runpod-workers/worker-faster_whisper): its input is validated as the worker's
  ``rp_validator`` does (an unknown key or a wrong type FAILs the request with the validator's
  messages; so does an unknown model or audio that is not an http(s) URL), and it answers in the
  worker's shape: ``segments`` (id, seek, start, end, text with faster-whisper's leading space,
  tokens, temperature, avg_logprob, compression_ratio, no_speech_prob), ``detected_language``,
  ``transcription`` (plain_text, formatted_text, srt or vtt as asked), ``translation``, ``device``,
  ``model`` and, when asked, ``word_timestamps``. Statuses carry ``delayTime`` and ``executionTime``
  in ms. Each endpoint has RunPod's settings too (name, templateId, gpuIds, idleTimeout, scaler,
  ``workersMin``, ``workersMax``); while its workersMax is 0 no worker may start, so requests stay
  IN_QUEUE until it is raised (then their queue time starts).
- GraphQL: ``POST /graphql``, the query text parsed with regexes and a small literal parser (string
  literals are unescaped as GraphQL does, so escaping bugs in a client show up as syntax errors or
  mangled values). GPU types with prices and stock per cloud; pods that boot after a delay and then
  really run their ``dockerArgs`` as ``sh -c`` subprocesses with the pod's env; billing per second.
  ``myself { endpoints {…} }`` lists the endpoints and ``saveEndpoint(input: {id, …})`` modifies one,
  validated as RunPod documents it: name, gpuIds and templateId are required, an unknown id is an
  error in the body, and optional settings left out take their defaults (the cautious reading of
  "default values will be used if unspecified"), so a client that forgets to send them back shows.

Both require ``Authorization: Bearer <key>``. Tests steer it with Python methods (``fail``,
``hang``, ``down``/``up``, ``out_of_stock``, ``stick``, ``preempt``, ``fail_next``, ``set_delay``,
``set_workers``) or, from another process, with ``/_emulator/…`` HTTP controls, and read an
endpoint's workers with ``workers_max`` / ``endpoint_settings``. ``python -m tests.emulators.runpod``
runs it from a shell.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from providers.sandbox import models
from tests.emulators.graphql_text import GraphQLSyntaxError, input_of, parse_value
from tests.emulators.server import LoopbackServer

CAPACITY_ERROR = ("There are no longer any instances available with the requested specifications. "
                  "Please refresh and try again.")
DEFAULT_KEY = "rp-test-key"
DEFAULT_ENDPOINTS: dict[str, dict[str, Any]] = {
    "vllm-llama": {"price_per_second": 0.00076, "workers": 2, "delay_seconds": 0.2},
    "whisper": {"price_per_second": 0.00031, "workers": 1, "delay_seconds": 0.2, "worker": "faster_whisper"},
}
DEFAULT_GPU_TYPES: list[dict[str, Any]] = [
    {"id": "NVIDIA A100 80GB PCIe", "displayName": "A100 80GB PCIe", "memoryInGb": 80, "maxGpuCount": 8,
     "securePrice": 1.64, "communityPrice": 1.19, "secureSpotPrice": 0.82, "communitySpotPrice": 0.6,
     "stock": {"SECURE": 4, "COMMUNITY": 4}},
    {"id": "NVIDIA H100 80GB HBM3", "displayName": "H100 SXM", "memoryInGb": 80, "maxGpuCount": 8,
     "securePrice": 2.99, "communityPrice": 2.69, "secureSpotPrice": 1.75, "communitySpotPrice": 1.5,
     "stock": {"SECURE": 2, "COMMUNITY": 2}},
    {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24, "maxGpuCount": 8,
     "securePrice": 0.69, "communityPrice": 0.34, "secureSpotPrice": 0.35, "communitySpotPrice": 0.2,
     "stock": {"SECURE": 8, "COMMUNITY": 8}},
]
CLOUDS = ("SECURE", "COMMUNITY")
_PRICE_KEYS = {"SECURE": ("securePrice", "secureSpotPrice"), "COMMUNITY": ("communityPrice", "communitySpotPrice")}
# saveEndpoint's optional settings and the values RunPod uses when one is not given (its documented
# create defaults; the SDK's create_endpoint uses the same).
ENDPOINT_DEFAULTS: dict[str, Any] = {"idleTimeout": 5, "scalerType": "QUEUE_DELAY", "scalerValue": 4, "locations": "",
                                     "networkVolumeId": "", "gpuCount": 1, "workersMin": 0, "workersMax": 3}
ENDPOINT_REQUIRED = ("name", "gpuIds", "templateId")


def _js_date(at: float) -> str:
    return time.strftime("%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)", time.gmtime(at))


# --- state ---------------------------------------------------------------------------------------


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: float | str | None
    paths: list[str] | None


@dataclass
class _Hang:
    seconds: float
    remaining: int
    paths: list[str] | None
    ops: list[str] | None


@dataclass
class _Request:
    """A serverless request; its state is a function of time (and of cancellation)."""

    id: str
    endpoint: str
    input: dict[str, Any]
    submitted: float
    queue_s: float
    exec_s: float
    outcome: str = "COMPLETED"
    error: str | None = None
    limit_s: float | None = None  # policy.executionTimeout
    cancelled_at: float | None = None
    streamed: bool = False
    released: float | None = None  # when a worker could first start for it (its endpoint's workersMax > 0)

    def ran(self, now: float) -> float:
        """Seconds of execution so far (what RunPod bills)."""
        if self.released is None:
            return 0.0
        end = min(now, self.cancelled_at) if self.cancelled_at is not None else now
        run = max(0.0, end - self.released - self.queue_s)
        return min(run, self._end())

    def waited(self) -> float:
        """Seconds in the queue before running (RunPod's delayTime), the hold for a worker included."""
        return (self.released - self.submitted if self.released is not None else 0.0) + self.queue_s

    def _end(self) -> float:
        return self.limit_s if self.limit_s is not None and self.limit_s < self.exec_s else self.exec_s

    def status(self, now: float) -> str:
        if self.cancelled_at is not None:
            return "CANCELLED"
        if self.released is None:
            return "IN_QUEUE"
        elapsed = now - self.released
        if elapsed < self.queue_s:
            return "IN_QUEUE"
        if elapsed - self.queue_s < self._end():
            return "IN_PROGRESS"
        if self.limit_s is not None and self.limit_s < self.exec_s:
            return "TIMED_OUT"
        return self.outcome


@dataclass
class _Pod:
    id: str
    name: str
    image: str
    gpu_type_id: str
    gpu_count: int
    cloud: str
    interruptible: bool
    cost_per_hr: float
    env: dict[str, str]
    docker_args: str
    container_disk_gb: int
    volume_gb: int
    created: float
    country_code: str | None = None
    ports: str | None = None
    desired: str = "RUNNING"
    booted_at: float | None = None
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    ended_at: float | None = None
    log_path: str = ""
    machine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def cost(self, now: float) -> float:
        return self.cost_per_hr * max(0.0, (self.ended_at or now) - self.created) / 3600

    def running(self) -> bool:
        return self.desired == "RUNNING" and self.process is not None and self.exit_code is None


def output_for(job_input: dict[str, Any], worker: str | None = None) -> Any:
    """What an emulated worker returns for an input: deterministic, so tests can assert on it."""
    if worker == FASTER_WHISPER or (worker is None and _looks_like_whisper_input(job_input)):
        return whisper_output(job_input)
    if job_input.get("kind") == "inference":
        return models.complete(str(job_input.get("model", "llama-3-8b")), models.prompt_text(job_input),
                               int(job_input.get("max_tokens", 256)))
    return job_input


# --- RunPod's faster-whisper worker ----------------------------------------------------------------

FASTER_WHISPER = "faster_whisper"
# The worker's input schema (its src/rp_schema.py): key → the type its validator checks with isinstance.
WHISPER_SCHEMA: dict[str, type] = {
    "audio": str, "audio_base64": str, "model": str, "transcription": str, "translate": bool, "translation": str,
    "language": str, "temperature": float, "best_of": int, "beam_size": int, "patience": float,
    "length_penalty": float, "suppress_tokens": str, "initial_prompt": str, "condition_on_previous_text": bool,
    "temperature_increment_on_fallback": float, "compression_ratio_threshold": float, "logprob_threshold": float,
    "no_speech_threshold": float, "enable_vad": bool, "word_timestamps": bool,
}
WHISPER_MODELS = ("tiny", "base", "small", "medium", "large-v1", "large-v2", "large-v3", "distil-large-v2",
                  "distil-large-v3", "turbo")


def _looks_like_whisper_input(job_input: dict[str, Any]) -> bool:
    return "kind" not in job_input and ("audio" in job_input or "audio_base64" in job_input)


def whisper_error(job_input: dict[str, Any]) -> str | None:
    """Why the worker would fail this input, as RunPod reports it; None when it would transcribe it.
    Validation errors are the validator's messages (the handler returns them as its ``error``); a missing
    model or unreadable audio is an exception in the handler, which the SDK reports as JSON."""
    errors = [f"Unexpected input. {key} is not a valid input option." for key in job_input if key not in WHISPER_SCHEMA]
    for key, kind in WHISPER_SCHEMA.items():
        value = job_input.get(key)
        if value is not None and not isinstance(value, kind):
            errors.append(f"{key} should be {kind} type, not {type(value)}.")
    if errors:
        return " ".join(errors)
    audio, encoded = job_input.get("audio"), job_input.get("audio_base64")
    if not audio and not encoded:
        return _handler_exception("ValueError", "Must provide either audio or audio_base64")
    if audio and not str(audio).startswith(("http://", "https://")):
        return _handler_exception("RuntimeError", f"Invalid data found when processing input: {audio}")
    if encoded and not audio:
        try:
            base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            return _handler_exception("binascii.Error", str(exc))
    model = job_input.get("model") or "base"
    if model not in WHISPER_MODELS:
        return _handler_exception("ValueError", f"Model '{model}' not found.")
    return None


def _handler_exception(error_type: str, message: str) -> str:
    """How the runpod SDK reports an exception raised by a handler."""
    return json.dumps({"error_type": f"<class '{error_type}'>", "error_message": message,
                       "error_traceback": f"Traceback (most recent call last):\n  ...\n{error_type}: {message}\n"})


def whisper_output(job_input: dict[str, Any]) -> dict[str, Any]:
    """The worker's answer: a deterministic transcript (``providers.sandbox.models``; remote audio is
    not fetched, so it lasts a minute) in faster-whisper's segment objects, serialized as the worker does."""
    model = str(job_input.get("model") or "base")
    audio = str(job_input.get("audio") or "")
    if not audio:
        audio = "base64:" + hashlib.sha256(str(job_input.get("audio_base64") or "").encode()).hexdigest()[:16]
    language = job_input.get("language")
    transcript = models.transcribe(model, audio, None, str(language) if language else None)
    segments: list[dict[str, Any]] = []
    for i, seg in enumerate(transcript["segments"], start=1):
        words = seg["text"].split()
        digest = hashlib.sha256(f"{audio}|{i}".encode()).digest()
        segments.append({
            "id": i, "seek": int(seg["start"] // 30 * 3000), "start": seg["start"], "end": seg["end"],
            "text": " " + seg["text"],  # faster-whisper's segments start with the space before the first word
            "tokens": [50364 + digest[j % len(digest)] * 7 + j for j in range(len(words) + 1)],
            "temperature": 0.0, "avg_logprob": round(-0.2 - digest[0] / 1000, 4),
            "compression_ratio": round(1.3 + digest[1] / 1000, 4),
            "no_speech_prob": digest[2] / 10_000})
    output: dict[str, Any] = {
        "segments": segments, "detected_language": transcript["language"],
        "transcription": _whisper_format(str(job_input.get("transcription") or "plain_text"), segments),
        "translation": (_whisper_format(str(job_input.get("translation") or "plain_text"), segments)
                        if job_input.get("translate") else None),
        "device": "cuda", "model": model}
    if job_input.get("word_timestamps"):
        output["word_timestamps"] = [word for seg in segments for word in _words_of(seg)]
    return output


def _words_of(segment: dict[str, Any]) -> list[dict[str, Any]]:
    words = segment["text"].split()
    step = (segment["end"] - segment["start"]) / len(words)
    return [{"word": " " + w, "start": round(segment["start"] + i * step, 2), "end": round(segment["start"] + (i + 1) * step, 2)}
            for i, w in enumerate(words)]


def _whisper_format(fmt: str, segments: list[dict[str, Any]]) -> str:
    """The worker's ``format_segments``: plain text, one line per segment, SRT, or (anything else) its VTT
    cues, which carry no WEBVTT header."""
    if fmt == "plain_text":
        return " ".join(s["text"].lstrip() for s in segments)
    if fmt == "formatted_text":
        return "\n".join(s["text"].lstrip() for s in segments)
    if fmt == "srt":
        return "".join(f"{i}\n{_stamp(s['start'], ',')} --> {_stamp(s['end'], ',')}\n{s['text'].strip()}\n\n"
                       for i, s in enumerate(segments, start=1))
    return "".join(f"{_stamp(s['start'], '.')} --> {_stamp(s['end'], '.')}\n{s['text'].strip()}\n\n" for s in segments)


def _stamp(seconds: float, marker: str) -> str:
    """faster-whisper's ``format_timestamp(..., always_include_hours=True)``."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{marker}{ms:03d}"


# --- the emulator --------------------------------------------------------------------------------


class RunPodEmulator(LoopbackServer):
    """RunPod's serverless and GraphQL APIs on one local port. Use as a context manager."""

    def __init__(self, api_key: str = DEFAULT_KEY, endpoints: dict[str, dict[str, Any]] | None = None,
                 gpu_types: list[dict[str, Any]] | None = None, boot_delay: float = 0.2, port: int = 0,
                 host: str = "127.0.0.1", queue_seconds: float = 0.05) -> None:
        self.api_key = api_key
        self.boot_delay = boot_delay
        self.queue_seconds = queue_seconds
        self.host = host
        self.endpoints = {name: {"workers": 1, "delay_seconds": 0.2, **cfg, "fail_next": []}
                          for name, cfg in (DEFAULT_ENDPOINTS if endpoints is None else endpoints).items()}
        # RunPod's settings of each endpoint, as saveEndpoint changes them; workersMax defaults to the
        # endpoint's worker count ("workers"), unless the test gives "workers_max"/"workers_min".
        self.settings: dict[str, dict[str, Any]] = {
            name: {**ENDPOINT_DEFAULTS, "id": name, "name": name, "gpuIds": "AMPERE_80", "templateId": f"tpl-{name}",
                   "workersMin": int(cfg.get("workers_min", 0)),
                   "workersMax": int(cfg.get("workers_max", cfg["workers"]))}
            for name, cfg in self.endpoints.items()}
        self.gpu_types = {g["id"]: {**g, "stock": dict(g.get("stock", {}))} for g in (gpu_types or DEFAULT_GPU_TYPES)}
        self.requests: list[dict[str, Any]] = []
        self.control_requests: list[dict[str, Any]] = []
        self._jobs: dict[str, _Request] = {}
        self._pods: dict[str, _Pod] = {}
        self._gone: list[_Pod] = []
        self._faults: list[_Fault] = []
        self._hangs: list[_Hang] = []
        self._no_stock: set[str] = set()
        self._stuck: set[str] = set()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._logs = tempfile.mkdtemp(prefix="runpod-emulator-")
        self._server = None
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self.port = port
        self.up()
        self._ticker.start()

    # --- addresses ---------------------------------------------------------------------------------

    @property
    def graphql_url(self) -> str:
        return f"{self.url}/graphql"

    @property
    def serverless_url(self) -> str:
        """The adapter's ``endpoint_base_url`` (the SDK's ``endpoint_url_base``)."""
        return f"{self.url}/v2"

    def __enter__(self) -> RunPodEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- server lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self.down()
        with self._lock:
            for pod in list(self._pods.values()):
                self._kill(pod)
        shutil.rmtree(self._logs, ignore_errors=True)

    # --- controls ----------------------------------------------------------------------------------

    def fail(self, status: int, count: int = 1, retry_after: float | str | None = None,
             paths: list[str] | None = None) -> None:
        """The next ``count`` API requests (whose path starts with one of ``paths``, if given) answer
        ``status``, with a ``Retry-After`` header if given. 502/504 answer an HTML page like a gateway."""
        with self._lock:
            self._faults.append(_Fault(int(status), int(count), retry_after, paths))

    def hang(self, seconds: float, count: int = 1, paths: list[str] | None = None, ops: list[str] | None = None) -> None:
        """The next ``count`` requests (matching ``paths`` prefixes and GraphQL ``ops`` such as
        "podFindAndDeployOnDemand", if given) are carried out, but their answers are held back
        ``seconds``: a client that times out does not know what happened."""
        with self._lock:
            self._hangs.append(_Hang(float(seconds), int(count), paths, ops))

    def heal(self) -> None:
        """Forget every pending ``fail`` and ``hang``."""
        with self._lock:
            self._faults.clear()
            self._hangs.clear()

    def out_of_stock(self, gpu_type_id: str, out: bool = True) -> None:
        with self._lock:
            (self._no_stock.add if out else self._no_stock.discard)(gpu_type_id)

    def stick(self, gpu_type_id: str, stuck: bool = True) -> None:
        """Pods of this GPU type stay booting (``runtime`` null) until unstuck."""
        with self._lock:
            (self._stuck.add if stuck else self._stuck.discard)(gpu_type_id)

    def preempt(self, pod_id: str) -> bool:
        """The pod vanishes (host lost / spot reclaimed): its process is killed, it leaves every listing."""
        with self._lock:
            pod = self._pods.pop(pod_id, None)
            if pod is None:
                return False
            self._end(pod)
            return True

    def fail_next(self, endpoint: str, status: str = "FAILED", count: int = 1, error: str | None = None) -> None:
        """The endpoint's next ``count`` requests end ``status`` (FAILED with ``error``, or TIMED_OUT)."""
        if status not in ("FAILED", "TIMED_OUT"):
            raise ValueError("status must be FAILED or TIMED_OUT")
        with self._lock:
            self.endpoints[endpoint]["fail_next"].extend([(status, error)] * int(count))

    def set_delay(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.endpoints[endpoint]["delay_seconds"] = float(seconds)

    def set_workers(self, endpoint: str, workers_max: int | None = None, workers_min: int | None = None,
                    **settings: Any) -> None:
        """Change an endpoint's settings as someone in the RunPod console would (no request logged)."""
        with self._lock:
            record = self.settings[endpoint]
            if workers_max is not None:
                record["workersMax"] = int(workers_max)
            if workers_min is not None:
                record["workersMin"] = int(workers_min)
            record.update(settings)
            self._advance()

    def workers_max(self, endpoint: str) -> int:
        """The endpoint's current workersMax, as RunPod would show it."""
        with self._lock:
            return int(self.settings[endpoint]["workersMax"])

    def endpoint_settings(self, endpoint: str) -> dict[str, Any]:
        """All of the endpoint's RunPod settings (a copy): workersMin, workersMax, idleTimeout, …"""
        with self._lock:
            return dict(self.settings[endpoint])

    def saves(self) -> list[dict[str, Any]]:
        """Every saveEndpoint request, in order: its input as parsed and the status answered."""
        return [{"input": r.get("input"), "status": r.get("status"), "errors": r.get("errors")}
                for r in list(self.requests) if r.get("op") == "saveEndpoint"]

    def pods(self, include_gone: bool = False) -> list[dict[str, Any]]:
        """Pods as the emulator holds them: name and env exactly as parsed from the GraphQL text."""
        with self._lock:
            self._advance()
            pods = [*self._pods.values(), *(self._gone if include_gone else [])]
            return [self._record(p) for p in pods]

    def alive(self) -> list[str]:
        """Ids of pods whose command is still running as a local process."""
        with self._lock:
            self._advance()
            return [p.id for p in self._pods.values() if p.running()]

    def billing(self) -> dict[str, Any]:
        """Money accrued: pods at costPerHr × seconds from creation to termination, requests at
        execution seconds × the endpoint's per-second price."""
        now = time.time()
        with self._lock:
            pods = {p.id: round(p.cost(now), 8) for p in [*self._gone, *self._pods.values()]}
            serverless: dict[str, float] = {}
            for job in self._jobs.values():
                price = self._per_second(job.endpoint)
                serverless[job.endpoint] = round(serverless.get(job.endpoint, 0.0) + job.ran(now) * price, 8)
        return {"pods": pods, "serverless": serverless, "total": round(sum(pods.values()) + sum(serverless.values()), 8)}

    def jobs(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            return [{"id": j.id, "endpoint": j.endpoint, "input": j.input, "status": j.status(now),
                     "executionTime": int(j.ran(now) * 1000)} for j in self._jobs.values()]

    def pod_log(self, pod_id: str) -> str:
        with self._lock:
            pod = self._pods.get(pod_id) or next((p for p in self._gone if p.id == pod_id), None)
        if pod is None or not pod.log_path or not os.path.exists(pod.log_path):
            return ""
        with open(pod.log_path, errors="replace") as fh:
            return fh.read()

    def state(self) -> dict[str, Any]:
        with self._lock:
            endpoints = {name: dict(record) for name, record in self.settings.items()}
        return {"pods": self.pods(include_gone=True), "alive": self.alive(), "jobs": self.jobs(),
                "requests": list(self.requests), "billing": self.billing(), "up": self.is_up, "endpoints": endpoints}

    # --- time passing ------------------------------------------------------------------------------

    def _tick(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                self._advance()

    def _advance(self) -> None:
        now = time.time()
        for job in self._jobs.values():
            if job.released is None and job.cancelled_at is None and self.settings[job.endpoint]["workersMax"] > 0:
                job.released = now
        for pod in self._pods.values():
            if pod.desired != "RUNNING":
                continue
            if pod.process is None:
                if pod.gpu_type_id not in self._stuck and now - pod.created >= self.boot_delay:
                    self._boot(pod)
            elif pod.exit_code is None and (code := pod.process.poll()) is not None:
                pod.exit_code, pod.desired = code, "EXITED"

    def _boot(self, pod: _Pod) -> None:
        env = {**pod.env, "RUNPOD_POD_ID": pod.id, "RUNPOD_GPU_COUNT": str(pod.gpu_count),
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        pod.log_path = os.path.join(self._logs, f"{pod.id}.log")
        with open(pod.log_path, "wb") as log:
            pod.process = subprocess.Popen(["sh", "-c", pod.docker_args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=self._logs, start_new_session=True)
        pod.booted_at = time.time()

    def _kill(self, pod: _Pod) -> None:
        if pod.process is not None and pod.process.poll() is None:
            try:
                os.killpg(pod.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pod.process.wait(timeout=5)

    def _end(self, pod: _Pod) -> None:
        self._kill(pod)
        pod.ended_at = time.time()
        pod.desired = "TERMINATED"
        stock = self.gpu_types.get(pod.gpu_type_id, {}).get("stock", {})
        stock[pod.cloud] = stock.get(pod.cloud, 0) + pod.gpu_count
        self._gone.append(pod)

    # --- HTTP plumbing -----------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer._serve(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                outer._serve(self, "POST")

        return Handler

    def _serve(self, http: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(http.path).path
        raw = http.rfile.read(int(http.headers.get("content-length") or 0))
        if path.startswith("/_emulator/"):
            self.control_requests.append({"method": method, "path": path})
            status, payload, headers = self._control(method, path, _json(raw))
            return _send(http, status, payload, headers)
        entry: dict[str, Any] = {"at": time.time(), "method": method, "path": path,
                                 "authorized": http.headers.get("Authorization") == f"Bearer {self.api_key}"}
        self.requests.append(entry)
        status, payload, headers = self._answer(method, path, raw, entry)
        entry["status"] = status
        if delay := self._hang_for(path, entry.get("op")):
            time.sleep(delay)
        _send(http, status, payload, headers)

    def _answer(self, method: str, path: str, raw: bytes,
                entry: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        graphql = path == "/graphql"
        fault = self._fault_for(path)
        if fault is not None:
            return _fault_answer(fault, graphql)
        if not entry["authorized"]:
            return 401, ({"errors": [{"message": "Unauthorized"}]} if graphql else "401 Unauthorized"), {}
        body = _json(raw)
        if graphql:
            query = str((body or {}).get("query", "")) if isinstance(body, dict) else ""
            entry["query"] = query
            return self._graphql(query, entry)
        entry["body"] = body
        return self._serverless(method, path, body)

    def _fault_for(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and (fault.paths is None or any(path.startswith(p) for p in fault.paths)):
                    fault.remaining -= 1
                    return fault
        return None

    def _hang_for(self, path: str, op: str | None) -> float:
        with self._lock:
            for hang in self._hangs:
                if hang.remaining > 0 and (hang.paths is None or any(path.startswith(p) for p in hang.paths)) \
                        and (hang.ops is None or op in hang.ops):
                    hang.remaining -= 1
                    return hang.seconds
        return 0.0

    # --- serverless --------------------------------------------------------------------------------

    def _serverless(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "v2":
            return 404, {"error": "not found"}, {}
        endpoint, action, rest = parts[1], parts[2], parts[3:]
        if endpoint not in self.endpoints:
            return 404, {"error": f"endpoint {endpoint} not found"}, {}
        if method == "POST" and action == "runsync" and not rest:
            with self._lock:
                status, answer, headers = self._submit(endpoint, body)
            return self._wait(answer["id"]) if status == 200 else (status, answer, headers)
        with self._lock:
            if method == "POST" and action == "run" and not rest:
                return self._submit(endpoint, body)
            if method == "GET" and action in ("status", "stream") and len(rest) == 1:
                return self._status(endpoint, rest[0], stream=action == "stream")
            if method == "POST" and action == "cancel" and len(rest) == 1:
                return self._cancel(endpoint, rest[0])
            if method == "GET" and action == "health" and not rest:
                return 200, self._health(endpoint), {}
            if method == "POST" and action == "purge-queue" and not rest:
                return 200, self._purge(endpoint), {}
        return 404, {"error": "not found"}, {}

    def _submit(self, endpoint: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return 400, {"error": "request body must be a JSON object with an 'input' object"}, {}
        cfg = self.endpoints[endpoint]
        policy: dict[str, Any] = body["policy"] if isinstance(body.get("policy"), dict) else {}
        outcome, error = cfg["fail_next"].pop(0) if cfg["fail_next"] else ("COMPLETED", None)
        worker = cfg.get("worker")
        if outcome == "COMPLETED" and (worker == FASTER_WHISPER or (worker is None and _looks_like_whisper_input(body["input"]))):
            # The worker runs (and is billed) before its validator or handler fails the request.
            if (refused := whisper_error(body["input"])) is not None:
                outcome, error = "FAILED", refused
        exec_s = float(cfg["delay_seconds"])
        limit = float(policy["executionTimeout"]) / 1000 if policy.get("executionTimeout") else None
        if outcome == "TIMED_OUT":
            limit = min(limit, exec_s) if limit is not None else exec_s
            exec_s = limit + 1.0
        now = time.time()
        job = _Request(id=f"{uuid.uuid4()}-u1", endpoint=endpoint, input=body["input"], submitted=now,
                       queue_s=float(cfg.get("queue_seconds", self.queue_seconds)), exec_s=exec_s, outcome=outcome,
                       error=(error or "handler raised RuntimeError: emulated failure") if outcome == "FAILED" else None,
                       limit_s=limit, released=now if self.settings[endpoint]["workersMax"] > 0 else None)
        self._jobs[job.id] = job
        return 200, {"id": job.id, "status": "IN_QUEUE"}, {}

    def _wait(self, job_id: str, seconds: float = 5.0) -> tuple[int, Any, dict[str, str]]:
        """``runsync``: hold the answer until the request finishes, or ``seconds`` pass."""
        job = self._jobs[job_id]
        deadline = time.time() + seconds
        while job.status(time.time()) in ("IN_QUEUE", "IN_PROGRESS") and time.time() < deadline:
            time.sleep(0.01)
        with self._lock:
            return 200, self._view(job), {}

    def _view(self, job: _Request) -> dict[str, Any]:
        now = time.time()
        status = job.status(now)
        out: dict[str, Any] = {"id": job.id, "status": status}
        if status != "IN_QUEUE":
            out["delayTime"] = int(job.waited() * 1000)
        if status not in ("IN_QUEUE", "IN_PROGRESS"):
            out["executionTime"] = int(job.ran(now) * 1000)
        if status == "COMPLETED":
            out["output"] = output_for(job.input, self.endpoints[job.endpoint].get("worker"))
            out["workerId"] = f"{job.endpoint}-worker-1"
        if status == "FAILED":
            out["error"] = job.error
        return out

    def _status(self, endpoint: str, job_id: str, stream: bool) -> tuple[int, Any, dict[str, str]]:
        job = self._jobs.get(job_id)
        if job is None or job.endpoint != endpoint:
            return 404, {"error": "request does not exist"}, {}
        view = self._view(job)
        if not stream:
            return 200, view, {}
        chunks = []
        if view["status"] == "COMPLETED" and not job.streamed:
            job.streamed = True
            chunks = [{"output": view["output"]}]
        return 200, {"status": view["status"], "stream": chunks}, {}

    def _cancel(self, endpoint: str, job_id: str) -> tuple[int, Any, dict[str, str]]:
        job = self._jobs.get(job_id)
        if job is None or job.endpoint != endpoint:
            return 404, {"error": "request does not exist"}, {}
        if job.status(time.time()) in ("IN_QUEUE", "IN_PROGRESS"):
            job.cancelled_at = time.time()
        return 200, {"id": job.id, "status": job.status(time.time())}, {}

    def _health(self, endpoint: str) -> dict[str, Any]:
        now = time.time()
        counts: dict[str, int] = {}
        for job in self._jobs.values():
            if job.endpoint == endpoint:
                status = job.status(now)
                counts[status] = counts.get(status, 0) + 1
        workers = min(int(self.endpoints[endpoint]["workers"]), int(self.settings[endpoint]["workersMax"]))
        busy = min(workers, counts.get("IN_PROGRESS", 0))
        return {"jobs": {"completed": counts.get("COMPLETED", 0), "failed": counts.get("FAILED", 0),
                         "inProgress": counts.get("IN_PROGRESS", 0), "inQueue": counts.get("IN_QUEUE", 0), "retried": 0},
                "workers": {"idle": workers - busy, "running": busy, "ready": workers - busy, "initializing": 0,
                            "throttled": 0, "unhealthy": 0}}

    def _purge(self, endpoint: str) -> dict[str, Any]:
        now = time.time()
        removed = 0
        for job in self._jobs.values():
            if job.endpoint == endpoint and job.status(now) == "IN_QUEUE":
                job.cancelled_at, removed = now, removed + 1
        return {"removed": removed, "status": "completed"}

    def _per_second(self, endpoint: str) -> float:
        cfg = self.endpoints.get(endpoint, {})
        if cfg.get("price_per_second") is not None:
            return float(cfg["price_per_second"])
        return float(cfg.get("price_per_hour") or 0.0) / 3600

    # --- GraphQL -----------------------------------------------------------------------------------

    _OPERATIONS = (
        ("podFindAndDeployOnDemand", r"\bpodFindAndDeployOnDemand\s*\("),
        ("podRentInterruptable", r"\bpodRentInterruptable\s*\("),
        ("podTerminate", r"\bpodTerminate\s*\("),
        ("podStop", r"\bpodStop\s*\("),
        ("saveEndpoint", r"\bsaveEndpoint\s*\("),
        ("pod", r"\bpod\s*\(\s*input"),
        ("myself", r"\bmyself\s*\{"),
        ("gpuType", r"\bgpuTypes\s*\(\s*input"),
        ("gpuTypes", r"\bgpuTypes\s*\{"),
    )

    def _graphql(self, query: str, entry: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        op = next((name for name, pattern in self._OPERATIONS if re.search(pattern, query)), None)
        entry["op"] = op
        if op is None:
            return 400, {"errors": [{"message": "Cannot query this field (unknown to the emulator)"}]}, {}
        try:
            with self._lock:
                self._advance()
                handler = getattr(self, f"_gql_{op}")
                data = handler(query, entry) if op == "saveEndpoint" else handler(query)
        except GraphQLSyntaxError as exc:
            entry["errors"] = [str(exc)]
            return 400, {"errors": [{"message": str(exc)}]}, {}
        except _GraphQLError as exc:
            entry["errors"] = [str(exc)]
            return 200, {"errors": [{"message": str(exc), "path": [op]}], "data": {op: None}}, {}
        return 200, {"data": data}, {}

    def _gql_gpuTypes(self, query: str) -> dict[str, Any]:  # noqa: N802
        return {"gpuTypes": [{"id": g["id"], "displayName": g["displayName"], "memoryInGb": g["memoryInGb"]}
                             for g in self.gpu_types.values()]}

    def _gql_gpuType(self, query: str) -> dict[str, Any]:  # noqa: N802
        gpu = self.gpu_types.get(str(input_of(query, "gpuTypes").get("id")))
        if gpu is None:
            return {"gpuTypes": []}
        count_match = re.search(r"lowestPrice\s*\(\s*input\s*:\s*\{\s*gpuCount\s*:\s*(\d+)", query)
        count = int(count_match[1]) if count_match else 1
        on_demand = [gpu[_PRICE_KEYS[c][0]] for c in CLOUDS if self._available(gpu, c) >= count and gpu.get(_PRICE_KEYS[c][0])]
        spot = [gpu[_PRICE_KEYS[c][1]] for c in CLOUDS if self._available(gpu, c) >= count and gpu.get(_PRICE_KEYS[c][1])]
        return {"gpuTypes": [{
            "maxGpuCount": gpu.get("maxGpuCount", 8), "id": gpu["id"], "displayName": gpu["displayName"],
            "manufacturer": "Nvidia", "memoryInGb": gpu["memoryInGb"], "cudaCores": 0,
            "secureCloud": bool(gpu.get("securePrice")), "communityCloud": bool(gpu.get("communityPrice")),
            "securePrice": gpu.get("securePrice"), "communityPrice": gpu.get("communityPrice"),
            "oneMonthPrice": None, "threeMonthPrice": None, "oneWeekPrice": None,
            "communitySpotPrice": gpu.get("communitySpotPrice"), "secureSpotPrice": gpu.get("secureSpotPrice"),
            "lowestPrice": {"minimumBidPrice": min(spot) if spot else None,
                            "uninterruptablePrice": min(on_demand) if on_demand else None},
        }]}

    def _available(self, gpu: dict[str, Any], cloud: str) -> int:
        return 0 if gpu["id"] in self._no_stock else int(gpu["stock"].get(cloud, 0))

    def _gql_podFindAndDeployOnDemand(self, query: str) -> dict[str, Any]:  # noqa: N802
        return self._deploy(query, "podFindAndDeployOnDemand", spot=False)

    def _gql_podRentInterruptable(self, query: str) -> dict[str, Any]:  # noqa: N802
        return self._deploy(query, "podRentInterruptable", spot=True)

    def _deploy(self, query: str, op: str, spot: bool) -> dict[str, Any]:
        spec = input_of(query, op)
        for required in ("name", "imageName", "gpuTypeId"):
            if not isinstance(spec.get(required), str):
                raise GraphQLSyntaxError(f"Field \"{required}\" of required type \"String!\" was not provided.")
        gpu = self.gpu_types.get(spec["gpuTypeId"])
        if gpu is None:
            raise _GraphQLError(f"Unknown GPU type: {spec['gpuTypeId']}")
        count = int(spec.get("gpuCount") or 1)
        clouds = [c for c in CLOUDS if spec.get("cloudType", "ALL") in ("ALL", c)]
        key = 1 if spot else 0
        clouds = sorted((c for c in clouds if gpu.get(_PRICE_KEYS[c][key]) and self._available(gpu, c) >= count),
                        key=lambda c: gpu[_PRICE_KEYS[c][key]])
        if not clouds:
            raise _GraphQLError(CAPACITY_ERROR)
        cloud = clouds[0]
        per_gpu = float(gpu[_PRICE_KEYS[cloud][key]])
        if spot:
            bid = float(spec.get("bidPerGpu") or 0)
            if bid < per_gpu:
                raise _GraphQLError(f"Your bid of {bid} per GPU is lower than the current minimum bid of {per_gpu}.")
            per_gpu = bid
        env = {str(item["key"]): str(item["value"]) for item in spec.get("env") or []}
        pod = _Pod(id=uuid.uuid4().hex[:14], name=spec["name"], image=spec["imageName"], gpu_type_id=gpu["id"],
                   gpu_count=count, cloud=cloud, interruptible=spot, cost_per_hr=round(per_gpu * count, 6), env=env,
                   docker_args=str(spec.get("dockerArgs") or ""), container_disk_gb=int(spec.get("containerDiskInGb") or 10),
                   volume_gb=int(spec.get("volumeInGb") or 0), created=time.time(),
                   country_code=spec.get("countryCode"), ports=spec.get("ports"))
        gpu["stock"][cloud] = gpu["stock"].get(cloud, 0) - count
        self._pods[pod.id] = pod
        created: dict[str, Any] = {"id": pod.id, "imageName": pod.image, "env": [f"{k}={v}" for k, v in env.items()],
                   "machineId": pod.machine_id, "machine": {"podHostId": f"{pod.id}-{pod.machine_id[:8]}"}}
        if "costPerHr" in query:
            created["costPerHr"] = pod.cost_per_hr
        return {op: created}

    def _pod_by_input(self, query: str, op: str) -> _Pod:
        pod = self._pods.get(str(input_of(query, op).get("podId")))
        if pod is None:
            raise _GraphQLError("Pod not found")
        return pod

    def _gql_podTerminate(self, query: str) -> dict[str, Any]:  # noqa: N802
        pod = self._pod_by_input(query, "podTerminate")
        del self._pods[pod.id]
        self._end(pod)
        return {"podTerminate": None}

    def _gql_podStop(self, query: str) -> dict[str, Any]:  # noqa: N802
        pod = self._pod_by_input(query, "podStop")
        self._kill(pod)
        pod.desired = "EXITED"
        return {"podStop": {"id": pod.id, "desiredStatus": pod.desired}}

    def _gql_pod(self, query: str) -> dict[str, Any]:
        pod = self._pods.get(str(input_of(query, "pod").get("podId")))
        return {"pod": self._view_pod(pod) if pod else None}

    def _gql_myself(self, query: str) -> dict[str, Any]:
        if re.search(r"\bpods\s*\{", query):
            return {"myself": {"pods": [self._view_pod(p) for p in self._pods.values()]}}
        if re.search(r"\bendpoints\s*\{", query):
            return {"myself": {"endpoints": [self._view_endpoint(name) for name in self.settings]}}
        return {"myself": {"id": "user-emulated", "pubKey": "", "networkVolumes": []}}

    def _view_endpoint(self, name: str) -> dict[str, Any]:
        """An endpoint as ``myself { endpoints {…} }`` shows it (the SDK's get_endpoints fields)."""
        record = self.settings[name]
        return {**record, "aiKey": None, "type": "QB", "userId": "user-emulated", "version": 0, "workersStandby": 0,
                "env": [], "createdAt": "2026-01-01T00:00:00.000Z", "networkVolume": None}

    def _gql_saveEndpoint(self, query: str, entry: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        spec = input_of(query, "saveEndpoint")
        entry["input"] = spec
        for required in ENDPOINT_REQUIRED:
            if not isinstance(spec.get(required), str):
                raise GraphQLSyntaxError(f"Field \"{required}\" of required type \"String!\" was not provided.")
        for key in ("workersMin", "workersMax", "idleTimeout", "scalerValue", "gpuCount"):
            if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool)):
                raise GraphQLSyntaxError(f"Int cannot represent non-integer value: {spec[key]!r} ({key})")
        endpoint_id = spec.get("id")
        if endpoint_id is None:
            raise _GraphQLError("the emulator does not create endpoints: saveEndpoint needs the id of an existing one")
        if endpoint_id not in self.settings:
            raise _GraphQLError(f"Endpoint {endpoint_id} not found")  # wording unverified
        record = {**ENDPOINT_DEFAULTS, **{k: v for k, v in spec.items() if k in ENDPOINT_DEFAULTS or k in ENDPOINT_REQUIRED}}
        if record["workersMin"] < 0 or record["workersMax"] < 0:
            raise _GraphQLError("workersMin and workersMax must not be negative")
        if record["workersMin"] > record["workersMax"]:
            raise _GraphQLError("Max workers must be greater than or equal to min workers")  # wording unverified
        self.settings[endpoint_id] = {**record, "id": endpoint_id}
        self._advance()
        return {"saveEndpoint": {key: value for key, value in self.settings[endpoint_id].items()
                                 if re.search(rf"\b{key}\b", _selection(query, "saveEndpoint"))}}

    def _view_pod(self, pod: _Pod) -> dict[str, Any]:
        now = time.time()
        running = pod.running()
        gpu = self.gpu_types.get(pod.gpu_type_id, {})
        uptime = int(now - pod.booted_at) if running and pod.booted_at else 0
        return {
            "id": pod.id, "name": pod.name, "containerDiskInGb": pod.container_disk_gb, "costPerHr": pod.cost_per_hr,
            "desiredStatus": pod.desired, "dockerArgs": pod.docker_args, "dockerId": None,
            "env": [f"{k}={v}" for k, v in pod.env.items()], "gpuCount": pod.gpu_count, "imageName": pod.image,
            "lastStatusChange": f"Rented by User: {_js_date(pod.created)}", "machineId": pod.machine_id,
            "memoryInGb": 62, "podType": "INTERRUPTABLE" if pod.interruptible else "RESERVED", "port": None,
            "ports": pod.ports or "", "uptimeSeconds": uptime, "vcpuCount": 8, "volumeInGb": pod.volume_gb,
            "volumeMountPath": "/workspace",
            "runtime": {"uptimeInSeconds": uptime, "ports": [], "gpus": [{"id": f"GPU-{pod.machine_id}"}]} if running else None,
            "machine": {"gpuDisplayName": gpu.get("displayName", pod.gpu_type_id),
                        "podHostId": f"{pod.id}-{pod.machine_id[:8]}"},
        }

    def _record(self, pod: _Pod) -> dict[str, Any]:
        return {"id": pod.id, "name": pod.name, "image": pod.image, "gpu_type_id": pod.gpu_type_id,
                "gpu_count": pod.gpu_count, "cloud": pod.cloud, "interruptible": pod.interruptible,
                "cost_per_hr": pod.cost_per_hr, "env": dict(pod.env), "docker_args": pod.docker_args,
                "desired_status": pod.desired, "booted": pod.booted_at is not None, "running": pod.running(),
                "exit_code": pod.exit_code, "created": pod.created, "ended": pod.ended_at,
                "country_code": pod.country_code, "container_disk_gb": pod.container_disk_gb}

    # --- HTTP controls -----------------------------------------------------------------------------

    def _control(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        """``/_emulator/…``: the Python controls for tests that drive the emulator from another process."""
        body = body if isinstance(body, dict) else {}
        action = path.removeprefix("/_emulator/").strip("/")
        try:
            if method == "GET" and action == "state":
                return 200, self.state(), {}
            if method != "POST":
                return 405, {"error": "use POST"}, {}
            if action == "fail":
                self.fail(body["status"], body.get("count", 1), body.get("retry_after"), body.get("paths"))
            elif action == "hang":
                self.hang(body["seconds"], body.get("count", 1), body.get("paths"), body.get("ops"))
            elif action == "heal":
                self.heal()
            elif action == "out_of_stock":
                self.out_of_stock(body["gpu_type_id"], body.get("out", True))
            elif action == "stick":
                self.stick(body["gpu_type_id"], body.get("stuck", True))
            elif action == "preempt":
                return 200, {"preempted": self.preempt(body["pod_id"])}, {}
            elif action == "fail_next":
                self.fail_next(body["endpoint"], body.get("status", "FAILED"), body.get("count", 1), body.get("error"))
            elif action == "set_delay":
                self.set_delay(body["endpoint"], body["seconds"])
            elif action == "set_workers":
                self.set_workers(body["endpoint"], body.get("workers_max"), body.get("workers_min"))
            elif action == "down":
                seconds = float(body.get("seconds", 1.0))
                threading.Thread(target=self._outage, args=(seconds,), daemon=True).start()
            else:
                return 404, {"error": f"unknown control {action}"}, {}
        except (KeyError, ValueError, TypeError) as exc:
            return 400, {"error": f"bad control request: {exc!r}"}, {}
        return 200, {"ok": True}, {}

    def _outage(self, seconds: float) -> None:
        time.sleep(0.05)  # let the control request's answer go out first
        self.down(seconds)


def _selection(query: str, field_name: str) -> str:
    """The text of ``field_name(input: {…}) { … }``'s selection set (flat: enough for the fields we answer)."""
    match = re.search(rf"\b{field_name}\s*\(\s*input\s*:\s*", query)
    if not match:
        return ""
    _, pos = parse_value(query, match.end())  # past the input object, string literals and all
    start = query.find("{", pos)
    end = query.find("}", start)
    return query[start:end] if start >= 0 and end >= 0 else ""


class _GraphQLError(Exception):
    """An error RunPod reports in the body's ``errors`` (HTTP 200), like its capacity refusal."""


def _fault_answer(fault: _Fault, graphql: bool) -> tuple[int, Any, dict[str, str]]:
    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
    if fault.status in (502, 504):
        return fault.status, f"<html><body><h1>{fault.status} Bad Gateway</h1></body></html>", \
            {**headers, "content-type": "text/html"}
    message = {429: "Too Many Requests", 401: "Unauthorized"}.get(fault.status, f"emulated HTTP {fault.status}")
    return fault.status, ({"errors": [{"message": message}]} if graphql else {"error": message}), headers


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _send(http: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str]) -> None:
    content_type = headers.pop("content-type", None)
    if isinstance(payload, str):
        data, content_type = payload.encode(), content_type or "text/plain"
    else:
        data, content_type = json.dumps(payload).encode(), content_type or "application/json"
    try:
        http.send_response(status)
        http.send_header("content-type", content_type)
        http.send_header("content-length", str(len(data)))
        for name, value in headers.items():
            http.send_header(name, value)
        http.end_headers()
        http.wfile.write(data)
    except OSError:
        pass  # the client gave up (a hang outlived its timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Emulate RunPod's serverless and GraphQL APIs locally.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default=os.environ.get("RUNPOD_API_KEY", DEFAULT_KEY))
    parser.add_argument("--boot-delay", type=float, default=0.2)
    args = parser.parse_args(argv)
    emulator = RunPodEmulator(api_key=args.key, boot_delay=args.boot_delay, port=args.port, host=args.host)
    print(json.dumps({"url": emulator.url, "graphql": emulator.graphql_url, "serverless": emulator.serverless_url,
                      "endpoints": sorted(emulator.endpoints), "gpu_types": sorted(emulator.gpu_types)}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    emulator.close()


if __name__ == "__main__":
    main()
