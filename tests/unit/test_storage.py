"""Object storage: the same operations against a real S3 API (moto's server over HTTP) and a directory,
plus the failures an operator meets first — a missing bucket, a dead endpoint, no credentials."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from orchestrator.storage import LocalStorage, ObjectNotFound, S3Storage, Storage, StorageError, storage_from_uri

SECRET = "fake-secret-key-do-not-print-0123456789"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials only, and nothing from the developer's own AWS config or an instance role."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(moto_endpoint: str, aws_env: None) -> str:
    name = f"gpufleet-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "artifacts")
    bucket = request.getfixturevalue("bucket")
    return S3Storage(bucket, "runs/", endpoint_url=request.getfixturevalue("moto_endpoint"))


def _dead_endpoint() -> str:
    """An address nothing listens on: bind a port, then free it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------ both implementations


def test_put_get_list_delete(storage: Storage) -> None:
    uri = storage.put_bytes("jobs/1/out.json", b'{"ok": true}', content_type="application/json")
    storage.put_bytes("jobs/1/log.txt", b"line\n")
    storage.put_bytes("jobs/2/out.json", b"{}")
    storage.put_bytes("jobs10/x", b"x")

    assert uri == storage.uri("jobs/1/out.json")
    assert uri.startswith("s3://" if isinstance(storage, S3Storage) else "file:///")
    assert storage.get_bytes("jobs/1/out.json") == b'{"ok": true}'
    assert storage.get_bytes(uri) == b'{"ok": true}'  # the recorded URI reads back too
    assert storage.list("jobs/1/") == ["jobs/1/log.txt", "jobs/1/out.json"]
    assert storage.list("jobs/1") == ["jobs/1/log.txt", "jobs/1/out.json"]
    assert storage.list("jobs1") == ["jobs10/x"]  # a string prefix, as S3 has it
    assert storage.list() == ["jobs/1/log.txt", "jobs/1/out.json", "jobs/2/out.json", "jobs10/x"]
    assert storage.list("nothing/") == []

    storage.put_bytes("jobs/1/out.json", b"replaced")
    assert storage.get_bytes(uri) == b"replaced"

    storage.delete("jobs/1/out.json")
    storage.delete("jobs/1/out.json")  # idempotent
    assert storage.list("jobs/1/") == ["jobs/1/log.txt"]
    with pytest.raises(ObjectNotFound, match="no such object"):
        storage.get_bytes("jobs/1/out.json")


def test_large_object_is_streamed_in_chunks(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.bin"
    data = os.urandom(9 * MiB + 123)  # above boto3's multipart threshold (8 MiB)
    source.write_bytes(data)

    uri = storage.put_file("ckpt/step-100.bin", source)

    chunks = list(storage.iter_chunks(uri, chunk_size=MiB))
    assert len(chunks) == 10
    assert all(len(chunk) <= MiB for chunk in chunks)
    assert b"".join(chunks) == data
    with storage.open_stream("ckpt/step-100.bin") as stream:
        assert stream.read(10) == data[:10]
        assert stream.read(5) == data[10:15]


def test_presigned_put_then_get(storage: Storage) -> None:
    payload = b"written by a rented instance"
    put_url = storage.presigned_put("uploads/result.bin", expires=600)
    get_url = storage.presigned_get("uploads/result.bin", expires=600)

    if isinstance(storage, S3Storage):
        # A real HTTP round trip, with no credentials, as an instance would do it.
        assert httpx.put(put_url, content=payload).status_code == 200
        response = httpx.get(get_url)
        assert response.status_code == 200
        assert response.content == payload
        assert SECRET not in put_url + get_url
    else:
        # "Presigned" local URLs are file:// paths: usable only on this machine.
        assert put_url == get_url == storage.uri("uploads/result.bin")
        Path(unquote(urlsplit(put_url).path)).write_bytes(payload)
        assert Path(unquote(urlsplit(get_url).path)).read_bytes() == payload
        assert not storage.reachable_by_instances
    assert storage.get_bytes("uploads/result.bin") == payload


@pytest.mark.parametrize("key", ["", "../escape", "a/../../b", "/etc/passwd", "a//b", "./a", "a/./b", "a/",
                                 "C:\\x", "a\\b", "a\x00b", "x" * 1100])
def test_bad_keys_are_refused_before_any_io(storage: Storage, key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.put_bytes(key, b"x")
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.get_bytes(key)
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.presigned_put(key)


def test_a_uri_from_elsewhere_is_refused(storage: Storage) -> None:
    with pytest.raises(StorageError, match="not an object of"):
        storage.get_bytes("s3://some-other-bucket/x")
    with pytest.raises(StorageError, match="not an object of"):
        storage.get_bytes("file:///etc/passwd")


# ------------------------------------------------------------------------------------------------ S3


def test_s3_keys_live_under_the_prefix(bucket: str, moto_endpoint: str) -> None:
    storage = S3Storage(bucket, "/team-a/runs/", endpoint_url=moto_endpoint)
    assert storage.put_bytes("a.txt", b"a") == f"s3://{bucket}/team-a/runs/a.txt"
    listed = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket=bucket)
    assert [item["Key"] for item in listed["Contents"]] == ["team-a/runs/a.txt"]
    assert storage.list() == ["a.txt"]


def test_s3_content_type_is_kept(bucket: str, moto_endpoint: str) -> None:
    storage = S3Storage(bucket, endpoint_url=moto_endpoint)
    storage.put_bytes("report.json", b"{}", content_type="application/json")
    head = boto3.client("s3", endpoint_url=moto_endpoint).head_object(Bucket=bucket, Key="report.json")
    assert head["ContentType"] == "application/json"


def test_s3_missing_bucket_is_a_clear_error(moto_endpoint: str, aws_env: None) -> None:
    storage = S3Storage("no-such-bucket-here", endpoint_url=moto_endpoint)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist") as info:
        storage.put_bytes("x", b"x")
    assert "\n" not in str(info.value)
    with pytest.raises(StorageError, match="does not exist"):
        storage.list()
    with pytest.raises(StorageError, match="does not exist"):
        storage.get_bytes("x")


def test_s3_endpoint_down_is_a_clear_error(aws_env: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = _dead_endpoint()
    storage = S3Storage("bucket", endpoint_url=endpoint, max_attempts=1, connect_timeout=2)
    with pytest.raises(StorageError, match=f"{endpoint} is unreachable") as info:
        storage.put_bytes("x", b"x")
    assert "\n" not in str(info.value)
    with pytest.raises(StorageError, match="unreachable"):
        storage.get_bytes("x")
    with pytest.raises(StorageError, match="unreachable"):
        storage.put_file("x", __file__)
    # botocore logs a lot at DEBUG; none of it, nor our errors, may carry the secret key.
    assert SECRET not in caplog.text
    assert SECRET not in str(info.value)


def test_s3_without_credentials_says_so(moto_endpoint: str, aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = S3Storage("bucket", endpoint_url=moto_endpoint)
    with pytest.raises(StorageError, match="no usable AWS credentials"):
        storage.put_bytes("x", b"x")


def test_s3_presigned_expiry_is_bounded(bucket: str, moto_endpoint: str) -> None:
    storage = S3Storage(bucket, endpoint_url=moto_endpoint)
    with pytest.raises(StorageError, match="between 1 s and 7 days"):
        storage.presigned_get("x", expires=8 * 24 * 3600)
    with pytest.raises(StorageError, match="between 1 s and 7 days"):
        storage.presigned_put("x", expires=0)


def test_s3_presigned_put_with_content_type(bucket: str, moto_endpoint: str) -> None:
    storage = S3Storage(bucket, endpoint_url=moto_endpoint)
    url = storage.presigned_put("m.json", content_type="application/json")
    assert httpx.put(url, content=b"{}", headers={"Content-Type": "application/json"}).status_code == 200
    head = boto3.client("s3", endpoint_url=moto_endpoint).head_object(Bucket=bucket, Key="m.json")
    assert head["ContentType"] == "application/json"


def test_s3_missing_object_is_object_not_found(bucket: str, moto_endpoint: str) -> None:
    storage = S3Storage(bucket, endpoint_url=moto_endpoint)
    with pytest.raises(ObjectNotFound, match=f"s3://{bucket}/nope: no such object"):
        storage.get_bytes("nope")
    with pytest.raises(ObjectNotFound):
        list(storage.iter_chunks("nope"))


# --------------------------------------------------------------------------------------------- local


def test_local_storage_cannot_be_escaped_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = LocalStorage(tmp_path / "store")
    (storage.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StorageError, match="resolves outside"):
        storage.put_bytes("link/x", b"x")
    assert not (outside / "x").exists()


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put_bytes("a/b/c.txt", b"1")
    storage.put_file("a/b/d.txt", storage.root / "a" / "b" / "c.txt")
    assert sorted(p.name for p in (storage.root / "a" / "b").iterdir()) == ["c.txt", "d.txt"]
    storage.delete("a/b/c.txt")
    storage.delete("a/b/d.txt")
    assert list(storage.root.iterdir()) == []  # emptied directories go too, as in S3


def test_local_upload_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a readable file"):
        LocalStorage(tmp_path).put_file("x", tmp_path / "missing")


# ------------------------------------------------------------------------------------------- factory


def test_storage_from_uri_picks_by_scheme(tmp_path: Path, aws_env: None) -> None:
    s3 = storage_from_uri("s3://my-bucket/some/prefix", endpoint_url="http://127.0.0.1:9", region="")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("my-bucket", "some/prefix/", "http://127.0.0.1:9")
    assert s3.uri("k") == "s3://my-bucket/some/prefix/k"
    assert s3.reachable_by_instances

    by_uri = storage_from_uri((tmp_path / "a dir").as_uri(), endpoint_url=None)
    assert isinstance(by_uri, LocalStorage) and by_uri.root == tmp_path / "a dir"
    by_path = storage_from_uri(str(tmp_path / "plain"))
    assert isinstance(by_path, LocalStorage) and by_path.root == tmp_path / "plain"
    assert by_uri.put_bytes("k", b"v") == (tmp_path / "a dir" / "k").as_uri()


@pytest.mark.parametrize(("uri", "options", "message"), [
    ("", {}, "no storage configured"),
    ("gs://bucket/x", {}, "unsupported storage scheme 'gs'"),
    ("s3:///prefix", {}, "missing the bucket name"),
    ("file://otherhost/dir", {}, "must name a local path"),
    ("/tmp/x", {"endpoint_url": "http://minio:9000"}, "endpoint_url only apply to s3://"),
    ("s3://bucket", {"colour": "blue"}, "unexpected keyword argument 'colour'"),
])
def test_storage_from_uri_errors(uri: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(StorageError, match=message):
        storage_from_uri(uri, **options)
