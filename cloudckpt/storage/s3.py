"""S3 backend on boto3/botocore: streamed multipart uploads, ranged reads into caller buffers.

One botocore client per :class:`S3Storage` (botocore clients are thread-safe), with botocore's own
retries off: every remote call runs under :class:`~cloudckpt.retry.RetryPolicy` after
:func:`translate_boto_error` turned the client's exception into a :mod:`cloudckpt.errors` type.

``storage_options`` follow the fsspec/s3fs names: ``key``, ``secret``, ``token``,
``endpoint_url``, ``region_name``, ``anon``, ``profile``, ``config_kwargs`` (botocore ``Config``
arguments) and ``client_kwargs`` (``boto3.client`` arguments, e.g. ``endpoint_url``,
``region_name``, ``verify``). Missing ones fall back to the usual AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``~/.aws``).
"""

from __future__ import annotations

import base64
import builtins
import functools
import hashlib
import http.client
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import boto3
import botocore
import botocore.exceptions
import botocore.loaders
import botocore.session
import urllib3.exceptions
from botocore.config import Config

from ..config import StorageConfig
from ..errors import (
    BadRequestError,
    BucketNotFoundError,
    CommitConflictError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    PreconditionFailedError,
    StorageError,
    ThrottledError,
    TransientStorageError,
    UnsupportedURLError,
)
from ..multipart import ParallelPartUploader, PartPlan, as_byte_view, crc32c_of
from ..retry import RetryPolicy
from .base import ObjectInfo, PendingUpload, Storage, Upload, UploadMetrics
from .registry import split_url

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: S3 limit: keys per DeleteObjects request.
DELETE_BATCH_KEYS = 1_000
#: Largest slice handed to urllib3's ``readinto`` at once: it reads into a temporary ``bytes`` of
#: this size, so a bounded slice keeps that temporary small whatever the range size.
READ_SLICE_BYTES = 1 << 20

_OPTION_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "endpoint_url",
        "region_name",
        "anon",
        "profile",
        "config_kwargs",
        "client_kwargs",
    }
)

# --- error translation --------------------------------------------------------------------


class NoSuchUploadError(StorageError):
    """The multipart upload is gone (completed, aborted, or expired by a lifecycle rule)."""


_CODE_TO_ERROR: dict[str, type[StorageError]] = {
    "NoSuchBucket": BucketNotFoundError,
    "NoSuchKey": NotFoundError,
    "NotFound": NotFoundError,
    "NoSuchUpload": NoSuchUploadError,
    "AccessDenied": PermissionDeniedError,
    "AllAccessDisabled": PermissionDeniedError,
    "InvalidAccessKeyId": PermissionDeniedError,
    "SignatureDoesNotMatch": PermissionDeniedError,
    "ExpiredToken": PermissionDeniedError,
    "InvalidToken": PermissionDeniedError,
    "TokenRefreshRequired": PermissionDeniedError,
    "AccountProblem": PermissionDeniedError,
    "RequestTimeTooSkewed": PermissionDeniedError,
    "PreconditionFailed": PreconditionFailedError,
    "ConditionalRequestConflict": PreconditionFailedError,
    "SlowDown": ThrottledError,
    "Throttling": ThrottledError,
    "ThrottlingException": ThrottledError,
    "RequestLimitExceeded": ThrottledError,
    "TooManyRequests": ThrottledError,
    "TooManyRequestsException": ThrottledError,
    "RequestThrottled": ThrottledError,
    "ServiceUnavailable": ThrottledError,
    "InternalError": TransientStorageError,
    # 400s that a later identical request does not hit: the connection idled out, or the
    # body was cut or corrupted in transit (we resend the same bytes from our buffer).
    "RequestTimeout": TransientStorageError,
    "IncompleteBody": TransientStorageError,
    "BadDigest": TransientStorageError,
    "XAmzContentSHA256Mismatch": TransientStorageError,
    "EntityTooSmall": BadRequestError,
    "EntityTooLarge": BadRequestError,
    "InvalidPart": BadRequestError,
    "InvalidPartOrder": BadRequestError,
    "MalformedXML": BadRequestError,
    "InvalidRange": BadRequestError,
    "InvalidArgument": BadRequestError,
    "InvalidRequest": BadRequestError,
    "InvalidBucketName": BadRequestError,
    "KeyTooLongError": BadRequestError,
    "NotImplemented": BadRequestError,
}

_STATUS_TO_ERROR: dict[int, type[StorageError]] = {
    400: BadRequestError,
    401: PermissionDeniedError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: PreconditionFailedError,
    412: PreconditionFailedError,
    416: BadRequestError,
    429: ThrottledError,
    500: TransientStorageError,
    502: TransientStorageError,
    503: ThrottledError,
    504: TransientStorageError,
}

_HINTS: dict[type[StorageError], str] = {
    BucketNotFoundError: "create the bucket first or fix the URL",
    NotFoundError: "check the URL; the object may have been deleted or never committed",
    NoSuchUploadError: "the multipart upload was completed or aborted elsewhere (a lifecycle "
    "rule or abort_stale_uploads?); start the upload again",
    PermissionDeniedError: "check key/secret/token in storage_options or AWS_* env vars, and "
    "that the bucket policy allows this request",
    BadRequestError: "the store rejected the request as invalid; check the URL, the part "
    "sizes and endpoint_url",
    PreconditionFailedError: "the object exists already or changed since it was read",
    ObjectChangedError: "the object was overwritten while being read; read it again",
    CommitConflictError: "an object exists at this URL already; delete it or allow overwrite",
    ThrottledError: "the store is throttling; lower max_concurrency or spread the load",
    TransientStorageError: "network or server trouble; check endpoint_url and the store's health",
    StorageError: "see the chained exception for the store's answer",
}

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.HTTPClientError,  # ConnectionClosed, ReadTimeout, ResponseStreaming...
    botocore.exceptions.ConnectionError,  # EndpointConnection, ConnectTimeout, ...
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.IncompleteRead,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.SSLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)

#: Every exception type a botocore call (or reading its body) raises and this module translates.
BOTO_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    *_TRANSPORT_ERRORS,
)


def _error_class(code: str | None, status: int | None) -> type[StorageError]:
    """The cloudckpt class for an S3 error code and/or HTTP status (code wins)."""
    if code and code in _CODE_TO_ERROR:
        return _CODE_TO_ERROR[code]
    if status is not None:
        if status in _STATUS_TO_ERROR:
            return _STATUS_TO_ERROR[status]
        if status >= 500:
            return TransientStorageError
        if status >= 400:
            return BadRequestError
    return StorageError


def translate_boto_error(
    exc: BaseException,
    *,
    url: str,
    what: str,
    not_found: type[NotFoundError] = NotFoundError,
    precondition: type[PreconditionFailedError] = PreconditionFailedError,
) -> StorageError:
    """The cloudckpt error for a botocore/urllib3 exception raised by ``what`` on ``url``.

    Decided by error code, HTTP status and exception class only, never by message text.
    ``not_found`` / ``precondition`` pick the subclass a 404 / 412 means for this call (e.g.
    BucketNotFoundError for head_bucket, ObjectChangedError for a pinned read). The caller
    raises the result ``from exc``.
    """
    bucket = _bucket_of(url)
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code is not None and code.isdigit():  # HEAD responses carry no body, no code
            status = status or int(code)
            code = None
        cls = _error_class(code, status)
        if cls is NotFoundError:
            cls = not_found
        elif cls is PreconditionFailedError:
            cls = precondition
        detail = f"{code or 'HTTP'} (HTTP {status})"
        server_msg = error.get("Message")
        if (
            server_msg
            and not server_msg.isdigit()
            and server_msg != http.client.responses.get(status or 0)
        ):
            detail = f"{detail}: {server_msg}"
        if cls is BucketNotFoundError:
            message = f"bucket {bucket!r} does not exist: {what} of {url} failed, {detail}"
        else:
            message = f"{what} of {url} failed: {detail}"
    elif isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        cls = PermissionDeniedError
        message = f"{what} of {url} failed: no usable AWS credentials ({type(exc).__name__})"
        return cls(
            message,
            url=url,
            hint="pass key/secret in storage_options, set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, or anon=True for public buckets",
        )
    elif isinstance(exc, _TRANSPORT_ERRORS):
        cls = TransientStorageError
        message = f"{what} of {url} failed: {type(exc).__name__}: {exc}"
    elif isinstance(exc, botocore.exceptions.ParamValidationError):
        cls = BadRequestError
        message = f"{what} of {url} failed: invalid request parameters: {exc}"
    else:
        cls = StorageError
        message = f"{what} of {url} failed: {type(exc).__name__}: {exc}"
    return cls(message, url=url, hint=_HINTS.get(cls, _HINTS[StorageError]))


# --- URLs and options -------------------------------------------------------------------------


def _bucket_of(url: str) -> str:
    _, rest = split_url(url)
    return rest.split("/", 1)[0]


def _split_s3_url(url: str, *, need_key: bool = True) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of an ``s3://`` / ``s3a://`` URL; UnsupportedURLError if bad."""
    scheme, rest = split_url(url)
    if scheme not in S3Storage.schemes:
        raise UnsupportedURLError(f"not an S3 URL: {url!r}", hint="use s3://bucket/key")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UnsupportedURLError(f"no bucket in {url!r}", hint="use s3://bucket/key")
    if need_key and not key:
        raise UnsupportedURLError(f"no object key in {url!r}", hint="use s3://bucket/key")
    return scheme, bucket, key


def _dir_prefix(key: str) -> str:
    """A key prefix as a "directory": everything strictly under it."""
    return "" if not key else key.rstrip("/") + "/"


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _decode_crc32c(value: str | None) -> int | None:
    if not value or "-" in value:  # "-N": a composite checksum of N parts, not the object's
        return None
    return int.from_bytes(base64.b64decode(value), "big")


def _b64_crc32c(crc: int) -> str:
    """The ``x-amz-checksum-crc32c`` form of a CRC32C: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def make_client_kwargs(options: Mapping[str, Any], config: StorageConfig) -> dict[str, Any]:
    """``boto3.client("s3", **kwargs)`` arguments for fsspec-style ``storage_options``.

    Raises ValueError naming unknown keys, before any I/O. Exposed for tests and tooling.
    """
    unknown = sorted(set(options) - _OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown S3 storage_options {unknown}; supported: {sorted(_OPTION_KEYS)}")
    client_kwargs = dict(options.get("client_kwargs") or {})
    for ours, boto_name in (
        ("key", "aws_access_key_id"),
        ("secret", "aws_secret_access_key"),
        ("token", "aws_session_token"),
        ("endpoint_url", "endpoint_url"),
        ("region_name", "region_name"),
    ):
        if options.get(ours) is not None:
            client_kwargs[boto_name] = options[ours]
    if not client_kwargs.get("endpoint_url"):
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if env_endpoint:
            client_kwargs["endpoint_url"] = env_endpoint

    timeout = config.retry.request_timeout_secs
    concurrency = max(config.upload.max_concurrency, config.download.max_concurrency)
    config_kwargs: dict[str, Any] = {
        "max_pool_connections": max(10, 2 * concurrency),
        # One attempt per call: our RetryPolicy retries. (botocore's "max_attempts" counts
        # retries, not attempts: {"max_attempts": 1} would still retry once.)
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "connect_timeout": timeout,
        "read_timeout": timeout,
        # We send our own CRC32C per part; no aws-chunked trailers or response validation.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    }
    s3_options: dict[str, Any] = {}
    if client_kwargs.get("endpoint_url"):
        s3_options["addressing_style"] = "path"  # local / S3-compatible servers
    if config.upload.send_checksums:
        # Each part carries a signed CRC32C header the store verifies; hashing every body with
        # SHA-256 for the signature as well would cost ~0.7 s of CPU per GiB for nothing.
        s3_options["payload_signing_enabled"] = False
    if s3_options:
        config_kwargs["s3"] = s3_options
    if options.get("anon"):
        config_kwargs["signature_version"] = botocore.UNSIGNED
    config_kwargs.update(options.get("config_kwargs") or {})
    client_kwargs["config"] = Config(**config_kwargs)
    return client_kwargs


_loader_lock = threading.Lock()
_shared_loader: botocore.loaders.Loader | None = None


def _make_client(profile: str | None, client_kwargs: dict[str, Any]) -> Any:
    """A new S3 client in its own session (own credentials), sharing one model loader: loading
    the S3 service model is most of the cost of a fresh session's first client."""
    global _shared_loader
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = botocore.loaders.create_loader()
        loader = _shared_loader
    core = botocore.session.get_session()
    core.register_component("data_loader", loader)
    session = boto3.session.Session(botocore_session=core, profile_name=profile)
    return session.client("s3", **client_kwargs)


class _ViewReader(io.RawIOBase):
    """A seekable read-only file over a memoryview, so botocore can send, sign and measure a
    part straight from its buffer. ``read`` hands out memoryview slices, not copies: http.client,
    urllib3, hashlib and sockets all take any bytes-like chunk."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view) - self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = min(max(base + offset, 0), len(self._view))
        return self._pos

    def read(self, size: int | None = -1) -> memoryview:  # type: ignore[override]
        end = (
            len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        )
        chunk = self._view[self._pos : end]
        self._pos = end
        return chunk

    def readinto(self, buffer: Any) -> int:
        out = as_byte_view(buffer)
        n = min(len(out), len(self._view) - self._pos)
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


# --- the backend ----------------------------------------------------------------------------


class S3Storage(Storage):
    """Amazon S3 and S3-compatible stores (MinIO, SeaweedFS, moto, ...) through boto3.

    (Annotations say ``builtins.list``: inside this class ``list`` is the method.)
    """

    schemes = ("s3", "s3a")

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        options = dict(config.storage_options)
        client_kwargs = make_client_kwargs(options, config)
        self._client = _make_client(options.get("profile"), client_kwargs)
        self._retry = RetryPolicy(config.retry)
        self._endpoint = client_kwargs.get("endpoint_url") or "AWS"
        self._checksums = config.upload.send_checksums

    def __reduce__(self) -> tuple[type[S3Storage], tuple[StorageConfig]]:
        # The client does not pickle; a copy in another process builds its own from the config.
        return (type(self), (self.config,))

    @property
    def client(self) -> Any:
        """The underlying botocore S3 client (thread-safe)."""
        return self._client

    # --- the one place remote calls go through --------------------------------------------
    def call(
        self,
        fn: Callable[[], T],
        *,
        url: str,
        what: str,
        not_found: type[NotFoundError] = NotFoundError,
        precondition: type[PreconditionFailedError] = PreconditionFailedError,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> T:
        """Run one remote call under the retry policy, translating botocore errors first."""

        def attempt() -> T:
            try:
                return fn()
            except BOTO_ERRORS as e:
                raise translate_boto_error(
                    e, url=url, what=what, not_found=not_found, precondition=precondition
                ) from e

        return self._retry.call(attempt, url=url, what=what, on_retry=on_retry)

    # --- writes ---------------------------------------------------------------------------
    def open_upload(self, url: str, *, size_hint_bytes: int | None = None) -> S3Upload:
        _, bucket, key = _split_s3_url(url)
        upload = S3Upload(self, url, bucket, key, size_hint_bytes=size_hint_bytes)  # validates
        self.check_bucket(url)
        return upload

    def check_bucket(self, url: str) -> None:
        """BucketNotFoundError / PermissionDeniedError unless the URL's bucket is usable.
        (HeadBucket needs s3:ListBucket; a write-only role gets PermissionDeniedError here.)"""
        _, bucket, _ = _split_s3_url(url, need_key=False)
        self.call(
            lambda: self._client.head_bucket(Bucket=bucket),
            url=url,
            what="head bucket",
            not_found=BucketNotFoundError,
        )

    def put_bytes(self, url: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        _, bucket, key = _split_s3_url(url)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        view = as_byte_view(data)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "ContentLength": len(view)}
        crc = crc32c_of(view) if self._checksums else None
        if crc is not None:
            kwargs["ChecksumCRC32C"] = _b64_crc32c(crc)
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        attempts = 0

        def put() -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            return self._client.put_object(Body=_ViewReader(view), **kwargs)

        try:
            resp = self.call(put, url=url, what="put object", precondition=CommitConflictError)
        except CommitConflictError:
            # A retried conditional PUT conflicts with its own first attempt when only that
            # attempt's response was lost: then the stored object is ours (same MD5 ETag).
            if attempts > 1 and self._is_our_object(url, view):
                return self.head(url)
            raise
        # A CRC32C we sent was checked by the store: it is the stored object's.
        return ObjectInfo(
            url=url, size_bytes=len(view), version=_strip_etag(resp.get("ETag")), crc32c=crc
        )

    def _is_our_object(self, url: str, view: memoryview) -> bool:
        try:
            info = self.head(url)
        except NotFoundError:
            return False
        return (
            info.size_bytes == len(view)
            and info.version == hashlib.md5(view, usedforsecurity=False).hexdigest()
        )

    # --- reads ----------------------------------------------------------------------------
    def head(self, url: str) -> ObjectInfo:
        _, bucket, key = _split_s3_url(url)
        resp = self.call(
            lambda: self._client.head_object(Bucket=bucket, Key=key),
            url=url,
            what="head object",
        )
        etag = _strip_etag(resp.get("ETag"))
        single_part = etag is not None and "-" not in etag
        full_object = resp.get("ChecksumType") == "FULL_OBJECT" or (
            resp.get("ChecksumType") is None and single_part
        )
        modified = resp.get("LastModified")
        return ObjectInfo(
            url=url,
            size_bytes=int(resp["ContentLength"]),
            version=etag,
            mtime_secs=modified.timestamp() if modified else None,
            crc32c=_decode_crc32c(resp.get("ChecksumCRC32C")) if full_object else None,
        )

    def get_bytes(
        self, url: str, start: int = 0, end: int | None = None, *, version: str | None = None
    ) -> bytes:
        _, bucket, key = _split_s3_url(url)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"invalid byte range [{start}, {end}) for {url}")
        if end == start:
            return b""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if version is not None:
            kwargs["IfMatch"] = f'"{version}"'

        def get() -> bytes:
            body = self._client.get_object(**kwargs)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self.call(
            get, url=url, what=f"get bytes [{start}, {end})", precondition=ObjectChangedError
        )

    def read_into(
        self, url: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        self.read_into_many(url, offset, [buf], version=version)

    def read_into_many(
        self,
        url: str,
        offset: int,
        targets: builtins.list[memoryview | int],
        *,
        version: str | None = None,
    ) -> None:
        """One ranged GET streamed straight into ``targets`` (gaps are read and dropped)."""
        _, bucket, key = _split_s3_url(url)
        views: builtins.list[memoryview | int] = []
        for t in targets:
            if isinstance(t, int):
                views.append(t)
                continue
            view = as_byte_view(t)
            if view.readonly:
                raise TypeError("read_into needs a writable buffer")
            views.append(view)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        size = sum(v if isinstance(v, int) else len(v) for v in views)
        if size == 0:
            return
        end = offset + size  # exclusive
        kwargs: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Range": f"bytes={offset}-{end - 1}",
        }
        if version is not None:
            kwargs["IfMatch"] = f'"{version}"'
        what = f"read bytes [{offset}, {end})"

        def read() -> None:
            resp = self._client.get_object(**kwargs)
            body = resp["Body"]
            try:
                announced = int(resp.get("ContentLength", size))
                if announced < size:
                    raise StorageError(
                        f"{what} of {url} got only {announced} bytes: the object is shorter "
                        "than the requested range",
                        url=url,
                        hint="the object is truncated or the range is wrong",
                    )
                raw = body._raw_stream  # urllib3 response: readinto without a full-size copy
                done = 0
                scratch: memoryview | None = None
                for target in views:
                    if isinstance(target, int):
                        if scratch is None:
                            scratch = memoryview(bytearray(min(target, READ_SLICE_BYTES)))
                        remaining = target
                        while remaining:
                            got = raw.readinto(scratch[: min(remaining, len(scratch))])
                            if not got:
                                break
                            remaining -= got
                            done += got
                        if remaining:
                            break
                        continue
                    pos, n = 0, len(target)
                    while pos < n:
                        got = raw.readinto(target[pos : min(n, pos + READ_SLICE_BYTES)])
                        if not got:
                            break
                        pos += got
                    done += pos
                    if pos < n:
                        break
                if done < size:
                    raise TransientStorageError(
                        f"{what} of {url}: the body ended after {done} of {size} bytes",
                        url=url,
                        hint="the connection was cut; the read is retried",
                    )
            finally:
                body.close()

        self.call(read, url=url, what=what, precondition=ObjectChangedError)

    # --- namespace ------------------------------------------------------------------------
    def list(self, prefix_url: str) -> builtins.list[ObjectInfo]:
        scheme, bucket, key = _split_s3_url(prefix_url, need_key=False)
        prefix = _dir_prefix(key)
        out: builtins.list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.call(
                functools.partial(self._client.list_objects_v2, **kwargs),
                url=prefix_url,
                what="list objects",
                not_found=BucketNotFoundError,
            )
            for item in page.get("Contents", []):
                modified = item.get("LastModified")
                out.append(
                    ObjectInfo(
                        url=f"{scheme}://{bucket}/{item['Key']}",
                        size_bytes=int(item["Size"]),
                        version=_strip_etag(item.get("ETag")),
                        mtime_secs=modified.timestamp() if modified else None,
                    )
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        return sorted(out, key=lambda info: info.url)

    def delete(self, urls: Iterable[str]) -> None:
        by_bucket: dict[str, builtins.list[str]] = {}
        for url in urls:
            _, bucket, key = _split_s3_url(url)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), DELETE_BATCH_KEYS):
                self._delete_batch(bucket, keys[i : i + DELETE_BATCH_KEYS])

    def _delete_batch(self, bucket: str, keys: builtins.list[str]) -> None:
        where = f"s3://{bucket}/{keys[0]}" if len(keys) == 1 else f"s3://{bucket}"
        resp = self.call(
            lambda: self._client.delete_objects(
                Bucket=bucket,
                Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
            ),
            url=where,
            what=f"delete {len(keys)} objects",
            not_found=BucketNotFoundError,
        )
        errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            cls = _error_class(first.get("Code"), None)
            failed = ", ".join(f"{e.get('Key')} ({e.get('Code')})" for e in errors[:5])
            raise cls(
                f"delete in s3://{bucket} failed for {len(errors)} of {len(keys)} objects: "
                f"{failed}{' ...' if len(errors) > 5 else ''}",
                url=f"s3://{bucket}/{first.get('Key')}",
                hint=_HINTS.get(cls, _HINTS[StorageError]),
            )

    # --- unfinished uploads -----------------------------------------------------------------
    def list_pending_uploads(self, prefix_url: str) -> builtins.list[PendingUpload]:
        scheme, bucket, key = _split_s3_url(prefix_url, need_key=False)
        prefix = _dir_prefix(key)
        out: builtins.list[PendingUpload] = []
        markers: dict[str, str] = {}
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, **markers}
            page = self.call(
                functools.partial(self._client.list_multipart_uploads, **kwargs),
                url=prefix_url,
                what="list multipart uploads",
                not_found=BucketNotFoundError,
            )
            for item in page.get("Uploads", []):
                if not item["Key"].startswith(prefix):
                    continue
                initiated = item.get("Initiated")
                out.append(
                    PendingUpload(
                        url=f"{scheme}://{bucket}/{item['Key']}",
                        upload_id=item["UploadId"],
                        initiated_secs=initiated.timestamp() if initiated else None,
                    )
                )
            if not page.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }
        return sorted(out, key=lambda p: (p.url, p.upload_id))

    def abort_pending_upload(self, pending: PendingUpload) -> None:
        _, bucket, key = _split_s3_url(pending.url)
        try:
            self.call(
                lambda: self._client.abort_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=pending.upload_id
                ),
                url=pending.url,
                what=f"abort multipart upload {pending.upload_id}",
            )
        except NoSuchUploadError:
            logger.debug("upload %s of %s was already gone", pending.upload_id, pending.url)

    def close(self) -> None:
        self._client.close()

    # --- used by S3Upload -------------------------------------------------------------------
    @property
    def send_checksums(self) -> bool:
        """Whether parts carry a CRC32C (turned off for a store that rejects them)."""
        return self._checksums

    def disable_checksums(self, reason: BaseException) -> None:
        """Stop sending CRC32C checksums to this store (it rejected them)."""
        if self._checksums:
            logger.warning(
                "%s rejected CRC32C multipart checksums (%s); uploads to it go without them",
                self._endpoint,
                reason,
            )
        self._checksums = False


class S3Upload(Upload):
    """A streamed upload to one S3 key: a single PUT for objects smaller than one part,
    otherwise a multipart upload started lazily, parts sent in parallel, completed on commit.

    Leaving a ``with`` block without :meth:`commit` aborts; any exception inside :meth:`write` or
    :meth:`commit` (KeyboardInterrupt included) aborts before it propagates.
    """

    def __init__(
        self,
        storage: S3Storage,
        url: str,
        bucket: str,
        key: str,
        *,
        size_hint_bytes: int | None,
    ) -> None:
        self.url = url
        self.metrics = UploadMetrics()
        self._storage = storage
        self._client = storage.client
        self._bucket = bucket
        self._key = key
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._upload_id: str | None = None
        self._checksums = storage.send_checksums
        self._state = "open"  # open -> committed | aborted
        upload_config = storage.config.upload
        self._plan = PartPlan.for_stream(size_hint_bytes, upload_config.part_size_bytes)
        self.metrics.notes["part_size_bytes"] = float(self._plan.base_part_size_bytes)
        self._uploader: ParallelPartUploader[dict[str, Any]] = ParallelPartUploader(
            self._send_part,
            self._plan,
            max_concurrency=upload_config.max_concurrency,
            size_hint_bytes=size_hint_bytes,
            before_first_part=self._create,
            thread_name_prefix=f"cloudckpt-s3-{key.rsplit('/', 1)[-1][:20]}",
        )

    # --- Upload API -----------------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        return self._uploader.bytes_written

    @property
    def upload_id(self) -> str | None:
        """The multipart upload id, once a part has been sent."""
        return self._upload_id

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._state != "open":
            raise ValueError(f"write to a {self._state} upload of {self.url}")
        try:
            return self._uploader.write(data)
        except BaseException:
            self._abort_after_error()
            raise

    def commit(self) -> ObjectInfo:
        if self._state != "open":
            raise ValueError(f"commit of a {self._state} upload of {self.url}")
        try:
            if self._uploader.parts_submitted == 0:
                info = self._put_single()
            else:
                info = self._complete_multipart()
        except BaseException:
            self._abort_after_error()
            raise
        self._state = "committed"
        self.metrics.seconds = time.monotonic() - self._started
        logger.info(
            "committed %s: %d bytes, %d parts, %.1f MiB/s, %d retries (%d throttled)",
            self.url,
            info.size_bytes,
            self.metrics.parts,
            self.metrics.mib_per_sec,
            self.metrics.retries,
            self.metrics.throttles,
        )
        return info

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._uploader.cancel()
        self._record_uploader_stats()
        self.metrics.seconds = time.monotonic() - self._started
        upload_id = self._upload_id
        if upload_id is None:
            return
        try:
            self._storage.abort_pending_upload(PendingUpload(self.url, upload_id))
        except Exception as e:
            logger.warning(
                "could not abort multipart upload %s of %s (%s: %s); it stays until a lifecycle "
                "rule or cloudckpt.multipart.abort_stale_uploads() removes it",
                upload_id,
                self.url,
                type(e).__name__,
                e,
            )
        else:
            logger.info("aborted multipart upload %s of %s", upload_id, self.url)

    def __enter__(self) -> S3Upload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()  # no-op after commit(); never publishes a partial object

    # --- internals ------------------------------------------------------------------------
    def _abort_after_error(self) -> None:
        # Called from an except block: log abort trouble, let the original error propagate.
        try:
            self.abort()
        except Exception as e:
            logger.warning("abort of %s after an error failed too: %s", self.url, e)

    def _on_retry(self, exc: BaseException) -> None:
        with self._lock:
            self.metrics.retries += 1
            if isinstance(exc, ThrottledError):
                self.metrics.throttles += 1

    def _record_uploader_stats(self) -> None:
        stats = self._uploader.stats
        self.metrics.notes["max_live_buffers"] = float(stats.max_live_buffers)
        self.metrics.notes["buffers_allocated"] = float(stats.buffers_allocated)

    def _create(self) -> None:
        """Start the multipart upload (runs in the writer thread before part 1 goes out)."""
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if self._checksums:
            kwargs["ChecksumAlgorithm"] = "CRC32C"
        try:
            resp = self._storage.call(
                lambda: self._client.create_multipart_upload(**kwargs),
                url=self.url,
                what="create multipart upload",
                not_found=BucketNotFoundError,
                on_retry=self._on_retry,
            )
        except BadRequestError as e:
            if not self._checksums:
                raise
            # A store without per-part checksum support: remember it, go on without them.
            self._storage.disable_checksums(e)
            self._checksums = False
            del kwargs["ChecksumAlgorithm"]
            resp = self._storage.call(
                lambda: self._client.create_multipart_upload(**kwargs),
                url=self.url,
                what="create multipart upload",
                not_found=BucketNotFoundError,
                on_retry=self._on_retry,
            )
        self._upload_id = resp["UploadId"]
        logger.debug("started multipart upload %s of %s", self._upload_id, self.url)

    def _send_part(self, part_number: int, view: memoryview) -> dict[str, Any]:
        """Upload one part (in a pool thread); each attempt re-reads the same buffer."""
        kwargs: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._key,
            "UploadId": self._upload_id,
            "PartNumber": part_number,
            "ContentLength": len(view),
        }
        if self._checksums:
            kwargs["ChecksumCRC32C"] = _b64_crc32c(crc32c_of(view))
        resp = self._storage.call(
            lambda: self._client.upload_part(Body=_ViewReader(view), **kwargs),
            url=self.url,
            what=f"upload part {part_number}",
            on_retry=self._on_retry,
        )
        with self._lock:
            self.metrics.bytes_sent += len(view)
            self.metrics.parts += 1
        logger.debug("sent part %d of %s (%d bytes)", part_number, self.url, len(view))
        part = {"PartNumber": part_number, "ETag": resp["ETag"]}
        if self._checksums:
            part["ChecksumCRC32C"] = kwargs["ChecksumCRC32C"]
        return part

    def _put_single(self) -> ObjectInfo:
        data = self._uploader.buffered()
        size = len(data)
        self._uploader.cancel()  # nothing in flight; frees the pool
        self._record_uploader_stats()
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key, "ContentLength": size}
        crc = crc32c_of(data) if self._checksums else None
        if crc is not None:
            kwargs["ChecksumCRC32C"] = _b64_crc32c(crc)
        resp = self._storage.call(
            lambda: self._client.put_object(Body=_ViewReader(data), **kwargs),
            url=self.url,
            what="put object",
            not_found=BucketNotFoundError,
            on_retry=self._on_retry,
        )
        self.metrics.bytes_sent += size
        self.metrics.notes["single_put"] = 1.0
        return ObjectInfo(
            url=self.url, size_bytes=size, version=_strip_etag(resp.get("ETag")), crc32c=crc
        )

    def _complete_multipart(self) -> ObjectInfo:
        parts = [token for _, token in self._uploader.finish()]
        self._record_uploader_stats()
        expected = self._uploader.bytes_written
        if self._uploader.stats.bytes_sent != expected:
            raise StorageError(
                f"sent {self._uploader.stats.bytes_sent} bytes in parts but {expected} were "
                f"written to {self.url}",
                url=self.url,
                hint="this is a cloudckpt bug; please report it",
            )
        attempts = 0

        def complete() -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            try:
                return self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except botocore.exceptions.ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                # An earlier attempt completed but its answer was lost: the upload is gone and
                # the object is there. Check that it is ours before taking it as done.
                if code == "NoSuchUpload" and attempts > 1 and self._is_completed(len(parts)):
                    return {"recovered": True}
                raise

        self._storage.call(
            complete,
            url=self.url,
            what=f"complete multipart upload {self._upload_id} ({len(parts)} parts)",
            on_retry=self._on_retry,
        )
        info = self._storage.head(self.url)
        if info.size_bytes != expected:
            raise StorageError(
                f"{self.url} has {info.size_bytes} bytes after completing upload "
                f"{self._upload_id}, but {expected} were written",
                url=self.url,
                hint="another writer may have replaced the object; write it again",
            )
        return info

    def _is_completed(self, nparts: int) -> bool:
        try:
            info = self._storage.head(self.url)
        except NotFoundError:
            return False
        version = info.version or ""
        return info.size_bytes == self._uploader.bytes_written and version.endswith(f"-{nparts}")
