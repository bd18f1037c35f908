"""Serverless endpoints: a job is one request (``/run`` → ``/status`` → ``/cancel``). Nothing is
rented, so the lease is free and the cost is the request's execution time × the endpoint's price.
An endpoint's workers are RunPod's to start; ``autoscaling`` only moves its ceiling (workersMax), so
offers keep the configured ``max_workers`` as capacity and a request sent while the ceiling is zero
waits IN_QUEUE at RunPod until the beat raises it.

Inference requests carry the job's spec as it is (``{"kind", **spec}``). Transcription requests are
written for RunPod's faster-whisper worker (runpod-workers/worker-faster_whisper), which validates its
input strictly — a key it does not know fails the request — and answers ``segments``,
``detected_language`` and ``transcription``; that answer goes through
``providers.transcription.transcription_result`` so the job's result has the shape every provider gives."""

from __future__ import annotations

import re
import time
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from providers.base import (
    JobSpec,
    Lease,
    NoCapacity,
    Offer,
    PermanentProviderError,
    Requirements,
    RunHandle,
    RunStatus,
)
from providers.runpod.api import Api
from providers.runpod.config import EndpointConfig
from providers.runpod.errors import ApiError
from providers.runpod.matching import fits
from providers.transcription import language_code, transcription_result

RUNNING = {"IN_QUEUE", "IN_PROGRESS"}
FINISHED = {"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"}
# A FAILED request is the job's fault unless the error says the worker itself went away.
_WORKER_LOST = re.compile(r"worker (died|exited|was (killed|terminated|lost)|lost|crashed)|unhealthy worker|"
                          r"out of memory|oom[- ]?kill", re.IGNORECASE)
MIN_EXECUTION_TIMEOUT_MS = 5_000  # RunPod's lower bound for policy.executionTimeout
# The models RunPod's faster-whisper worker loads, by the names it accepts (anything else fails the request).
WHISPER_WORKER_MODELS = frozenset({"tiny", "base", "small", "medium", "large-v1", "large-v2", "large-v3",
                                   "distil-large-v2", "distil-large-v3", "turbo"})
# Options of ours the worker also takes, by its names and types (its validator rejects ints for floats & co).
_WHISPER_OPTIONS: dict[str, tuple[str, type]] = {
    "prompt": ("initial_prompt", str), "word_timestamps": ("word_timestamps", bool), "enable_vad": ("enable_vad", bool)}


class Serverless:
    def __init__(self, provider: str, endpoints: list[EndpointConfig], api: Api) -> None:
        self.provider = provider
        self.endpoints = {e.endpoint_id: e for e in endpoints}
        self.api = api

    # --- offers / reserve -----------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        if kind == "transcription" and not _reachable_audio(spec):
            return []  # a worker at RunPod cannot open a file on this machine: let a provider that can take it
        offers = [self._offer(e) for e in self.endpoints.values() if kind in e.kinds and _serves(e, spec)]
        return [o for o in offers if fits(o, req, *self.endpoints[o.data["endpoint_id"]].gpu_types)]

    def _offer(self, e: EndpointConfig) -> Offer:
        return Offer(provider=self.provider, offer_id=f"endpoint:{e.endpoint_id}", gpu=e.gpu, gpu_count=e.gpu_count,
                     gpu_memory_gb=e.gpu_memory_gb, region=e.region, price_per_hour=round(e.per_second * 3600, 6),
                     capacity=e.max_workers, kinds=list(e.kinds),
                     data={"type": "serverless", "endpoint_id": e.endpoint_id, "price_per_second": e.per_second})

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        endpoint = self.endpoints.get(str(offer.data.get("endpoint_id") or offer.offer_id.removeprefix("endpoint:")))
        if endpoint is None:
            raise NoCapacity(f"RunPod endpoint of offer {offer.offer_id} is no longer configured")
        # Nothing is rented: the lease costs nothing by time; poll reports the request's cost.
        return Lease(provider=self.provider, offer_id=offer.offer_id, external_id="", label=job.label,
                     price_per_hour=0.0, reserved_at=time.time(),
                     data={"type": "serverless", "endpoint_id": endpoint.endpoint_id,
                           "price_per_second": endpoint.per_second})

    # --- run ------------------------------------------------------------------------------------

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        endpoint_id = lease.data["endpoint_id"]
        if job.kind == "transcription":
            worker_input = whisper_input(job.spec)
        else:
            worker_input = {"kind": job.kind, **job.spec}
        body = {"input": worker_input,
                "policy": {"executionTimeout": max(MIN_EXECUTION_TIMEOUT_MS, job.timeout_seconds * 1000)}}
        timeout = self.api.request_timeout()
        # Not repeated on a timeout: the request may have been queued, and a second one would run twice.
        answer = self.api.serverless(endpoint_id, f"submitting to endpoint {endpoint_id}",
                                     lambda client: client.post(f"{endpoint_id}/run", body, timeout=timeout),
                                     safe_to_repeat=False)
        request_id = answer.get("id") if isinstance(answer, dict) else None
        if not request_id:
            raise ApiError(f"RunPod endpoint {endpoint_id} accepted the request but returned no id")
        data: dict[str, Any] = {"type": "serverless", "endpoint_id": endpoint_id, "request_id": request_id,
                                "price_per_second": lease.data.get("price_per_second", 0.0)}
        if job.kind == "transcription":
            # What poll needs to shape the answer (hint, declared length, subtitles wanted): the handle is
            # all a worker that picks the run up later has.
            data["transcription"] = {k: job.spec[k] for k in ("model", "language", "duration_seconds", "formats")
                                     if job.spec.get(k) is not None}
        return RunHandle(provider=self.provider, lease=lease, started_at=time.time(), data=data)

    def poll(self, handle: RunHandle) -> RunStatus:
        endpoint_id, request_id = handle.data["endpoint_id"], handle.data["request_id"]
        timeout = self.api.request_timeout()
        try:
            answer = self.api.serverless(endpoint_id, f"checking request {request_id}",
                                         lambda client: client.get(f"{endpoint_id}/status/{request_id}", timeout=timeout),
                                         safe_to_repeat=True)
        except ApiError as exc:
            if exc.status == 404:
                return RunStatus(state="failed", transient=True,
                                 error=f"RunPod no longer knows request {request_id} on endpoint {endpoint_id}")
            raise
        if not isinstance(answer, dict):
            raise ApiError(f"RunPod answered the status of request {request_id} with {type(answer).__name__}")
        status = str(answer.get("status", ""))
        if status in FINISHED:
            handle.data["finished"] = True  # release() then has nothing to cancel
        return _status(answer, float(handle.data.get("price_per_second") or 0.0), handle.data.get("transcription"),
                       endpoint_id)

    def release(self, handle: RunHandle | None) -> None:
        """Cancel the request unless it already finished. Idempotent: cancelling twice is harmless."""
        if handle is None or handle.data.get("finished") or not handle.data.get("request_id"):
            return
        endpoint_id, request_id = handle.data["endpoint_id"], handle.data["request_id"]
        timeout = self.api.request_timeout()
        try:
            self.api.serverless(endpoint_id, f"cancelling request {request_id}",
                                lambda client: client.post(f"{endpoint_id}/cancel/{request_id}", None, timeout=timeout),
                                safe_to_repeat=True)
        except ApiError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                return  # unknown or already finished: nothing left to stop
            raise
        handle.data["finished"] = True

    def health(self, timeout: float) -> str:
        """One cheap ``/health`` call per endpoint; raises on failure."""
        details = []
        for endpoint_id in self.endpoints:
            answer = self.api.serverless(endpoint_id, f"checking endpoint {endpoint_id}",
                                         partial(_get, path=f"{endpoint_id}/health", timeout=timeout),
                                         safe_to_repeat=True, timeout=timeout, retries=False)
            workers = answer.get("workers", {}) if isinstance(answer, dict) else {}
            details.append(f"endpoint {endpoint_id}: {workers.get('idle', '?')} idle, {workers.get('running', '?')} busy")
        return "; ".join(details)

    def requests_held(self, endpoint_id: str) -> int | None:
        """Requests RunPod holds for the endpoint (waiting for a worker, or running) by its ``/health``:
        the autoscaler's measure of work there, whoever sent it. None when the answer does not say
        (the shape of ``/health`` is unverified), so the caller can fall back to its own count."""
        timeout = self.api.request_timeout()
        answer = self.api.serverless(endpoint_id, f"checking the load of endpoint {endpoint_id}",
                                     partial(_get, path=f"{endpoint_id}/health", timeout=timeout),
                                     safe_to_repeat=True)
        jobs = answer.get("jobs") if isinstance(answer, dict) else None
        if not isinstance(jobs, dict):
            return None
        counts = [jobs.get(key) for key in ("inQueue", "inProgress")]
        numbers = [int(c) for c in counts if isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0]
        return sum(numbers) if numbers else None


def _get(client: Any, path: str, timeout: float) -> Any:
    return client.get(path, timeout=timeout)


def _serves(endpoint: EndpointConfig, spec: dict[str, Any]) -> bool:
    return not endpoint.models or spec.get("model") in endpoint.models


def _reachable_audio(spec: dict[str, Any]) -> bool:
    """Whether a worker elsewhere can fetch the job's audio: not a local path or ``file://`` URL. A spec
    without audio (``gpufleet offers`` asking in general) is answered as reachable."""
    audio = str(spec.get("audio_url") or "")
    return not audio or urlsplit(audio).scheme not in ("", "file")


def whisper_model(name: str) -> str:
    """Our model name as the faster-whisper worker knows it: ``whisper-large-v3`` and
    ``openai/whisper-large-v3`` → ``large-v3``, ``whisper-large-v3-turbo`` → ``turbo``. A name that maps to
    none of its models is sent as given: a forked worker may load others, and the stock one says it has not."""
    short = name.strip().lower().rsplit("/", 1)[-1]
    for prefix in ("faster-whisper-", "whisper-"):
        short = short.removeprefix(prefix)
    short = "turbo" if short in ("large-v3-turbo", "turbo") else short
    return short if short in WHISPER_WORKER_MODELS else name


def whisper_input(spec: dict[str, Any]) -> dict[str, Any]:
    """The faster-whisper worker's input for a transcription job. Only keys it knows, with the types its
    validator wants: it fails a request with any other key. Plain text is asked for because subtitles are
    rendered here from the segments (``providers.transcription``), the same way for every provider."""
    audio = str(spec.get("audio_url") or "")
    if not audio:
        raise PermanentProviderError("transcription jobs need an 'audio_url'")
    if not _reachable_audio(spec):
        raise PermanentProviderError(f"RunPod workers cannot read the local audio {audio}: give an http(s) URL "
                                     "or an s3:// input gpufleet presigns")
    worker: dict[str, Any] = {"audio": audio, "transcription": "plain_text"}
    if spec.get("model"):
        worker["model"] = whisper_model(str(spec["model"]))
    if language := language_code(spec.get("language")):  # Whisper wants "en", not "english"
        worker["language"] = language
    for ours, (theirs, kind) in _WHISPER_OPTIONS.items():
        if spec.get(ours) is not None:
            worker[theirs] = kind(spec[ours])
    return worker


def _transcript(output: Any, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The uniform result from the worker's answer; None when the answer is not a transcript at all
    (an endpoint running another worker), which fails the job instead of storing an empty text."""
    # Segments are what the worker always sends (``transcription`` alone could be anything: an echo of our input
    # has one); a plain ``text`` is accepted from forks that answer OpenAI's way.
    if not isinstance(output, dict) or not (isinstance(output.get("segments"), list) or isinstance(output.get("text"), str)):
        return None
    tokens = [len(s["tokens"]) for s in output.get("segments") or []
              if isinstance(s, dict) and isinstance(s.get("tokens"), list)]
    result = transcription_result(output, model=str(wanted.get("model") or output.get("model") or "base"), spec=wanted)
    # The worker reports no usage: the tokens it decoded when the segments list them, else the words.
    result["usage"] = {"total_tokens": sum(tokens) if tokens else len(result["text"].split())}
    return dict(result)


def _status(answer: dict[str, Any], per_second: float, transcription: dict[str, Any] | None = None,
            endpoint_id: str = "") -> RunStatus:
    status = str(answer.get("status", ""))
    cost = round(float(answer.get("executionTime") or 0) / 1000 * per_second, 8) if per_second else None
    if status in RUNNING or not status:
        return RunStatus(state="running", provisioning=status == "IN_QUEUE")
    if status == "COMPLETED":
        output = answer.get("output")
        if transcription is not None:
            result = _transcript(output, transcription)
            if result is None:
                return RunStatus(state="failed", cost=cost,
                                 error=f"RunPod endpoint {endpoint_id} answered the transcription without a transcript "
                                       f"(got {_shape(output)}): is it running the faster-whisper worker?")
            return RunStatus(state="succeeded", result=result, cost=cost)
        return RunStatus(state="succeeded", result=output if isinstance(output, dict) else {"output": output}, cost=cost)
    if status == "FAILED":
        error = str(answer.get("error") or "no error given")[:2000]
        return RunStatus(state="failed", error=f"RunPod request failed: {error}", transient=bool(_WORKER_LOST.search(error)),
                         cost=cost)
    if status == "TIMED_OUT":
        return RunStatus(state="failed", transient=True, cost=cost,
                         error="RunPod request timed out (the endpoint's execution timeout or the request's TTL)")
    if status == "CANCELLED":
        return RunStatus(state="failed", error="cancelled by RunPod", cost=cost)
    return RunStatus(state="running")


def _shape(output: Any) -> str:
    """What an unexpected answer was, briefly: its keys or its type, never its (possibly long) content."""
    if isinstance(output, dict):
        return "keys " + ", ".join(sorted(map(str, output))[:8]) if output else "an empty object"
    return type(output).__name__
