"""A stateful local emulator of the Vast.ai REST API, answering the requests the real ``vastai``
SDK makes (see /work/shared/reference/provider-apis.md), for adapter and integration tests.

Offers can be searched and rented; instances boot (created → loading → running after a boot
delay), then really run their ``onstart`` command as a local ``sh -c`` subprocess and end
"exited" when it does. Billing accrues per instance while it exists. Failures are injected
through Python methods (tests in this process) or the ``/_emulator/…`` HTTP endpoints (tests
that start the emulator in a subprocess: ``python -m tests.emulators.vastai --port N --key K``).
The adapter under test must never call ``/_emulator/…``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.emulators.server import LoopbackServer
from tests.emulators.vast_offers import DEFAULT_OFFERS, complete_offer, matches

Reply = tuple[int, Any, dict[str, str]]

_BOOTING = (None, "loading")


@dataclass
class _Instance:
    id: int
    offer: dict[str, Any]
    label: str | None
    image: str | None
    env: dict[str, Any]
    onstart: str | None
    disk: float
    price: float
    is_bid: bool
    created_at: float
    boot_delay: float
    stuck: bool = False
    intended_status: str = "running"
    actual_status: str | None = None
    status_msg: str = "Creating the container"
    process: subprocess.Popen[bytes] | None = None
    workdir: str | None = None
    exit_code: int | None = None
    destroyed_at: float | None = None
    preempted: bool = False
    accrued: float = 0.0
    billed_until: float = 0.0
    patch: dict[str, Any] = field(default_factory=dict)


class VastEmulator(LoopbackServer):
    """The Vast.ai API on 127.0.0.1: ``with VastEmulator(api_key="k") as emu: VastAI(..., server_url=emu.url)``."""

    def __init__(self, api_key: str = "test-vast-key", offers: list[dict[str, Any]] | None = None,
                 boot_delay: float = 0.2, port: int = 0, host: str = "127.0.0.1", max_page: int = 25) -> None:
        self.api_key = api_key
        self.boot_delay = boot_delay
        self.host = host
        self.port = port
        self.max_page = max_page
        self.request_log: list[dict[str, Any]] = []
        self._offers = {int(o["id"]): complete_offer(o) for o in copy.deepcopy(offers or DEFAULT_OFFERS)}
        self._taken: set[int] = set()
        self._stuck: set[int] = set()
        self._held: dict[int, int] = {}  # offer id -> instance id
        self._instances: dict[int, _Instance] = {}
        self._next_id = 7_000_001
        self._faults: list[dict[str, Any]] = []
        self._lags: list[dict[str, Any]] = []
        self._half_creates = 0
        self._lock = threading.RLock()
        self._server = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, daemon=True, name="vast-emulator-clock")

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> VastEmulator:
        self.up()
        self._ticker.start()
        return self

    def stop(self) -> None:
        """Stop serving and kill every instance process (tests must not leak subprocesses)."""
        self._stop.set()
        self.down()
        with self._lock:
            for inst in self._instances.values():
                self._kill(inst)
                if inst.workdir:
                    shutil.rmtree(inst.workdir, ignore_errors=True)

    def __enter__(self) -> VastEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test controls -----------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received, in order (query strings left out)."""
        return [(r["method"], r["path"]) for r in list(self.request_log)]

    def take(self, offer_id: int) -> None:
        """Someone else rents the offer: it leaves searches and creating from it fails."""
        with self._lock:
            self._offer(offer_id)
            self._taken.add(int(offer_id))

    def reset(self) -> None:
        """Clear every injected fault (taken, stuck, failures, lags): each test starts from a healthy market."""
        with self._lock:
            self._taken.clear()
            self._stuck.clear()
            self._faults.clear()
            self._lags.clear()
            self._half_creates = 0

    def untake(self, offer_id: int) -> None:
        with self._lock:
            self._taken.discard(int(offer_id))

    def stick(self, offer_id: int) -> None:
        """Instances created from this offer stay "loading" forever (a bad host)."""
        with self._lock:
            self._offer(offer_id)
            self._stuck.add(int(offer_id))

    def fail(self, status: int, count: int = 1, retry_after: float | None = None, paths: list[str] | None = None) -> None:
        """The next ``count`` API requests (whose path starts with one of ``paths``, if given) answer ``status``."""
        with self._lock:
            self._faults.append({"status": int(status), "remaining": int(count), "retry_after": retry_after,
                                 "paths": list(paths) if paths else None})

    def lag(self, seconds: float, count: int = 1, paths: list[str] | None = None) -> None:
        """The next ``count`` matching requests are carried out, then answered only after ``seconds``
        (a client that times out does not know the outcome)."""
        with self._lock:
            self._lags.append({"seconds": float(seconds), "remaining": int(count), "paths": list(paths) if paths else None})

    def half_create(self, count: int = 1) -> None:
        """The next ``count`` creates make the instance but answer ``{"success": false, "new_contract": N}``."""
        with self._lock:
            self._half_creates += int(count)

    def preempt(self, instance_id: int) -> None:
        """The instance vanishes (host lost): its process is killed and the API no longer shows it."""
        with self._lock:
            inst = self._instance(instance_id)
            inst.preempted = True
            self._destroy(inst)

    def outbid(self, instance_id: int) -> None:
        """An interruptible instance is outbid: Vast stops it (intended and actual status "stopped")."""
        with self._lock:
            inst = self._instance(instance_id)
            self._kill(inst)
            inst.intended_status, inst.actual_status = "stopped", "stopped"
            inst.status_msg = "Instance stopped: outbid by a higher bid"

    def set_price(self, instance_id: int, dph: float) -> None:
        with self._lock:
            inst = self._instance(instance_id)
            self._accrue(inst, time.time())
            inst.price = float(dph)

    def patch(self, instance_id: int, fields: dict[str, Any]) -> None:
        """Override fields of the instance's API row (e.g. ``start_date=None``) to test tolerant readers."""
        with self._lock:
            self._instance(instance_id).patch.update(fields)

    def instances(self) -> list[dict[str, Any]]:
        """Every instance ever created: its API row plus emulator facts (destroyed, cost, pid, env…)."""
        with self._lock:
            self._advance()
            now = time.time()
            return [{**self._row(i), "offer_id": i.offer["id"], "destroyed": i.destroyed_at is not None,
                     "preempted": i.preempted, "exit_code": i.exit_code, "cost": round(self._cost(i, now), 8),
                     "pid": i.process.pid if i.process else None, "env": dict(i.env), "onstart": i.onstart,
                     "image": i.image, "disk": i.disk, "workdir": i.workdir}
                    for i in self._instances.values()]

    def instance(self, instance_id: int) -> dict[str, Any] | None:
        return next((row for row in self.instances() if row["id"] == int(instance_id)), None)

    def alive(self) -> list[int]:
        with self._lock:
            return [i.id for i in self._instances.values() if i.destroyed_at is None]

    def destroyed(self) -> list[int]:
        with self._lock:
            return [i.id for i in self._instances.values() if i.destroyed_at is not None]

    def billing(self) -> dict[str, Any]:
        """Dollars accrued: ``{"total": x, "instances": {id: x}}`` (price × seconds alive / 3600)."""
        with self._lock:
            now = time.time()
            per = {i.id: round(self._cost(i, now), 8) for i in self._instances.values()}
            return {"total": round(sum(per.values()), 8), "instances": per}

    def logs(self, instance_id: int) -> str:
        """What the instance's onstart command printed (stdout and stderr together)."""
        with self._lock:
            workdir = self._instance(instance_id).workdir
        if not workdir or not os.path.exists(os.path.join(workdir, "onstart.log")):
            return ""
        with open(os.path.join(workdir, "onstart.log"), errors="replace") as fh:
            return fh.read()

    def state(self) -> dict[str, Any]:
        with self._lock:
            offers = [self._search_row(o, bid=False) for o in self._offers.values()]
        return {"instances": self.instances(), "alive": self.alive(), "destroyed": self.destroyed(),
                "billing": self.billing(), "offers": offers}

    # --- internals: state --------------------------------------------------------------------

    def _offer(self, offer_id: Any) -> dict[str, Any]:
        try:
            return self._offers[int(offer_id)]
        except (KeyError, TypeError, ValueError):
            raise KeyError(f"no offer {offer_id}") from None

    def _instance(self, instance_id: Any) -> _Instance:
        try:
            return self._instances[int(instance_id)]
        except (KeyError, TypeError, ValueError):
            raise KeyError(f"no instance {instance_id}") from None

    def _rentable(self, offer_id: int) -> bool:
        return offer_id not in self._taken and offer_id not in self._held

    def _cost(self, inst: _Instance, now: float) -> float:
        end = inst.destroyed_at if inst.destroyed_at is not None else now
        return inst.accrued + inst.price * max(0.0, end - inst.billed_until) / 3600

    def _accrue(self, inst: _Instance, now: float) -> None:
        inst.accrued = self._cost(inst, now)
        inst.billed_until = now if inst.destroyed_at is None else inst.destroyed_at

    def _tick_forever(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                self._advance()

    def _advance(self) -> None:
        """Move every live instance along its lifecycle; called by the clock thread and on every read."""
        now = time.time()
        for inst in self._instances.values():
            if inst.destroyed_at is not None or inst.intended_status != "running":
                continue
            age = now - inst.created_at
            if inst.actual_status in _BOOTING:
                if age >= inst.boot_delay / 2:
                    inst.actual_status, inst.status_msg = "loading", "Pulling the image"
                if age >= inst.boot_delay and not inst.stuck:
                    self._boot(inst)
            elif inst.actual_status == "running" and inst.process is not None and inst.process.poll() is not None:
                inst.exit_code = inst.process.returncode
                inst.actual_status = "exited"
                inst.status_msg = f"Container exited: onstart command exited with code {inst.exit_code}"

    def _boot(self, inst: _Instance) -> None:
        inst.actual_status, inst.status_msg = "running", "Container is running"
        if not inst.onstart:
            return
        inst.workdir = tempfile.mkdtemp(prefix=f"vast-emu-{inst.id}-")
        env = {str(k): str(v) for k, v in inst.env.items() if not str(k).startswith("-")}
        # The instance's python3 is the one running the tests, found first on PATH.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        env.update({"CONTAINER_ID": str(inst.id), "VAST_CONTAINERLABEL": f"C.{inst.id}"})
        with open(os.path.join(inst.workdir, "onstart.log"), "wb") as log:
            inst.process = subprocess.Popen(["sh", "-c", inst.onstart], cwd=inst.workdir, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _kill(self, inst: _Instance) -> None:
        proc = inst.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _destroy(self, inst: _Instance) -> None:
        if inst.destroyed_at is not None:
            return
        self._kill(inst)
        now = time.time()
        self._accrue(inst, now)
        inst.destroyed_at = now
        if self._held.get(inst.offer["id"]) == inst.id:
            del self._held[inst.offer["id"]]

    def _row(self, inst: _Instance) -> dict[str, Any]:
        """The instance as GET /api/v0/instances/{id}/ and /api/v1/instances/ show it."""
        offer, now = inst.offer, time.time()
        row = {
            "id": inst.id, "machine_id": offer["machine_id"], "host_id": offer["host_id"],
            "actual_status": inst.actual_status, "intended_status": inst.intended_status,
            "cur_state": "running" if inst.actual_status == "running" else "stopped", "next_state": inst.intended_status,
            "label": inst.label, "image_uuid": inst.image, "image_runtype": "ssh", "num_gpus": offer["num_gpus"],
            "gpu_name": offer["gpu_name"], "gpu_ram": offer["gpu_ram"], "gpu_util": 0.0,
            "cuda_max_good": offer["cuda_max_good"], "dph_total": inst.price, "dph_base": inst.price,
            "is_bid": inst.is_bid, "min_bid": offer["min_bid"], "geolocation": offer["geolocation"],
            "reliability2": offer["reliability"], "disk_space": inst.disk, "ssh_host": "127.0.0.1",
            "ssh_port": 20000 + inst.id % 10000, "public_ipaddr": offer["public_ipaddr"], "ports": {},
            "status_msg": inst.status_msg, "start_date": inst.created_at, "end_date": None,
            "uptime_mins": round((now - inst.created_at) / 60, 3), "onstart": inst.onstart,
            "extra_env": [[str(k), str(v)] for k, v in inst.env.items()], "template_id": None,
        }
        row.update(inst.patch)
        return row

    def _search_row(self, offer: dict[str, Any], bid: bool) -> dict[str, Any]:
        row = dict(offer)
        rentable = self._rentable(offer["id"])
        row["rentable"], row["rented"] = rentable, not rentable
        if bid:  # an interruptible search prices offers at their minimum bid
            row["dph_total"] = offer["min_bid"]
            row["is_bid"] = True
        return row

    # --- internals: API ----------------------------------------------------------------------

    def _search(self, body: dict[str, Any]) -> Reply:
        bid = body.get("type") in ("bid", "interruptible")
        limit = int(body.get("limit") or 64)
        order = body.get("order") or [["score", "desc"]]
        with self._lock:
            rows = [self._search_row(o, bid) for o in self._offers.values()]
        meta = {"type", "order", "limit", "allocated_storage", "disable_bundling"}
        rows = [r for r in rows if all(matches(r, k, v) for k, v in body.items() if k not in meta)]
        for name, direction in reversed(order):
            rows.sort(key=lambda r, n=name: (r.get(n) is None, r.get(n) or 0), reverse=str(direction).lower() == "desc")
        return 200, {"offers": rows[:limit]}, {}

    def _create(self, offer_id: str, body: dict[str, Any]) -> Reply:
        with self._lock:
            offer = self._offers.get(int(offer_id))
            if offer is None or not self._rentable(offer["id"]):
                return 400, {"success": False, "error": "no_such_ask",
                             "msg": f"Instance type by id {offer_id} is not available."}, {}
            if not body.get("image"):
                return 400, {"success": False, "error": "invalid_args", "msg": "image is required"}, {}
            price = body.get("price")
            if price is not None and float(price) < offer["min_bid"]:
                return 400, {"success": False, "error": "invalid_price",
                             "msg": f"Your bid {price} is below the minimum bid {offer['min_bid']} for this offer."}, {}
            inst = self._new_instance(offer, body)
            if self._half_creates > 0:
                self._half_creates -= 1
                return 200, {"success": False, "new_contract": inst.id, "error": "internal_error",
                             "msg": "instance created but its setup failed"}, {}
            return 200, {"success": True, "new_contract": inst.id}, {}

    def _new_instance(self, offer: dict[str, Any], body: dict[str, Any]) -> _Instance:
        now = time.time()
        price = body.get("price")
        env = body.get("env") if isinstance(body.get("env"), dict) else {}
        inst = _Instance(id=self._next_id, offer=offer, label=body.get("label"), image=body.get("image"), env=env,
                         onstart=body.get("onstart"), disk=float(body.get("disk") or 10),
                         price=float(price) if price is not None else offer["dph_total"], is_bid=price is not None,
                         created_at=now, billed_until=now, boot_delay=self.boot_delay, stuck=offer["id"] in self._stuck)
        self._next_id += 1
        self._instances[inst.id] = inst
        self._held[offer["id"]] = inst.id
        return inst

    def _live(self, instance_id: str) -> _Instance | None:
        inst = self._instances.get(int(instance_id))
        return inst if inst is not None and inst.destroyed_at is None else None

    def _show(self, instance_id: str) -> Reply:
        with self._lock:
            self._advance()
            inst = self._live(instance_id)
            # The SDK's show_instance returns None for this answer: the real API's "not yours / gone".
            return 200, {"instances": self._row(inst) if inst else None}, {}

    def _list(self, query: dict[str, list[str]]) -> Reply:
        filters = _json_arg(query, "select_filters") or {}
        limit = min(int((query.get("limit") or ["25"])[0]), self.max_page)
        after = int((query.get("after_token") or ["0"])[0] or 0)
        with self._lock:
            self._advance()
            rows = [self._row(i) for i in sorted(self._instances.values(), key=lambda i: i.id) if i.destroyed_at is None]
        rows = [r for r in rows if all(matches(r, k, v) for k, v in filters.items())]
        page = [r for r in rows if r["id"] > after][:limit]
        more = bool(page) and page[-1]["id"] < rows[-1]["id"]
        return 200, {"instances": page, "next_token": str(page[-1]["id"]) if more else None,
                     "total_instances": len(rows)}, {}

    def _delete(self, instance_id: str) -> Reply:
        with self._lock:
            inst = self._live(instance_id)
            if inst is None:
                return 404, {"success": False, "error": "no_such_instance", "msg": f"Instance {instance_id} not found."}, {}
            self._destroy(inst)
            return 200, {"success": True}, {}

    def _update(self, instance_id: str, body: dict[str, Any]) -> Reply:
        with self._lock:
            inst = self._live(instance_id)
            if inst is None:
                return 404, {"success": False, "error": "no_such_instance", "msg": f"Instance {instance_id} not found."}, {}
            if "label" in body:
                inst.label = body["label"]
            if body.get("state") == "stopped":
                self._kill(inst)
                inst.intended_status, inst.actual_status, inst.status_msg = "stopped", "stopped", "Stopped by the user"
            elif body.get("state") == "running" and inst.intended_status != "running":
                inst.intended_status, inst.actual_status, inst.created_at = "running", None, time.time()
                inst.process, inst.exit_code = None, None
            return 200, {"success": True}, {}

    def _user(self) -> Reply:
        return 200, {"id": 4242, "username": "emulator", "email": "emulator@example.invalid", "credit": 100.0,
                     "balance": 0.0, "can_pay": True}, {}

    def _api(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> Reply:
        routes: list[tuple[str, str, Callable[..., Reply]]] = [
            ("POST", r"/api/v0/bundles/?", lambda: self._search(body)),
            ("PUT", r"/api/v0/asks/(\d+)/?", lambda i: self._create(i, body)),
            ("GET", r"/api/v1/instances/?", lambda: self._list(query)),
            ("GET", r"/api/v0/instances/(\d+)/?", self._show),
            ("DELETE", r"/api/v0/instances/(\d+)/?", self._delete),
            ("PUT", r"/api/v0/instances/(\d+)/?", lambda i: self._update(i, body)),
            ("GET", r"/api/v0/users/current/?", self._user),
        ]
        for verb, pattern, action in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                return action(*match.groups())
        return 404, {"success": False, "error": "not_found", "msg": f"{method} {path} is not an API endpoint"}, {}

    def _control(self, method: str, path: str, body: dict[str, Any]) -> Reply:
        """The emulator's own endpoints, for tests that run it in another process."""
        name = path.removeprefix("/_emulator/").strip("/")
        if method == "GET" and name == "state":
            return 200, self.state(), {}
        if method == "GET" and name == "requests":
            return 200, {"requests": self.requests}, {}
        actions: dict[str, Callable[[], None]] = {
            "take": lambda: self.take(body["offer_id"]),
            "untake": lambda: self.untake(body["offer_id"]),
            "stick": lambda: self.stick(body["offer_id"]),
            "fail": lambda: self.fail(body["status"], body.get("count", 1), body.get("retry_after"), body.get("paths")),
            "lag": lambda: self.lag(body["seconds"], body.get("count", 1), body.get("paths")),
            "half_create": lambda: self.half_create(body.get("count", 1)),
            "preempt": lambda: self.preempt(body["instance_id"]),
            "outbid": lambda: self.outbid(body["instance_id"]),
            "set_price": lambda: self.set_price(body["instance_id"], body["dph"]),
            "patch": lambda: self.patch(body["instance_id"], body["fields"]),
            "down": lambda: self.down(float(body.get("seconds", 1.0))),
        }
        if method != "POST" or name not in actions:
            return 404, {"ok": False, "error": f"unknown control {method} {path}"}, {}
        try:
            actions[name]()
        except KeyError as exc:
            return 404, {"ok": False, "error": str(exc).strip("'\"")}, {}
        return 200, {"ok": True}, {}

    def _next_rule(self, rules: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
        with self._lock:
            for rule in rules:
                if rule["remaining"] > 0 and (rule["paths"] is None or any(path.startswith(p) for p in rule["paths"])):
                    rule["remaining"] -= 1
                    return rule
        return None

    def handle(self, method: str, target: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[Reply, float]:
        """One request: faults, then auth, then the API. Returns the reply and how long to hold it back."""
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        self.request_log.append({"method": method, "path": path, "query": parts.query, "body": body, "at": time.time()})
        if path.startswith("/_emulator/"):
            return self._control(method, path, body), 0.0
        fault = self._next_rule(self._faults, path)
        if fault is not None:
            extra = {"Retry-After": str(fault["retry_after"])} if fault["retry_after"] is not None else {}
            error = "rate_limited" if fault["status"] == 429 else "server_error"
            return (fault["status"], {"success": False, "error": error, "msg": f"injected HTTP {fault['status']}"}, extra), 0.0
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return (401, {"success": False, "error": "invalid_api_key", "msg": "Invalid or missing API key."}, {}), 0.0
        reply = self._api(method, path, query, body)
        lag = self._next_rule(self._lags, path)
        return reply, lag["seconds"] if lag else 0.0

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
                headers = {k.lower(): v for k, v in self.headers.items()}
                (status, payload, extra), hold = outer.handle(self.command, self.path, headers,
                                                             body if isinstance(body, dict) else {})
                if hold:
                    time.sleep(hold)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", **extra}.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (timeouts are part of the tests)
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

        return Handler


def _json_arg(query: dict[str, list[str]], name: str) -> Any:
    try:
        return json.loads(query[name][0])
    except (KeyError, IndexError, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Vast.ai API emulator until killed.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--key", default="test-vast-key", help="the API key clients must send")
    parser.add_argument("--boot-delay", type=float, default=0.5)
    args = parser.parse_args(argv)
    emulator = VastEmulator(api_key=args.key, boot_delay=args.boot_delay, port=args.port, host=args.host).start()
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    print(emulator.url, flush=True)
    done.wait()
    emulator.stop()


if __name__ == "__main__":
    main()
