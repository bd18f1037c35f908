"""Pods: a GPU machine rented per job, named after the reservation's label, running the job's
command through the instance wrapper, terminated on release."""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime
from functools import partial
from typing import Any

from providers.base import (
    LABEL_PREFIX,
    ExternalResource,
    JobSpec,
    Lease,
    NoCapacity,
    NotYetReleased,
    Offer,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.instance import instance_command
from providers.runpod import graphql
from providers.runpod.api import Api
from providers.runpod.config import PodsConfig
from providers.runpod.errors import ApiError
from providers.runpod.matching import fits, spot_allowed

log = logging.getLogger(__name__)

STOPPED = {"EXITED", "TERMINATED", "STOPPED"}
_CLOUDS = (("SECURE", "securePrice", "secureSpotPrice", "secureCloud"),
           ("COMMUNITY", "communityPrice", "communitySpotPrice", "communityCloud"))
# lastStatusChange reads like "Rented by User: Fri Jun 14 2024 10:35:52 GMT+0000 (Coordinated Universal Time)".
_RENTED_AT = re.compile(r"^Rented by User:\s*\w{3} (\w{3} \d{1,2} \d{4} \d{2}:\d{2}:\d{2}) GMT([+-]\d{4})")


class Pods:
    def __init__(self, provider: str, config: PodsConfig, api: Api, provisioning_timeout: float) -> None:
        self.provider = provider
        self.config = config
        self.api = api
        self.provisioning_timeout = provisioning_timeout

    # --- offers ---------------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        if kind not in self.config.kinds or not (spec.get("command") or self.config.default_command):
            return []
        count = max(1, req.gpu_count)
        offers: list[Offer] = []
        for gpu_type_id in self.config.gpu_types:
            try:
                info = self.api.graphql(f"looking up GPU type {gpu_type_id}",
                                        partial(_get_gpu, gpu_type_id=gpu_type_id, count=count))
            except NoCapacity as exc:  # an unknown GPU type id in our config
                log.warning("RunPod offers: skipping %s: %s", gpu_type_id, exc)
                continue
            offers += [o for o in self._offers_for(info, count, spot_allowed(req, self.config.interruptible))
                       if fits(o, req, gpu_type_id)]
        return offers

    def _offers_for(self, info: dict[str, Any], count: int, spot: bool) -> list[Offer]:
        lowest = info.get("lowestPrice") or {}
        if lowest and lowest.get("uninterruptablePrice") is None and lowest.get("minimumBidPrice") is None:
            return []  # RunPod quotes no price for this count: nothing is free right now
        if info.get("maxGpuCount") and count > int(info["maxGpuCount"]):
            return []
        offers = []
        for cloud, price_key, spot_key, flag in _CLOUDS:
            if self.config.cloud_type not in ("ALL", cloud) or info.get(flag) is False:
                continue
            if info.get(price_key):
                offers.append(self._offer(info, cloud, count, float(info[price_key]), interruptible=False))
            if spot and info.get(spot_key):
                offers.append(self._offer(info, cloud, count, float(info[spot_key]), interruptible=True))
        return offers

    def _offer(self, info: dict[str, Any], cloud: str, count: int, per_gpu: float, *, interruptible: bool) -> Offer:
        suffix = ":spot" if interruptible else ""
        return Offer(provider=self.provider, offer_id=f"pod:{info['id']}:{cloud.lower()}{suffix}",
                     gpu=info.get("displayName") or info["id"], gpu_count=count,
                     gpu_memory_gb=float(info.get("memoryInGb") or 0), region=self.config.offer_region,
                     price_per_hour=round(per_gpu * count, 6), capacity=1, kinds=list(self.config.kinds),
                     interruptible=interruptible,
                     data={"type": "pod", "gpu_type_id": info["id"], "cloud_type": cloud, "gpu_count": count,
                           "interruptible": interruptible, "bid_per_gpu": per_gpu if interruptible else None})

    # --- reserve --------------------------------------------------------------------------------

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        name = job.label or f"{LABEL_PREFIX}{job.job_id}-{job.attempt}"
        docker_args = instance_command(job, self.config.default_command)
        env = {**{str(k): str(v) for k, v in (job.spec.get("env") or {}).items()}, **job.env}
        data = offer.data
        if not data.get("gpu_type_id") or data.get("cloud_type") not in ("ALL", "SECURE", "COMMUNITY"):
            raise NoCapacity(f"offer {offer.offer_id} does not describe a RunPod pod (GPU type and cloud)")
        if data.get("interruptible") and not data.get("bid_per_gpu"):
            raise NoCapacity(f"spot offer {offer.offer_id} carries no bid")
        try:
            created = self.api.graphql(f"creating pod {name} ({data['gpu_type_id']}, {data['cloud_type']})",
                                       lambda rp: self._create(rp, data, job, name, docker_args, env), safe_to_repeat=False)
        except ApiError as exc:
            if exc.unknown_outcome:
                raise ApiError(f"{exc}; {self._remove_named(name)}", status=exc.status) from None
            raise
        if not created or not created.get("id"):
            raise ApiError(f"RunPod created no pod for {name}; {self._remove_named(name)}")
        return Lease(provider=self.provider, offer_id=offer.offer_id, external_id=str(created["id"]), label=name,
                     price_per_hour=float(created.get("costPerHr") or offer.price_per_hour), reserved_at=time.time(),
                     data={"type": "pod", "pod_id": str(created["id"]), "gpu_type_id": data["gpu_type_id"],
                           "cloud_type": data["cloud_type"], "interruptible": bool(data.get("interruptible"))})

    def _create(self, rp: Any, data: dict[str, Any], job: JobSpec, name: str, docker_args: str,
                env: dict[str, str]) -> dict[str, Any] | None:
        image = str(job.spec.get("image") or self.config.image)
        count = int(data.get("gpu_count") or 1)
        if data.get("interruptible"):
            text = graphql.interruptible_pod_mutation(
                name=name, image=image, gpu_type_id=data["gpu_type_id"], cloud_type=data["cloud_type"], gpu_count=count,
                bid_per_gpu=float(data["bid_per_gpu"]), container_disk_gb=self.config.container_disk_gb,
                volume_gb=self.config.volume_gb, docker_args=docker_args, env=env, country_code=self.config.country_code,
                ports=self.config.ports)
            return rp.api.graphql.run_graphql_query(text)["data"]["podRentInterruptable"]
        lit = graphql.literal
        return rp.create_pod(
            name=lit(name), image_name=lit(image), gpu_type_id=lit(data["gpu_type_id"]), cloud_type=data["cloud_type"],
            gpu_count=count, container_disk_in_gb=self.config.container_disk_gb, volume_in_gb=self.config.volume_gb,
            docker_args=lit(docker_args), env=graphql.escaped_env(env),
            country_code=lit(self.config.country_code) if self.config.country_code else None,
            ports=lit(self.config.ports) if self.config.ports else None)

    def _remove_named(self, name: str) -> str:
        """After a create whose outcome is unknown: terminate any pod that got our name. Says what it did."""
        try:
            pods = self.api.graphql(f"looking for pod {name}", lambda rp: rp.get_pods())
            ids = [p["id"] for p in pods or [] if p.get("name") == name]
            for pod_id in ids:
                self.api.graphql(f"terminating pod {pod_id}", partial(_terminate, pod_id=pod_id))
        except TransientProviderError as exc:
            return f"could not check for a half-created pod named {name} ({exc}); the reaper will remove it"
        return f"terminated half-created pod(s) {', '.join(ids)}" if ids else f"no pod named {name} was created"

    # --- run ------------------------------------------------------------------------------------

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        """The pod runs the job's command from boot: nothing to start, only a handle to record."""
        return RunHandle(provider=self.provider, lease=lease, started_at=time.time(),
                         data={"type": "pod", "pod_id": lease.external_id})

    def poll(self, handle: RunHandle) -> RunStatus:
        lease = handle.lease
        pod_id = lease.external_id
        pod = self._get(pod_id)
        if pod is None:
            return RunStatus(state="failed", transient=True, error=f"pod {pod_id} disappeared (preempted or host lost)")
        desired = str(pod.get("desiredStatus") or "")
        if desired in STOPPED:
            spot = bool(lease.data.get("interruptible"))
            reason = " (interruptible: it may have been outbid)" if spot else ""
            return RunStatus(state="failed", transient=spot, error=f"pod {pod_id} exited{reason}")
        if pod.get("runtime") is None:
            waited = time.time() - lease.reserved_at
            if waited > self.provisioning_timeout:
                return RunStatus(state="failed", transient=True,
                                 error=f"pod {pod_id} was not running after {self.provisioning_timeout:g}s")
            return RunStatus(state="running", provisioning=True)
        return RunStatus(state="running")

    def _get(self, pod_id: str) -> dict[str, Any] | None:
        return self.api.graphql(f"checking pod {pod_id}", lambda rp: rp.get_pod(graphql.literal(pod_id)))

    def release(self, lease: Lease) -> None:
        pod_id = lease.external_id
        if not pod_id:
            return
        try:
            self.api.graphql(f"terminating pod {pod_id}", partial(_terminate, pod_id=pod_id))
        except TransientProviderError as exc:
            if self._gone(pod_id):
                return
            raise NotYetReleased(f"terminating pod {pod_id} failed: {exc}; call release again") from None

    def _gone(self, pod_id: str) -> bool:
        try:
            pod = self._get(pod_id)
        except TransientProviderError:
            return False
        return pod is None or pod.get("desiredStatus") == "TERMINATED"

    # --- listing --------------------------------------------------------------------------------

    def owned(self) -> list[ExternalResource]:
        pods = self.api.graphql("listing pods", lambda rp: rp.get_pods()) or []
        return [ExternalResource(provider=self.provider, external_id=str(p["id"]), label=p["name"],
                                 created_at=rented_at(p.get("lastStatusChange")),
                                 price_per_hour=float(p.get("costPerHr") or 0.0))
                for p in pods
                if str(p.get("name") or "").startswith(LABEL_PREFIX) and p.get("desiredStatus") != "TERMINATED"]


def _get_gpu(rp: Any, gpu_type_id: str, count: int) -> dict[str, Any]:
    return rp.get_gpu(graphql.literal(gpu_type_id), count)


def _terminate(rp: Any, pod_id: str) -> None:
    rp.terminate_pod(graphql.literal(pod_id))


def rented_at(last_status_change: str | None) -> float | None:
    """The rental time from RunPod's ``lastStatusChange`` text, if it still says when we rented it."""
    match = _RENTED_AT.match(last_status_change or "")
    if not match:
        return None
    return datetime.strptime(f"{match[1]} {match[2]}", "%b %d %Y %H:%M:%S %z").timestamp()
