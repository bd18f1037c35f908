"""Object storage for artifacts, checkpoints and exports: one small interface, two implementations.

``S3Storage`` speaks the S3 API (AWS, or any S3-compatible store: R2, MinIO, B2, Tigris…) and is what
rented instances use, through presigned URLs, to read inputs and write results. ``LocalStorage`` keeps
objects in a directory; it is the embedded default, so ``gpufleet demo`` needs no bucket. Its "presigned"
URLs are plain ``file://`` paths that only processes on the same machine can use: a rented instance
cannot reach them, so remote providers need S3 configured (``reachable_by_instances`` says which is which).

Keys are relative, ``/``-separated names (``jobs/42/checkpoint-3.pt``). They are validated before any I/O
(no ``..``, no absolute paths, no empty segments) so a key taken from a job spec can never escape the
bucket prefix or the storage directory. Every failure surfaces as a one-line ``StorageError``.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from orchestrator.errors import GpufleetError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
_MAX_KEY_BYTES = 1024  # S3's limit; applied to local keys too so both backends accept the same names


class StorageError(GpufleetError):
    """A storage operation failed; the message is one line naming the object and the cause."""


class ObjectNotFound(StorageError):
    """The object does not exist (distinct so callers can treat "no checkpoint yet" as normal)."""


def check_key(key: str, *, allow_prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative object name, else raise ``StorageError``.

    ``allow_prefix`` accepts "" and a trailing "/" (for ``list``), which are not valid object names.
    """
    if not isinstance(key, str):
        raise StorageError(f"invalid storage key {key!r}: must be a string")
    if allow_prefix and key == "":
        return key
    if not key:
        raise StorageError("invalid storage key '': must not be empty")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise StorageError(f"invalid storage key {key!r}: must be relative, not an absolute path")
    if "\\" in key:
        raise StorageError(f"invalid storage key {key!r}: use '/' as the separator, not '\\'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise StorageError(f"invalid storage key {key!r}: must not contain control characters")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise StorageError(f"invalid storage key {key[:40]!r}…: longer than {_MAX_KEY_BYTES} bytes")
    parts = key.split("/")
    if allow_prefix and parts[-1] == "":
        parts = parts[:-1]
    for part in parts:
        if part == "..":
            raise StorageError(f"invalid storage key {key!r}: must not contain '..'")
        if part in ("", "."):
            raise StorageError(f"invalid storage key {key!r}: must not contain empty or '.' segments")
    return key


class Storage(ABC):
    """Where artifacts live. Methods take keys relative to the storage's base; readers also accept the
    full URI that ``uri``/``put_*`` returned, since that is what gets recorded on jobs."""

    #: Whether a rented instance (another machine) can use this storage's URIs and presigned URLs.
    reachable_by_instances: bool = False

    @abstractmethod
    def uri(self, key: str) -> str:
        """The durable address of ``key`` (``s3://bucket/prefix/key`` or ``file:///dir/key``)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store ``data`` under ``key``, replacing any previous object; returns its URI."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        """Store a local file under ``key`` without reading it into memory; returns its URI."""

    @abstractmethod
    def open_stream(self, uri_or_key: str) -> BinaryIO:
        """A readable binary stream of the object, for objects too large to hold in memory.
        Use it as a context manager so the connection or file is closed."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys that start with ``prefix`` (a string prefix, as in S3, not a directory), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error (cleanup may be retried)."""

    @abstractmethod
    def presigned_get(self, key: str, expires: int = 3600) -> str:
        """A URL from which the holder can download the object without credentials."""

    @abstractmethod
    def presigned_put(self, key: str, expires: int = 3600, content_type: str | None = None) -> str:
        """A URL to which the holder can upload the object (HTTP PUT) without credentials.
        If ``content_type`` is given the uploader must send the same ``Content-Type`` header."""

    @abstractmethod
    def key_of(self, uri_or_key: str) -> str:
        """The key of a URI from this storage (or a key, checked); ``StorageError`` for foreign URIs."""

    def get_bytes(self, uri_or_key: str) -> bytes:
        """The whole object in memory; use ``iter_chunks`` or ``open_stream`` for large ones."""
        with self.open_stream(uri_or_key) as stream:
            return stream.read()

    def iter_chunks(self, uri_or_key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """The object as successive chunks of at most ``chunk_size`` bytes."""
        if chunk_size < 1:
            raise StorageError(f"chunk_size must be at least 1, not {chunk_size}")
        with self.open_stream(uri_or_key) as stream:
            while chunk := stream.read(chunk_size):
                yield chunk


# --------------------------------------------------------------------------------------------- local


class LocalStorage(Storage):
    """Objects as files under ``root``. Writes go to a temporary file renamed into place, so a reader
    never sees half a checkpoint. ``content_type`` is accepted and ignored (files carry none)."""

    reachable_by_instances = False
    _TMP_PREFIX = ".tmp-"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the storage directory {self.root}: {exc.strerror}") from None

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri_or_key: str) -> str:
        if "://" not in uri_or_key:
            return check_key(uri_or_key)
        parts = urlsplit(uri_or_key)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise StorageError(f"{uri_or_key}: not an object of {self.root.as_uri()}")
        path = Path(unquote(parts.path))
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            raise StorageError(f"{uri_or_key}: not an object of {self.root.as_uri()}") from None
        return check_key(relative.as_posix())

    def _path(self, key: str) -> Path:
        """The file for ``key``, refusing one that resolves outside ``root`` (e.g. through a symlink)."""
        path = self.root / check_key(key)
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise StorageError(f"invalid storage key {key!r}: resolves outside {self.root}")
        return path

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri(key)}: no such object") from None
        except IsADirectoryError:
            raise ObjectNotFound(f"{self.uri(key)}: no such object (it is a directory of objects)") from None
        except OSError as exc:
            raise StorageError(f"cannot {action} {self.uri(key)}: {exc.strerror or exc}") from None

    def _write(self, key: str, fill: Callable[[BinaryIO], None]) -> str:
        path = self._path(key)
        with self._errors("write", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self._TMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    fill(out)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return path.as_uri()

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        def write(out: BinaryIO) -> None:
            out.write(data)

        return self._write(key, write)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"cannot upload {source}: not a readable file")

        def copy(out: BinaryIO) -> None:
            with source.open("rb") as src:
                shutil.copyfileobj(src, out, DEFAULT_CHUNK_SIZE)

        return self._write(key, copy)

    def open_stream(self, uri_or_key: str) -> BinaryIO:
        key = self.key_of(uri_or_key)
        with self._errors("read", key):
            return self._path(key).open("rb")

    def list(self, prefix: str = "") -> builtins.list[str]:
        check_key(prefix, allow_prefix=True)
        # Walk only the deepest directory the prefix names, then filter by string prefix like S3.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(self._TMP_PREFIX):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors("delete", key):
            path.unlink(missing_ok=True)
        # Drop directories the delete left empty: S3 has no directories, so neither should we.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def presigned_get(self, key: str, expires: int = 3600) -> str:
        """The object's ``file://`` URI: usable only on this machine, never by a rented instance."""
        return self.uri(key)

    def presigned_put(self, key: str, expires: int = 3600, content_type: str | None = None) -> str:
        """The ``file://`` URI to write to (its directory is created); usable only on this machine."""
        path = self._path(key)
        with self._errors("prepare", key):
            path.parent.mkdir(parents=True, exist_ok=True)
        return path.as_uri()


# ------------------------------------------------------------------------------------------------ S3


class S3Storage(Storage):
    """Objects in an S3 bucket under an optional prefix, through boto3.

    Credentials come from boto3's normal chain (environment, profile, instance role); they are never
    passed through here, logged, or put into messages. ``endpoint_url`` selects an S3-compatible store;
    with one set, path-style addressing is the default because most such stores (and IP endpoints)
    do not serve bucket subdomains. Presigned URLs embed ``endpoint_url`` and are signed for ``region``:
    the endpoint must be an address rented instances can reach (not a Compose service name), and the
    region must be the bucket's.
    """

    reachable_by_instances = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        client: Any = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise StorageError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url or None
        if client is None:
            client = self._make_client(region, addressing_style, connect_timeout, read_timeout, max_attempts)
        self._client = client

    def _make_client(
        self, region: str | None, addressing_style: str | None, connect_timeout: float, read_timeout: float,
        max_attempts: int,
    ) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StorageError("s3:// storage needs boto3: pip install 'gpufleet[aws]'") from None
        style = addressing_style or ("path" if self.endpoint_url else "auto")
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": style},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name=region or None,
                                              config=config)

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Storage({self.base_uri!r}{where})"

    @property
    def base_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{check_key(key)}"

    def key_of(self, uri_or_key: str) -> str:
        if "://" not in uri_or_key:
            return check_key(uri_or_key)
        if not uri_or_key.startswith(self.base_uri):
            raise StorageError(f"{uri_or_key}: not an object of {self.base_uri}")
        return check_key(uri_or_key[len(self.base_uri):])

    def _object(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn boto3's many exceptions into one-line ``StorageError``s naming the object."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        target = self.uri(key) if key is not None else self.base_uri
        try:
            yield
        except ClientError as exc:
            raise self._client_error(action, target, exc) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageError(
                f"cannot {action} {target}: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role)"
            ) from None
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
            endpoint = self.endpoint_url or "the AWS S3 endpoint"
            raise StorageError(f"cannot {action} {target}: {endpoint} is unreachable ({type(exc).__name__})") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot {action} {target}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        except S3UploadFailedError as exc:  # raised inside `except ClientError`, which it replaces
            cause = exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(action, target, cause) from None
            raise StorageError(f"cannot {action} {target}: upload failed") from None

    def _client_error(self, action: str, target: str, exc: Any) -> StorageError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StorageError(f"cannot {action} {target}: bucket {self.bucket!r} does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFound(f"{target}: no such object")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken") or status == 403:
            return StorageError(f"cannot {action} {target}: access denied ({code or status}); "
                                "check the credentials and the bucket policy")
        message = str(error.get("Message") or "").splitlines()[0] if error.get("Message") else ""
        detail = f"{code}: {message}" if message else (code or f"HTTP {status}")
        return StorageError(f"cannot {action} {target}: {detail}")

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        with self._errors("write", key):
            self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, **extra)
        return self.uri(key)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"cannot upload {source}: not a readable file")
        # upload_file switches to a multipart upload for large files (checkpoints can be many GB).
        with self._errors("write", key):
            self._client.upload_file(str(source), self.bucket, self._object(key))
        return self.uri(key)

    def open_stream(self, uri_or_key: str) -> BinaryIO:
        key = self.key_of(uri_or_key)
        with self._errors("read", key):
            body = self._client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"]
        raw = _S3Body(body, lambda: self._errors("read", key))
        return io.BufferedReader(raw, buffer_size=1024 * 1024)

    def list(self, prefix: str = "") -> builtins.list[str]:
        check_key(prefix, allow_prefix=True)
        keys: builtins.list[str] = []
        with self._errors("list"):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def presigned_get(self, key: str, expires: int = 3600) -> str:
        _check_expiry(expires)
        with self._errors("presign", key):
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=expires)
        return url

    def presigned_put(self, key: str, expires: int = 3600, content_type: str | None = None) -> str:
        _check_expiry(expires)
        params = {"Bucket": self.bucket, "Key": self._object(key)}
        if content_type:
            params["ContentType"] = content_type
        with self._errors("presign", key):
            url: str = self._client.generate_presigned_url("put_object", Params=params, ExpiresIn=expires)
        return url


def _check_expiry(expires: int) -> None:
    """SigV4 presigned URLs live at most 7 days; S3 would only refuse a longer one when it is used."""
    if not 1 <= expires <= 7 * 24 * 3600:
        raise StorageError(f"presigned URL expiry must be between 1 s and 7 days, not {expires} s")


class _S3Body(io.RawIOBase):
    """botocore's streaming body as a raw stream whose mid-download failures are ``StorageError``s."""

    def __init__(self, body: Any, errors: Callable[[], Any]) -> None:
        super().__init__()
        self._body = body
        self._errors = errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        with self._errors():
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        # RawIOBase's default reads 8 KiB at a time; one read is much cheaper through botocore.
        with self._errors():
            data: bytes = self._body.read()
        return data

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


# ------------------------------------------------------------------------------------------- factory


def storage_from_uri(base_uri: str, **options: Any) -> Storage:
    """The storage a base URI names: ``s3://bucket/prefix`` (options such as ``endpoint_url`` and
    ``region`` go to ``S3Storage``), or ``file:///dir`` / a plain path for ``LocalStorage``.

    Options left empty (``None`` or "") are ignored, so a caller can pass its S3 settings whatever
    the scheme; a non-empty S3 option with a local URI is an error rather than silently unused.
    """
    options = {name: value for name, value in options.items() if value not in (None, "")}
    uri = (base_uri or "").strip()
    if not uri:
        raise StorageError("no storage configured: give s3://bucket/prefix, file:///dir or a directory path")
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme == "s3":
        parts = urlsplit(uri)
        if not parts.netloc:
            raise StorageError(f"{uri}: missing the bucket name (s3://bucket/prefix)")
        try:
            return S3Storage(parts.netloc, parts.path, **options)
        except TypeError as exc:
            raise StorageError(f"{uri}: {exc}".replace("__init__() ", "")) from None
    if scheme not in ("", "file"):
        raise StorageError(f"{uri}: unsupported storage scheme {scheme!r} (use s3://bucket/prefix for S3 or any "
                           "S3-compatible store, or file:///dir)")
    if options:
        raise StorageError(f"{uri}: option(s) {', '.join(sorted(options))} only apply to s3:// storage")
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs must name a local path (file:///dir)")
        return LocalStorage(unquote(parts.path))
    return LocalStorage(uri)



_configured: dict[tuple[str, str, str], Storage] = {}


def configured_storage(settings: Any) -> Storage:
    """The deployment's storage (``artifact_base_uri``; a directory under the data dir by default)."""
    key = (settings.artifact_base_uri or str(Path(settings.data_dir) / "artifacts"),
           settings.storage_endpoint_url, settings.storage_region)
    if key not in _configured:
        _configured[key] = storage_from_uri(key[0], endpoint_url=key[1], region=key[2])
    return _configured[key]
