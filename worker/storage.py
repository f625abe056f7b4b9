"""Object storage for outputs and uploads: ``s3://`` (boto3: AWS, MinIO, R2, ...) and ``file://``.

Keys are deterministic (``TENANT/JOB_ID/NODE_ID_INDEX.png``): a retried job overwrites its
objects and never duplicates them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from engine.paths import join_inside, safe_relative

log = logging.getLogger(__name__)

T = TypeVar("T")


class StorageError(Exception):
    """Raised when the object store fails after retries, or is misconfigured."""


class ObjectNotFound(StorageError):
    """Raised when a key does not exist."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    bytes: int
    sha256: str
    content_type: str


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def list(self, prefix: str) -> list[str]: ...

    def presign_get(self, key: str, expires_s: int) -> str: ...

    def check(self) -> None:
        """Raise StorageError if the store cannot be reached (readiness)."""
        ...


def object_key(*parts: str) -> str:
    """Join key parts, refusing traversal; every key goes through here."""
    return "/".join(safe_relative(part) for part in parts if part)


def with_retries(operation: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.2) -> T:
    """Run ``operation``, retrying transient failures with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except ObjectNotFound:
            raise
        except Exception as exc:
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempts: {exc}") from exc
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def sign(secret: str, key: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


class FileStorage:
    """Objects as files under a root folder; presigned URLs point at the gateway's ``/v1/files``."""

    def __init__(
        self, root: Path, public_url: str = "http://127.0.0.1:8188", signing_secret: str = ""
    ) -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")
        self.signing_secret = signing_secret
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return join_inside(self.root, key)

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: readers never see half a file, and a retry replaces it whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key, len(data), hashlib.sha256(data).hexdigest(), content_type)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        for key in self.list(prefix):
            self._path(key).unlink(missing_ok=True)
            count += 1
        return count

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root.resolve()
        folder = base if base.is_dir() else base.parent
        if not folder.is_dir():
            return []
        root = self.root.resolve()
        keys = []
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(".upload-"):
                key = path.relative_to(root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def presign_get(self, key: str, expires_s: int) -> str:
        expires = int(time.time()) + expires_s
        query = urllib.parse.urlencode(
            {"expires": expires, "signature": sign(self.signing_secret, key, expires)}
        )
        return f"{self.public_url}/v1/files/{urllib.parse.quote(key)}?{query}"

    def verify(self, key: str, expires: int, signature: str) -> bool:
        """Whether a ``/v1/files`` URL was signed by us and has not expired."""
        if expires < time.time():
            return False
        return hmac.compare_digest(sign(self.signing_secret, key, expires), signature)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")


class S3Storage:
    """An S3-compatible bucket through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
        public_endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4")
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        # Presigned URLs must use the address clients reach (e.g. localhost vs the compose service name).
        self.presign_client = (
            boto3.client("s3", endpoint_url=public_endpoint_url, region_name=region, config=config)
            if public_endpoint_url
            else self.client
        )
        if create_bucket:
            self._create_bucket(region)

    def _create_bucket(self, region: str | None) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            params: dict[str, Any] = {"Bucket": self.bucket}
            if region and region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self.client.create_bucket(**params)
            except ClientError as exc:
                if "BucketAlready" not in str(exc):
                    raise StorageError(f"Cannot create bucket {self.bucket}: {exc}") from exc

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        digest = hashlib.sha256(data).hexdigest()
        with_retries(
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=self._full(key),
                Body=data,
                ContentType=content_type,
                Metadata={"sha256": digest},
            ),
            f"upload of {key}",
        )
        return StoredObject(key, len(data), digest, content_type)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        def read() -> bytes:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise ObjectNotFound(key) from exc
                raise

        return with_retries(read, f"download of {key}")

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full(prefix)):
            keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)

    def presign_get(self, key: str, expires_s: int) -> str:
        return self.presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires_s
        )

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StorageError(f"Bucket {self.bucket} is not reachable: {exc}") from exc


def storage_from_url(
    url: str,
    *,
    create_bucket: bool = False,
    public_url: str = "http://127.0.0.1:8188",
    signing_secret: str = "",
    s3_endpoint_url: str | None = None,
    s3_public_endpoint_url: str | None = None,
    s3_region: str | None = None,
) -> Storage:
    """``s3://bucket/prefix`` or ``file:///path`` (a plain path means file)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"No bucket in storage URL {url!r}")
        return S3Storage(
            parsed.netloc,
            parsed.path,
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            create_bucket=create_bucket,
            public_endpoint_url=s3_public_endpoint_url,
        )
    if parsed.scheme in ("file", ""):
        path = Path(urllib.parse.unquote(parsed.path if parsed.scheme else url))
        return FileStorage(path, public_url=public_url, signing_secret=signing_secret)
    raise StorageError(f"Unsupported storage URL {url!r}: use s3://bucket/prefix or file:///path")
