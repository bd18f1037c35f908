"""EC2 GPU instances, on-demand and spot: one instance per job, running the job from its UserData.

The instance reports the job's outcome to our callback (the pipeline prefers that report), then
powers off; with shutdown behaviour "terminate" that deletes it. ``poll`` reads the instance's
state for what the report cannot say: still booting, interrupted, gone. Creates carry a
ClientToken derived from the reservation label and attempt, so repeating one after a lost
answer does not start a second instance on AWS.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime
from typing import Any, ClassVar

from providers.aws import catalog as cat
from providers.aws.clients import Clients
from providers.aws.config import COMMAND_KINDS, AWSConfig
from providers.aws.errors import Failure
from providers.aws.instances import LIVE_STATES, instance_status
from providers.aws.spot_prices import SpotPrices
from providers.aws.userdata import job_env, user_data
from providers.base import (
    LABEL_PREFIX,
    ExternalResource,
    Health,
    JobSpec,
    Lease,
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

log = logging.getLogger(__name__)

LABEL_TAG = "gpufleet-label"
HEALTH_CACHE_SECONDS = 5.0
_MAX_PAGES = 100


def client_token(label: str, attempt: int, offer_id: str = "") -> str:
    """Same reservation, attempt and offer → same token → EC2 returns the instance it already made.

    The offer is part of it because AWS refuses a reused token with other parameters
    (IdempotentParameterMismatch) rather than launching the new request."""
    return "gpufleet-" + hashlib.sha256(f"{label}:{attempt}:{offer_id}".encode()).hexdigest()[:40]


class AWSProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.marketplace
    lists_all_leases: ClassVar[bool] = True
    default_provisioning_timeout: ClassVar[float] = 600.0
    _health_cache: tuple[float, Health] | None = None

    def __init__(self, name: str = "aws", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        self.cfg = AWSConfig.parse(name, self.config)
        self.clients = Clients(endpoint_url=self.cfg.endpoint_url, profile=self.cfg.profile, retry=self.cfg.retry,
                               max_retry_wait=self.cfg.max_retry_wait, read_timeout=self.cfg.request_timeout)
        self.spot_prices = SpotPrices(self.clients, self.cfg.spot_price_ttl)

    # --- offers ------------------------------------------------------------------------------

    def _serves(self, kind: str, spec: dict[str, Any]) -> bool:
        has_command = bool(spec.get("command") or self.cfg.default_command)
        return has_command and (kind in self.cfg.kinds or (kind in COMMAND_KINDS and bool(spec.get("command"))))

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        if not self._serves(kind, spec):
            return []
        regions = [r for r in self.cfg.regions if self.cfg.image_for(r)]
        spot = self.cfg.use_spot and req.interruptible is not False
        refreshed = None
        if spot and self.cfg.refresh_spot_prices:
            wanted = {r: [it.name for it in self.cfg.catalog.values() if r in it.prices.get("spot", {})] for r in regions}
            refreshed = self.spot_prices.for_regions(wanted)
        kinds = sorted({*self.cfg.kinds, kind})
        return cat.build_offers(self.name, self.cfg.catalog, regions, req, spot=spot, kinds=kinds,
                                capacity=self.cfg.capacity, spot_reliability=self.cfg.spot_reliability,
                                spot_prices=refreshed)

    # --- reserve -----------------------------------------------------------------------------

    def _where(self, offer_id: str, data: dict[str, Any]) -> tuple[str, str, str]:
        parsed = cat.parse_offer_id(offer_id)
        region = str(data.get("region") or (parsed[0] if parsed else ""))
        instance_type = str(data.get("instance_type") or (parsed[1] if parsed else ""))
        market = str(data.get("market") or (parsed[2] if parsed else "on_demand"))
        return region, instance_type, market

    def _launch_params(self, offer: Offer, job: JobSpec, label: str) -> dict[str, Any]:
        region, instance_type, market = self._where(offer.offer_id, offer.data)
        image = self.cfg.image_for(region)
        if not region or not instance_type or not image:
            raise PermanentProviderError(f"aws offer {offer.offer_id} has no region, instance type or image")
        env = job_env(job, {"GPUFLEET_GPU": offer.gpu or "", "GPUFLEET_REGION": region})
        tags = [{"Key": LABEL_TAG, "Value": label}, {"Key": "Name", "Value": label},
                {"Key": "gpufleet-job", "Value": job.job_id}, {"Key": "gpufleet-attempt", "Value": str(job.attempt)}]
        params: dict[str, Any] = {
            "ImageId": image, "InstanceType": instance_type, "MinCount": 1, "MaxCount": 1,
            "UserData": user_data(job, env, self.cfg.default_command),
            "ClientToken": client_token(label, job.attempt, offer.offer_id),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
        }
        if market == "spot":
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "MaxPrice": f"{offer.price_per_hour:.6g}", "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate"}}
        if subnet := self.cfg.subnet_for(region):
            params["SubnetId"] = subnet
        if groups := self.cfg.groups_for(region):
            params["SecurityGroupIds"] = groups
        if self.cfg.key_name:
            params["KeyName"] = self.cfg.key_name
        if self.cfg.iam_instance_profile:
            params["IamInstanceProfile"] = {"Name": self.cfg.iam_instance_profile}
        if self.cfg.root_volume_gb:
            params["BlockDeviceMappings"] = [{"DeviceName": self._root_device(region, image),
                                              "Ebs": {"VolumeSize": self.cfg.root_volume_gb, "DeleteOnTermination": True}}]
        return params

    def _root_device(self, region: str, image: str) -> str:
        images = self.clients.call("ec2", region, "describe_images", f"lookup of image {image}", ImageIds=[image])
        found = images.get("Images") or []
        return str(found[0].get("RootDeviceName") or "/dev/xvda") if found else "/dev/xvda"

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        label = job.label or f"{LABEL_PREFIX}{job.job_id}-{job.attempt}"
        region, instance_type, market = self._where(offer.offer_id, offer.data)
        params = self._launch_params(offer, job, label)
        what = f"launch of {instance_type} ({market.replace('_', '-')})"
        answer = self.clients.attempt("ec2", region, "run_instances", what, **params)
        if isinstance(answer, Failure):
            raise self._launch_failure(answer, region, label) from None
        instances = answer.get("Instances") or []
        if not instances or not instances[0].get("InstanceId"):
            raise TransientProviderError(f"aws {what} in {region} returned no instance{self._cleanup(region, label)}")
        instance_id = str(instances[0]["InstanceId"])
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=instance_id, label=label,
                     price_per_hour=offer.price_per_hour, reserved_at=time.time(),
                     data={"region": region, "instance_type": instance_type, "market": market,
                           "interruptible": market == "spot", "client_token": params["ClientToken"]})

    def _launch_failure(self, failure: Failure, region: str, label: str) -> ProviderError:
        """A launch that failed after a server answered 5xx may still have made an instance: look it up."""
        if failure.retryable and failure.code:
            return TransientProviderError(f"{failure.error}{self._cleanup(region, label)}")
        if failure.retryable:  # no answer at all: the launch may or may not have happened
            return TransientProviderError(f"{failure.error}; if the launch went through, the reaper finds the "
                                          "instance by its label")
        return failure.error

    def _cleanup(self, region: str, label: str) -> str:
        try:
            found = [r for r in self._listing(region) if r.label == label]
        except ProviderError:
            return "; could not check for a half-created instance (the reaper will find it by its label)"
        for resource in found:
            try:
                self.release(resource.as_lease())
            except ProviderError as exc:
                log.warning("aws: could not terminate half-created instance %s: %s", resource.external_id, exc)
        return f"; terminated {', '.join(r.external_id for r in found)}" if found else ""

    # --- run ---------------------------------------------------------------------------------

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        """Nothing to send: the instance starts the job itself from its UserData."""
        return RunHandle(provider=self.name, lease=lease, started_at=time.time(),
                         data={"instance_id": lease.external_id, "region": lease.data.get("region")})

    def poll(self, handle: RunHandle) -> RunStatus:
        lease = handle.lease
        region = self._where(lease.offer_id, lease.data)[0] or self.cfg.regions[0]
        iid = lease.external_id
        answer = self.clients.attempt("ec2", region, "describe_instances", f"status of instance {iid}", InstanceIds=[iid])
        age = time.time() - lease.reserved_at
        if isinstance(answer, Failure):
            if not answer.not_found:
                raise answer.error
            if age < self.cfg.not_found_grace:  # EC2 is eventually consistent right after a launch
                return RunStatus(state="running", provisioning=True)
            return RunStatus(state="failed", transient=True, error=f"aws instance {iid} disappeared")
        found = [i for r in answer.get("Reservations") or [] for i in r.get("Instances") or [] if i.get("InstanceId") == iid]
        if not found:
            return RunStatus(state="failed", transient=True, error=f"aws instance {iid} disappeared")
        return instance_status(found[0], age=age, provisioning_timeout=self.provisioning_timeout,
                               interruptible=bool(lease.data.get("interruptible")))

    # --- release, reaper, health -------------------------------------------------------------

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        iid = lease.external_id
        region = self._where(lease.offer_id, lease.data)[0]
        for where in [region] if region else self.cfg.regions:
            answer = self.clients.attempt("ec2", where, "terminate_instances", f"termination of {iid}", InstanceIds=[iid])
            if not isinstance(answer, Failure):
                return
            if answer.not_found:
                if region and lease.reserved_at and time.time() - lease.reserved_at < self.cfg.not_found_grace:
                    raise NotYetReleased(f"aws instance {iid} is not visible yet (just launched); release again")
                continue
            if isinstance(answer.error, TransientProviderError):
                raise NotYetReleased(str(answer.error)) from None
            raise answer.error

    def _listing(self, region: str) -> list[ExternalResource]:
        params: dict[str, Any] = {"Filters": [{"Name": "tag-key", "Values": [LABEL_TAG]},
                                             {"Name": "instance-state-name", "Values": list(LIVE_STATES)}],
                                  "MaxResults": 1000}
        out = []
        for _ in range(_MAX_PAGES):
            page = self.clients.call("ec2", region, "describe_instances", "instance listing", **params)
            for reservation in page.get("Reservations") or []:
                for inst in reservation.get("Instances") or []:
                    if resource := self._resource(region, inst):
                        out.append(resource)
            token = page.get("NextToken")
            if not token:
                break
            params["NextToken"] = token
        return out

    def _resource(self, region: str, inst: dict[str, Any]) -> ExternalResource | None:
        tags = {t.get("Key"): t.get("Value") for t in inst.get("Tags") or []}
        label = str(tags.get(LABEL_TAG) or "")
        if not label.startswith(LABEL_PREFIX) or not inst.get("InstanceId"):
            return None
        market = "spot" if inst.get("InstanceLifecycle") == "spot" else "on_demand"
        instance_type = str(inst.get("InstanceType") or "")
        launched = inst.get("LaunchTime")
        return ExternalResource(
            provider=self.name, external_id=str(inst["InstanceId"]), label=label,
            offer_id=cat.offer_id(region, instance_type, market),
            created_at=launched.timestamp() if isinstance(launched, datetime) else None,
            price_per_hour=cat.catalog_price(self.cfg.catalog, region, instance_type, market))

    def owned(self) -> list[ExternalResource]:
        """Every labelled instance in every configured region. A region that fails raises: the reaper
        reads a missing lease as gone, so a partial listing must never pass for a complete one."""
        return [r for region in self.cfg.regions for r in self._listing(region)]

    def health(self) -> Health:
        now = time.monotonic()
        cached = self._health_cache
        if cached is not None and now - cached[0] < HEALTH_CACHE_SECONDS:
            return cached[1]
        health = self._check_health()
        self._health_cache = (now, health) if health.ok else None
        return health

    def _check_health(self) -> Health:
        region = self.cfg.regions[0]
        started = time.monotonic()
        try:
            self.clients.call("ec2", region, "describe_instances", "health check", quick=True, MaxResults=5)
        except ProviderError as exc:
            return Health(ok=False, detail=str(exc))
        return Health(ok=True, detail=f"EC2 {region} answered in {(time.monotonic() - started) * 1000:.0f} ms")
