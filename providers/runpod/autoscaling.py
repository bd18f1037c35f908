"""Autoscaling of RunPod serverless endpoints: the beat's ``autoscale`` sets each opted-in endpoint's
``workersMax`` (and keeps its ``workersMin``, normally 0) from the work in sight, by the cloud pools'
policy (``providers.pools.scaling.decide``: clamp to the limits, cooldown, scale to zero when idle).

Why workersMax: RunPod starts workers for the requests it holds, up to workersMax, and bills only
running workers. Holding workersMax at zero while nothing is wanted is what keeps an endpoint from
waking for stray traffic, and raising it with the queue is what lets our jobs through; capping it at
``max_workers`` bounds what one burst can cost. Scaling to zero is safe at once (no choice of which
member to delete, unlike a group): RunPod lets running requests finish, but we still only shrink
after ``scale_down_idle_seconds`` of nothing, so a steady trickle does not pay a cold start each time.

The work for one endpoint is gpufleet's queue for the provider (jobs not yet placed, of the kinds
the autoscaled endpoints serve: they could go to any of them, and raising a ceiling that no request
reaches costs nothing) plus what RunPod holds for that endpoint, read from its ``/health`` (requests
waiting for a worker or running, whoever sent them; counted across all our workers, unlike this
process's own view). When that answer lacks the counts (its shape is unverified), the job table's
count of this provider's running jobs stands in. An endpoint is read through the SDK's
``get_endpoints`` and changed by ``saveEndpoint`` with its id (``graphql.save_endpoint_workers_mutation``).

The decision's memory (last resize, last busy moment per endpoint) lives in a JSON file under the
provider's ``state_dir`` when there is one, so a restarted beat keeps its cooldowns.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from providers.base import PermanentProviderError, ProviderError
from providers.pools.scaling import Decision, Limits, ScaleState, decide
from providers.runpod import graphql
from providers.runpod.api import Api
from providers.runpod.config import EndpointConfig
from providers.runpod.errors import ApiError
from providers.runpod.serverless import Serverless

log = logging.getLogger(__name__)


class EndpointScaler:
    """The autoscaled endpoints of one RunPod provider."""

    def __init__(self, provider: str, endpoints: list[EndpointConfig], api: Api, serverless: Serverless, *,
                 state_dir: str | None, sole: bool) -> None:
        self.provider = provider
        self.endpoints = [e for e in endpoints if e.autoscale]
        self.api = api
        self.serverless = serverless
        # The provider serves only this endpoint: every running job of the provider is one of its requests.
        self.sole = sole and len(self.endpoints) == 1
        self.state = EndpointStates(state_dir, provider)

    @property
    def kinds(self) -> list[str]:
        """Job kinds the autoscaled endpoints serve (the autoscaler counts queued jobs of these)."""
        return sorted({kind for e in self.endpoints for kind in e.kinds})

    def autoscale(self, queue_depth: int, now: float | None = None, *, in_flight: int | None = None,
                  waited_seconds: float = 0.0) -> str | None:
        """Set each autoscaled endpoint's workersMax for the work in sight; one line per endpoint whose
        decision is worth reading (a resize, or one held back by a cooldown or an idle clock), None when
        all are steady. One endpoint's failure does not stop the others; it is raised afterwards, as the
        error class of the first failure, so the autoscaler reports it."""
        if not self.endpoints:
            return None
        now = time.time() if now is None else now
        found = self._read_endpoints()
        notes: list[str] = []
        failures: list[tuple[str, ProviderError]] = []
        states = self.state.load()
        for endpoint in self.endpoints:
            eid = endpoint.endpoint_id
            try:
                decision = self._scale(endpoint, found.get(eid), states.get(eid, ScaleState()), now,
                                       queue_depth=max(0, queue_depth), in_flight=in_flight,
                                       waited_seconds=waited_seconds, states=states)
            except ProviderError as exc:
                failures.append((eid, exc))
                continue
            if not decision.steady:
                notes.append(f"endpoint {eid}: {decision.reason}")
        self.state.save(states)
        if failures:
            raise _combined(notes, failures)
        return "; ".join(notes) or None

    # --- one endpoint --------------------------------------------------------------------------

    def _scale(self, endpoint: EndpointConfig, record: dict[str, Any] | None, state: ScaleState, now: float, *,
               queue_depth: int, in_flight: int | None, waited_seconds: float,
               states: dict[str, ScaleState]) -> Decision:
        eid = endpoint.endpoint_id
        if record is None:
            raise PermanentProviderError(f"{self.provider}: RunPod endpoint {eid} does not exist in this account")
        current = _count(record.get("workersMax"))
        if current is None:
            raise ApiError(f"RunPod described endpoint {eid} without workersMax")
        work = self._work(endpoint, in_flight)
        decision = decide(_limits(endpoint), state, current=current, queue_depth=queue_depth, in_flight=work,
                          now=now, waited_seconds=waited_seconds)
        states[eid] = ScaleState(last_resize_at=state.last_resize_at, last_active_at=decision.active_at)
        if decision.size is not None:
            self._save(record, endpoint, decision.size)
            states[eid] = ScaleState(last_resize_at=now, last_active_at=decision.active_at)
            log.info("%s: endpoint %s workersMax %d -> %d: %s", self.provider, eid, current, decision.size,
                     decision.reason)
        return decision

    def _work(self, endpoint: EndpointConfig, in_flight: int | None) -> int:
        """Requests in flight on the endpoint: RunPod's count, or the job table's when RunPod gives none."""
        known = max(0, in_flight) if in_flight is not None else None
        seen = self.serverless.requests_held(endpoint.endpoint_id)
        if seen is None:
            return known or 0
        return max(seen, known or 0) if self.sole else seen

    def _save(self, record: dict[str, Any], endpoint: EndpointConfig, size: int) -> None:
        eid = endpoint.endpoint_id
        workers_min = min(endpoint.min_workers, size)
        try:
            text = graphql.save_endpoint_workers_mutation(record, workers_min=workers_min, workers_max=size)
        except ValueError as exc:
            raise ApiError(str(exc)) from None
        # Setting an absolute value: sending it twice does no harm, so a lost answer may be retried.
        saved = self.api.graphql(f"setting workersMax of endpoint {eid} to {size}",
                                 lambda rp: rp.api.graphql.run_graphql_query(text)["data"]["saveEndpoint"])
        answered = _count(saved.get("workersMax")) if isinstance(saved, dict) else None
        if isinstance(saved, dict) and "workersMax" in saved and answered != size:
            raise ApiError(f"RunPod kept workersMax of endpoint {eid} at {saved.get('workersMax')!r}, not {size}")

    def _read_endpoints(self) -> dict[str, dict[str, Any]]:
        """The account's endpoints by id, through the SDK's ``get_endpoints`` (one call for all)."""
        rows = self.api.graphql("reading the account's serverless endpoints", lambda rp: rp.get_endpoints())
        if not isinstance(rows, list):
            raise ApiError(f"RunPod listed the account's endpoints as {type(rows).__name__}, not a list")
        return {str(row["id"]): row for row in rows if isinstance(row, dict) and row.get("id")}


def _combined(notes: list[str], failures: list[tuple[str, ProviderError]]) -> ProviderError:
    """The first failure, as its own class (permanent or transient), telling every endpoint's outcome."""
    eid, first = failures[0]
    if not notes and len(failures) == 1:
        return first
    said = "; ".join([*notes, *(f"endpoint {e} failed: {exc}" for e, exc in failures)])
    if isinstance(first, ApiError):
        return ApiError(said, status=first.status, unknown_outcome=first.unknown_outcome)
    try:
        return type(first)(said)
    except TypeError:  # an error class with other constructor arguments: keep it as it is
        return first


def _limits(endpoint: EndpointConfig) -> Limits:
    return Limits(min_size=endpoint.min_workers, max_size=endpoint.max_workers,
                  member_concurrency=endpoint.worker_concurrency, idle_seconds=endpoint.scale_down_idle_seconds,
                  cooldown_seconds=endpoint.scale_cooldown_seconds)


def _count(value: Any) -> int | None:
    """A non-negative worker count from an API answer, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return int(value)


class EndpointStates:
    """Each endpoint's ScaleState, persisted as one JSON file (atomic replace); in memory only when
    the provider has no ``state_dir``. A file that cannot be read or written costs a cooldown, not
    the beat: the in-memory copy still holds."""

    def __init__(self, directory: str | None, provider: str) -> None:
        self.path = Path(directory) / f"{provider}-endpoints-autoscale.json" if directory else None
        self._memory: dict[str, ScaleState] = {}

    def load(self) -> dict[str, ScaleState]:
        if self.path is None or not self.path.exists():
            return dict(self._memory)
        try:
            raw = json.loads(self.path.read_text())
            return {str(eid): ScaleState(last_resize_at=_time(s.get("last_resize_at")),
                                         last_active_at=_time(s.get("last_active_at")))
                    for eid, s in raw.items() if isinstance(s, dict)}
        except (OSError, ValueError, AttributeError):
            return dict(self._memory)

    def save(self, states: dict[str, ScaleState]) -> None:
        self._memory = dict(states)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".runpod-autoscale-")
            with os.fdopen(fd, "w") as fh:
                json.dump({eid: asdict(s) for eid, s in states.items()}, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass


def _time(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
