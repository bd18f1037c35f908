"""GraphQL text for RunPod: the SDK pastes our values between double quotes without escaping them,
so every string we hand it goes through ``literal`` first, and the mutations the SDK lacks
(interruptible pods, changing an endpoint's workers) are written here in the SDK's own style."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

# An endpoint's settings that ``saveEndpoint`` is sent back unchanged when we only change its workers,
# with their GraphQL types as the SDK's ``generate_endpoint_mutation`` writes them. RunPod documents
# that omitted optional fields take default values; whether that holds for an update is unverified,
# so we re-send what the endpoint has rather than risk resetting its idle timeout or scaler.
_KEPT_SETTINGS: tuple[tuple[str, type], ...] = (
    ("idleTimeout", int), ("scalerType", str), ("scalerValue", int), ("locations", str),
    ("networkVolumeId", str), ("gpuCount", int))
# Required by ``saveEndpoint`` even for an update of an existing endpoint.
ENDPOINT_REQUIRED = ("name", "gpuIds", "templateId")


def literal(value: object) -> str:
    """The inside of a GraphQL string literal for ``value``: quotes, backslashes, newlines and other
    control characters escaped; non-ASCII as \\u escapes, which every GraphQL parser reads."""
    return json.dumps(str(value), ensure_ascii=True)[1:-1]


def escaped_env(env: dict[str, str]) -> dict[str, str]:
    """Env keys and values ready for the SDK's ``{ key: "…", value: "…" }`` pasting."""
    return {literal(key): literal(value) for key, value in env.items()}


def price(value: float) -> str:
    """A bid as a GraphQL float, rounded up to 4 decimals so rounding never bids below the quote."""
    return f"{math.ceil(value * 10_000 - 1e-9) / 10_000:.4f}"


def interruptible_pod_mutation(
    *,
    name: str,
    image: str,
    gpu_type_id: str,
    cloud_type: str,
    gpu_count: int,
    bid_per_gpu: float,
    container_disk_gb: int,
    volume_gb: int,
    docker_args: str,
    env: dict[str, str],
    country_code: str | None = None,
    ports: str | None = None,
) -> str:
    """``podRentInterruptable``: the spot twin of the SDK's ``podFindAndDeployOnDemand``.
    Takes raw values and escapes them itself."""
    fields = [
        f"bidPerGpu: {price(bid_per_gpu)}",
        f'name: "{literal(name)}"',
        f'imageName: "{literal(image)}"',
        f'gpuTypeId: "{literal(gpu_type_id)}"',
        f"cloudType: {cloud_type}",
        f"gpuCount: {int(gpu_count)}",
        f"volumeInGb: {int(volume_gb)}",
        f"containerDiskInGb: {int(container_disk_gb)}",
        "minVcpuCount: 1",
        "minMemoryInGb: 1",
        "startSsh: true",
        "supportPublicIp: true",
        f'dockerArgs: "{literal(docker_args)}"',
    ]
    if country_code:
        fields.append(f'countryCode: "{literal(country_code)}"')
    if ports:
        fields.append(f'ports: "{literal(ports.replace(" ", ""))}"')
    pairs = ", ".join(f'{{ key: "{literal(k)}", value: "{literal(v)}" }}' for k, v in env.items())
    fields.append(f"env: [{pairs}]")
    return (
        "mutation {\n  podRentInterruptable(\n    input: {\n      " + ", ".join(fields) + "\n    }\n  ) {\n"
        "    id\n    imageName\n    env\n    machineId\n    costPerHr\n    machine {\n      podHostId\n    }\n  }\n}\n"
    )


def save_endpoint_workers_mutation(endpoint: Mapping[str, Any], *, workers_min: int, workers_max: int) -> str:
    """``saveEndpoint`` with the endpoint's ``id``: RunPod's way to modify an endpoint. ``endpoint`` is
    the endpoint as ``runpod.get_endpoints()`` reads it; its required fields (name, gpuIds,
    templateId) and the settings in ``_KEPT_SETTINGS`` it has are sent back as they are, so the
    only change is to workersMin and workersMax."""
    missing = [key for key in ("id", *ENDPOINT_REQUIRED) if not isinstance(endpoint.get(key), str)]
    if missing:
        raise ValueError(f"RunPod endpoint {endpoint.get('id')!r} was read without {', '.join(missing)}")
    fields = [f'id: "{literal(endpoint["id"])}"']
    fields += [f'{key}: "{literal(endpoint[key])}"' for key in ENDPOINT_REQUIRED]
    for key, kind in _KEPT_SETTINGS:
        value = endpoint.get(key)
        if value is None or isinstance(value, bool):
            continue
        if kind is int and isinstance(value, (int, float)):
            fields.append(f"{key}: {int(value)}")
        elif kind is str and isinstance(value, str):
            fields.append(f'{key}: "{literal(value)}"')
    fields += [f"workersMin: {int(workers_min)}", f"workersMax: {int(workers_max)}"]
    return ("mutation {\n  saveEndpoint(\n    input: {\n      " + ", ".join(fields) + "\n    }\n  ) {\n"
            "    id\n    workersMin\n    workersMax\n  }\n}\n")
