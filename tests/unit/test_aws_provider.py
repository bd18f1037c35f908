"""The AWS adapters through real boto3 against moto's server (EC2 and Auto Scaling), and against a
small fault stub for what moto cannot produce (capacity refusals, auth failures, stuck states, an
unreachable endpoint). Nothing of ours is mocked."""

from __future__ import annotations

import base64
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from providers.aws import AWSPoolProvider, AWSProvider
from providers.aws.provider import LABEL_TAG, client_token
from providers.aws.userdata import job_env, user_data
from providers.base import (
    JobSpec,
    Lease,
    NoCapacity,
    NotYetReleased,
    Offer,
    PermanentProviderError,
    Requirements,
    RunHandle,
    TransientProviderError,
)
from tests.emulators.aws_faults import AWSFaults
from tests.emulators.callback import Receiver
from tests.emulators.pool_server import PoolServer

KEY_ID = "AKIAGPUFLEETTEST0001"
SECRET = "gpufleet-test-secret-" + "s" * 19
POOL_SECRET = "pool-secret-for-aws-pool-test"
POOL_SECRET_ENV = "GPUFLEET_TEST_AWS_POOL_SECRET"
CATALOG: dict[str, Any] = {
    "g5.xlarge": {"gpu": "A10G", "gpu_count": 1, "gpu_memory_gb": 24,
                  "on_demand": {"us-east-1": 1.006, "eu-west-1": 1.123}, "spot": {"us-east-1": 0.45, "eu-west-1": 0.5}},
    "p4d.24xlarge": {"gpu": "A100", "gpu_count": 8, "gpu_memory_gb": 40,
                     "on_demand": {"us-east-1": 32.77}, "spot": {"us-east-1": 12.0}},
    "g6.xlarge": {"gpu": "L4", "gpu_count": 1, "gpu_memory_gb": 24, "on_demand": {"eu-west-1": 0.9}},
}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def moto(moto_url: str) -> str:
    """The moto server, emptied: every test starts from a clean account."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=10).read()
    return moto_url


def ec2(url: str, region: str = "us-east-1") -> Any:
    return boto3.client("ec2", region_name=region, endpoint_url=url)


def amis(url: str) -> dict[str, str]:
    return {r: ec2(url, r).describe_images(Owners=["amazon"])["Images"][0]["ImageId"] for r in ("us-east-1", "eu-west-1")}


def make(url: str, images: dict[str, str] | str = "ami-12345678", **config: Any) -> AWSProvider:
    base = {"regions": ["us-east-1", "eu-west-1"], "endpoint_url": url, "image_id": images, "instance_types": CATALOG,
            "retry": 2, "max_retry_wait": 0.05, "request_timeout": 5}
    return AWSProvider("aws", {**base, **config})


def job(command: Any = "echo hi", kind: str = "command", attempt: int = 1, **spec: Any) -> JobSpec:
    job_id = uuid.uuid4().hex[:8]
    if command is not None:
        spec["command"] = command
    env = {"GPUFLEET_JOB_ID": job_id, "GPUFLEET_JOB_TOKEN": "job-token-x", "GPUFLEET_CALLBACK_URL": "http://cb/report"}
    return JobSpec(job_id=job_id, kind=kind, attempt=attempt, spec=spec, timeout_seconds=600,  # type: ignore[arg-type]
                   env=env, label=f"gpufleet-{job_id}-{attempt}")


def offer(provider: AWSProvider, offer_id: str) -> Offer:
    return next(o for o in provider.offers(Requirements(interruptible=True), "command", {"command": "x"})
                if o.offer_id == offer_id)


def ids(offers: list[Offer]) -> set[str]:
    return {o.offer_id for o in offers}


def describe(url: str, instance_id: str, region: str = "us-east-1") -> dict[str, Any]:
    return ec2(url, region).describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


# --- offers ----------------------------------------------------------------------------------


def test_offers_filter_by_gpu_region_market_and_price() -> None:
    provider = make("http://127.0.0.1:9")  # offers come from the catalog: no call is made
    spec = {"command": "python train.py"}
    everything = provider.offers(Requirements(), "command", spec)
    assert ids(everything) == {"us-east-1/g5.xlarge/on_demand", "us-east-1/g5.xlarge/spot", "eu-west-1/g5.xlarge/on_demand",
                               "eu-west-1/g5.xlarge/spot", "us-east-1/p4d.24xlarge/on_demand",
                               "us-east-1/p4d.24xlarge/spot", "eu-west-1/g6.xlarge/on_demand"}
    spot = next(o for o in everything if o.offer_id == "eu-west-1/g5.xlarge/spot")
    assert spot.interruptible and spot.price_per_hour == 0.5 and spot.gpu == "A10G" and spot.region == "eu-west-1"
    assert spot.reliability < 1 and spot.kinds == ["command", "training"]

    assert ids(provider.offers(Requirements(gpu=["A100"]), "training", spec)) == {
        "us-east-1/p4d.24xlarge/on_demand", "us-east-1/p4d.24xlarge/spot"}
    assert ids(provider.offers(Requirements(gpu=["nvidia l4"]), "command", spec)) == {"eu-west-1/g6.xlarge/on_demand"}
    assert ids(provider.offers(Requirements(gpu_count=2), "command", spec)) == {
        "us-east-1/p4d.24xlarge/on_demand", "us-east-1/p4d.24xlarge/spot"}
    assert ids(provider.offers(Requirements(min_gpu_memory_gb=32), "command", spec)) == {
        "us-east-1/p4d.24xlarge/on_demand", "us-east-1/p4d.24xlarge/spot"}
    assert {o.region for o in provider.offers(Requirements(regions=["EU"]), "command", spec)} == {"eu-west-1"}
    assert {o.region for o in provider.offers(Requirements(regions=["US"]), "command", spec)} == {"us-east-1"}
    assert {o.region for o in provider.offers(Requirements(regions=["NA"]), "command", spec)} == {"us-east-1"}
    assert not any(o.interruptible for o in provider.offers(Requirements(interruptible=False), "command", spec))
    assert ids(provider.offers(Requirements(max_price_per_hour=0.6), "command", spec)) == {
        "us-east-1/g5.xlarge/spot", "eu-west-1/g5.xlarge/spot"}
    no_spot = make("http://127.0.0.1:9", use_spot=False)
    assert not any(o.interruptible for o in no_spot.offers(Requirements(interruptible=True), "command", spec))


def test_offers_only_for_kinds_that_run_a_command() -> None:
    provider = make("http://127.0.0.1:9", image_id={"us-east-1": "ami-1"})
    assert provider.offers(Requirements(), "command", {}) == []  # nothing to run
    assert provider.offers(Requirements(), "inference", {"model": "llama"}) == []
    served = provider.offers(Requirements(), "inference", {"model": "llama", "command": "python serve_once.py"})
    assert served and {o.region for o in served} == {"us-east-1"}  # eu-west-1 has no image
    assert all("inference" in o.kinds for o in served)


def test_config_refuses_credentials_and_needs_an_image() -> None:
    with pytest.raises(ValueError, match="credentials do not belong") as err:
        make("http://x", aws_secret_access_key=SECRET)
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="image_id"):
        make("http://x", images="")
    with pytest.raises(ValueError, match="regional"):
        make("http://x", subnet_id="subnet-1")


def test_spot_prices_refresh_from_aws_and_keep_the_catalog_otherwise(moto: str) -> None:
    provider = make(moto, refresh_spot_prices=True)
    offers = {o.offer_id: o for o in provider.offers(Requirements(), "command", {"command": "x"})}
    assert offers["us-east-1/g5.xlarge/spot"].price_per_hour != 0.45  # moto's own (fake) price
    assert offers["us-east-1/g5.xlarge/on_demand"].price_per_hour == 1.006
    down = make("http://127.0.0.1:9", refresh_spot_prices=True, retry=1)
    assert offer(down, "us-east-1/g5.xlarge/spot").price_per_hour == 0.45


# --- the instance cycle on moto -------------------------------------------------------------


def test_reserve_launches_a_labelled_instance_whose_user_data_runs_the_wrapper(moto: str) -> None:
    provider = make(moto, amis(moto))
    spec = job(["python", "train.py"], env={"EPOCHS": "3"})
    lease = provider.reserve(offer(provider, "eu-west-1/g5.xlarge/on_demand"), spec)
    assert lease.external_id.startswith("i-") and lease.label == spec.label and lease.price_per_hour == 1.123
    inst = describe(moto, lease.external_id, "eu-west-1")
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags[LABEL_TAG] == spec.label and tags["Name"] == spec.label and tags["gpufleet-job"] == spec.job_id
    assert inst["InstanceType"] == "g5.xlarge" and "InstanceLifecycle" not in inst
    assert inst["ClientToken"] == lease.data["client_token"] == client_token(spec.label, 1, "eu-west-1/g5.xlarge/on_demand")
    raw = ec2(moto, "eu-west-1").describe_instance_attribute(InstanceId=lease.external_id, Attribute="userData")
    script = base64.b64decode(raw["UserData"]["Value"]).decode()
    assert script.startswith("#!/bin/bash") and "gpufleet-wrapper" in script and "shutdown -h now" in script
    assert "export GPUFLEET_CALLBACK_URL=http://cb/report" in script and "export EPOCHS=3" in script
    assert "export GPUFLEET_REGION=eu-west-1" in script

    handle = provider.start(lease, spec)
    status = provider.poll(handle)
    assert status.state == "running" and not status.provisioning


def test_user_data_runs_the_job_and_reports_before_powering_off(tmp_path: Any) -> None:
    """The script itself, run by bash here with stand-ins for ``shutdown`` and ``sleep`` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "shutdown").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/shutdowns\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    receiver = Receiver()
    try:
        spec = job("echo \"it's $GREETING\"; echo 'GPUFLEET_RESULT {\"n\": 3}'", env={"GREETING": "a 'quoted' $value"})
        spec.env["GPUFLEET_CALLBACK_URL"] = receiver.url
        script = user_data(spec, job_env(spec, {"GPUFLEET_REGION": "us-east-1"}))
        done = subprocess.run(["bash", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert receiver.got.wait(10)
        body = receiver.reports[0]["body"]
        assert body["state"] == "succeeded" and body["result"]["n"] == 3
        assert "it's a 'quoted' $value" in body["result"]["stdout"]
        assert receiver.reports[0]["auth"] == "Bearer job-token-x"
        assert "-h now" in (tmp_path / "shutdowns").read_text()
    finally:
        receiver.close()


def test_client_token_is_stable_per_label_and_attempt() -> None:
    where = "us-east-1/g5.xlarge/spot"
    assert client_token("gpufleet-a-1", 1, where) == client_token("gpufleet-a-1", 1, where)
    assert client_token("gpufleet-a-1", 1, where) != client_token("gpufleet-a-1", 2, where)
    assert client_token("gpufleet-a-1", 1, where) != client_token("gpufleet-b-1", 1, where)
    assert client_token("gpufleet-a-1", 1, where) != client_token("gpufleet-a-1", 1, "us-east-1/g5.xlarge/on_demand")
    assert len(client_token("x" * 200, 1, where)) <= 64


def test_release_is_idempotent_and_owned_lists_only_our_labelled_instances(moto: str) -> None:
    images = amis(moto)
    provider = make(moto, images)
    ours = provider.reserve(offer(provider, "us-east-1/g5.xlarge/spot"), job())
    client = ec2(moto)
    client.run_instances(ImageId=images["us-east-1"], InstanceType="t3.micro", MinCount=1, MaxCount=1)
    client.run_instances(ImageId=images["us-east-1"], InstanceType="t3.micro", MinCount=1, MaxCount=1,
                         TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": LABEL_TAG, "Value": "other"}]}])
    owned = provider.owned()
    assert [r.external_id for r in owned] == [ours.external_id]
    found = owned[0]
    assert found.label == ours.label and found.offer_id == "us-east-1/g5.xlarge/spot" and found.price_per_hour == 0.45
    assert found.created_at is not None and abs(found.created_at - time.time()) < 120

    provider.release(ours)
    provider.release(ours)  # already terminating: fine
    assert describe(moto, ours.external_id)["State"]["Name"] in ("shutting-down", "terminated")
    assert provider.owned() == []
    # The reaper's view of a lease (no data, region in the offer id) releases too; an unknown id is gone already.
    provider.release(found.as_lease())
    gone = Lease(provider="aws", offer_id="", external_id="i-0123456789abcdef0", label="gpufleet-x", price_per_hour=0,
                 reserved_at=time.time() - 3600)
    provider.release(gone)


def test_a_spot_interruption_is_a_transient_failure(moto: str) -> None:
    provider = make(moto, amis(moto))
    spec = job()
    lease = provider.reserve(offer(provider, "us-east-1/g5.xlarge/spot"), spec)
    assert describe(moto, lease.external_id)["InstanceLifecycle"] == "spot"
    handle = provider.start(lease, spec)
    ec2(moto).terminate_instances(InstanceIds=[lease.external_id])  # out of band: not us
    status = provider.poll(handle)
    assert status.state == "failed" and status.transient and lease.external_id in (status.error or "")


def test_health_answers_with_latency(moto: str) -> None:
    health = make(moto).health()
    assert health.ok and "ms" in health.detail


# --- what only the fault stub can show ------------------------------------------------------


@pytest.fixture
def faults() -> Iterator[AWSFaults]:
    with AWSFaults() as stub:
        yield stub


def handle_for(instance_id: str, region: str = "us-east-1", reserved_at: float | None = None,
               market: str = "on_demand") -> RunHandle:
    lease = Lease(provider="aws", offer_id=f"{region}/g5.xlarge/{market}", external_id=instance_id, label="gpufleet-x-1",
                  price_per_hour=1.0, reserved_at=time.time() if reserved_at is None else reserved_at,
                  data={"region": region, "interruptible": market == "spot"})
    return RunHandle(provider="aws", lease=lease, started_at=lease.reserved_at)


@pytest.mark.parametrize("code", ["InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
                                  "InstanceLimitExceeded", "Unsupported"])
def test_capacity_refusals_are_no_capacity_without_retrying(faults: AWSFaults, code: str) -> None:
    faults.fail("RunInstances", code, f"We currently do not have sufficient capacity ({code})", status=500)
    provider = make(faults.url)
    spec = job()
    with pytest.raises(NoCapacity, match=code):
        provider.reserve(offer(provider, "us-east-1/g5.xlarge/spot"), spec)
    assert faults.actions() == ["RunInstances"]
    sent = faults.requests[0]["params"]
    assert sent["ClientToken"] == client_token(spec.label, 1, "us-east-1/g5.xlarge/spot")
    assert sent["InstanceMarketOptions.MarketType"] == "spot"
    assert sent["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.45"
    assert sent["TagSpecification.1.Tag.1.Value"] == spec.label


def test_auth_failures_are_permanent_and_never_show_credentials(faults: AWSFaults) -> None:
    faults.fail("*", "AuthFailure", f"credential {KEY_ID} with secret {SECRET} was not accepted", status=401)
    provider = make(faults.url)
    with pytest.raises(PermanentProviderError) as err:
        provider.reserve(offer(provider, "us-east-1/g5.xlarge/on_demand"), job())
    message = str(err.value)
    assert "AuthFailure" in message and "credential" in message and "\n" not in message
    assert KEY_ID not in message and SECRET not in message
    health = provider.health()
    assert not health.ok and KEY_ID not in health.detail and SECRET not in health.detail
    with pytest.raises(PermanentProviderError):
        provider.owned()

    faults.reset()
    faults.fail("RunInstances", "InvalidParameterValue", f"bad value near {SECRET}")
    with pytest.raises(PermanentProviderError, match="InvalidParameterValue") as err:
        provider.reserve(offer(provider, "us-east-1/g5.xlarge/on_demand"), job())
    assert SECRET not in str(err.value) and "***" in str(err.value)


def test_missing_credentials_are_a_clear_permanent_error(faults: AWSFaults, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Any) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    provider = make(faults.url)
    with pytest.raises(PermanentProviderError, match="no usable credentials"):
        provider.reserve(offer(provider, "us-east-1/g5.xlarge/on_demand"), job())
    assert faults.requests == []


def test_an_unreachable_endpoint_is_transient(faults: AWSFaults) -> None:
    provider = make(faults.url, retry=2)
    faults.down()
    began = time.monotonic()
    with pytest.raises(TransientProviderError, match="unreachable"):
        provider.reserve(offer(provider, "us-east-1/g5.xlarge/on_demand"), job())
    with pytest.raises(NotYetReleased):
        provider.release(handle_for("i-0abc").lease)
    with pytest.raises(TransientProviderError):
        provider.poll(handle_for("i-0abc"))
    with pytest.raises(TransientProviderError):
        provider.owned()
    assert not provider.health().ok
    assert time.monotonic() - began < 20


def test_throttling_and_server_errors_are_retried(faults: AWSFaults) -> None:
    faults.fail("DescribeInstances", "RequestLimitExceeded", "Request limit exceeded.", status=503, times=1)
    faults.instance("i-0abc", "running")
    provider = make(faults.url)
    assert provider.poll(handle_for("i-0abc")).state == "running"
    assert faults.actions() == ["DescribeInstances", "DescribeInstances"]

    faults.reset()
    faults.fail("RunInstances", "InternalError", "An internal error has occurred", status=500)
    with pytest.raises(TransientProviderError, match="InternalError") as err:
        provider.reserve(offer(provider, "us-east-1/g5.xlarge/on_demand"), job())
    # The launch may have happened anyway: the adapter looked for the label to clean up.
    assert faults.actions() == ["RunInstances", "RunInstances", "DescribeInstances"]
    tokens = {r["params"]["ClientToken"] for r in faults.requests if r["action"] == "RunInstances"}
    assert len(tokens) == 1  # the retry repeats the token: AWS would answer with the first launch, not a second
    assert "reaper" in str(err.value)


def test_poll_reads_instance_states(faults: AWSFaults) -> None:
    provider = make(faults.url, provisioning_timeout=60, not_found_grace=30)
    faults.instance("i-0abc", "pending")
    booting = provider.poll(handle_for("i-0abc"))
    assert booting.state == "running" and booting.provisioning
    stuck = provider.poll(handle_for("i-0abc", reserved_at=time.time() - 120))
    assert stuck.state == "failed" and stuck.transient and "pending" in (stuck.error or "")

    faults.instance("i-0abc", "terminated", reason_code="Server.SpotInstanceTermination", spot=True)
    spot = provider.poll(handle_for("i-0abc", market="spot"))
    assert spot.state == "failed" and spot.transient and "interrupted" in (spot.error or "")

    faults.instance("i-0abc", "stopped", reason_code="Client.UserInitiatedShutdown")
    stopped = provider.poll(handle_for("i-0abc"))
    assert stopped.state == "failed" and stopped.transient

    faults.instance("i-0abc", "terminated", reason_code="Client.InstanceInitiatedShutdown")
    ended = provider.poll(handle_for("i-0abc"))
    assert ended.state == "failed" and not ended.transient and "without reporting" in (ended.error or "")

    faults.reset()
    faults.fail("DescribeInstances", "InvalidInstanceID.NotFound", "The instance ID 'i-0abc' does not exist")
    assert provider.poll(handle_for("i-0abc")).provisioning  # just launched: EC2 is eventually consistent
    gone = provider.poll(handle_for("i-0abc", reserved_at=time.time() - 60))
    assert gone.state == "failed" and gone.transient and "disappeared" in (gone.error or "")

    faults.fail("TerminateInstances", "InvalidInstanceID.NotFound", "The instance ID 'i-0abc' does not exist")
    with pytest.raises(NotYetReleased):
        provider.release(handle_for("i-0abc").lease)  # too young to be believed gone
    provider.release(handle_for("i-0abc", reserved_at=time.time() - 60).lease)


# --- the Auto Scaling pool ----------------------------------------------------------------------


def make_group(url: str, name: str, *, min_size: int = 0, max_size: int = 3, desired: int = 0) -> None:
    region = "eu-west-1"
    image = ec2(url, region).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2(url, region).create_launch_template(LaunchTemplateName=f"{name}-tpl",
                                            LaunchTemplateData={"ImageId": image, "InstanceType": "g5.xlarge"})
    boto3.client("autoscaling", region_name=region, endpoint_url=url).create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": f"{name}-tpl"}, MinSize=min_size,
        MaxSize=max_size, DesiredCapacity=desired, AvailabilityZones=["eu-west-1a"])


def desired_of(url: str, name: str) -> int:
    client = boto3.client("autoscaling", region_name="eu-west-1", endpoint_url=url)
    return int(client.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["DesiredCapacity"])


def make_pool(url: str, name: str, **config: Any) -> AWSPoolProvider:
    base = {"asg_name": name, "region": "eu-west-1", "endpoint_url": url, "endpoint": "http://127.0.0.1:9",
            "member_concurrency": 2, "price_per_hour": 1.8, "assumed_tokens_per_second": 500, "gpu": "A10G",
            "gpu_memory_gb": 24, "group_cache_seconds": 0, "scale_cooldown_seconds": 60, "scale_down_idle_seconds": 300}
    return AWSPoolProvider("aws-pool", {**base, **config})


def test_pool_offers_come_from_in_service_members(moto: str) -> None:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    make_group(moto, name, desired=0)
    pool = make_pool(moto, name, models=["llama-3-8b"])
    spec = {"model": "llama-3-8b", "prompt": "hi"}
    [empty] = pool.offers(Requirements(), "inference", spec)
    assert empty.capacity == 0  # no member yet: placement sees "no free capacity" and the job waits
    assert empty.price_per_1k_tokens == pytest.approx(1.8 / 3600 / 500 * 1000)
    assert pool.offers(Requirements(), "inference", {"model": "other"}) == []
    assert pool.offers(Requirements(), "command", {"command": "x"}) == []

    boto3.client("autoscaling", region_name="eu-west-1", endpoint_url=moto).set_desired_capacity(
        AutoScalingGroupName=name, DesiredCapacity=2)
    [full] = pool.offers(Requirements(), "inference", spec)
    assert full.capacity == 4 and full.region == "eu-west-1" and full.gpu == "A10G" and full.price_per_hour == 0
    held = [pool.reserve(full, job(None, kind="inference", model="llama-3-8b")) for _ in range(4)]
    assert pool.offers(Requirements(), "inference", spec)[0].capacity == 0
    with pytest.raises(NoCapacity):
        pool.reserve(full, job(None, kind="inference", model="llama-3-8b"))
    pool.release(held[0])
    pool.release(held[0])
    assert pool.offers(Requirements(), "inference", spec)[0].capacity == 1
    for lease in held[1:]:
        pool.release(lease)
    health = pool.health()
    assert health.ok and "2 of 2" in health.detail

    make_group(moto, f"{name}-off", max_size=0)
    assert make_pool(moto, f"{name}-off").offers(Requirements(), "inference", spec) == []
    assert not make_pool(moto, "no-such-group").health().ok


def test_pool_member_urls_come_from_member_addresses(moto: str) -> None:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    make_group(moto, name, desired=1)
    pool = make_pool(moto, name, endpoint=None, member_url="http://{private_ip}:8000")
    [found] = pool.offers(Requirements(), "inference", {"model": "m"})
    first = pool.reserve(found, job(None, kind="inference", model="m"))
    second = pool.reserve(found, job(None, kind="inference", model="m"))
    assert first.data["url"] == second.data["url"] and first.data["url"].endswith(":8000")
    assert first.data["url"].startswith("http://10.")
    with pytest.raises(NoCapacity):
        pool.reserve(found, job(None, kind="inference", model="m"))
    pool.release(first)
    pool.release(second)


def test_pool_serves_a_signed_chat_request(moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    make_group(moto, name, desired=1)
    monkeypatch.setenv(POOL_SECRET_ENV, POOL_SECRET)
    with PoolServer(secret=POOL_SECRET) as server:
        pool = make_pool(moto, name, endpoint=server.url, secret_env=POOL_SECRET_ENV)
        spec = job(None, kind="inference", model="llama-3-8b", prompt="Say hi", max_tokens=16)
        [found] = pool.offers(Requirements(), "inference", spec.spec)
        lease = pool.reserve(found, spec)
        handle = pool.start(lease, spec)
        status = pool.poll(handle)
        assert status.state == "succeeded" and status.result and status.result["text"]
        assert status.cost is not None and status.cost > 0
        assert pool.offers(Requirements(), "inference", spec.spec)[0].capacity == 2  # the slot came back
        pool.release(lease, handle)


def test_autoscale_follows_the_queue_within_bounds_and_cooldown(moto: str) -> None:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    make_group(moto, name, max_size=3, desired=0)
    pool = make_pool(moto, name)
    t = 1_000_000.0
    note = pool.autoscale(3, now=t)  # 3 queued / 2 per member
    assert note and "up from 0 to 2" in note and desired_of(moto, name) == 2
    assert pool.autoscale(10, now=t + 10) is None  # cooling down
    assert desired_of(moto, name) == 2
    note = pool.autoscale(10, now=t + 61)
    assert note and "to 3" in note and "MaxSize" in note and desired_of(moto, name) == 3  # never above MaxSize
    assert pool.autoscale(10, now=t + 200) is None

    # Idle: no queue, nothing in flight. It waits scale_down_idle_seconds from the last busy moment.
    assert pool.autoscale(0, now=t + 300, in_flight=0) is None
    assert pool.autoscale(0, now=t + 400, in_flight=1) is None  # work in flight: busy, not idle
    assert pool.autoscale(0, now=t + 650, in_flight=0) is None
    assert desired_of(moto, name) == 3
    note = pool.autoscale(0, now=t + 701, in_flight=0)
    assert note and "down from 3 to 0" in note and desired_of(moto, name) == 0
    assert pool.autoscale(0, now=t + 2000) is None


def test_autoscale_respects_min_size_and_starts_the_idle_clock(moto: str) -> None:
    name = f"pool-{uuid.uuid4().hex[:6]}"
    make_group(moto, name, min_size=1, max_size=4, desired=3)
    pool = make_pool(moto, name)
    t = 2_000_000.0
    assert pool.autoscale(0, now=t) is None  # first look: the idle clock starts now, nothing is guessed
    note = pool.autoscale(0, now=t + 301)
    assert note and "down from 3 to 1" in note and desired_of(moto, name) == 1
    note = pool.autoscale(1, now=t + 400, in_flight=4)  # 1 queued + 2 busy members
    assert note and "to 3" in note and desired_of(moto, name) == 3
