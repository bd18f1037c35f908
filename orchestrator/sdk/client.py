"""The Python SDK: a small typed client over the HTTP API.

``Client(url, api_key)`` talks to a running API. ``Client.local()`` starts the embedded
stack inside this process first, so scripts and tests need no services — and still go
through exactly the same HTTP API, queues and workers as production.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
from pydantic import BaseModel

from orchestrator.batch_models import AppendOut, BatchItemOut, BatchItemPage, BatchRunOut, Estimate
from orchestrator.domain import BatchOut, JobOut, JobPage
from orchestrator.sdk.errors import ConnectionFailed, WaitTimeout, error_for

JobId = str | uuid.UUID


class BatchResult(BaseModel):
    batch_id: uuid.UUID
    created: int
    job_ids: list[uuid.UUID]


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> None:
        from orchestrator.settings import get_settings

        settings = get_settings()
        self.url = (url or settings.api_url).rstrip("/")
        self.api_key = api_key or settings.api_key
        self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        self._stack: Any = None

    @classmethod
    def local(cls, concurrency: int = 8) -> Client:
        """Start API, worker and sweeper in this process (embedded default) and connect to them."""
        from orchestrator.embedded import EmbeddedStack

        stack = EmbeddedStack(concurrency=concurrency).start()
        client = cls(stack.url, stack.api_key)
        client._stack = stack
        return client

    # --- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach gpufleet at {self.url}: {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:200]}
        if response.status_code >= 400:
            raise error_for(response.status_code, body)
        return body

    def close(self) -> None:
        self._http.close()
        if self._stack is not None:
            self._stack.stop()
            self._stack = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- jobs -----------------------------------------------------------------------------

    @staticmethod
    def job_body(kind: str, spec: dict[str, Any], *, priority: str = "normal",
                 requirements: dict[str, Any] | None = None, idempotency_key: str | None = None,
                 max_attempts: int | None = None, timeout_seconds: int | None = None,
                 labels: dict[str, str] | None = None, reservation_id: JobId | None = None,
                 distill: dict[str, Any] | None = None) -> dict[str, Any]:
        """``reservation_id``: run on that standalone reservation's capacity instead of renting new.
        ``distill`` (inference): ``{"student_model": …, "tags": […]}`` — also ask the student, keep the pair."""
        body: dict[str, Any] = {"kind": kind, "spec": spec, "priority": priority}
        optional = {"requirements": requirements, "idempotency_key": idempotency_key, "max_attempts": max_attempts,
                    "timeout_seconds": timeout_seconds, "labels": labels,
                    "reservation_id": str(reservation_id) if reservation_id else None, "distill": distill}
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    def submit(self, kind: str, spec: dict[str, Any], **options: Any) -> JobOut:
        """Submit one job. With an ``idempotency_key``, resubmitting returns the original job."""
        return JobOut.model_validate(self._request("POST", "/v1/jobs", json=self.job_body(kind, spec, **options)))

    def submit_batch(self, jobs: Iterable[dict[str, Any]]) -> BatchResult:
        """Submit many jobs in one call; each item is a ``job_body(...)`` dict."""
        return BatchResult.model_validate(self._request("POST", "/v1/jobs/batch", json={"jobs": list(jobs)}))

    def get(self, job_id: JobId, events: bool = True) -> JobOut:
        return JobOut.model_validate(self._request("GET", f"/v1/jobs/{job_id}", params={"events": events}))

    def list(self, *, status: str | None = None, kind: str | None = None, batch_id: JobId | None = None,
             ids: Iterable[JobId] | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("status", status), ("kind", kind), ("batch_id", batch_id), ("cursor", cursor)):
            if value is not None:
                params[key] = str(value)
        if ids is not None:
            params["ids"] = [str(i) for i in ids]
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params))

    def iter_jobs(self, **filters: Any) -> Iterator[JobOut]:
        cursor = None
        while True:
            page = self.list(cursor=cursor, **filters)
            yield from page.jobs
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: JobId) -> JobOut:
        return JobOut.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def batch(self, batch_id: JobId) -> BatchOut:
        return BatchOut.model_validate(self._request("GET", f"/v1/batches/{batch_id}"))

    def logs(self, job_id: JobId, after: int = 0, limit: int = 200) -> dict[str, Any]:
        """Output chunks after chunk id ``after`` (``next_after`` continues), with the job's status."""
        return dict(self._request("GET", f"/v1/jobs/{job_id}/logs", params={"after": after, "limit": limit}))

    def follow_logs(self, job_id: JobId, poll_interval: float = 0.5, after: int = 0,
                    follow: bool = True) -> Iterator[dict[str, Any]]:
        """Yield every output chunk, page after page; with ``follow``, keep waiting for more until the job
        has ended and everything is read."""
        while True:
            page = self.logs(job_id, after=after)
            yield from page["chunks"]
            after = page["next_after"]
            if not page["chunks"] and (not follow or page["status"] in ("succeeded", "failed", "cancelled")):
                return
            if not page["chunks"]:
                time.sleep(poll_interval)

    def checkpoints(self, job_id: JobId) -> dict[str, Any]:
        """The checkpoints a training job reported, its latest, restarts and lost time."""
        return dict(self._request("GET", f"/v1/jobs/{job_id}/checkpoints"))

    def wait(self, job_id: JobId, timeout: float = 300.0, poll_interval: float = 0.1) -> JobOut:
        """Block until the job is terminal; raises WaitTimeout with the last known status."""
        deadline = time.monotonic() + timeout
        delay = poll_interval
        while True:
            job = self.get(job_id)
            if job.done:
                return job
            if time.monotonic() + delay > deadline:
                raise WaitTimeout(f"job {job_id} still {job.status.value} after {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def wait_all(self, job_ids: Iterable[JobId], timeout: float = 600.0, poll_interval: float = 0.2,
                 on_progress: Callable[[int, int], None] | None = None) -> builtins.list[JobOut]:
        """Block until every job is terminal; returns them in the order given."""
        order = [str(j) for j in job_ids]
        pending = list(order)
        total = len(pending)
        done: dict[str, JobOut] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for start in range(0, len(pending), 200):
                for job in self.list(ids=pending[start:start + 200], limit=200).jobs:
                    if job.done:
                        done[str(job.id)] = job
            pending = [j for j in pending if j not in done]
            if on_progress:
                on_progress(total - len(pending), total)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise WaitTimeout(f"{len(pending)} of {total} jobs still unfinished after {timeout:g}s")
            time.sleep(poll_interval)
        return [done[j] for j in order]

    # --- reservations, costs and budgets ----------------------------------------------------

    def reserve(self, gpu: str | builtins.list[str], *, duration_seconds: int, gpu_count: int = 1,
                max_price_per_hour: float | None = None, provider: str = "auto",
                fallback_providers: builtins.list[str] | None = None, **options: Any) -> dict[str, Any]:
        """Reserve GPUs for a duration; the request waits in the queue until capacity fits."""
        body: dict[str, Any] = {"gpu": [gpu] if isinstance(gpu, str) else gpu, "gpu_count": gpu_count,
                                "duration_seconds": duration_seconds, "provider": provider,
                                "fallback_providers": fallback_providers or [], **options}
        if max_price_per_hour is not None:
            body["max_price_per_hour"] = max_price_per_hour
        return self._request("POST", "/v1/reservations", json=body)

    def reservation(self, reservation_id: JobId) -> dict[str, Any]:
        return self._request("GET", f"/v1/reservations/{reservation_id}")

    def reservations(self, state: str | None = None, limit: int = 50) -> builtins.list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
        return self._request("GET", "/v1/reservations", params=params)

    def release_reservation(self, reservation_id: JobId) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/reservations/{reservation_id}")

    def placement(self, job_id: JobId) -> dict[str, Any]:
        """Why the job went where it did: strategy, scores of the options, rejections, history."""
        return dict(self._request("GET", f"/v1/jobs/{job_id}/placement"))

    # --- distillation ---------------------------------------------------------------------

    def distill_query(self, teacher_model: str, student_model: str, prompt: str | None = None, *,
                      messages: builtins.list[dict[str, str]] | None = None, **options: Any) -> dict[str, Any]:
        """Ask teacher and student at once; returns the teacher's answer and the pair's id."""
        body = {"teacher_model": teacher_model, "student_model": student_model, "prompt": prompt, "messages": messages,
                **options}
        return dict(self._request("POST", "/v1/distillation/query", json={k: v for k, v in body.items() if v is not None}))

    def pairs(self, **filters: Any) -> builtins.list[dict[str, Any]]:
        return list(self._request("GET", "/v1/distillation/pairs", params={k: v for k, v in filters.items() if v is not None}))

    def export(self, out: Any, split: str = "train", **filters: Any) -> int:
        """Stream the JSONL export into ``out`` (a binary file object); returns the lines written."""
        params = {"split": split, **{k: v for k, v in filters.items() if v is not None}}
        lines = 0
        with self._http.stream("GET", "/v1/distillation/export", params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise error_for(response.status_code, response.json())
            for chunk in response.iter_bytes():
                out.write(chunk)
                lines += chunk.count(b"\n")
        return lines

    def export_manifest(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return dict(self._request("GET", "/v1/distillation/export/manifest", params=params))

    def export_to_storage(self, **filters: Any) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/distillation/export", json={k: v for k, v in filters.items() if v is not None}))

    def train_student(self, student_name: str, **options: Any) -> dict[str, Any]:
        body = {"student_name": student_name, **{k: v for k, v in options.items() if v is not None}}
        return dict(self._request("POST", "/v1/distillation/train", json=body))

    def routes(self) -> builtins.list[dict[str, Any]]:
        return list(self._request("GET", "/v1/distillation/routes"))

    def set_route(self, teacher_model: str, student_name: str, **options: Any) -> dict[str, Any]:
        body = {"student_name": student_name, **{k: v for k, v in options.items() if v is not None}}
        return dict(self._request("PUT", f"/v1/distillation/routes/{teacher_model}", json=body))

    # --- the model registry ------------------------------------------------------------------

    def models(self, name: str | None = None) -> builtins.list[dict[str, Any]]:
        return list(self._request("GET", "/v1/models", params={"name": name} if name else None))

    def register_model(self, name: str, **fields: Any) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/models/{name}/versions", json=fields))

    def promote_model(self, name: str, version: int) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/models/{name}/versions/{version}/promote"))

    def rollback_model(self, name: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/models/{name}/rollback"))

    def production_model(self, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/models/{name}/production"))

    def evaluate_model(self, name: str, version: int) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/models/{name}/versions/{version}/evaluate"))

    def providers(self) -> builtins.list[dict[str, Any]]:
        """Each configured provider: health, latency, capacity and cheapest prices."""
        return list(self._request("GET", "/v1/providers"))

    def costs(self, since: str | None = None, until: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("since", since), ("until", until)) if v}
        return self._request("GET", "/v1/costs", params=params)

    def budgets(self) -> builtins.list[dict[str, Any]]:
        return self._request("GET", "/v1/budgets")

    def set_budget(self, monthly_limit: float | None = None, hourly_limit: float | None = None) -> dict[str, Any]:
        """Cap the caller's own tenant."""
        return self._request("PUT", "/v1/budgets/tenant",
                             json={"monthly_limit": monthly_limit, "hourly_limit": hourly_limit})

    def health(self) -> dict[str, Any]:
        try:
            response = self._http.get("/health")
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach gpufleet at {self.url}: {type(exc).__name__}") from None
        return response.json()

    # --- batch runs (orchestrator/sdk/batches.py builds items, submits, waits and gathers) --------

    def create_batch(self, kind: str, size: int, *, options: dict[str, Any] | None = None, name: str | None = None,
                     idempotency_key: str | None = None, output_uri: str | None = None,
                     sample: Iterable[dict[str, Any]] = (), client_notes: dict[str, Any] | None = None) -> BatchRunOut:
        """Declare a batch run of ``size`` items (an existing one with the same key is returned); ``sample``
        items get the estimate recorded with it."""
        body: dict[str, Any] = {"kind": kind, "size": size, "options": options or {}, "sample": list(sample),
                                "client": client_notes or {}}
        optional = {"name": name, "idempotency_key": idempotency_key, "output_uri": output_uri}
        body.update({k: v for k, v in optional.items() if v is not None})
        return BatchRunOut.model_validate(self._request("POST", "/v1/batches", json=body))

    def add_batch_items(self, batch_id: JobId, items: Iterable[dict[str, Any]]) -> AppendOut:
        """Add ``{"key", "spec"}`` items; re-sending items already added creates nothing."""
        return AppendOut.model_validate(self._request("POST", f"/v1/batches/{batch_id}/items", json={"items": list(items)}))

    def batch_progress(self, batch_id: JobId) -> BatchRunOut:
        """Counts, throughput, ETA, cost so far and the recorded estimate."""
        return BatchRunOut.model_validate(self._request("GET", f"/v1/batches/{batch_id}"))

    def batch_items(self, batch_id: JobId, *, status: str | None = None, limit: int = 100, cursor: str | None = None,
                    results: bool = False) -> BatchItemPage:
        params: dict[str, Any] = {"limit": limit, "results": results}
        params.update({k: v for k, v in (("status", status), ("cursor", cursor)) if v is not None})
        return BatchItemPage.model_validate(self._request("GET", f"/v1/batches/{batch_id}/items", params=params))

    def iter_batch_items(self, batch_id: JobId, *, status: str | None = None, results: bool = False,
                         page_size: int = 500) -> Iterator[BatchItemOut]:
        cursor = None
        while True:
            page = self.batch_items(batch_id, status=status, limit=page_size, cursor=cursor, results=results)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel_batch(self, batch_id: JobId) -> BatchRunOut:
        """Cancel every item of the batch that has not ended; rented capacity is released."""
        return BatchRunOut.model_validate(self._request("POST", f"/v1/batches/{batch_id}/cancel"))

    def estimate_batch(self, kind: str, items: Iterable[dict[str, Any]], *, options: dict[str, Any] | None = None,
                       total: int | None = None) -> Estimate:
        """Cost and time if placed now; ``items`` may be a sample of ``total``. Nothing is created."""
        body: dict[str, Any] = {"kind": kind, "items": list(items), "options": options or {}}
        if total is not None:
            body["total"] = total
        return Estimate.model_validate(self._request("POST", "/v1/batches/estimate", json=body))
