"""An EC2 Auto Scaling Group kept warm as an inference pool (``type: aws_pool``).

Members run a model server; serving (slots, member URLs, the ``pool`` adapter's client, HMAC
signing, per-token pricing and cost, reused by composition) is ``providers.pools.group``'s.
Capacity is in-service members × ``member_concurrency`` minus this process's slots held. A group
with no member in service but room to grow offers zero capacity, so jobs wait while
``autoscale`` (run from Celery beat) grows it; scaling never happens inside placement. The
scaling policy is ``providers.pools.scaling``'s; its memory lives in the group's tags.

Config keys:
    asg_name (required), region (default us-east-1), endpoint_url (AWS API endpoint, tests)
    endpoint              one URL in front of every member, or
    member_url            per-member URL template: {private_ip}, {instance_id}
    member_concurrency    requests one member serves at once (default 4)
    price_per_hour        what one member costs per hour (default 0)
    price_per_1k_tokens   fixed per-token price; else price_per_hour / 3600 / member throughput × 1000
    assumed_tokens_per_second  one member's throughput until measured (default 500)
    gpu, gpu_count, gpu_memory_gb, kinds (default [inference]; transcription allowed), models
    scale_down_idle_seconds (default 900), scale_cooldown_seconds (default 120)
    secret_env            env var holding the pool's HMAC secret (never the secret itself)
    timeout (120), group_cache_seconds (5), retry, max_retry_wait, request_timeout
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from providers.aws import asg
from providers.aws.asg import BUSY_AT_TAG, SCALED_AT_TAG
from providers.aws.clients import Clients, refuse_credentials
from providers.base import Health, PermanentProviderError, ProviderError
from providers.pools.group import GroupPool
from providers.pools.scaling import ScaleState, decide

log = logging.getLogger(__name__)

# Refresh the "busy at" tag at most this often while the pool is busy: one write per beat is waste.
BUSY_TAG_REFRESH_SECONDS = 30.0


class AWSPoolProvider(GroupPool):
    offer_prefix: ClassVar[str] = "asg/"
    member_url_example: ClassVar[str] = "http://{private_ip}:8000"
    default_idle_seconds: ClassVar[float] = 900.0

    def __init__(self, name: str = "aws_pool", config: dict[str, Any] | None = None) -> None:
        c = dict(config or {})
        refuse_credentials(c, name)
        if not c.get("asg_name"):
            raise ValueError(f"{name}: asg_name is required")
        super().__init__(name, c, group=str(c["asg_name"]), region=str(c.get("region") or "us-east-1"))
        self.group_cache_seconds = float(c.get("group_cache_seconds", 5))
        self.clients = Clients(endpoint_url=c.get("endpoint_url") or None, profile=c.get("profile") or None,
                               retry=int(c.get("retry", 2)), max_retry_wait=float(c.get("max_retry_wait", 2)),
                               read_timeout=float(c.get("request_timeout", 15)))
        self._group: tuple[float, asg.Group | None] | None = None

    # --- the group ---------------------------------------------------------------------------

    def group(self, fresh: bool = False) -> asg.Group | None:
        """The group as last described, re-read after ``group_cache_seconds`` (placement asks per job)."""
        cached = self._group
        if not fresh and cached is not None and time.monotonic() - cached[0] < self.group_cache_seconds:
            return cached[1]
        found = asg.describe_group(self.clients, self.region, self.group_name)
        self._group = (time.monotonic(), found)
        return found

    def _require_group(self, fresh: bool = False) -> asg.Group:
        found = self.group(fresh)
        if found is None:
            raise PermanentProviderError(f"{self.name}: auto scaling group {self.group_name!r} does not exist "
                                         f"in {self.region}")
        return found

    def serving(self) -> tuple[list[str], int]:
        group = self._require_group()
        return list(group.in_service), group.max_size

    def member_urls(self, members: list[str]) -> dict[str, str]:
        ips = asg.private_ips(self.clients, self.region, members)
        return {iid: self.member_address(private_ip=ip, instance_id=iid) for iid, ip in ips.items()}

    def health(self) -> Health:
        try:
            group = asg.describe_group(self.clients, self.region, self.group_name, quick=True)
        except ProviderError as exc:
            return Health(ok=False, detail=str(exc))
        if group is None:
            return Health(ok=False, detail=f"auto scaling group {self.group_name!r} not found in {self.region}")
        self._group = (time.monotonic(), group)
        return Health(ok=True, detail=f"{len(group.in_service)} of {group.desired} members in service "
                                      f"(min {group.min_size}, max {group.max_size})")

    # --- scaling -----------------------------------------------------------------------------

    def autoscale(self, queue_depth: int, now: float | None = None, *, in_flight: int | None = None,
                  waited_seconds: float = 0.0) -> str | None:
        """Resize the group for the work in sight; a one-line note when it changed, else None.

        ``in_flight`` is the number of this pool's jobs being served; it defaults to this process's
        count, which is right only where the requests are sent, so a beat task should pass the
        number of running jobs on this provider. MinSize and MaxSize are the group's own; the
        decision's memory (last resize, last busy moment) is kept in the group's tags, since the
        beat task may run in any worker.
        """
        now = time.time() if now is None else now
        group = self._require_group(fresh=True)
        busy_at = group.tag_time(BUSY_AT_TAG)
        queue_depth = max(0, queue_depth)
        busy = max(0, self.held_slots() if in_flight is None else in_flight)
        decision = decide(self.limits(group.min_size, group.max_size),
                          ScaleState(last_resize_at=group.tag_time(SCALED_AT_TAG), last_active_at=busy_at),
                          current=group.desired, queue_depth=queue_depth, in_flight=busy, now=now,
                          waited_seconds=waited_seconds)
        tags: dict[str, float] = {}
        if decision.active_at != busy_at and (
                busy_at is None or now - busy_at >= min(BUSY_TAG_REFRESH_SECONDS, self.idle_seconds / 4)):
            tags[BUSY_AT_TAG] = decision.active_at
        note = None
        if decision.size is not None:
            asg.set_desired(self.clients, self.region, self.group_name, decision.size)
            self._group = None
            tags[SCALED_AT_TAG] = now
            if decision.size > group.desired:
                capped = f", capped at MaxSize {group.max_size}" if decision.needed > group.max_size else ""
                note = (f"scaled {group.name} up from {group.desired} to {decision.size} "
                        f"({queue_depth} queued, {busy} in flight{capped})")
            else:
                note = (f"scaled {group.name} down from {group.desired} to {decision.size} "
                        f"after {now - decision.active_at:.0f}s idle")
        if tags:
            asg.write_tags(self.clients, self.region, self.group_name, tags)
        if note:
            log.info("%s: %s", self.name, note)
        return note
