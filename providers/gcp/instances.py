"""What one job's VM looks like: its name and label derived from the reservation label (so a retried
insert finds the same instance), the startup script that runs the job, and the Instance resource.

GCP label values allow lowercase letters, digits, ``-`` and ``_`` up to 63 characters, and
instance names ``[a-z]([-a-z0-9]*[a-z0-9])?`` up to 63: ``gpufleet-<uuid>`` (45) is both. The
exact label also rides in metadata, so ``owned()`` can return it even if it had to be folded.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from providers.base import JobSpec
from providers.gcp.catalog import MachineType
from providers.instance import instance_command

LABEL_KEY = "gpufleet-label"
METADATA_LABEL = "gpufleet-label"
_MAX = 63


def label_value(label: str) -> str:
    """``label`` as a valid GCP label value (lowercase, digits, ``-``, ``_``; at most 63)."""
    return re.sub(r"[^a-z0-9_-]", "_", label.lower())[:_MAX]


def instance_name(label: str) -> str:
    """A valid, deterministic instance name for ``label``."""
    name = re.sub(r"[^a-z0-9-]", "-", label.lower())
    if not name or not name[0].isalpha():
        name = "g" + name
    return name[:_MAX].rstrip("-") or "gpufleet"


def startup_script(job: JobSpec, default_command: list[str] | str | None) -> str:
    """A shell script that exports the job's env and runs the gpufleet wrapper (which reports to our callback)."""
    command = instance_command(job, default_command)  # raises before anything is rented if there is no command
    env = {str(k): str(v) for k, v in (job.spec.get("env") or {}).items()}
    env.update({str(k): str(v) for k, v in job.env.items()})
    lines = ["#!/bin/bash", "# gpufleet: run one job, report its outcome, leave the VM for gpufleet to delete"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    lines.append(command)
    return "\n".join(lines) + "\n"


def instance_resource(compute_v1: Any, *, name: str, label: str, zone: str, machine: MachineType, spot: bool,
                      image: str, disk_gb: int, network: str, script: str) -> Any:
    scheduling = compute_v1.Scheduling(
        # GPU VMs cannot live-migrate; and a restarted VM would run the job's startup script twice.
        on_host_maintenance="TERMINATE" if machine.gpu_count else "MIGRATE", automatic_restart=False)
    if spot:
        scheduling.provisioning_model = "SPOT"
        scheduling.instance_termination_action = "DELETE"
    else:
        scheduling.provisioning_model = "STANDARD"
    resource = compute_v1.Instance(
        name=name,
        machine_type=f"zones/{zone}/machineTypes/{machine.name}",
        labels={LABEL_KEY: label_value(label)},
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key="startup-script", value=script),
                                            compute_v1.Items(key=METADATA_LABEL, value=label)]),
        disks=[compute_v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
            source_image=image, disk_size_gb=disk_gb))],
        # An external address: the job must reach our callback URL.
        network_interfaces=[compute_v1.NetworkInterface(network=network, access_configs=[
            compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")])],
        scheduling=scheduling,
    )
    if machine.gpu_count and machine.accelerator_type:
        resource.guest_accelerators = [compute_v1.AcceleratorConfig(
            accelerator_type=f"zones/{zone}/acceleratorTypes/{machine.accelerator_type}",
            accelerator_count=machine.gpu_count)]
    return resource


def label_of(instance: Any) -> str:
    """The exact gpufleet label of a listed instance: the metadata copy, else the label value."""
    for item in getattr(getattr(instance, "metadata", None), "items", None) or []:
        if item.key == METADATA_LABEL and item.value:
            return str(item.value)
    return str(instance.labels.get(LABEL_KEY, ""))
