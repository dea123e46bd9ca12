"""radground.store: the same behaviour tests run against the local folder and S3 (moto)."""

from __future__ import annotations

import hashlib
import io
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from radground import store as store_module
from radground.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    StoreAuthError,
    StoreError,
    StoreUnreachableError,
)
from radground.settings import Settings, load_settings
from radground.store import LocalStore, ObjectStore, S3Store, open_store

MiB = 1024 * 1024


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


class OneWayStream:
    """A readable stream that cannot seek (like a socket or a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._buf.read(size)


class FailingStream(OneWayStream):
    """Serves ``fail_after`` bytes, then raises as a broken disk or network source would."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self._left = fail_after

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise OSError("source stream broke: disk unplugged")
        size = self._left if size < 0 else min(size, self._left)
        chunk = super().read(size)
        self._left -= len(chunk)
        return chunk


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)], ids=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clean_env: None) -> ObjectStore:
    """An empty store of its own per test: a tmp folder, or a fresh bucket on moto."""
    if request.param == "local":
        return open_store(load_settings(data_dir=tmp_path))
    endpoint = request.getfixturevalue("s3_server")
    return open_store(request.getfixturevalue("make_s3_settings")(endpoint))


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _assert_no_partial_upload(store: ObjectStore) -> None:
    """Local: no file at all under the root. S3: no multipart upload left open."""
    if isinstance(store, LocalStore):
        assert _files_under(store.root) == []
        return
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=store.settings.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    assert s3.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


# --- behaviour every backend shares ------------------------------------------------------


def test_put_get_bytes_round_trip(store: ObjectStore) -> None:
    data = _payload(70_000)
    assert store.put("drops/a/blob.bin", data) == "drops/a/blob.bin"
    assert store.get("drops/a/blob.bin") == data


def test_put_overwrites_existing_object(store: ObjectStore) -> None:
    store.put("k", b"first")
    store.put("k", b"second, longer")
    assert store.get("k") == b"second, longer"


@pytest.mark.parametrize("make_stream", [io.BytesIO, OneWayStream], ids=["seekable", "one-way"])
def test_put_stream_round_trip(store: ObjectStore, make_stream: Callable[[bytes], object]) -> None:
    data = _payload(3 * MiB + 17, seed=1)
    store.put("streams/x", make_stream(data))  # type: ignore[arg-type]
    assert store.get("streams/x") == data


def test_put_stream_starts_at_current_position(store: ObjectStore) -> None:
    stream = io.BytesIO(b"HEADERpayload")
    stream.seek(6)
    store.put("k", stream)
    assert store.get("k") == b"payload"


def test_put_one_way_stream_larger_than_a_part_uses_multipart(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_PART_SIZE", 5 * MiB)  # S3's smallest part; 3 parts here
    data = _payload(11 * MiB + 3, seed=2)
    store.put("big/one-way.bin", OneWayStream(data))  # type: ignore[arg-type]
    assert hashlib.sha256(store.get("big/one-way.bin")).hexdigest() == hashlib.sha256(data).hexdigest()


def test_put_file_and_get_file(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "in" / "scan.dcm"
    source.parent.mkdir()
    source.write_bytes(_payload(200_000, seed=3))
    assert store.put_file("series/1/scan.dcm", source) == "series/1/scan.dcm"

    dest = tmp_path / "out" / "nested" / "scan.dcm"  # parents do not exist yet
    assert store.get_file("series/1/scan.dcm", dest) == dest
    assert dest.read_bytes() == source.read_bytes()

    store.put("series/1/scan.dcm", b"v2")
    store.get_file("series/1/scan.dcm", dest)  # replaces an existing file
    assert dest.read_bytes() == b"v2"
    assert [p.name for p in dest.parent.iterdir()] == ["scan.dcm"]  # no temp file left


def test_put_content_is_sha256_addressed_and_idempotent(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"report text: no acute findings"
    expected = "cas/" + hashlib.sha256(data).hexdigest()
    assert store.put_content(data) == expected
    assert store.get(expected) == data

    def no_second_write(key: str, data: bytes) -> str:
        raise AssertionError(f"put_content rewrote existing object {key}")

    monkeypatch.setattr(store, "put", no_second_write)
    assert store.put_content(data) == expected
    assert list(store.list()) == [expected]
    monkeypatch.undo()
    assert store.put_content(data, prefix="blobs/") == "blobs/" + hashlib.sha256(data).hexdigest()


def test_exists(store: ObjectStore) -> None:
    assert not store.exists("a/b")
    store.put("a/b", b"x")
    assert store.exists("a/b")
    assert not store.exists("a")  # a folder-like prefix is not an object


def test_list_is_recursive_sorted_and_prefix_isolated(store: ObjectStore) -> None:
    keys = ["z", "a/b/c.txt", "ab", "a/bc/d", "a/b.txt", "a/b/a/deep.json"]
    for key in keys:
        store.put(key, key.encode())
    if isinstance(store, LocalStore):  # an in-flight write of another process
        (store.root / "a" / "b" / ".tmp-0123abcd").write_bytes(b"half")

    assert list(store.list()) == sorted(keys)
    assert list(store.list("a/b/")) == ["a/b/a/deep.json", "a/b/c.txt"]
    assert list(store.list("a/b")) == ["a/b.txt", "a/b/a/deep.json", "a/b/c.txt", "a/bc/d"]
    assert list(store.list("a")) == ["a/b.txt", "a/b/a/deep.json", "a/b/c.txt", "a/bc/d", "ab"]
    assert list(store.list("nothing/")) == []


def test_delete(store: ObjectStore) -> None:
    store.put("a/1", b"1")
    store.put("a/2", b"2")
    store.delete("a/1")
    assert not store.exists("a/1")
    assert list(store.list()) == ["a/2"]
    store.delete("a/1")  # already gone: fine
    store.delete("never/was")


def test_get_missing_key_raises_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match=r"object 'no/such/key' not found in store") as info:
        store.get("no/such/key")
    assert isinstance(info.value, KeyError)
    dest = tmp_path / "dest.bin"
    with pytest.raises(ObjectNotFoundError, match="no/such/key"):
        store.get_file("no/such/key", dest)
    assert not dest.exists()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a//b", "", "a/", "a\\b", "./a", ".tmp-x"])
def test_invalid_keys_are_rejected(store: ObjectStore, key: str) -> None:
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                 lambda: store.delete(key)):
        with pytest.raises(InvalidKeyError, match="is not allowed: keys are non-empty relative posix"):
            call()
    assert list(store.list()) == []


def test_invalid_list_prefix_is_rejected(store: ObjectStore) -> None:
    with pytest.raises(InvalidKeyError, match="list prefix '../' is not allowed"):
        list(store.list("../"))


@pytest.mark.parametrize("fail_after", [10, 6 * MiB], ids=["small", "after-a-part"])
def test_interrupted_write_leaves_nothing_visible(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch, fail_after: int
) -> None:
    monkeypatch.setattr(store_module, "_PART_SIZE", 5 * MiB)  # 'after-a-part': 1 part uploaded
    data = _payload(12 * MiB, seed=4)
    with pytest.raises(OSError, match="disk unplugged") as info:
        store.put("drops/new.bin", FailingStream(data, fail_after))  # type: ignore[arg-type]
    assert not isinstance(info.value, StoreError)  # the caller's error, not taken for the store's
    assert not store.exists("drops/new.bin")
    assert list(store.list()) == []
    _assert_no_partial_upload(store)


def test_interrupted_overwrite_keeps_the_old_object(store: ObjectStore) -> None:
    store.put("k", b"old version")
    with pytest.raises(OSError, match="disk unplugged"):
        store.put("k", FailingStream(b"new version" * 1000, fail_after=100))  # type: ignore[arg-type]
    assert store.get("k") == b"old version"
    assert list(store.list()) == ["k"]


# --- local backend ------------------------------------------------------------------------


def test_open_store_local_creates_root_and_describes_it(tmp_path: Path, clean_env: None) -> None:
    store = open_store(load_settings(data_dir=tmp_path / "data"))
    assert isinstance(store, LocalStore)
    assert (tmp_path / "data" / "store").is_dir()
    assert store.describe() == f"local:{(tmp_path / 'data' / 'store').absolute()}"


def test_local_write_blocked_by_a_file_raises_store_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"a file where a folder must go")
    with pytest.raises(StoreError, match=r"cannot write object 'a/b' to store local:"):
        store.put("a/b", b"x")
    assert _files_under(tmp_path) == [tmp_path / "a"]


# --- S3 backend -----------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_prefix_isolates_stores_in_one_bucket(s3_server: str, make_s3_settings) -> None:
    site_a = open_store(make_s3_settings(s3_server, prefix="site-a"))
    bucket = site_a.settings.bucket  # type: ignore[attr-defined]
    site_b = open_store(make_s3_settings(s3_server, bucket=bucket, prefix="site-b/"))
    whole = open_store(make_s3_settings(s3_server, bucket=bucket))
    assert site_a.describe() == f"s3://{bucket}/site-a/ at {s3_server}"

    site_a.put("x/1", b"a")
    site_b.put("x/1", b"b")
    assert site_a.get("x/1") == b"a"
    assert site_b.get("x/1") == b"b"
    assert list(site_a.list()) == ["x/1"]
    assert list(whole.list()) == ["site-a/x/1", "site-b/x/1"]
    site_a.delete("x/1")
    assert list(whole.list()) == ["site-b/x/1"]


@pytest.fixture
def store_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake clock for radground.store's retries: the waits tenacity asks for, recorded, not waited."""
    import functools

    from tenacity import Retrying

    slept: list[float] = []
    monkeypatch.setattr(store_module, "Retrying", functools.partial(Retrying, sleep=slept.append))
    return slept


def test_constructing_an_s3_store_makes_no_connection(make_s3_settings) -> None:
    """open_store() touches no network: the endpoint (a listening socket that never answers) sees no
    connection until the store is first used, and then it does (the control)."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        store = open_store(make_s3_settings(endpoint, max_attempts=1, read_timeout_s=0.2))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
        with pytest.raises(StoreUnreachableError, match=r"timed out"):
            store.exists("a")  # first use: it connects, asks, and gets no answer
        connection, _ = listener.accept()
        connection.close()


@pytest.mark.integration
def test_s3_endpoint_down_raises_unreachable_after_its_backoff(
    make_s3_settings, free_tcp_port: int, caplog: pytest.LogCaptureFixture, store_sleeps: list[float]
) -> None:
    endpoint = f"http://127.0.0.1:{free_tcp_port}"  # nothing listens there
    settings = make_s3_settings(endpoint, max_attempts=2, backoff_s=0.01)
    store = open_store(settings)
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreUnreachableError, match="unreachable") as info:
        store.get("a")
    # Two tries, one wait between them: backoff_s plus at most backoff_s of jitter (storage.backoff_s).
    assert len(store_sleeps) == 1 and 0.01 <= store_sleeps[0] <= 0.02, store_sleeps
    # One line per retry from radground, none from urllib3 (its own retries are off).
    warnings = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [name for name, _ in warnings] == ["radground.store"]
    assert f"check bucket failed (connection refused), attempt 1 of 2; retrying in {store_sleeps[0]:.2f} s" in (
        warnings[0][1])  # the wait it announces is the wait it asks for
    assert not [r for r in caplog.records if "Retrying (Retry(" in r.getMessage()]
    message = str(info.value)
    assert message == (
        f"object store s3://{store.bucket} at {endpoint} is unreachable (connection refused) "  # type: ignore[attr-defined]
        "after 2 attempts. Check storage.endpoint and that the S3/MinIO server is running."
    )
    assert settings.storage.secret_key.get_secret_value() not in message


@pytest.mark.integration
def test_s3_missing_bucket_without_create_bucket(s3_server: str, make_s3_settings) -> None:
    store = open_store(make_s3_settings(s3_server, create_bucket=False))
    with pytest.raises(StoreError, match=r"bucket 'rg-[0-9a-f]+' does not exist.*storage.create_bucket=true"):
        store.put("a", b"x")


@pytest.mark.integration
def test_s3_bad_credentials_raise_auth_error_without_retry_or_secret(
    s3_auth_server: dict[str, str], make_s3_settings, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = s3_auth_server["endpoint"]
    valid = make_s3_settings(
        endpoint, access_key=s3_auth_server["access_key"], secret_key=s3_auth_server["secret_key"]
    )
    store = open_store(valid)  # control: the server accepts the right key
    store.put("a", b"x")
    assert store.get("a") == b"x"

    wrong_secret = "wrong-secret-must-never-be-printed"
    cases = [  # a known key with the wrong secret, and an unknown key
        dict(access_key=s3_auth_server["access_key"], secret_key=wrong_secret),
        dict(access_key="AKIANOSUCHKEY0000000", secret_key=wrong_secret),
    ]
    for creds in cases:
        bad = open_store(make_s3_settings(endpoint, bucket=valid.storage.bucket, max_attempts=4, **creds))
        # The first request is the lazy bucket check, a HEAD: no body, so S3 can only say 403.
        with (
            caplog.at_level(logging.WARNING, logger="radground.store"),
            pytest.raises(StoreAuthError, match=r"rejected the credentials \(AccessDenied\)") as info,
        ):
            bad.get("a")
        message = str(info.value)
        assert "storage.access_key/storage.secret_key" in message
        assert "RADGROUND_STORAGE__SECRET_KEY" in message
        assert wrong_secret not in message and s3_auth_server["secret_key"] not in message
        assert caplog.records == []  # credentials problems are not retried


class _StubS3(BaseHTTPRequestHandler):
    """Answers with one fixed S3 error (HEAD too, unless head_ok); counts the requests."""

    status, code, head_ok = 503, "SlowDown", False
    hits = 0

    def _reply(self) -> None:
        type(self).hits += 1
        if self.command == "HEAD" and self.head_ok:  # 'the bucket exists'
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = f"<Error><Code>{self.code}</Code><Message>stub says {self.code}</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = _reply

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve_stub() -> Iterator[Callable[[type[BaseHTTPRequestHandler]], str]]:
    """Start a loopback HTTP server for a handler class; returns its endpoint URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(handler: type[BaseHTTPRequestHandler]) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


_ERROR_CASES = [
    # HEAD (the lazy bucket check) has no body: minio sees only the status.
    (503, "SlowDown", False, StoreError, 3, r"check bucket kept failing \(HTTP 503\) after 3 attempts"),
    (403, "AccessDenied", False, StoreAuthError, 1, r"rejected the credentials \(AccessDenied\)"),
    # GET carries the S3 error document: 1 HEAD for the bucket, then the GETs.
    (503, "SlowDown", True, StoreError, 1 + 3, r"get 'a' kept failing \(SlowDown: stub says"),
    (500, "InternalError", True, StoreError, 1 + 3, r"kept failing \(InternalError: .*after 3 attempts"),
    (503, "ServiceUnavailable", True, StoreError, 1 + 3, r"ServiceUnavailable.*after 3 attempts"),
    (400, "RequestTimeout", True, StoreError, 1 + 3, r"RequestTimeout.*after 3 attempts"),
    (403, "SignatureDoesNotMatch", True, StoreAuthError, 1 + 1, r"credentials \(SignatureDoesNotMatch\)"),
    (403, "InvalidAccessKeyId", True, StoreAuthError, 1 + 1, r"credentials \(InvalidAccessKeyId\)"),
    (404, "NoSuchKey", True, ObjectNotFoundError, 1 + 1, r"object 'a' not found in store s3://"),
    (400, "InvalidArgument", True, StoreError, 1 + 1, r"get 'a' failed \(InvalidArgument: stub"),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "code", "head_ok", "error", "hits", "match"),
    _ERROR_CASES,
    ids=[f"{case[0]}-{case[1]}-{'get' if case[2] else 'head'}" for case in _ERROR_CASES],
)
def test_s3_retries_only_transient_errors(
    serve_stub, make_s3_settings, status: int, code: str, head_ok: bool, error: type, hits: int, match: str
) -> None:
    handler = type("Stub", (_StubS3,), {"hits": 0, "status": status, "code": code, "head_ok": head_ok})
    endpoint = serve_stub(handler)
    store = open_store(make_s3_settings(endpoint, max_attempts=3, backoff_s=0.01))
    with pytest.raises(error, match=match) as info:
        store.get("a")
    assert type(info.value) is error
    assert handler.hits == hits


def test_s3_store_never_shows_credentials(make_s3_settings) -> None:
    settings: Settings = make_s3_settings("http://user:pw@127.0.0.1:9")
    store = S3Store(settings.storage)
    assert store.describe() == f"s3://{settings.storage.bucket} at http://127.0.0.1:9"
    assert "pw" not in store.describe()


def test_s3_retries_back_off_doubling(make_s3_settings, free_tcp_port: int, store_sleeps: list[float]) -> None:
    """storage.backoff_s is the first wait and doubles each retry (plus at most backoff_s of jitter):
    four tries against a dead endpoint ask the fake clock for about 1, 2 and 4 s."""
    store = open_store(make_s3_settings(f"http://127.0.0.1:{free_tcp_port}", max_attempts=4, backoff_s=1.0))
    with pytest.raises(StoreUnreachableError, match=r"after 4 attempts"):
        store.exists("a")
    assert len(store_sleeps) == 3, store_sleeps
    for slept, base in zip(store_sleeps, (1.0, 2.0, 4.0), strict=True):
        assert base <= slept <= base + 1.0, store_sleeps


class _SilentS3(BaseHTTPRequestHandler):
    """Accepts the connection, then never answers in time: closes it after 2 s without a reply."""

    hits = 0

    def do_HEAD(self) -> None:
        type(self).hits += 1
        time.sleep(2)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.integration
def test_s3_read_timeout_is_retried_then_unreachable(serve_stub, make_s3_settings, store_sleeps) -> None:
    """storage.read_timeout_s (0.2 s), not the server's 2 s, ends each try: a client that waited the
    server out would see the connection closed without a reply, not a timeout. Both tries reach the
    server, with one backoff between them."""
    handler = type("Silent", (_SilentS3,), {"hits": 0})
    # connect_timeout_s is far from read_timeout_s and from the server's 2 s: mixing them up shows
    store = open_store(make_s3_settings(serve_stub(handler), max_attempts=2, read_timeout_s=0.2,
                                        connect_timeout_s=5.0, backoff_s=0.5))
    with pytest.raises(StoreUnreachableError, match=r"unreachable \(timed out.*\) after 2 attempts"):
        store.exists("a")
    assert handler.hits == 2
    assert len(store_sleeps) == 1 and 0.5 <= store_sleeps[0] <= 1.0, store_sleeps


class _FlakyS3(BaseHTTPRequestHandler):
    """The bucket exists; the first PUT fails with 503 SlowDown, later PUTs succeed."""

    puts: list[bytes] = []
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.puts.append(body)
        if len(self.puts) == 1:
            reply = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
        else:
            reply = b""
            self.send_response(200)
            self.send_header("ETag", '"0123"')
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.integration
@pytest.mark.parametrize("seekable", [True, False], ids=["seekable", "one-way"])
def test_s3_put_retry_resends_a_seekable_stream_from_its_start(
    serve_stub, make_s3_settings, seekable: bool
) -> None:
    handler = type("Flaky", (_FlakyS3,), {"puts": []})
    store = open_store(make_s3_settings(serve_stub(handler), max_attempts=3, backoff_s=0.01))
    if seekable:
        stream = io.BytesIO(b"HEAD:payload")
        stream.seek(5)
        store.put("k", stream)
        assert handler.puts == [b"payload", b"payload"]
    else:  # read once already: retrying would upload a truncated object, so it does not
        with pytest.raises(StoreError, match=r"put 'k' failed \(SlowDown: slow down\) and was not retried"):
            store.put("k", OneWayStream(b"payload"))  # type: ignore[arg-type]
        assert handler.puts == [b"payload"]
