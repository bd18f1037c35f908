"""Jobs on AWS and Google Cloud, end to end: our API, Postgres, Redis, Celery worker and beat, the
real boto3 and google-cloud-compute SDKs against moto's EC2/Auto Scaling server and our Compute
Engine emulator, with instances that really run their start scripts (tests.emulators.instance_runner)
and a model-server pool (tests.emulators.pool_server) that checks every request's signature.

What users judge us on: the job lands on the cheapest fitting cloud capacity, its output comes
back, the instance is gone afterwards, what it cost is recorded; a cloud without capacity, or an
instance that vanishes, moves the job to the other cloud; and an inference pool scaled to zero
grows for queued work (never past its limit) and shrinks back when idle. Every test ends asking:
is anything still running at the provider?
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import select

from tests.emulators.gcp import GCPEmulator
from tests.emulators.instance_runner import EC2Runner, GCPRunner
from tests.emulators.pool_server import DEFAULT_SECRET, PoolServer

from .conftest import KEY_A, Stack, isolated_stack

REGION = "us-east-1"
PROJECT = "gpufleet-test"
ZONE = "europe-west4-a"
ASG = "llm-asg"
MIG = "llm-mig"
POOL_SECRET_ENV = "GPUFLEET_TEST_POOL_SECRET"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAGPUFLEETCLOUDS01", "AWS_SECRET_ACCESS_KEY": "clouds-test-secret-" + "c" * 21,
           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
RESULT_LINE = "echo 'GPUFLEET_RESULT {\"loss\": 0.12}'"


def _providers_yaml(moto: str, ami: str, gcp: str, pool: str) -> str:
    return f"""
providers:
  aws:
    type: aws
    regions: [{REGION}]
    endpoint_url: "{moto}"
    image_id: "{ami}"
    retry: 2
    max_retry_wait: 0.2
    request_timeout: 5
    provisioning_timeout: 20
    not_found_grace: 5
    instance_types:
      g5.xlarge: {{gpu: A10G, gpu_count: 1, gpu_memory_gb: 24, on_demand: {{{REGION}: 1.006}}, spot: {{{REGION}: 0.45}}}}
  gcp:
    type: gcp
    project: {PROJECT}
    zones: [{ZONE}]
    api_endpoint: "{gcp}"
    anonymous: true
    operation_wait: 3
    request_timeout: 5
    retry_seconds: 1
    provisioning_timeout: 20
    machine_types:
      g2-standard-8: {{gpu: L4, gpu_count: 1, gpu_memory_gb: 24, on_demand: {{europe-west4: 0.85}}, spot: {{europe-west4: 0.34}}}}
  aws-pool:
    type: aws_pool
    asg_name: {ASG}
    region: {REGION}
    endpoint_url: "{moto}"
    endpoint: "{pool}"
    member_concurrency: 2
    price_per_hour: 1.2
    gpu: A10G
    gpu_memory_gb: 24
    kinds: [inference]
    models: [llama-3-8b]
    scale_down_idle_seconds: 2
    scale_cooldown_seconds: 0
    group_cache_seconds: 0.5
    secret_env: {POOL_SECRET_ENV}
    timeout: 20
  gcp-pool:
    type: gcp_pool
    project: {PROJECT}
    zone: {ZONE}
    instance_group_manager: {MIG}
    api_endpoint: "{gcp}"
    anonymous: true
    endpoint: "{pool}"
    min_size: 0
    max_size: 2
    member_concurrency: 2
    price_per_hour: 0.9
    gpu: L4
    gpu_memory_gb: 24
    kinds: [inference]
    models: [llama-3-8b]
    scale_down_idle_seconds: 2
    scale_cooldown_seconds: 0
    secret_env: {POOL_SECRET_ENV}
    timeout: 20
    request_timeout: 5
    retry_seconds: 1
  local:
    slots: 4
"""


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """moto's credentials for this process (the runner's and the test's boto3) and, through
    launch_stack's copy of the environment, for the stack's processes."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def moto(aws_env: None) -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=f"{ASG}-tpl", LaunchTemplateData={"ImageId": image,
                                                                                  "InstanceType": "g5.xlarge"})
    asg(url).create_auto_scaling_group(AutoScalingGroupName=ASG, LaunchTemplate={"LaunchTemplateName": f"{ASG}-tpl"},
                                    MinSize=0, MaxSize=2, DesiredCapacity=0, AvailabilityZones=[f"{REGION}a"])
    yield url
    server.stop()


@pytest.fixture(scope="module")
def emu() -> Iterator[GCPEmulator]:
    with GCPEmulator(boot_delay=0.3, member_boot_delay=0.3) as emulator:
        emulator.add_group(PROJECT, ZONE, MIG, size=0)
        yield emulator


@pytest.fixture(scope="module")
def pool() -> Iterator[PoolServer]:
    with PoolServer(models=["llama-3-8b"]) as server:
        yield server


@pytest.fixture(scope="module")
def ec2_runner(moto: str) -> Iterator[EC2Runner]:
    with EC2Runner(moto, [REGION]) as runner:
        yield runner


@pytest.fixture(scope="module")
def gce_runner(emu: GCPEmulator) -> Iterator[GCPRunner]:
    with GCPRunner(emu) as runner:
        yield runner


@pytest.fixture(scope="module")
def clouds(moto: str, emu: GCPEmulator, pool: PoolServer, ec2_runner: EC2Runner, gce_runner: GCPRunner,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ami = boto3.client("ec2", region_name=REGION, endpoint_url=moto).describe_images(
        Owners=["amazon"])["Images"][0]["ImageId"]
    env = {**AWS_ENV, "GPUFLEET_AUTOSCALE_INTERVAL_SECONDS": "1", POOL_SECRET_ENV: DEFAULT_SECRET}
    with isolated_stack(tmp_path_factory.mktemp("clouds"), 15, _providers_yaml(moto, ami, emu.url, pool.url),
                        env) as running:
        yield running


@pytest.fixture()
def client(clouds: Stack, emu: GCPEmulator):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    emu.reset()
    with Client(clouds.url, KEY_A) as c:
        yield c


# --- helpers ---------------------------------------------------------------------------------


def asg(moto: str) -> Any:
    return boto3.client("autoscaling", region_name=REGION, endpoint_url=moto)


def ec2_client(moto: str) -> Any:
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto)


def reservations_of(job_id: uuid.UUID) -> list:  # type: ignore[type-arg]
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Reservation

    with session_scope() as s:
        return list(s.scalars(select(Reservation).where(Reservation.job_id == job_id).order_by(Reservation.created_at)))


def wait_released(job_id: uuid.UUID, timeout: float = 15.0) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        rows = reservations_of(job_id)
        if rows and all(r.state in ("released", "failed") for r in rows):
            return rows
        assert time.monotonic() < deadline, f"reservations not settled: {[(r.label, r.state) for r in rows]}"
        time.sleep(0.1)


def live_ec2(moto: str) -> list[dict[str, Any]]:
    answer = ec2_client(moto).describe_instances(Filters=[
        {"Name": "tag-key", "Values": ["gpufleet-label"]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    return [i for r in answer["Reservations"] for i in r["Instances"]]


def live_gce(emu: GCPEmulator) -> list[dict[str, Any]]:
    return [i for i in emu.instances() if "gpufleet-label" in (i.get("labels") or {})]


def assert_nothing_running(moto: str, emu: GCPEmulator, runners: tuple[EC2Runner, GCPRunner],
                           timeout: float = 15.0) -> None:
    """No labelled EC2 instance or GCE VM is alive, no start script runs, and both pools are at zero."""
    deadline = time.monotonic() + timeout
    while True:
        left = {"ec2": [i["InstanceId"] for i in live_ec2(moto)], "gce": [i["name"] for i in live_gce(emu)],
                "scripts": [r.instance for runner in runners for r in runner.running()],
                "asg": asg_desired(moto), "mig": emu.group(ZONE, MIG)["target_size"]}
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"still running at the providers: {left}"
        time.sleep(0.1)


def asg_desired(moto: str) -> int:
    return int(asg(moto).describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]["DesiredCapacity"])


def submit(client, command: str, kind: str = "command", **requirements: Any):  # type: ignore[no-untyped-def]
    """A job that runs ``command`` on a rented instance (max 3 attempts, so failover has room)."""
    spec: dict[str, Any] = {"command": command}
    if kind == "training":
        spec.update(base_model="llama-3-8b", dataset_uri="s3://datasets/tiny.jsonl", env={"EPOCHS": "1"})
    return client.submit(kind, spec, requirements=requirements, max_attempts=3)


def reasons(job) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.reason for e in job.events or []]


@pytest.fixture()
def nothing_left(moto: str, emu: GCPEmulator, ec2_runner: EC2Runner, gce_runner: GCPRunner):  # type: ignore[no-untyped-def]
    return lambda: assert_nothing_running(moto, emu, (ec2_runner, gce_runner))


# --- instances: one per job ------------------------------------------------------------------


def test_training_job_runs_on_aws_spot_returns_its_output_and_the_instance_is_terminated(
        client, moto, ec2_runner, nothing_left) -> None:  # type: ignore[no-untyped-def]
    job = submit(client, f"echo trained on $GPUFLEET_GPU in $GPUFLEET_REGION; {RESULT_LINE}",
                 gpu=["A10G"], providers=["aws"], interruptible=True)
    done = client.wait(job.id, timeout=40)
    assert done.status.value == "succeeded", done.error
    # Spot is allowed and $0.45/h beats on-demand's $1.006/h for the same g5.xlarge.
    assert (done.provider, done.offer_id, done.attempt) == ("aws", f"{REGION}/g5.xlarge/spot", 1)
    rationale = done.placement["rationale"] if done.placement else ""
    assert rationale.startswith("cheapest of 2 fitting offers") and f"next best aws/{REGION}/g5.xlarge/on_demand" in rationale
    assert done.result and done.result["loss"] == 0.12
    assert done.result["stdout"].startswith(f"trained on A10G in {REGION}")
    (row,) = wait_released(job.id)
    assert row.state == "released" and row.price_per_hour == pytest.approx(0.45) and row.cost > 0
    assert client.get(job.id).cost == pytest.approx(row.cost)
    # The instance ran the UserData, which powered it off; with shutdown behaviour "terminate" it is gone.
    inst = ec2_client(moto).describe_instances(InstanceIds=[row.external_id])["Reservations"][0]["Instances"][0]
    assert inst["State"]["Name"] == "terminated" and inst.get("InstanceLifecycle") == "spot"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["gpufleet-label"] == row.label and tags["gpufleet-job"] == str(job.id)
    run = ec2_runner.run_of(row.external_id)
    # The script powers off when done — unless our release terminated the instance first, right after its report.
    assert run is not None
    assert (run.shutdown_requested and run.power_requests[-1] == "shutdown -h now") or run.state == "killed"
    nothing_left()


def test_training_job_runs_on_gcp_on_demand_in_the_eu_and_the_vm_is_deleted(
        client, emu, gce_runner, nothing_left) -> None:  # type: ignore[no-untyped-def]
    job = submit(client, f"echo trained on gce for $EPOCHS epoch; {RESULT_LINE}", "training",
                 gpu=["L4"], regions=["EU"], providers=["gcp"], interruptible=False)
    done = client.wait(job.id, timeout=40)
    assert done.status.value == "succeeded", done.error
    # On-demand only (interruptible: false), so the $0.34/h spot VM was never a candidate.
    assert (done.provider, done.offer_id) == ("gcp", f"g2-standard-8@{ZONE}")
    assert done.result and done.result["loss"] == 0.12 and done.result["stdout"].startswith("trained on gce for 1 epoch")
    (row,) = wait_released(job.id)
    assert row.state == "released" and row.price_per_hour == pytest.approx(0.85) and row.cost > 0
    assert client.get(job.id).cost == pytest.approx(row.cost)
    run = gce_runner.run_of(row.external_id)
    # The startup script did not power off (as on GCE): it was our release that deleted the VM — either after
    # the script ended, or in the moment between its report and its exit (then the runner saw it killed).
    assert run is not None and not run.shutdown_requested
    assert (run.state, run.exit_code) == ("exited", 0) or run.state == "killed"
    zone, _, name = row.external_id.partition("/")
    assert emu.instance(zone, name) is None
    assert any(r["method"] == "DELETE" and r["path"].endswith(f"/instances/{name}") for r in emu.request_log)
    nothing_left()


def test_gcp_out_of_capacity_fails_over_to_aws(client, emu, nothing_left) -> None:  # type: ignore[no-untyped-def]
    emu.exhaust(ZONE, count=1, mode="operation")  # the real stockout: the insert is accepted, its operation fails
    job = submit(client, f"echo ran; {RESULT_LINE}", gpu=["A10G", "L4"], providers=["aws", "gcp"], interruptible=True)
    done = client.wait(job.id, timeout=40)
    assert done.status.value == "succeeded", done.error
    # GCP spot ($0.34/h) was the cheapest fit; without capacity there, AWS spot ($0.45/h) took the job —
    # on the same attempt: a stockout is not a failure of the job.
    assert (done.provider, done.offer_id, done.attempt) == ("aws", f"{REGION}/g5.xlarge/spot", 1)
    placed = [r for r in reasons(done) if r.startswith("placed:")]
    assert placed[0].startswith(f"placed: cheapest of 4 fitting offers: gcp/g2-standard-8@{ZONE}:spot")
    assert f"next best aws/{REGION}/g5.xlarge/spot" in placed[0] and f"aws/{REGION}/g5.xlarge/spot" in placed[1]
    stockout = next(r for r in reasons(done) if "is busy" in r)
    assert "no capacity" in stockout and "ZONE_RESOURCE_POOL_EXHAUSTED" in stockout, stockout
    first, second = wait_released(job.id)
    assert (first.provider, first.state, first.cost) == ("gcp", "failed", 0)
    assert second.provider == "aws" and second.state == "released" and second.cost > 0
    assert client.get(job.id).cost == pytest.approx(second.cost)
    assert done.result and done.result["loss"] == 0.12
    nothing_left()


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_instance_that_disappears_mid_run_fails_over(cloud, client, moto, emu, ec2_runner, gce_runner,
                                                     nothing_left) -> None:  # type: ignore[no-untyped-def]
    gpu, runner = ("A10G", ec2_runner) if cloud == "aws" else ("L4", gce_runner)
    # The first attempt would run far longer than the test; a later one finishes at once.
    command = f'if [ "$GPUFLEET_ATTEMPT" = 1 ]; then sleep 60; fi; echo attempt $GPUFLEET_ATTEMPT; {RESULT_LINE}'
    job = submit(client, command, gpu=[gpu], providers=[cloud], interruptible=True)
    first = runner.wait_for(lambda r: str(job.id) in r.script and r.state == "running")
    if cloud == "aws":
        ec2_client(moto).terminate_instances(InstanceIds=[first.instance])  # out of band, behind our back
    else:
        zone, _, name = first.instance.partition("/")
        emu.preempt(zone, name)  # spot reclaimed: TERMINATED, then deleted
    done = client.wait(job.id, timeout=40)
    assert done.status.value == "succeeded", done.error
    assert done.provider == cloud and done.attempt == 2 and done.result and done.result["stdout"].startswith("attempt 2")
    assert not done.offer_id or not done.offer_id.endswith("spot")  # the spot offer failed this job: on-demand now
    lost = next(r for r in reasons(done) if "retrying elsewhere" in r)
    assert ("terminated by someone else" if cloud == "aws" else "preempted") in lost, lost
    assert first.state == "killed" and first.exit_code is not None and first.exit_code < 0  # the script went with it
    gone, second = wait_released(job.id)
    assert gone.state == "released" and gone.cost > 0  # it ran (and billed) until it vanished
    assert second.state == "released" and client.get(job.id).cost == pytest.approx(gone.cost + second.cost)
    nothing_left()


# --- pools: scaled from zero by the beat -----------------------------------------------------


def _chat_jobs(client, provider: str, count: int) -> list:  # type: ignore[no-untyped-def,type-arg]
    return [client.submit("inference", {"model": "llama-3-8b", "max_tokens": 16,
                                        "messages": [{"role": "user", "content": f"question {i}"}]},
                          requirements={"providers": [provider]}, max_attempts=2) for i in range(count)]


def _wait_all(client, jobs: list, sizes: Any, timeout: float = 40.0) -> tuple[list, list[tuple[int, int]]]:  # type: ignore[no-untyped-def,type-arg]
    """Every job finished, and the pool's (target size, members serving) as seen every 0.1 s meanwhile."""
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while True:
        seen.append(sizes())
        states = [client.get(j.id, events=False) for j in jobs]
        if all(s.done for s in states):
            return [client.get(j.id) for j in jobs], seen
        assert time.monotonic() < deadline, f"jobs not done: {[s.status.value for s in states]}, sizes {seen[-5:]}"
        time.sleep(0.1)


def _assert_served_by_the_pool(done: list, provider: str, pool: PoolServer, before: int) -> None:  # type: ignore[type-arg]
    for job in done:
        assert job.status.value == "succeeded", "\n".join(reasons(job))
        assert job.provider == provider and job.cost > 0 and job.result and job.result["text"]
        # Jobs placed together may race for the last slot: the loser waits again on the same attempt.
        assert job.attempt == 1
        *busy, row = wait_released(job.id)
        assert all(r.state == "failed" and r.cost == 0 and "busy" in (r.error or "") for r in busy)
        assert row.state == "released" and job.cost == pytest.approx(row.cost)
    # Queued while the pool had no member (not failed): they waited for the autoscaler.
    assert any(r.startswith("waiting for capacity") and "no free capacity" in r for job in done for r in reasons(job))
    served = pool.work_requests()[before:]
    assert len(served) == len(done) and all(r["status"] == 200 for r in served)
    assert all(any(k.lower() == "x-gpufleet-signature" for k in r["headers"]) for r in served)


def _wait_size(sizes: Any, size: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := sizes()[0]) != size:
        assert time.monotonic() < deadline, f"pool size {now}, never {size}"
        time.sleep(0.1)


def test_asg_pool_scales_up_from_zero_for_queued_inference_and_back_down_when_idle(
        client, moto, pool, nothing_left) -> None:  # type: ignore[no-untyped-def]
    autoscaling = asg(moto)
    def desired() -> tuple[int, int]:
        group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]
        return group["DesiredCapacity"], sum(1 for m in group["Instances"] if m["LifecycleState"] == "InService")

    assert desired() == (0, 0)
    before = len(pool.work_requests())
    jobs = _chat_jobs(client, "aws-pool", 5)  # 5 requests / 2 per member = 3 members wanted; MaxSize is 2
    done, seen = _wait_all(client, jobs, desired)
    _assert_served_by_the_pool(done, "aws-pool", pool, before)
    # Grown from zero, capped at MaxSize (5 jobs / 2 per member wanted 3; moto would accept more), members in service.
    assert max(d for d, _ in seen) == 2 and max(m for _, m in seen) >= 1
    _wait_size(desired, 0)  # idle for scale_down_idle_seconds: back to MinSize
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]
    assert group["Instances"] == [] and group["MaxSize"] == 2
    tags = {t["Key"] for t in group["Tags"]}
    assert {"gpufleet:scaled-at", "gpufleet:busy-at"} <= tags  # the decision's memory lives on the group
    nothing_left()


def test_mig_pool_scales_up_from_zero_for_queued_inference_and_back_down_when_idle(
        client, emu, pool, nothing_left) -> None:  # type: ignore[no-untyped-def]
    def size() -> tuple[int, int]:
        group = emu.group(ZONE, MIG)
        return group["target_size"], sum(1 for m in group["members"] if m["instanceStatus"] == "RUNNING")

    assert size() == (0, 0)
    resized_before = len(emu.resizes())
    before = len(pool.work_requests())
    jobs = _chat_jobs(client, "gcp-pool", 5)
    done, seen = _wait_all(client, jobs, size)
    _assert_served_by_the_pool(done, "gcp-pool", pool, before)
    assert max(t for t, _ in seen) == 2 and max(m for _, m in seen) >= 1
    _wait_size(size, 0)
    resizes = emu.resizes()[resized_before:]
    assert resizes[-1] == 0 and max(resizes) == 2, resizes  # never past max_size, back to min_size
    time.sleep(emu.member_delete_delay + 0.05)
    assert emu.group(ZONE, MIG)["members"] == []
    nothing_left()
