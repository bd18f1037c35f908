"""Object storage on S3 (moto's server here): a run gets a presigned PUT URL for its artifact and
presigned GET URLs for its inputs in our bucket — never our credentials."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.emulators.llm_apis import OpenAIEmulator

from .conftest import KEY_A, PROVIDERS_YAML, Stack, isolated_stack

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
UPLOAD = ("python3 -c \"import os,urllib.request as u;"
          "u.urlopen(u.Request(os.environ['GPUFLEET_ARTIFACT_PUT_URL'],data=b'trained weights',method='PUT',"
          "headers={'Content-Type':'application/octet-stream'})).read();"
          "print(os.environ['GPUFLEET_ARTIFACT_URI'])\"")


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, **_creds()).create_bucket(Bucket="fleet-artifacts")
    yield url
    server.stop()


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def whisper() -> Iterator[OpenAIEmulator]:
    with OpenAIEmulator(api_key="sk-test-whisper-" + "k" * 16, models=["whisper-1"]) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def artifact_stack(s3_url: str, whisper: OpenAIEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {**AWS_ENV, "GPUFLEET_ARTIFACT_BASE_URI": "s3://fleet-artifacts/runs", "GPUFLEET_STORAGE_ENDPOINT_URL": s3_url,
           "GPUFLEET_TEST_WHISPER_KEY": whisper.api_key}
    providers = PROVIDERS_YAML.rstrip() + f"""
  openai:
    type: openai_api
    base_url: "{whisper.url}/v1"
    api_key_env: GPUFLEET_TEST_WHISPER_KEY
    kinds: [transcription]
    models:
      whisper-1: {{per_minute: 0.006}}
"""
    with isolated_stack(tmp_path_factory.mktemp("artifacts"), 14, providers, env) as running:
        yield running


def test_a_run_uploads_its_artifact_through_a_presigned_url(artifact_stack: Stack, s3_url: str) -> None:
    from orchestrator.sdk import Client

    with Client(artifact_stack.url, KEY_A) as client:
        job = client.submit("command", {"command": UPLOAD}, requirements={"providers": ["sandbox"]})
        done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", "\n".join(e.reason for e in done.events or [])
    prefix = f"runs/jobs/{done.id}/1/"
    assert done.result["stdout"].strip() == f"s3://fleet-artifacts/{prefix}"
    body = boto3.client("s3", endpoint_url=s3_url, **_creds()).get_object(Bucket="fleet-artifacts", Key=prefix + "artifact")
    assert body["Body"].read() == b"trained weights"


def test_an_input_in_our_bucket_reaches_a_model_api_presigned(artifact_stack: Stack, s3_url: str,
                                                              whisper: OpenAIEmulator) -> None:
    from orchestrator.sdk import Client

    s3 = boto3.client("s3", endpoint_url=s3_url, **_creds())
    s3.put_object(Bucket="fleet-artifacts", Key="runs/inputs/call-7.wav", Body=b"\x00\x01" * 160_000)  # 10 s
    with Client(artifact_stack.url, KEY_A) as client:
        job = client.submit("transcription", {"audio_url": "s3://fleet-artifacts/runs/inputs/call-7.wav",
                                              "model": "whisper-1", "language": "en"},
                            requirements={"providers": ["openai"]})
        done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error
    assert done.result["duration_seconds"] == 10.0 and done.cost == pytest.approx(10 / 60 * 0.006)
    uploaded = whisper.requests("/v1/audio/transcriptions")[-1]["body"]
    assert len(uploaded["file"]) == 320_000 and uploaded["model"] == "whisper-1"
    assert done.spec["audio_url"].startswith("s3://")  # the stored job keeps the URI, not a signature
