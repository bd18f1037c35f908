"""What the pool adapter reads from an Auto Scaling Group: sizes, members that can take work,
their addresses, and the small state we keep in the group's own tags.

Autoscaling runs in whichever worker picks up the beat task, so its memory (when we last
scaled, when the pool last had work) lives on the group as tags, not in a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from providers.aws.clients import Clients

SCALED_AT_TAG = "gpufleet:scaled-at"
BUSY_AT_TAG = "gpufleet:busy-at"


@dataclass(frozen=True)
class Group:
    name: str
    min_size: int
    max_size: int
    desired: int
    in_service: tuple[str, ...]  # instance ids that are InService and Healthy
    starting: int  # members on their way in (Pending…)
    tags: dict[str, str] = field(default_factory=dict)

    def tag_time(self, key: str) -> float | None:
        try:
            return float(self.tags[key])
        except (KeyError, ValueError):
            return None


def describe_group(clients: Clients, region: str, name: str, *, quick: bool = False) -> Group | None:
    answer = clients.call("autoscaling", region, "describe_auto_scaling_groups", f"lookup of group {name}", quick=quick,
                          AutoScalingGroupNames=[name])
    rows = [g for g in answer.get("AutoScalingGroups") or [] if g.get("AutoScalingGroupName") == name]
    if not rows:
        return None
    g = rows[0]
    members = g.get("Instances") or []
    in_service = tuple(str(m["InstanceId"]) for m in members
                       if m.get("LifecycleState") == "InService" and m.get("HealthStatus", "Healthy") == "Healthy")
    starting = sum(1 for m in members if str(m.get("LifecycleState", "")).startswith("Pending"))
    tags = {str(t.get("Key")): str(t.get("Value")) for t in g.get("Tags") or []}
    return Group(name=name, min_size=int(g.get("MinSize", 0)), max_size=int(g.get("MaxSize", 0)),
                 desired=int(g.get("DesiredCapacity", 0)), in_service=in_service, starting=starting, tags=tags)


def private_ips(clients: Clients, region: str, instance_ids: list[str]) -> dict[str, str]:
    if not instance_ids:
        return {}
    answer = clients.call("ec2", region, "describe_instances", "lookup of pool members", InstanceIds=instance_ids)
    out: dict[str, str] = {}
    for reservation in answer.get("Reservations") or []:
        for inst in reservation.get("Instances") or []:
            if inst.get("PrivateIpAddress") and (inst.get("State") or {}).get("Name") == "running":
                out[str(inst["InstanceId"])] = str(inst["PrivateIpAddress"])
    return out


def set_desired(clients: Clients, region: str, name: str, desired: int) -> None:
    # HonorCooldown=False: our own cooldown (a tag) decides; the group's would silently refuse.
    clients.call("autoscaling", region, "set_desired_capacity", f"resize of group {name}",
                 AutoScalingGroupName=name, DesiredCapacity=desired, HonorCooldown=False)


def write_tags(clients: Clients, region: str, name: str, values: dict[str, Any]) -> None:
    tags = [{"ResourceId": name, "ResourceType": "auto-scaling-group", "Key": key, "Value": f"{value}",
             "PropagateAtLaunch": False} for key, value in values.items()]
    clients.call("autoscaling", region, "create_or_update_tags", f"tagging of group {name}", Tags=tags)
