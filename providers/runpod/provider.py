"""RunPod: serverless endpoints (a job is a request) and pods (a job rents a GPU machine).

The adapter drives the official ``runpod`` SDK, imported lazily (see ``sdk.py`` for the globals and
logging it touches). Offers say which half serves them (``endpoint:…`` or ``pod:…``); leases and
handles carry ``data["type"]`` so a restarted worker can pick a run up from its JSON alone.
Endpoints configured with ``autoscale: true`` have their max workers set by the beat's autoscaler
(``autoscale``, policy in ``providers.pools.scaling``; see ``autoscaling.py``).
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

from providers.base import (
    ExternalResource,
    Health,
    JobSpec,
    Lease,
    NoCapacity,
    Offer,
    Provider,
    ProviderError,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
)
from providers.runpod.api import Api
from providers.runpod.autoscaling import EndpointScaler
from providers.runpod.config import PodsConfig, RunPodConfig
from providers.runpod.pods import Pods
from providers.runpod.sdk import ApiSettings
from providers.runpod.serverless import Serverless


class RunPodProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.serverless

    def __init__(self, name: str = "runpod", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        self.settings = RunPodConfig.parse(self.config)
        if "api_key" in self.config:  # the parsed SecretStr keeps it; the plain copy goes
            self.config = {**self.config, "api_key": "***"}
        self.api = Api(self._api_settings(), retry_budget=self.settings.retry_budget_seconds,
                       max_attempts=self.settings.max_attempts,
                       missing_key=f"no RunPod API key: set {self.settings.api_key_env} or the provider's api_key")
        self.serverless = Serverless(name, self.settings.endpoints, self.api)
        self.pods = Pods(name, self.settings.pods, self.api, self.provisioning_timeout) if self.settings.pods else None
        self.scaler = EndpointScaler(name, self.settings.endpoints, self.api, self.serverless,
                                     state_dir=self.config.get("state_dir"),
                                     sole=len(self.settings.endpoints) == 1 and self.pods is None)
        # What the beat's autoscaler counts as this provider's queue: jobs of the autoscaled endpoints' kinds.
        self.kinds: list[str] = self.scaler.kinds
        self._health: tuple[float, Health] | None = None

    def _api_settings(self) -> ApiSettings | None:
        s = self.settings
        key = s.api_key.get_secret_value() if s.api_key else os.environ.get(s.api_key_env, "")
        if not key:
            return None
        return ApiSettings(api_key=key, api_base_url=s.api_base_url.rstrip("/"),
                           endpoint_base_url=s.endpoint_base_url.rstrip("/"), timeout=s.request_timeout)

    # --- the interface --------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        if req.providers and self.name not in req.providers:
            return []
        offers = self.serverless.offers(req, kind, spec)
        if self.pods is not None:
            offers += self.pods.offers(req, kind, spec)
        return offers

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        if _is_serverless(offer.offer_id, offer.data):
            return self.serverless.reserve(offer, job)
        return self._pods(offer.offer_id).reserve(offer, job)

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        if _is_serverless(lease.offer_id, lease.data):
            return self.serverless.start(lease, job)
        return self._pods(lease.offer_id).start(lease, job)

    def poll(self, handle: RunHandle) -> RunStatus:
        if _is_serverless(handle.lease.offer_id, handle.data):
            return self.serverless.poll(handle)
        return self._pods(handle.lease.offer_id).poll(handle)

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        if _is_serverless(lease.offer_id, lease.data):
            self.serverless.release(handle)
        elif lease.external_id:
            self._pods(lease.offer_id).release(lease)

    def owned(self) -> list[ExternalResource]:
        return self.pods.owned() if self.pods is not None else []

    def health(self) -> Health:
        """One cheap call per configured surface, cached briefly: placement asks before every job."""
        now = time.monotonic()
        if self._health and now - self._health[0] < self.settings.health_cache_seconds:
            return self._health[1]
        health = self._check_health()
        self._health = (now, health)
        return health

    def autoscale(self, queue_depth: int, now: float | None = None, *, in_flight: int | None = None,
                  waited_seconds: float = 0.0) -> str | None:
        """Called from the beat (``orchestrator.services.autoscaler``) with the jobs queued for this
        provider, its jobs running (job table, all workers) and how long the oldest queued one waited:
        sets the max workers of every endpoint with ``autoscale: true``. A line per endpoint whose
        decision is worth reading, None when nothing changed or nothing is autoscaled (no API call)."""
        return self.scaler.autoscale(queue_depth, now, in_flight=in_flight, waited_seconds=waited_seconds)

    # --- helpers --------------------------------------------------------------------------------

    def _check_health(self) -> Health:
        timeout = self.settings.health_timeout
        details = []
        try:
            if self.pods is not None or not self.settings.endpoints:
                self.api.graphql("checking the account", lambda rp: rp.get_user(), timeout=timeout, retries=False)
                details.append("GraphQL API ok")
            if self.settings.endpoints:
                details.append(self.serverless.health(timeout))
        except ProviderError as exc:
            return Health(ok=False, detail=str(exc))
        return Health(ok=True, detail="; ".join(details))

    def _pods(self, offer_id: str) -> Pods:
        """The pods half; without a pods config, a stand-in that can still poll and terminate a pod
        we hold (a lease from the reaper, or from before the config changed)."""
        if self.pods is not None:
            return self.pods
        if offer_id.startswith("pod:") or not offer_id:
            return Pods(self.name, PodsConfig(gpu_types=["-"]), self.api, self.provisioning_timeout)
        raise NoCapacity(f"RunPod pods are not configured for provider {self.name} (offer {offer_id})")


def _is_serverless(offer_id: str, data: dict[str, Any]) -> bool:
    return data.get("type") == "serverless" or offer_id.startswith("endpoint:")
