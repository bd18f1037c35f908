"""Vast.ai marketplace adapter: rents an instance per job through the ``vastai`` SDK and lets the
instance's onstart command run the job and report back to our callback.

The SDK's own retry waits out any ``Retry-After`` up to 60 s inside a call, with a 120 s
timeout; we give it one attempt and a short timeout and retry here, with bounded waits, so
no call can stall a worker. Creating an instance is not idempotent: when its outcome is
unknown we look the instance up by its label and destroy it instead of retrying.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

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
from providers.instance import instance_command
from providers.vastai import query

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_URL = "https://console.vast.ai"
DEFAULT_IMAGE = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime"
_RETRYABLE = frozenset({429, 502, 503, 504})
_BOOTING = frozenset({"", "created", "loading", "scheduling", "starting", "pulling", "queued", "init", "creating"})
_TAKEN_WORDS = ("no_such_ask", "not available", "unavailable", "no longer", "rented", "taken", "bid", "price")
_GONE_WORDS = ("no_such_instance", "not found", "does not exist", "no such")
_PAGE = 25
_MAX_PAGES = 400


class _ApiError(TransientProviderError):
    """An HTTP error answer, kept apart so each operation can read its status (404 = gone, …)."""

    def __init__(self, status: int, code: str, msg: str) -> None:
        super().__init__(f"HTTP {status}: {code}: {msg}" if code else f"HTTP {status}: {msg}")
        self.status, self.code, self.msg = status, code, msg

    @property
    def text(self) -> str:
        return f"{self.code} {self.msg}".lower()


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _optional_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _names(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


HEALTH_CACHE_SECONDS = 5.0


def _import_sdk() -> Any:
    """Import the SDK with the real stdout in place: it reads ``sys.stdout.encoding`` at import, which
    Celery's LoggingProxy (a worker's stdout) does not have."""
    import sys

    saved = sys.stdout
    if not hasattr(saved, "encoding"):
        sys.stdout = sys.__stdout__
    try:
        from vastai import VastAI
    finally:
        sys.stdout = saved
    return VastAI


class VastAIProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.marketplace
    lists_all_leases: ClassVar[bool] = True
    _health_cache: tuple[float, Health] | None = None

    def __init__(self, name: str = "vastai", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        c = self.config
        self.server_url = str(c.get("server_url") or DEFAULT_URL).rstrip("/")
        self.image = str(c.get("image") or DEFAULT_IMAGE)
        self.disk_gb = float(c.get("disk_gb", 20))
        self.min_reliability = float(c.get("min_reliability", 0.95))
        self.verified_only = _flag(c.get("verified_only", True))
        self.interruptible = _flag(c.get("interruptible", False))
        self.bid_ratio = float(c.get("bid_ratio", 1.15))
        self.preferred_gpus = _names(c.get("preferred_gpus"))
        self.max_price_per_hour = _optional_float(c.get("max_price_per_hour"))
        self.checkpoint_interval = _optional_float(c.get("checkpoint_interval"))
        self.default_command: list[str] | str | None = c.get("default_command") or None
        self.search_limit = int(c.get("search_limit", 64))
        self.kinds = _names(c.get("kinds", ["training", "command"]))
        self.request_timeout = float(c.get("request_timeout", 30))
        self.retry = max(1, int(c.get("retry", 2)))
        self.max_retry_wait = float(c.get("max_retry_wait", 5))
        self.health_timeout = float(c.get("health_timeout", min(5.0, self.request_timeout)))
        self.api_key_env = str(c.get("api_key_env") or "VAST_API_KEY")
        if self.bid_ratio < 1 or self.search_limit < 1 or self.request_timeout <= 0:
            raise ValueError("vastai: bid_ratio must be >= 1, search_limit >= 1 and request_timeout > 0")
        self._sdk: Any = None
        self._key = ""
        self._lock = threading.Lock()

    # --- plumbing ----------------------------------------------------------------------------

    def _client(self) -> Any:
        """The SDK object, built on first use (importing vastai is slow and configures logging)."""
        with self._lock:
            if self._sdk is None:
                key = str(self.config.get("api_key") or os.environ.get(self.api_key_env) or "")
                if not key:
                    raise PermanentProviderError(
                        f"vastai: no API key (set api_key in the provider config or ${self.api_key_env})")
                VastAI = _import_sdk()
                # retry=1: we retry ourselves with bounded waits; raw=True: plain JSON back.
                sdk = VastAI(api_key=key, server_url=self.server_url, retry=1, raw=True, quiet=True)
                sdk.client.timeout = self.request_timeout
                self._key, self._sdk = key, sdk
            return self._sdk

    def _scrub(self, text: str) -> str:
        """Never let the key into a message, whatever a server or library echoes back."""
        text = str(text)
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def _api_error(self, response: Any) -> _ApiError:
        code, msg = "", ""
        try:
            body = response.json()
            if isinstance(body, dict):
                code, msg = str(body.get("error") or ""), str(body.get("msg") or body.get("message") or "")
        except ValueError:
            msg = (response.text or "")[:200]
        return _ApiError(response.status_code, self._scrub(code)[:100], self._scrub(msg)[:300])

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        try:
            wanted = float(retry_after) if retry_after is not None else 0.5 * 2 ** (attempt - 1)
        except ValueError:
            wanted = 0.5 * 2 ** (attempt - 1)
        return max(0.0, min(wanted, self.max_retry_wait))

    def _request(self, what: str, call: Callable[[Any], T], *, idempotent: bool = True, attempts: int | None = None) -> T:
        """Run one SDK call with our retries. HTTP errors come out as _ApiError, transport ones as
        TransientProviderError; non-idempotent calls are retried only on 429 (nothing was done)."""
        import requests

        sdk = self._client()
        attempts = attempts or self.retry
        for attempt in range(1, attempts + 1):
            try:
                return call(sdk)
            except requests.HTTPError as exc:
                if exc.response is None:
                    raise TransientProviderError(f"vastai {what} failed: {self._scrub(str(exc))[:300]}") from None
                err = self._api_error(exc.response)
                retryable = err.status == 429 or (idempotent and err.status in _RETRYABLE)
                if not retryable or attempt == attempts:
                    raise err from None
                time.sleep(self._wait(attempt, exc.response.headers.get("Retry-After")))
            except (requests.ConnectionError, requests.Timeout) as exc:
                if not idempotent or attempt == attempts:
                    raise TransientProviderError(
                        f"vastai API unreachable during {what}: {type(exc).__name__}: {self._scrub(str(exc))[:300]}") from None
                time.sleep(self._wait(attempt, None))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not the JSON shape we know
                raise TransientProviderError(f"vastai {what} gave an unexpected answer: {self._scrub(repr(exc))[:300]}") from None
        raise AssertionError("unreachable")

    def _failure(self, what: str, err: _ApiError) -> ProviderError:
        """The generic meaning of an HTTP error answer."""
        if err.status in (401, 403):
            return PermanentProviderError(f"vastai rejected the API key ({err.status}) during {what}")
        if err.status in _RETRYABLE or err.status >= 500:
            return TransientProviderError(f"vastai {what} failed: {err}")
        return PermanentProviderError(f"vastai {what} was refused: {err}")

    # --- offers ------------------------------------------------------------------------------

    def _search_for(self, req: Requirements) -> query.Search:
        prices = [p for p in (req.max_price_per_hour, self.max_price_per_hour) if p is not None]
        interruptible = req.interruptible if req.interruptible is not None else self.interruptible
        return query.Search(
            gpus=tuple(req.gpu or self.preferred_gpus),
            gpu_count=max(1, req.gpu_count),
            min_gpu_memory_gb=req.min_gpu_memory_gb,
            max_price=min(prices) if prices else None,
            min_reliability=req.min_reliability if req.min_reliability is not None else self.min_reliability,
            regions=tuple(req.regions or ()),
            verified_only=self.verified_only,
            interruptible=interruptible,
        )

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        if kind not in self.kinds:
            return []
        search = self._search_for(req)
        found = self._search(search, bid=False)
        if search.interruptible:
            found += self._search(search, bid=True)
        return found

    def _search(self, search: query.Search, bid: bool) -> list[Offer]:
        body = query.filters(search, bid, self.bid_ratio)
        what = "interruptible offer search" if bid else "offer search"
        try:
            rows = self._request(what, lambda sdk: sdk.search_offers(
                query=body, type="bid" if bid else "on-demand", order="dph_total", limit=self.search_limit,
                storage=self.disk_gb, no_default=True))
        except _ApiError as err:
            raise self._failure(what, err) from None
        offers = (query.to_offer(row, provider=self.name, kinds=self.kinds, bid=bid, bid_ratio=self.bid_ratio)
                  for row in rows or [] if isinstance(row, dict))
        return [o for o in offers if o is not None and query.accepts(o, search)]

    # --- reserve -----------------------------------------------------------------------------

    def _env(self, offer: Offer, job: JobSpec) -> dict[str, str]:
        env = {str(k): str(v) for k, v in (job.spec.get("env") or {}).items()}
        env.update({str(k): str(v) for k, v in job.env.items()})
        env.setdefault("GPUFLEET_GPU", offer.gpu or "")
        env.setdefault("GPUFLEET_REGION", offer.region)
        if job.kind == "training" and self.checkpoint_interval is not None:
            env["GPUFLEET_CHECKPOINT_INTERVAL"] = f"{self.checkpoint_interval:g}"
        return env

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        label = job.label or f"{LABEL_PREFIX}{job.job_id}-{job.attempt}"
        command = instance_command(job, self.default_command)  # before renting: a job without a command fails here
        ask_id = query.ask_id_of(offer)
        bid = float(offer.data.get("bid") or offer.price_per_hour) if offer.interruptible else None
        image = str(job.spec.get("image") or self.image)
        disk = float(job.spec.get("disk_gb") or self.disk_gb)
        env = self._env(offer, job)
        what = f"create on offer {ask_id}"
        try:
            answer = self._request(what, lambda sdk: sdk.create_instance(
                ask_id, image=image, disk=disk, env=env, label=label, onstart_cmd=command, price=bid), idempotent=False)
        except _ApiError as err:
            raise self._create_failure(ask_id, label, err) from None
        except TransientProviderError as exc:  # no answer: the instance may exist anyway
            raise TransientProviderError(f"{exc}{self._cleanup(label)}") from None
        contract = answer.get("new_contract") if isinstance(answer, dict) else None
        if not (isinstance(answer, dict) and answer.get("success") and contract):
            raise self._half_created(ask_id, label, answer, contract)
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=str(contract), label=label,
                     price_per_hour=offer.price_per_hour, reserved_at=time.time(),
                     data={"instance_id": int(contract), "ask_id": ask_id, "interruptible": bid is not None, "bid": bid,
                           "image": image, "machine_id": offer.data.get("machine_id")})

    def _create_failure(self, ask_id: int, label: str, err: _ApiError) -> ProviderError:
        if err.status in (401, 403):
            return self._failure(f"create on offer {ask_id}", err)
        if err.status == 429:
            return TransientProviderError(f"vastai is rate limiting instance creation: {err}")
        if err.status >= 500:  # a gateway error may hide a created instance
            return TransientProviderError(f"vastai create on offer {ask_id} failed: {err}{self._cleanup(label)}")
        if err.status in (404, 410) or any(word in err.text for word in _TAKEN_WORDS):
            return NoCapacity(f"vastai offer {ask_id} was taken or is no longer available: {err}")
        return PermanentProviderError(f"vastai refused to create an instance on offer {ask_id}: {err}")

    def _half_created(self, ask_id: int, label: str, answer: Any, contract: Any) -> ProviderError:
        """A create that answered without success: destroy whatever it made, then say why."""
        body = answer if isinstance(answer, dict) else {}
        detail = self._scrub(f"{body.get('error') or ''} {body.get('msg') or ''}".strip() or repr(answer))[:300]
        if contract:
            note = self._destroy_quietly(str(contract))
            return TransientProviderError(f"vastai create on offer {ask_id} half-succeeded ({detail}); {note}")
        if any(word in detail.lower() for word in _TAKEN_WORDS):
            return NoCapacity(f"vastai offer {ask_id} was taken or is no longer available: {detail}")
        return TransientProviderError(f"vastai create on offer {ask_id} returned no instance ({detail}){self._cleanup(label)}")

    def _destroy_quietly(self, instance_id: str) -> str:
        try:
            self.release(Lease(provider=self.name, offer_id="", external_id=instance_id, label="", price_per_hour=0,
                               reserved_at=0))
            return f"destroyed instance {instance_id}"
        except ProviderError as exc:
            log.warning("vastai: could not destroy half-created instance %s: %s", instance_id, exc)
            return f"could not destroy instance {instance_id} yet (the reaper will find it by its label)"

    def _cleanup(self, label: str) -> str:
        """After a create with an unknown outcome: destroy any instance carrying the label."""
        try:
            rows = self._instances()
        except ProviderError:
            return "; could not check for a half-created instance (the reaper will find it by its label)"
        ids = [str(row.get("id")) for row in rows if row.get("label") == label and row.get("id") is not None]
        notes = [self._destroy_quietly(i) for i in ids]
        return f"; {', '.join(notes)}" if notes else ""

    # --- run ---------------------------------------------------------------------------------

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        now = time.time()
        return RunHandle(provider=self.name, lease=lease, started_at=now,
                         data={"instance_id": lease.external_id, "deadline": now + job.timeout_seconds})

    def _show(self, instance_id: str) -> dict[str, Any] | None:
        """GET /instances/{id}/ read tolerantly (the SDK's show_instance crashes on rows without start_date)."""
        def call(sdk: Any) -> Any:
            response = sdk.client.get(f"/instances/{instance_id}/", query_args={"owner": "me"})
            response.raise_for_status()
            return response.json()

        try:
            body = self._request(f"status of instance {instance_id}", call)
        except _ApiError as err:
            if err.status == 404:
                return None
            raise self._failure(f"status of instance {instance_id}", err) from None
        row = body.get("instances") if isinstance(body, dict) else None
        if isinstance(row, list):
            row = next((r for r in row if str(r.get("id")) == instance_id), None)
        return row if isinstance(row, dict) else None

    def poll(self, handle: RunHandle) -> RunStatus:
        lease = handle.lease
        return self._status(lease, self._show(lease.external_id))

    def _status(self, lease: Lease, row: dict[str, Any] | None) -> RunStatus:
        iid = lease.external_id
        if row is None or row.get("intended_status") == "destroyed":
            return RunStatus(state="failed", transient=True, error=f"vastai instance {iid} disappeared (preempted or host lost)")
        actual = str(row.get("actual_status") or "").lower()
        intended = str(row.get("intended_status") or "running").lower()
        message = self._scrub(str(row.get("status_msg") or "").strip())[:500] or "no status message"
        if actual == "exited":
            return RunStatus(state="failed", error=f"vastai instance {iid} exited: {message}")
        if actual == "offline":
            return RunStatus(state="failed", transient=True, error=f"vastai instance {iid} went offline (host lost): {message}")
        if actual == "stopped" or intended == "stopped":
            why = "was outbid (interruptible instance stopped)" if lease.data.get("interruptible") else "was stopped"
            return RunStatus(state="failed", transient=True, error=f"vastai instance {iid} {why}: {message}")
        if actual == "running":
            return RunStatus(state="running")
        waited = time.time() - lease.reserved_at
        if waited > self.provisioning_timeout:
            return RunStatus(state="failed", transient=True,
                             error=f"vastai instance {iid} was not running after {self.provisioning_timeout:g}s "
                                   f"(status {actual or 'created'})")
        if actual not in _BOOTING:
            log.info("vastai: instance %s has unfamiliar status %r; treating it as booting", iid, actual)
        return RunStatus(state="running", provisioning=True)

    # --- release, reaper, health -------------------------------------------------------------

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        iid = lease.external_id
        target: int | str = int(iid) if iid.isdigit() else iid
        try:
            answer = self._request(f"destroy of instance {iid}", lambda sdk: sdk.destroy_instance(target))
        except _ApiError as err:
            if err.status in (404, 410) or any(word in err.text for word in _GONE_WORDS):
                return
            if err.status in (401, 403):
                raise self._failure(f"destroy of instance {iid}", err) from None
            raise NotYetReleased(f"vastai destroy of instance {iid} failed: {err}") from None
        except TransientProviderError as exc:
            raise NotYetReleased(str(exc)) from None
        if isinstance(answer, dict) and answer.get("success") is False:
            text = f"{answer.get('error') or ''} {answer.get('msg') or ''}".lower()
            if not any(word in text for word in _GONE_WORDS):
                raise NotYetReleased(f"vastai did not destroy instance {iid}: {self._scrub(text.strip())[:300]}")

    def _instances(self) -> list[dict[str, Any]]:
        """Every instance, paging /api/v1/instances/ raw (the SDK's show_instances crashes on odd rows)."""
        params: dict[str, Any] = {"select_filters": {}, "order_by": [{"col": "id", "dir": "asc"}], "limit": _PAGE}
        rows: list[dict[str, Any]] = []
        for _ in range(_MAX_PAGES):
            try:
                page = self._request("instance listing", lambda sdk: sdk.show_instances_v1(dict(params)))
            except _ApiError as err:
                raise self._failure("instance listing", err) from None
            rows.extend(r for r in (page.get("instances") or []) if isinstance(r, dict))
            token = page.get("next_token")
            if not token or token == params.get("after_token"):
                break
            params["after_token"] = token
        return rows

    def owned(self) -> list[ExternalResource]:
        owned = []
        for row in self._instances():
            label = str(row.get("label") or "")
            if not label.startswith(LABEL_PREFIX) or row.get("id") is None:
                continue
            start = row.get("start_date")
            owned.append(ExternalResource(
                provider=self.name, external_id=str(row["id"]), label=label,
                offer_id=str(row.get("ask_id") or row.get("ask_contract_id") or ""),
                created_at=float(start) if isinstance(start, int | float) else None,
                price_per_hour=float(row.get("dph_total") or 0.0)))
        return owned

    def health(self) -> Health:
        """A healthy answer is cached for a few seconds: placement asks before every search."""
        now = time.monotonic()
        cached = self._health_cache
        if cached is not None and now - cached[0] < HEALTH_CACHE_SECONDS:
            return cached[1]
        health = self._check_health()
        # Only good news is cached: a recovered API is noticed at the next placement.
        self._health_cache = (now, health) if health.ok else None
        return health

    def _check_health(self) -> Health:
        import requests

        try:
            sdk = self._client()
            response = sdk.client.get("/users/current", timeout=self.health_timeout)
        except PermanentProviderError as exc:
            return Health(ok=False, detail=str(exc))
        except requests.RequestException as exc:
            return Health(ok=False, detail=f"vastai API unreachable: {type(exc).__name__}")
        if response.status_code in (401, 403):
            return Health(ok=False, detail=f"vastai rejected the API key ({response.status_code})")
        if response.status_code >= 400:
            return Health(ok=False, detail=f"vastai API unhealthy: HTTP {response.status_code}")
        return Health(ok=True, detail=f"vastai API reachable at {self.server_url}")
