"""A stateful local emulator of the Compute Engine REST API paths ``google-cloud-compute`` (REST
transport) uses for gpufleet's ``gcp`` and ``gcp_pool`` adapters.

Paths and JSON casing are read off ``google/cloud/compute_v1/services/*/transports/rest_base.py``:
every path starts ``/compute/v1/projects/{project}/zones/{zone}/``; request bodies and query
parameters are camelCase (``json_format.MessageToJson``); responses are parsed with
``json_format.Parse(ignore_unknown_fields=True)``, so camelCase answers are what the client reads.
Errors use Google's JSON error shape, which ``google.api_core.exceptions.from_http_response``
maps by HTTP status alone (429 → TooManyRequests, 401 → Unauthorized, 409 → Conflict,
503 → ServiceUnavailable); the ``errors[].reason`` rides along.

Instances boot PROVISIONING → STAGING → RUNNING over ``boot_delay``; operations answer DONE after
``op_delay``; a managed instance group's members appear and disappear over time after a resize.
Faults are injected through Python methods; the adapter must never call anything else.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.emulators.server import LoopbackServer

Reply = tuple[int, Any]
_ZONE_PATH = re.compile(r"/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/(?P<rest>.+)")
_EXHAUSTED_MESSAGE = ("The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill "
                      "the request.  Try a different zone, or try again later.")


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def google_error(code: int, message: str, reason: str, status: str) -> dict[str, Any]:
    """Google's JSON error body (what api_core reads ``message`` and ``errors`` from)."""
    return {"error": {"code": code, "message": message, "status": status,
                      "errors": [{"domain": "global", "reason": reason, "message": message}]}}


@dataclass
class _Instance:
    project: str
    zone: str
    name: str
    body: dict[str, Any]
    created_at: float
    boot_delay: float
    id: int
    terminated_at: float | None = None  # preempted: TERMINATED, then gone after ``gone_delay``
    gone_delay: float = 0.0
    deleted: bool = False

    def status(self, now: float) -> str:
        if self.terminated_at is not None:
            return "TERMINATED"
        age = now - self.created_at
        if age < self.boot_delay / 2:
            return "PROVISIONING"
        return "STAGING" if age < self.boot_delay else "RUNNING"


@dataclass
class _Operation:
    name: str
    project: str
    zone: str
    kind: str
    target: str
    created_at: float
    delay: float
    error: dict[str, Any] | None = None
    http_status: int | None = None


@dataclass
class _Member:
    name: str
    created_at: float
    deleting_at: float | None = None


@dataclass
class _Group:
    name: str
    project: str
    zone: str
    target: int
    members: list[_Member] = field(default_factory=list)


class GCPEmulator(LoopbackServer):
    """Compute Engine on 127.0.0.1: point ``client_options.api_endpoint`` at ``emu.url``."""

    def __init__(self, boot_delay: float = 0.2, op_delay: float = 0.05, member_boot_delay: float = 0.2,
                 member_delete_delay: float = 0.1, page_size: int = 500, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.boot_delay, self.op_delay = boot_delay, op_delay
        self.member_boot_delay, self.member_delete_delay = member_boot_delay, member_delete_delay
        self.page_size = page_size  # the most a page holds, whatever maxResults asks
        self.request_log: list[dict[str, Any]] = []
        self._instances: dict[tuple[str, str], _Instance] = {}  # (zone, name)
        self._operations: dict[str, _Operation] = {}
        self._request_ids: dict[str, str] = {}  # requestId -> operation name (Compute's retry dedup)
        self._groups: dict[tuple[str, str], _Group] = {}
        self._faults: list[dict[str, Any]] = []
        self._exhausted: list[dict[str, Any]] = []
        self._ids = itertools.count(1_000_000_001)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._server = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> GCPEmulator:
        self.up()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.down()

    def __enter__(self) -> GCPEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test controls -----------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in list(self.request_log)]

    def fail(self, status: int, count: int = 1, paths: list[str] | None = None, reason: str | None = None,
             method: str | None = None) -> None:
        """The next ``count`` matching requests (path contains one of ``paths``) answer ``status`` in Google's shape."""
        reasons = {401: ("authError", "UNAUTHENTICATED"), 403: ("forbidden", "PERMISSION_DENIED"),
                   429: ("rateLimitExceeded", "RESOURCE_EXHAUSTED"), 503: ("backendError", "UNAVAILABLE")}
        default_reason, state = reasons.get(status, ("backendError", "INTERNAL"))
        with self._lock:
            self._faults.append({"status": status, "remaining": count, "paths": paths, "method": method,
                                 "reason": reason or default_reason, "state": state})

    def reset(self) -> None:
        """Clear every injected fault."""
        with self._lock:
            self._faults.clear()
            self._exhausted.clear()

    def exhaust(self, zone: str | None = None, count: int = 1, mode: str = "http", status: int = 503,
                code: str = "ZONE_RESOURCE_POOL_EXHAUSTED") -> None:
        """The next ``count`` inserts (in ``zone``, if given) fail for lack of capacity: ``mode="http"`` answers
        ``status`` with reason ``code``; ``mode="operation"`` accepts the insert and ends its operation with the error."""
        with self._lock:
            self._exhausted.append({"zone": zone, "remaining": count, "mode": mode, "status": status, "code": code})

    def preempt(self, zone: str, name: str, gone_after: float = 0.3) -> None:
        """Spot preemption with instanceTerminationAction DELETE: TERMINATED, then gone after ``gone_after``."""
        with self._lock:
            inst = self._instances[(zone, name)]
            inst.terminated_at, inst.gone_delay = time.time(), gone_after

    def power_off(self, zone: str, name: str) -> None:
        """The guest powered itself off (``shutdown -h now``): TERMINATED, and kept until deleted."""
        with self._lock:
            inst = self._instances[(zone, name)]
            if inst.terminated_at is None:
                inst.terminated_at, inst.gone_delay = time.time(), float("inf")

    def add_instance(self, project: str, zone: str, name: str, labels: dict[str, str] | None = None) -> None:
        """An instance made outside the adapter (someone else's, or ours from an earlier run)."""
        with self._lock:
            self._instances[(zone, name)] = _Instance(project, zone, name, {"name": name, "labels": labels or {}},
                                                      time.time(), 0.0, next(self._ids))

    def instance(self, zone: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            inst = self._live(zone, name)
            return self._instance_json(inst) if inst else None

    def instances(self) -> list[dict[str, Any]]:
        with self._lock:
            self._advance()
            return [self._instance_json(i) for i in self._instances.values() if not i.deleted]

    def add_group(self, project: str, zone: str, name: str, size: int = 0, running: bool = True) -> None:
        """A managed instance group with ``size`` members (already RUNNING unless ``running=False``)."""
        with self._lock:
            group = _Group(name, project, zone, size)
            born = time.time() - (self.member_boot_delay + 1 if running else 0.0)
            group.members = [_Member(f"{name}-{uuid.uuid4().hex[:4]}", born) for _ in range(size)]
            self._groups[(zone, name)] = group

    def group(self, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            self._advance()
            group = self._groups[(zone, name)]
            return {"target_size": group.target, "members": [self._member_json(group, m) for m in group.members]}

    def resizes(self) -> list[int]:
        """The sizes asked for by every resize request, in order."""
        return [int((parse_qs(r["query"]).get("size") or ["-1"])[0]) for r in self.request_log
                if r["path"].endswith("/resize")]

    # --- state -------------------------------------------------------------------------------

    def _advance(self) -> None:
        now = time.time()
        for inst in self._instances.values():
            if inst.terminated_at is not None and now - inst.terminated_at >= inst.gone_delay:
                inst.deleted = True
        for group in self._groups.values():
            group.members = [m for m in group.members
                             if m.deleting_at is None or now - m.deleting_at < self.member_delete_delay]

    def _live(self, zone: str, name: str) -> _Instance | None:
        self._advance()
        inst = self._instances.get((zone, name))
        return inst if inst is not None and not inst.deleted else None

    def _instance_json(self, inst: _Instance) -> dict[str, Any]:
        base = f"{self.url}/compute/v1/projects/{inst.project}/zones/{inst.zone}"
        return {**inst.body, "kind": "compute#instance", "id": str(inst.id), "name": inst.name,
                "status": inst.status(time.time()), "zone": base, "selfLink": f"{base}/instances/{inst.name}",
                "creationTimestamp": _rfc3339(inst.created_at)}

    def _operation(self, project: str, zone: str, kind: str, target: str, error: dict[str, Any] | None = None,
                   http_status: int | None = None) -> _Operation:
        op = _Operation(f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}", project, zone, kind, target,
                        time.time(), self.op_delay, error, http_status)
        self._operations[op.name] = op
        return op

    def _operation_json(self, op: _Operation) -> dict[str, Any]:
        done = time.time() - op.created_at >= op.delay
        base = f"{self.url}/compute/v1/projects/{op.project}/zones/{op.zone}"
        body: dict[str, Any] = {"kind": "compute#operation", "id": str(abs(hash(op.name)) % 10**18), "name": op.name,
                                "zone": base, "operationType": op.kind, "targetLink": op.target,
                                "status": "DONE" if done else "RUNNING", "progress": 100 if done else 0,
                                "insertTime": _rfc3339(op.created_at), "selfLink": f"{base}/operations/{op.name}"}
        if done and op.error:
            body["error"] = op.error
            body["httpErrorStatusCode"] = op.http_status or 400
            body["httpErrorMessage"] = "SERVICE UNAVAILABLE" if op.http_status == 503 else "BAD REQUEST"
        return body

    def _member_json(self, group: _Group, member: _Member) -> dict[str, Any]:
        age = time.time() - member.created_at
        if member.deleting_at is not None:
            status, action = "STOPPING", "DELETING"
        elif age < self.member_boot_delay:
            status, action = ("PROVISIONING" if age < self.member_boot_delay / 2 else "STAGING"), "CREATING"
        else:
            status, action = "RUNNING", "NONE"
        link = f"{self.url}/compute/v1/projects/{group.project}/zones/{group.zone}/instances/{member.name}"
        return {"instance": link, "name": member.name, "instanceStatus": status, "currentAction": action,
                "id": str(abs(hash(member.name)) % 10**18)}

    # --- API: instances ----------------------------------------------------------------------

    def _take_exhaustion(self, zone: str) -> dict[str, Any] | None:
        for rule in self._exhausted:
            if rule["remaining"] > 0 and rule["zone"] in (None, zone):
                rule["remaining"] -= 1
                return rule
        return None

    def _insert(self, project: str, zone: str, query: dict[str, str], body: dict[str, Any]) -> Reply:
        request_id = query.get("requestId")
        if request_id and request_id in self._request_ids:  # a retried request: the same operation again
            return 200, self._operation_json(self._operations[self._request_ids[request_id]])
        name = str(body.get("name") or "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            return 400, google_error(400, f"Invalid value for field 'resource.name': '{name}'.", "invalid", "INVALID_ARGUMENT")
        for key, value in (body.get("labels") or {}).items():
            if not re.fullmatch(r"[a-z0-9_-]{0,63}", str(value)) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key):
                return 400, google_error(400, f"Invalid value for field 'resource.labels': '{key}'.", "invalid",
                                         "INVALID_ARGUMENT")
        if self._live(zone, name) is not None:
            return 409, google_error(409, f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists",
                                     "alreadyExists", "ALREADY_EXISTS")
        target = f"{self.url}/compute/v1/projects/{project}/zones/{zone}/instances/{name}"
        rule = self._take_exhaustion(zone)
        message = _EXHAUSTED_MESSAGE.format(project=project, zone=zone)
        if rule is not None and rule["mode"] == "http":
            state = "RESOURCE_EXHAUSTED" if rule["status"] == 429 else "UNAVAILABLE"
            return rule["status"], google_error(rule["status"], message, rule["code"], state)
        if rule is not None:  # the real stockout: the insert is accepted, its operation fails
            op = self._operation(project, zone, "insert", target, {"errors": [{"code": rule["code"], "message": message}]},
                                 rule["status"])
        else:
            self._instances[(zone, name)] = _Instance(project, zone, name, body, time.time(), self.boot_delay,
                                                      next(self._ids))
            op = self._operation(project, zone, "insert", target)
        if request_id:
            self._request_ids[request_id] = op.name
        return 200, self._operation_json(op)

    def _get_instance(self, project: str, zone: str, name: str) -> Reply:
        inst = self._live(zone, name)
        if inst is None:
            return 404, google_error(404, f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                                     "notFound", "NOT_FOUND")
        return 200, self._instance_json(inst)

    def _delete_instance(self, project: str, zone: str, name: str) -> Reply:
        inst = self._live(zone, name)
        if inst is None:
            return self._get_instance(project, zone, name)
        inst.deleted = True
        return 200, self._operation_json(self._operation(project, zone, "delete", self._instance_json(inst)["selfLink"]))

    def _list_instances(self, project: str, zone: str, query: dict[str, str]) -> Reply:
        self._advance()
        rows = [self._instance_json(i) for i in sorted(self._instances.values(), key=lambda i: i.id)
                if i.zone == zone and i.project == project and not i.deleted]
        rows = [r for r in rows if _filter_matches(r, query.get("filter", ""))]
        return 200, _page(rows, query, self.page_size, "items",
                          {"kind": "compute#instanceList", "id": f"projects/{project}/zones/{zone}/instances"})

    # --- API: operations and groups ----------------------------------------------------------

    def _get_operation(self, project: str, zone: str, name: str) -> Reply:
        op = self._operations.get(name)
        if op is None or op.zone != zone:
            return 404, google_error(404, f"The resource 'projects/{project}/zones/{zone}/operations/{name}' was not found",
                                     "notFound", "NOT_FOUND")
        return 200, self._operation_json(op)

    def _group(self, project: str, zone: str, name: str) -> _Group | Reply:
        group = self._groups.get((zone, name))
        if group is None:
            return 404, google_error(404, f"The resource 'projects/{project}/zones/{zone}/instanceGroupManagers/{name}' "
                                          "was not found", "notFound", "NOT_FOUND")
        return group

    def _group_json(self, group: _Group) -> dict[str, Any]:
        members = [self._member_json(group, m) for m in group.members]
        actions = {a: sum(1 for m in members if m["currentAction"] == a.upper()) for a in ("none", "creating", "deleting")}
        base = f"{self.url}/compute/v1/projects/{group.project}/zones/{group.zone}"
        return {"kind": "compute#instanceGroupManager", "name": group.name, "zone": base, "targetSize": group.target,
                "baseInstanceName": group.name, "currentActions": actions,
                "status": {"isStable": actions["creating"] == actions["deleting"] == 0},
                "selfLink": f"{base}/instanceGroupManagers/{group.name}"}

    def _resize(self, group: _Group, query: dict[str, str]) -> Reply:
        size = int(query.get("size", "-1"))
        if size < 0:
            return 400, google_error(400, "Invalid value for field 'size'", "invalid", "INVALID_ARGUMENT")
        now = time.time()
        alive = [m for m in group.members if m.deleting_at is None]
        for _ in range(size - len(alive)):
            group.members.append(_Member(f"{group.name}-{uuid.uuid4().hex[:4]}", now))
        for member in alive[size:]:
            member.deleting_at = now
        group.target = size
        link = f"{self.url}/compute/v1/projects/{group.project}/zones/{group.zone}/instanceGroupManagers/{group.name}"
        return 200, self._operation_json(self._operation(group.project, group.zone, "compute.instanceGroupManagers.resize",
                                                         link))

    def _groups_api(self, method: str, project: str, zone: str, rest: str, query: dict[str, str]) -> Reply | None:
        match = re.fullmatch(r"instanceGroupManagers/([^/]+)(/resize|/listManagedInstances)?", rest)
        if match is None:
            return None
        found = self._group(project, zone, match.group(1))
        if not isinstance(found, _Group):
            return found
        action = match.group(2) or ""
        if method == "GET" and not action:
            return 200, self._group_json(found)
        if method == "POST" and action == "/resize":
            return self._resize(found, query)
        if method == "POST" and action == "/listManagedInstances":
            self._advance()
            return 200, _page([self._member_json(found, m) for m in found.members], query, self.page_size,
                              "managedInstances", {})
        return None

    def _api(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]) -> Reply:
        match = _ZONE_PATH.fullmatch(path)
        if match is None:
            return 404, google_error(404, f"{method} {path} is not an API path", "notFound", "NOT_FOUND")
        project, zone, rest = match["project"], match["zone"], match["rest"]
        with self._lock:
            if rest == "instances" and method == "POST":
                return self._insert(project, zone, query, body)
            if rest == "instances" and method == "GET":
                return self._list_instances(project, zone, query)
            if (m := re.fullmatch(r"instances/([^/]+)", rest)) and method in ("GET", "DELETE"):
                return (self._get_instance if method == "GET" else self._delete_instance)(project, zone, m.group(1))
            if m := re.fullmatch(r"operations/([^/]+?)(/wait)?", rest):
                return self._get_operation(project, zone, m.group(1))  # wait: the op is DONE within op_delay anyway
            reply = self._groups_api(method, project, zone, rest, query)
        if reply is None:
            return 404, google_error(404, f"{method} {path} is not an API path", "notFound", "NOT_FOUND")
        return reply

    def _next_fault(self, method: str, path: str) -> dict[str, Any] | None:
        with self._lock:
            for rule in self._faults:
                if rule["remaining"] > 0 and (rule["paths"] is None or any(p in path for p in rule["paths"])) \
                        and rule["method"] in (None, method):
                    rule["remaining"] -= 1
                    return rule
        return None

    def handle(self, method: str, target: str, body: dict[str, Any]) -> Reply:
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.request_log.append({"method": method, "path": parts.path, "query": parts.query, "body": body,
                                 "at": time.time()})
        fault = self._next_fault(method, parts.path)
        if fault is not None:
            messages = {401: "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
                             "cookie or other valid authentication credential.",
                        403: "Required 'compute.instances.create' permission for 'projects/p'"}
            message = messages.get(fault["status"], f"injected HTTP {fault['status']}")
            return fault["status"], google_error(fault["status"], message, fault["reason"], fault["state"])
        return self._api(method, parts.path, query, body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                status, payload = outer.handle(self.command, self.path, body if isinstance(body, dict) else {})
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            do_GET = do_POST = do_DELETE = _serve  # noqa: N815

        return Handler


def _page(rows: list[dict[str, Any]], query: dict[str, str], page_size: int, key: str,
          extra: dict[str, Any]) -> dict[str, Any]:
    """One page of ``rows``: the page token is the offset of the next row."""
    size = min(int(query.get("maxResults") or page_size), page_size)
    start = int(query.get("pageToken") or 0)
    chunk = rows[start:start + size]
    body: dict[str, Any] = {**extra, key: chunk}
    if start + size < len(rows):
        body["nextPageToken"] = str(start + size)
    return body


def _filter_matches(row: dict[str, Any], text: str) -> bool:
    """The subset of Compute's list filter syntax the adapter uses: ``labels.KEY:*``, ``labels.KEY = "v"``,
    ``name = v``, ``status = v``, terms joined by spaces or AND."""
    for term in re.findall(r'[\w.-]+\s*(?:=|!=|:)\s*(?:"[^"]*"|\S+)', text):
        key, op, value = re.fullmatch(r'([\w.-]+)\s*(=|!=|:)\s*"?([^"]*)"?', term).groups()  # type: ignore[union-attr]
        if key.startswith("labels."):
            have = (row.get("labels") or {}).get(key.removeprefix("labels."))
        else:
            have = row.get(key)
        if op == ":" and value == "*":
            ok = have is not None
        elif op == "!=":
            ok = str(have) != value
        else:
            ok = have is not None and str(have) == value
        if not ok:
            return False
    return True
