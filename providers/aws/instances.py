"""An EC2 instance's state, as ``describe_instances`` shows it, read as a run status.

The job's outcome normally arrives by callback before the instance powers itself off; what is
left for the instance state to say is "still booting", "running", or how it ended without a
report: powered off by its own job (the job ended but its report never arrived: not worth a
retry elsewhere) or stopped/terminated by anyone else, spot interruptions included (the
capacity failed, not the job: fail over). We never stop or terminate a run we still poll.
"""

from __future__ import annotations

from typing import Any

from providers.base import RunStatus

LIVE_STATES = ("pending", "running", "stopping", "stopped")
_ENDED = ("shutting-down", "terminated", "stopping", "stopped")
SPOT_CODES = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})
SELF_SHUTDOWN = "Client.InstanceInitiatedShutdown"


def instance_status(inst: dict[str, Any], *, age: float, provisioning_timeout: float, interruptible: bool) -> RunStatus:
    iid = inst.get("InstanceId", "?")
    state = str((inst.get("State") or {}).get("Name") or "")
    reason = inst.get("StateReason") or {}
    code = str(reason.get("Code") or "")
    why = str(reason.get("Message") or inst.get("StateTransitionReason") or code or "no reason given")[:300]
    if state == "running":
        return RunStatus(state="running")
    if state == "pending":
        if age > provisioning_timeout:
            return RunStatus(state="failed", transient=True,
                             error=f"aws instance {iid} was still pending after {provisioning_timeout:g}s")
        return RunStatus(state="running", provisioning=True)
    if state in _ENDED:
        verb = "terminated" if state in ("shutting-down", "terminated") else "stopped"
        if code in SPOT_CODES or (interruptible and code.startswith("Server.")):
            return RunStatus(state="failed", transient=True, error=f"aws spot instance {iid} was interrupted ({why})")
        if code == SELF_SHUTDOWN:
            return RunStatus(state="failed", error=f"aws instance {iid} powered off after its job without reporting "
                                                   "an outcome (check the job's output and the callback URL)")
        return RunStatus(state="failed", transient=True, error=f"aws instance {iid} was {verb} by someone else ({why})")
    return RunStatus(state="failed", transient=True, error=f"aws instance {iid} is in unexpected state {state!r}")
