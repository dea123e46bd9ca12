"""The one door to object storage: a local folder or an S3/MinIO bucket, same interface.

Keys are relative posix paths (``drops/2026-11-A/manifest.json``). Writes are atomic on
both backends: a reader sees the whole object or nothing, even when the writer dies or
the source stream fails half-way. Pick the backend with ``storage.backend`` and build the
store with :func:`open_store`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NameResolutionError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from radground.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    StoreAuthError,
    StoreError,
    StoreUnreachableError,
)
from radground.settings import Settings, StorageSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

TMP_PREFIX = ".tmp-"  # temp files of in-flight writes; never a key, never listed
_CHUNK = 1024 * 1024
_PART_SIZE = 16 * 1024 * 1024  # multipart part for streams of unknown length (S3 minimum: 5 MiB)
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
               "ExpiredToken", "AuthorizationHeaderMalformed"}
_KEY_RULES = ("keys are non-empty relative posix paths such as 'drops/a/file.json': no leading "
              "'/', no backslash, no empty, '.' or '..' segment, no segment starting with "
              f"'{TMP_PREFIX}'")


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` unchanged, or raise InvalidKeyError saying what is allowed.

    With ``prefix=True`` the empty string and a trailing '/' are allowed (list prefixes).
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"object key {key!r} is a {type(key).__name__}: {_KEY_RULES}.")
    segments = key.split("/")
    if prefix and segments[-1] == "":
        segments = segments[:-1]  # 'a/' lists inside a; '' lists everything
    bad = (not key and not prefix) or key.startswith("/") or "\\" in key or "\0" in key or any(
        s in ("", ".", "..") or s.startswith(TMP_PREFIX) for s in segments)
    if bad:
        what = "list prefix" if prefix else "object key"
        raise InvalidKeyError(f"{what} {key!r} is not allowed: {_KEY_RULES}.")
    return key


class ObjectStore(ABC):
    """Put, get, list and delete whole objects by key; every write is atomic."""

    @abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> str:
        """Store ``data`` (bytes or a readable binary stream) under ``key``; return the key."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object's bytes; ObjectNotFoundError when the key does not exist."""

    @abstractmethod
    def get_file(self, key: str, dest: Path | str) -> Path:
        """Write the object to ``dest`` atomically (temp file, then rename); return ``dest``."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key that starts with ``prefix``, recursively, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store lives, for messages and logs; never credentials."""

    def has_objects(self, prefix: str) -> bool:
        """Whether any object's key starts with ``prefix`` (a folder-like prefix ends in '/')."""
        return next(iter(self.list(prefix)), None) is not None

    def list_stat(self, prefix: str = "") -> list[tuple[str, int, str]]:
        """(key, size, version stamp) of every object under ``prefix``, sorted by key. The stamp (ETag or
        mtime) changes when an object is rewritten, so two listings tell an upload in progress."""
        raise StoreError(f"the {type(self).__name__} object store cannot list sizes and stamps "
                         f"({self.describe()}). Use the local or s3 storage backend.")

    def put_file(self, key: str, path: Path | str) -> str:
        """Store the file at ``path`` under ``key``; return the key."""
        with open(path, "rb") as source:
            return self.put(key, source)

    def put_content(self, data: bytes, prefix: str = "cas/") -> str:
        """Store ``data`` content-addressed under ``prefix + sha256``; a no-op if present."""
        key = validate_key(prefix + hashlib.sha256(data).hexdigest())
        if not self.exists(key):
            self.put(key, data)
        return key

    def _not_found(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(
            f"object {key!r} not found in store {self.describe()}. "
            "Check the key (list the store with its prefix) or write the object first."
        )


class _SourceError(Exception):
    """Carries an exception of the caller's stream, so it is never taken for a store failure."""


class _SourceReader:
    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        try:
            chunk = self._raw.read(size)
        except Exception as exc:
            raise _SourceError() from exc
        return chunk if isinstance(chunk, bytes) else bytes(chunk or b"")


def _write_atomic(dest: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to a hidden temp file beside ``dest``, fsync, then rename over it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    # os.open with 0o666 honours the umask (mkstemp would leave every object 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: stream.read(_CHUNK), b"")


class LocalStore(ObjectStore):
    """Objects as files under ``root``; the embedded, server-free default."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    def describe(self) -> str:
        return f"local:{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key: str, data: bytes | BinaryIO) -> str:
        dest = self._path(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = io.BytesIO(data)
        try:
            _write_atomic(dest, _chunks(_SourceReader(data)))  # type: ignore[arg-type]
        except _SourceError as exc:
            source_error = exc.__cause__
        except OSError as exc:
            raise StoreError(
                f"cannot write object {key!r} to store {self.describe()}: {exc.strerror or exc}. "
                "Check that the folder is writable and that no file is in the way of its path."
            ) from exc
        else:
            return key
        raise source_error  # type: ignore[misc]  # the caller's stream failed: its own error

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None

    def get_file(self, key: str, dest: Path | str) -> Path:
        dest = Path(dest)
        try:
            source = open(self._path(key), "rb")  # noqa: SIM115  # closed below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None
        with source:
            _write_atomic(dest, _chunks(source))
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)
        # Walk only the deepest folder the prefix names; 'a/b' also matches 'a/bc'.
        base = self.root / prefix.rpartition("/")[0]
        keys = []
        for folder, _dirs, files in os.walk(base):
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def list_stat(self, prefix: str = "") -> list[tuple[str, int, str]]:
        out = []
        for key in self.list(prefix):
            try:
                stat = self._path(key).stat()
            except FileNotFoundError:  # deleted while listing: the next listing shows the change
                continue
            out.append((key, stat.st_size, str(stat.st_mtime_ns)))
        return out

    def delete(self, key: str) -> None:
        # A folder, or a path through a file: no object by that key either.
        with contextlib.suppress(IsADirectoryError, NotADirectoryError):
            self._path(key).unlink(missing_ok=True)


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, S3Error):
        return exc.response.status if exc.response is not None else None
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        return exc._code  # minio keeps the HTTP status only here
    return None


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, SSLError):
        return False  # a bad certificate does not heal by retrying
    if isinstance(exc, Urllib3Error):
        return True  # refused, reset, timed out, DNS: urllib3 wraps every socket failure
    if isinstance(exc, S3Error) and exc.code in _TRANSIENT_CODES:
        return True
    return (_status(exc) or 0) >= 500


def _connection_reason(exc: BaseException) -> str:
    chain, seen = [exc], set()
    while chain:
        err = chain.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, NameResolutionError):
            return "host name does not resolve"
        if isinstance(err, ConnectionRefusedError):
            return "connection refused"
        if isinstance(err, ConnectionResetError):
            return "connection reset"
        if isinstance(err, Urllib3Timeout) and not isinstance(err, NewConnectionError):
            return "timed out; see storage.connect_timeout_s/read_timeout_s"
        chain += [e for e in (err.__cause__, err.__context__, getattr(err, "reason", None))
                  if isinstance(e, BaseException)]
    return type(exc).__name__


class S3Store(ObjectStore):
    """Objects in an S3/MinIO bucket under ``storage.prefix``; retries transient failures."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        parts = urlsplit(settings.endpoint)
        host = parts.netloc.rpartition("@")[2]  # never keep userinfo, it may hold a password
        self._endpoint = f"{parts.scheme}://{host}"
        http = urllib3.PoolManager(
            # retries=False: tenacity below is the only retry layer, so a dead endpoint
            # gives one error after max_attempts, not a wall of urllib3 retry warnings.
            retries=False,
            timeout=urllib3.Timeout(connect=settings.connect_timeout_s,
                                    read=settings.read_timeout_s),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        secret = settings.secret_key.get_secret_value() if settings.secret_key else None
        access = settings.access_key.get_secret_value() if settings.access_key else None
        self._client = Minio(host, access_key=access, secret_key=secret, region=settings.region,
                             secure=parts.scheme == "https", http_client=http)
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def describe(self) -> str:
        return f"s3://{self.bucket}{'/' + self.prefix if self.prefix else ''} at {self._endpoint}"

    def _call(self, op: str, key: str | None, fn: Callable[[], T], *, retry: bool = True) -> T:
        """Run ``fn`` with backoff on transient errors; map what is left to radground errors."""
        attempts = self.settings.max_attempts if retry else 1
        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(multiplier=self.settings.backoff_s, max=30,
                                         jitter=self.settings.backoff_s),
            retry=retry_if_exception(_is_transient),
            before_sleep=lambda state: self._log_retry(op, key, state),
            reraise=True,
        )
        tries = 0

        def attempt() -> T:
            nonlocal tries
            tries += 1
            return fn()

        try:
            return retrying(attempt)
        except _SourceError:
            raise
        except (Urllib3Error, MinioException) as exc:
            raise self._translate(exc, op, key, tries) from exc

    def _log_retry(self, op: str, key: str | None, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = _connection_reason(exc) if isinstance(exc, Urllib3Error) else _short(exc)
        log.warning("object store %s: %s failed (%s), attempt %d of %d; retrying in %.2f s",
                    self.describe(), _target(op, key), reason, state.attempt_number,
                    self.settings.max_attempts, state.upcoming_sleep)

    def _translate(self, exc: Exception, op: str, key: str | None, tries: int) -> StoreError:
        where = f"object store {self.describe()}"
        after = f"after {tries} attempt{'s' if tries != 1 else ''}"
        code = exc.code if isinstance(exc, S3Error) else None
        status = _status(exc)
        if isinstance(exc, SSLError):
            return StoreError(f"{where}: TLS handshake failed ({exc}). Check storage.endpoint "
                              "(http vs https) and the server certificate (SSL_CERT_FILE).")
        if isinstance(exc, Urllib3Error):
            return StoreUnreachableError(
                f"{where} is unreachable ({_connection_reason(exc)}) {after}. "
                "Check storage.endpoint and that the S3/MinIO server is running.")
        if code in _AUTH_CODES or status in (401, 403):
            have = "are set" if self.settings.access_key else "are NOT set"
            return StoreAuthError(
                f"{where} rejected the credentials ({code or f'HTTP {status}'}) on {op}; the "
                f"credentials {have}. Check storage.access_key/storage.secret_key "
                "(RADGROUND_STORAGE__ACCESS_KEY / RADGROUND_STORAGE__SECRET_KEY) and that the "
                f"key may access bucket '{self.bucket}'.")
        if code == "NoSuchKey" and key is not None:
            return self._not_found(key)
        if code == "NoSuchBucket":
            return self._no_bucket()
        if _is_transient(exc) and tries < self.settings.max_attempts:
            return StoreError(f"{where}: {_target(op, key)} failed ({_short(exc)}) and was not retried: "
                              "a one-way stream cannot be read twice. Retry later, or pass a file or a "
                              "seekable stream so that radground can retry by itself.")
        if _is_transient(exc):
            return StoreError(f"{where}: {_target(op, key)} kept failing ({_short(exc)}) {after}. "
                              "The server is overloaded or unhealthy; retry later or raise "
                              "storage.max_attempts.")
        return StoreError(f"{where}: {_target(op, key)} failed ({_short(exc)}). Check the server's "
                          "logs; this is not an error radground retries.")

    def _ensure_bucket(self) -> None:
        # Lazily, once: constructing a store must never touch the network.
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self._call("check bucket", None, lambda: self._client.bucket_exists(self.bucket)):
                if not self.settings.create_bucket:
                    raise self._no_bucket()
                self._call("create bucket", None, self._make_bucket)
                log.info("object store %s: created bucket %s", self.describe(), self.bucket)
            self._bucket_ready = True

    def _no_bucket(self) -> StoreError:
        return StoreError(f"object store {self.describe()}: bucket '{self.bucket}' does not exist. "
                          "Create it, or set storage.create_bucket=true to let radground create it.")

    def _make_bucket(self) -> None:
        try:
            self._client.make_bucket(self.bucket, location=self.settings.region)
        except S3Error as exc:  # another writer won the race: fine
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, data: bytes | BinaryIO) -> str:
        name = self._name(key)
        self._ensure_bucket()
        if isinstance(data, (bytes, bytearray, memoryview)):
            blob = bytes(data)
            self._call("put", key, lambda: self._client.put_object(
                self.bucket, name, io.BytesIO(blob), len(blob)))
            return key
        # A seekable stream is rewound before each try; any other can be read only once.
        try:
            start = data.tell() if data.seekable() else None
        except (AttributeError, OSError):
            start = None

        def upload() -> None:
            if start is not None:
                data.seek(start)
            # Unknown length: multipart; S3 makes the object visible only when it completes,
            # and minio aborts the upload when the stream fails, so nothing half-written shows.
            self._client.put_object(self.bucket, name, _SourceReader(data), -1,
                                    part_size=_PART_SIZE)

        try:
            self._call("put", key, upload, retry=start is not None)
        except _SourceError as exc:
            source_error = exc.__cause__
        else:
            return key
        raise source_error  # type: ignore[misc]

    def _read(self, name: str, sink: Callable[[Iterator[bytes]], T]) -> T:
        response = self._client.get_object(self.bucket, name)
        try:
            return sink(response.stream(_CHUNK))
        finally:
            response.close()
            response.release_conn()

    def get(self, key: str) -> bytes:
        name = self._name(key)
        self._ensure_bucket()
        return self._call("get", key, lambda: self._read(name, b"".join))

    def get_file(self, key: str, dest: Path | str) -> Path:
        name, dest = self._name(key), Path(dest)
        self._ensure_bucket()
        # Each try streams into a fresh temp file; a failed try leaves nothing behind.
        self._call("get", key, lambda: self._read(name, lambda chunks: _write_atomic(dest, chunks)))
        return dest

    def exists(self, key: str) -> bool:
        name = self._name(key)
        self._ensure_bucket()

        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, name)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    return False
                raise
            return True

        return self._call("stat", key, stat)

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self.prefix + validate_key(prefix, prefix=True)
        self._ensure_bucket()
        # Listing pages lazily; collect inside the retry so a failed page restarts cleanly.
        names = self._call("list", prefix or None, lambda: [
            obj.object_name for obj in self._client.list_objects(self.bucket, full, recursive=True)
            if obj.object_name and not obj.object_name.endswith("/")])
        return iter(sorted(name[len(self.prefix):] for name in names))

    def list_stat(self, prefix: str = "") -> list[tuple[str, int, str]]:
        full = self.prefix + validate_key(prefix, prefix=True)
        self._ensure_bucket()
        objects = self._call("list", prefix or None, lambda: [
            (obj.object_name, obj.size or 0, obj.etag or "")
            for obj in self._client.list_objects(self.bucket, full, recursive=True)
            if obj.object_name and not obj.object_name.endswith("/")])
        return sorted((name[len(self.prefix):], size, etag) for name, size, etag in objects)

    def has_objects(self, prefix: str) -> bool:
        full = self.prefix + validate_key(prefix, prefix=True)
        self._ensure_bucket()
        # The first object of the first listing page answers it: no need to list a whole drop.
        return self._call("list", prefix or None, lambda: any(
            obj.object_name and not obj.object_name.endswith("/")
            for obj in self._client.list_objects(self.bucket, full, recursive=True)))

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._ensure_bucket()
        self._call("delete", key, lambda: self._client.remove_object(self.bucket, name))


def _target(op: str, key: str | None) -> str:
    return f"{op} {key!r}" if key else op


def _short(exc: BaseException | None) -> str:
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    status = _status(exc) if exc is not None else None
    return f"HTTP {status}" if status else type(exc).__name__


def open_store(settings: Settings) -> ObjectStore:
    """Build the store ``settings.storage.backend`` names; the local root is created if missing."""
    if settings.storage.backend == "s3":
        return S3Store(settings.storage)
    root = settings.store_root
    root.mkdir(parents=True, exist_ok=True)
    return LocalStore(root)
