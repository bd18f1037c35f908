"""A Managed Instance Group as a warm pool of model servers: its RUNNING members serve jobs over
HTTP (``providers.pools.group``: slots, member URLs, and the ``pool`` adapter's client, signing
and per-token pricing, reused by composition), and ``autoscale`` resizes the group from the queue
by ``providers.pools.scaling``'s policy within ``min_size`` and ``max_size``.

Members are reached either through one fixed ``endpoint`` (an internal load balancer in front of
the group) or one by one through ``member_url``, a template filled with ``{name}``, ``{zone}`` and
``{project}`` (e.g. ``http://{name}.{zone}.c.{project}.internal:8000``). ``price_per_hour`` is one
member's cost; a slot costs a ``member_concurrency``-th of it.

The little state the scaling decision needs (last resize, last activity) is kept in a JSON file
under the provider's ``state_dir`` when there is one, so a restarted beat worker keeps its cooldown.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

from providers.base import Health, Offer, PermanentProviderError, ProviderError, Requirements
from providers.gcp.catalog import fits
from providers.gcp.sdk import Compute, timed, translate
from providers.pools.group import GroupPool
from providers.pools.scaling import ScaleState, decide

log = logging.getLogger(__name__)


class GCPPoolProvider(GroupPool):
    offer_prefix: ClassVar[str] = "mig:"
    member_url_example: ClassVar[str] = "http://{name}.{zone}.c.{project}.internal:8000"

    def __init__(self, name: str = "gcp_pool", config: dict[str, Any] | None = None) -> None:
        c = dict(config or {})
        self.compute = Compute(name, c)
        self.zone = str(c.get("zone") or "")
        if not self.zone or not c.get("instance_group_manager"):
            raise ValueError(f"{name}: 'zone' and 'instance_group_manager' are required")
        super().__init__(name, c, group=str(c["instance_group_manager"]), region=str(c.get("region") or self.zone))
        self.min_size, self.max_size = int(c.get("min_size", 0)), int(c.get("max_size", 1))
        if not 0 <= self.min_size <= self.max_size:
            raise ValueError(f"{name}: need 0 <= min_size <= max_size")
        self._state = StateFile(c.get("state_dir"), name)

    # --- members -----------------------------------------------------------------------------

    def members(self) -> list[dict[str, str]]:
        """The group's managed instances: name, instanceStatus and currentAction of each."""
        rows = self.compute.call("groups", f"listing members of {self.group_name}", lambda c: list(
            c.list_managed_instances(project=self.compute.project, zone=self.zone,
                                     instance_group_manager=self.group_name, retry=self.compute.retry(),
                                     timeout=self.compute.request_timeout)))
        return [{"name": str(m.name or str(m.instance).rsplit("/", 1)[-1]), "status": str(m.instance_status),
                 "action": str(m.current_action)} for m in rows]

    def serving(self) -> tuple[list[str], int]:
        running = [m["name"] for m in self.members() if m["status"] == "RUNNING" and m["action"] in ("NONE", "VERIFYING")]
        return running, self.max_size

    def member_urls(self, members: list[str]) -> dict[str, str]:
        return {m: self.member_address(name=m, zone=self.zone, project=self.compute.project) for m in members}

    # --- Provider ----------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        return [offer for offer in super().offers(req, kind, spec) if fits(offer, req)]

    def health(self) -> Health:
        try:
            group, ms = timed(lambda: self._get_group())
        except ProviderError as exc:
            return Health(ok=False, detail=str(exc))
        detail = f"{self.group_name}: target size {group.target_size}, Compute API answered in {ms:.0f} ms"
        if self.endpoint and group.target_size:
            served = self.template.health()
            return Health(ok=served.ok, detail=f"{detail}; endpoint: {served.detail}")
        return Health(ok=True, detail=detail)

    # --- autoscaling -------------------------------------------------------------------------

    def _get_group(self) -> Any:
        from google.api_core import exceptions

        try:
            return self.compute.call("groups", f"get of {self.group_name}", lambda c: c.get(
                project=self.compute.project, zone=self.zone, instance_group_manager=self.group_name,
                retry=self.compute.retry(), timeout=self.compute.request_timeout))
        except exceptions.NotFound as exc:
            raise PermanentProviderError(str(translate(exc, f"{self.name} get of {self.group_name}"))) from None

    def autoscale(self, queue_depth: int, now: float | None = None, *, in_flight: int | None = None,
                  waited_seconds: float = 0.0) -> str | None:
        """Resize the group for ``queue_depth`` waiting jobs; a one-line account of the decision, None if
        nothing changed. ``in_flight`` is the number of jobs running on this pool (the caller knows it from
        the job table); without it, this process's own count is used."""
        now = time.time() if now is None else now
        state = self._state.load()
        current = int(self._get_group().target_size)
        decision = decide(self.limits(self.min_size, self.max_size), state, current=current, queue_depth=queue_depth,
                          in_flight=self.held_slots() if in_flight is None else in_flight, now=now,
                          waited_seconds=waited_seconds)
        state = replace(state, last_active_at=decision.active_at)
        if decision.size is not None:
            self.compute.call("groups", f"resize of {self.group_name} to {decision.size}", lambda c: c.resize_unary(
                project=self.compute.project, zone=self.zone, instance_group_manager=self.group_name,
                size=decision.size, retry=self.compute.retry(), timeout=self.compute.request_timeout))
            state = replace(state, last_resize_at=now)
            log.info("%s: %s", self.name, decision.reason)
        self._state.save(state)
        return None if decision.steady else f"{self.name}: {decision.reason}"


class StateFile:
    """ScaleState persisted as JSON (atomic replace); in memory only when there is no directory."""

    def __init__(self, directory: str | None, name: str) -> None:
        self.path = Path(directory) / f"{name}-autoscale.json" if directory else None
        self._memory = ScaleState()

    def load(self) -> ScaleState:
        if self.path is None or not self.path.exists():
            return self._memory
        try:
            raw = json.loads(self.path.read_text())
            return ScaleState(last_resize_at=raw.get("last_resize_at"), last_active_at=raw.get("last_active_at"))
        except (OSError, ValueError, AttributeError):
            return self._memory

    def save(self, state: ScaleState) -> None:
        self._memory = state
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autoscale-")
            with os.fdopen(fd, "w") as fh:
                json.dump(asdict(state), fh)
            os.replace(tmp, self.path)
        except OSError:
            pass  # the in-memory copy still holds; a lost cooldown is not worth failing the beat
