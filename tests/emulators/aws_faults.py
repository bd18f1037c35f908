"""A tiny stand-in for the EC2 / Auto Scaling query API that answers what moto cannot produce:
capacity refusals, auth failures, throttling, and instances stuck in a chosen state.

Point an adapter's ``endpoint_url`` at ``AWSFaults().url``. Requests are form-encoded
``Action=…`` POSTs (botocore's query protocol); each is logged with its parameters. Steer it
with ``fail(action, code, …)`` (an error answer, optionally for the next N calls only) and
``instance(…)`` (what DescribeInstances shows). Anything not configured gets an EC2
``InvalidAction`` error. ``down()`` / ``up()`` close and reopen the port (an unreachable endpoint).
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from tests.emulators.server import LoopbackServer

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


@dataclass
class _Fault:
    code: str
    message: str
    status: int
    remaining: int | None  # None: for ever


def ec2_error(code: str, message: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>")


def query_error(code: str, message: str) -> str:
    """The error shape of the other query-protocol services (Auto Scaling)."""
    return (f'<ErrorResponse><Error><Type>Sender</Type><Code>{escape(code)}</Code><Message>{escape(message)}</Message>'
            f"</Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>")


def describe_instances_xml(instance_id: str, state: str, *, reason_code: str | None = None, reason: str = "",
                           instance_type: str = "g5.xlarge", label: str | None = None, spot: bool = False) -> str:
    tags = (f"<tagSet><item><key>gpufleet-label</key><value>{escape(label)}</value></item></tagSet>" if label else "")
    state_reason = (f"<stateReason><code>{escape(reason_code)}</code><message>{escape(reason or reason_code)}</message>"
                    "</stateReason>" if reason_code else "")
    lifecycle = "<instanceLifecycle>spot</instanceLifecycle>" if spot else ""
    launched = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeInstancesResponse xmlns="{EC2_NS}">'
            f"<requestId>{uuid.uuid4()}</requestId><reservationSet><item><reservationId>r-0fault</reservationId>"
            f"<ownerId>123456789012</ownerId><instancesSet><item><instanceId>{escape(instance_id)}</instanceId>"
            f"<instanceType>{escape(instance_type)}</instanceType>"
            f"<instanceState><code>{STATE_CODES.get(state, 0)}</code><name>{escape(state)}</name></instanceState>"
            f"{state_reason}<launchTime>{launched}</launchTime>{lifecycle}{tags}</item></instancesSet></item>"
            "</reservationSet></DescribeInstancesResponse>")


class AWSFaults(LoopbackServer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self._faults: dict[str, list[_Fault]] = {}
        self._answers: dict[str, str] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._server = None

    def __enter__(self) -> AWSFaults:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.down()

    # --- test controls -----------------------------------------------------------------------

    def fail(self, action: str, code: str, message: str = "", *, status: int = 400, times: int | None = None) -> None:
        """Answer ``action`` ("*" for any) with this error, ``times`` times or for ever."""
        with self._lock:
            self._faults.setdefault(action, []).append(_Fault(code, message or code, status, times))

    def answer(self, action: str, xml: str) -> None:
        with self._lock:
            self._answers[action] = xml

    def instance(self, instance_id: str, state: str, **kwargs: Any) -> None:
        self.answer("DescribeInstances", describe_instances_xml(instance_id, state, **kwargs))

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._answers.clear()
            self.requests.clear()

    def actions(self) -> list[str]:
        with self._lock:
            return [r["action"] for r in self.requests]

    # --- serving -----------------------------------------------------------------------------

    def _respond(self, params: dict[str, str]) -> tuple[int, str]:
        action = params.get("Action", "")
        with self._lock:
            self.requests.append({"action": action, "params": params})
            for key in (action, "*"):
                faults = self._faults.get(key) or []
                while faults and faults[0].remaining == 0:
                    faults.pop(0)
                if faults:
                    fault = faults[0]
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    body = query_error if params.get("_service") == "autoscaling" else ec2_error
                    return fault.status, body(fault.code, fault.message)
            if action in self._answers:
                return 200, self._answers[action]
        return 400, ec2_error("InvalidAction", f"the fault stub has no answer for {action or 'this request'}")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                params = {k: v[0] for k, v in parse_qs(raw).items()}
                auth = self.headers.get("Authorization", "")
                params["_service"] = "autoscaling" if "/autoscaling/" in auth else "ec2"
                status, body = outer._respond(params)
                data = body.encode()
                self.send_response(status)
                self.send_header("content-type", "text/xml")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
