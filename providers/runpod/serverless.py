"""Serverless endpoints: a job is one request (``/run`` → ``/status`` → ``/cancel``). Nothing is
rented, so the lease is free and the cost is the request's execution time × the endpoint's price.
An endpoint's workers are RunPod's to start; ``autoscaling`` only moves its ceiling (workersMax), so
offers keep the configured ``max_workers`` as capacity and a request sent while the ceiling is zero
waits IN_QUEUE at RunPod until the beat raises it."""

from __future__ import annotations

import re
import time
from functools import partial
from typing import Any

from providers.base import JobSpec, Lease, NoCapacity, Offer, Requirements, RunHandle, RunStatus
from providers.runpod.api import Api
from providers.runpod.config import EndpointConfig
from providers.runpod.errors import ApiError
from providers.runpod.matching import fits

RUNNING = {"IN_QUEUE", "IN_PROGRESS"}
FINISHED = {"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"}
# A FAILED request is the job's fault unless the error says the worker itself went away.
_WORKER_LOST = re.compile(r"worker (died|exited|was (killed|terminated|lost)|lost|crashed)|unhealthy worker|"
                          r"out of memory|oom[- ]?kill", re.IGNORECASE)
MIN_EXECUTION_TIMEOUT_MS = 5_000  # RunPod's lower bound for policy.executionTimeout


class Serverless:
    def __init__(self, provider: str, endpoints: list[EndpointConfig], api: Api) -> None:
        self.provider = provider
        self.endpoints = {e.endpoint_id: e for e in endpoints}
        self.api = api

    # --- offers / reserve -----------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
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
        body = {"input": {"kind": job.kind, **job.spec},
                "policy": {"executionTimeout": max(MIN_EXECUTION_TIMEOUT_MS, job.timeout_seconds * 1000)}}
        timeout = self.api.request_timeout()
        # Not repeated on a timeout: the request may have been queued, and a second one would run twice.
        answer = self.api.serverless(endpoint_id, f"submitting to endpoint {endpoint_id}",
                                     lambda client: client.post(f"{endpoint_id}/run", body, timeout=timeout),
                                     safe_to_repeat=False)
        request_id = answer.get("id") if isinstance(answer, dict) else None
        if not request_id:
            raise ApiError(f"RunPod endpoint {endpoint_id} accepted the request but returned no id")
        return RunHandle(provider=self.provider, lease=lease, started_at=time.time(),
                         data={"type": "serverless", "endpoint_id": endpoint_id, "request_id": request_id,
                               "price_per_second": lease.data.get("price_per_second", 0.0)})

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
        return _status(answer, float(handle.data.get("price_per_second") or 0.0))

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


def _status(answer: dict[str, Any], per_second: float) -> RunStatus:
    status = str(answer.get("status", ""))
    cost = round(float(answer.get("executionTime") or 0) / 1000 * per_second, 8) if per_second else None
    if status in RUNNING or not status:
        return RunStatus(state="running", provisioning=status == "IN_QUEUE")
    if status == "COMPLETED":
        output = answer.get("output")
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
