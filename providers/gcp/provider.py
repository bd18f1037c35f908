"""Compute Engine GPU VMs, spot or on-demand: one VM per job, named and labelled after the reservation,
whose startup script runs the job and reports to our callback.

An insert is made safe to repeat twice over: the instance name comes from the label (a second
insert answers 409, which we read as "created"), and the request carries a ``requestId``
derived from the label (Compute answers a retried request with the first one's operation).
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime
from functools import partial
from typing import Any, ClassVar

from providers.base import (
    LABEL_PREFIX,
    ExternalResource,
    Health,
    JobSpec,
    Lease,
    NoCapacity,
    NotYetReleased,
    Offer,
    PermanentProviderError,
    Provider,
    ProviderError,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.gcp import catalog, instances
from providers.gcp.sdk import Compute, operation_failure, timed, translate, wait_for

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11-py310"
_BOOTING = frozenset({"PROVISIONING", "STAGING", "PENDING"})
_GONE = frozenset({"TERMINATED", "STOPPED", "STOPPING", "SUSPENDED", "SUSPENDING"})
HEALTH_CACHE_SECONDS = 5.0


def _epoch(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class GCPProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.marketplace
    lists_all_leases: ClassVar[bool] = True
    default_provisioning_timeout: ClassVar[float] = 600.0
    _health_cache: tuple[float, Health] | None = None

    def __init__(self, name: str = "gcp", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        c = self.config
        self.compute = Compute(name, c)
        zones = c.get("zones") or []
        self.zones = [zones] if isinstance(zones, str) else [str(z) for z in zones]
        if not self.zones:
            raise ValueError(f"{name}: 'zones' must list at least one zone (e.g. us-central1-a)")
        self.catalog = catalog.parse_catalog(c.get("machine_types"), name)
        self.image = str(c.get("image") or DEFAULT_IMAGE)
        self.disk_gb = int(c.get("disk_gb", 100))
        self.network = str(c.get("network") or "global/networks/default")
        self.kinds = [str(k) for k in c.get("kinds", ["training", "command"])]
        self.default_command: list[str] | str | None = c.get("default_command") or None
        self.operation_wait = float(c.get("operation_wait", 20))
        self.page_size = int(c.get("page_size", 500))

    # --- offers, reserve ---------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        if kind not in self.kinds:
            return []
        return catalog.offers(self.catalog, self.zones, req, provider=self.name, kinds=self.kinds)

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        machine_name, zone, spot = catalog.parse_offer_id(offer.offer_id)
        zone = str(offer.data.get("zone") or zone)
        machine = self.catalog.get(str(offer.data.get("machine_type") or machine_name))
        if machine is None or zone not in self.zones:
            raise NoCapacity(f"{self.name}: offer {offer.offer_id} is no longer configured")
        label = job.label or f"{LABEL_PREFIX}{job.job_id}-{job.attempt}"
        name = instances.instance_name(label)
        script = instances.startup_script(job, self.default_command)
        compute_v1 = self.compute.types
        resource = instances.instance_resource(
            compute_v1, name=name, label=label, zone=zone, machine=machine, spot=bool(offer.data.get("spot", spot)),
            image=str(job.spec.get("image") or self.image), disk_gb=int(job.spec.get("disk_gb") or self.disk_gb),
            network=self.network, script=script)
        request = compute_v1.InsertInstanceRequest(project=self.compute.project, zone=zone, instance_resource=resource,
                                                   request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"gpufleet:{label}")))
        what = f"insert of {name} ({machine.name}) in {zone}"
        from google.api_core import exceptions

        operation = ""
        try:
            op = self.compute.call("instances", what, lambda c: c.insert_unary(
                request=request, retry=self.compute.retry(), timeout=self.compute.request_timeout), capacity=True)
            operation = str(op.name)
        except exceptions.Conflict:  # 409 alreadyExists: a retried create of this very reservation
            log.info("%s: %s already exists (a retried create); using it", self.name, name)
        except exceptions.NotFound as exc:  # the zone, machine type or image does not exist
            raise translate(exc, f"{self.name} {what}", capacity=True) from None
        if operation:
            self._settle(zone, name, operation, what)
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=f"{zone}/{name}", label=label,
                     price_per_hour=offer.price_per_hour, reserved_at=time.time(),
                     data={"zone": zone, "name": name, "operation": operation, "machine_type": machine.name,
                           "spot": bool(offer.data.get("spot", spot))})

    def _settle(self, zone: str, name: str, operation: str, what: str) -> None:
        """Wait briefly for the insert: a stockout shows up as the operation's error, not the insert's answer.
        An operation still running after ``operation_wait`` is left to poll()."""
        try:
            op = wait_for(self.compute, zone, operation, self.operation_wait, what)
        except TransientProviderError as exc:
            log.warning("%s: cannot follow %s yet: %s", self.name, what, exc)
            return
        failure = operation_failure(op, f"{self.name} {what}") if op is not None else None
        if failure is not None:
            self._delete_quietly(zone, name)
            raise failure

    # --- run ---------------------------------------------------------------------------------

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        now = time.time()
        return RunHandle(provider=self.name, lease=lease, started_at=now,
                         data={"zone": lease.data.get("zone"), "name": lease.data.get("name"),
                               "deadline": now + job.timeout_seconds})

    def _where(self, lease: Lease) -> tuple[str, str]:
        zone, _, name = lease.external_id.partition("/")
        return str(lease.data.get("zone") or zone), str(lease.data.get("name") or name)

    def poll(self, handle: RunHandle) -> RunStatus:
        lease = handle.lease
        zone, name = self._where(lease)
        from google.api_core import exceptions

        try:
            inst = self.compute.call("instances", f"status of {name}", lambda c: c.get(
                project=self.compute.project, zone=zone, instance=name, retry=self.compute.retry(),
                timeout=self.compute.request_timeout))
        except exceptions.NotFound:
            return self._missing(lease, zone, name)
        status = str(inst.status)
        if status == "RUNNING" or status == "REPAIRING":
            return RunStatus(state="running")
        if status in _GONE:
            why = "preempted (spot VM reclaimed)" if lease.data.get("spot") else "stopped or deleted"
            return RunStatus(state="failed", transient=True, error=f"{self.name} instance {name} in {zone} was {why}: {status}")
        return self._booting(lease, f"{self.name} instance {name} in {zone} ({status or 'no status'})")

    def _booting(self, lease: Lease, what: str) -> RunStatus:
        waited = time.time() - lease.reserved_at
        if waited > self.provisioning_timeout:
            return RunStatus(state="failed", transient=True,
                             error=f"{what} was not running after {self.provisioning_timeout:g}s")
        return RunStatus(state="running", provisioning=True)

    def _missing(self, lease: Lease, zone: str, name: str) -> RunStatus:
        """No such instance: still being created (its insert operation runs), failed to create, or gone."""
        from google.api_core import exceptions

        operation = str(lease.data.get("operation") or "")
        if operation:
            what = f"{self.name} insert of {name} in {zone}"
            try:
                op = wait_for(self.compute, zone, operation, 0, what)
            except exceptions.NotFound:  # finished operations are kept only for a while
                op = True
            except ProviderError:
                return self._booting(lease, what)  # cannot tell yet
            if op is None:
                return self._booting(lease, what)
            failure = operation_failure(op, what) if op is not True else None
            if failure is not None:
                return RunStatus(state="failed", transient=not isinstance(failure, PermanentProviderError), error=str(failure))
        return RunStatus(state="failed", transient=True, error=f"{self.name} instance {name} in {zone} is gone "
                                                               "(preempted or deleted)")

    # --- release, reaper, health -------------------------------------------------------------

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        from google.api_core import exceptions

        zone, name = self._where(lease)
        try:
            self.compute.call("instances", f"delete of {name}", lambda c: c.delete_unary(
                project=self.compute.project, zone=zone, instance=name, retry=self.compute.retry(),
                timeout=self.compute.request_timeout))
        except exceptions.NotFound:
            return
        except PermanentProviderError:
            raise
        except ProviderError as exc:
            raise NotYetReleased(str(exc)) from None
        except exceptions.Conflict as exc:  # an operation on it is still running
            raise NotYetReleased(f"{self.name} delete of {name}: {type(exc).__name__}") from None

    def _delete_quietly(self, zone: str, name: str) -> None:
        try:
            self.release(Lease(provider=self.name, offer_id="", external_id=f"{zone}/{name}", label="",
                               price_per_hour=0, reserved_at=0))
        except ProviderError as exc:
            log.warning("%s: could not delete %s in %s yet (the reaper will find it by its label): %s",
                        self.name, name, zone, exc)

    def owned(self) -> list[ExternalResource]:
        found: list[ExternalResource] = []
        for zone in self.zones:
            listed = self.compute.call("instances", f"listing in {zone}", partial(self._list_labelled, zone=zone))
            found.extend(self._resource(zone, inst) for inst in listed)
        return [r for r in found if r.label.startswith(LABEL_PREFIX)]

    def _list_labelled(self, client: Any, zone: str) -> list[Any]:
        """Every instance in ``zone`` with our label key, all pages (the pager follows nextPageToken)."""
        request = self.compute.types.ListInstancesRequest(
            project=self.compute.project, zone=zone, filter=f"labels.{instances.LABEL_KEY}:*", max_results=self.page_size)
        return list(client.list(request=request, retry=self.compute.retry(), timeout=self.compute.request_timeout))

    def _resource(self, zone: str, inst: Any) -> ExternalResource:
        machine_name = str(inst.machine_type).rsplit("/", 1)[-1]
        spot = str(inst.scheduling.provisioning_model) == "SPOT"
        machine = self.catalog.get(machine_name)
        price = (machine.price(zone, spot) if machine else None) or 0.0
        return ExternalResource(provider=self.name, external_id=f"{zone}/{inst.name}", label=instances.label_of(inst),
                                offer_id=f"{machine_name}@{zone}{catalog.SPOT_SUFFIX if spot else ''}",
                                created_at=_epoch(str(inst.creation_timestamp)), price_per_hour=price)

    def health(self) -> Health:
        """A cheap one-row listing, with its latency; good answers are cached (placement asks often)."""
        now = time.monotonic()
        if self._health_cache is not None and now - self._health_cache[0] < HEALTH_CACHE_SECONDS:
            return self._health_cache[1]
        zone = self.zones[0]
        try:
            request = self.compute.types.ListInstancesRequest(project=self.compute.project, zone=zone, max_results=1)
            _, ms = timed(lambda: self.compute.call("instances", "health check", lambda c: c.list(
                request=request, retry=None, timeout=min(5.0, self.compute.request_timeout)).next_page_token))
        except ProviderError as exc:
            self._health_cache = None
            return Health(ok=False, detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - NotFound: the project or zone does not exist
            self._health_cache = None
            return Health(ok=False, detail=str(translate(exc, f"{self.name} health check")))
        health = Health(ok=True, detail=f"Compute API answered in {ms:.0f} ms ({self.compute.project}, {zone})")
        self._health_cache = (now, health)
        return health
