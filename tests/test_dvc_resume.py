"""Requirement: the S3 endpoint going down during a DVC push gives a clear error, and a rerun
resumes without duplicate objects.

A real moto S3 server runs on a loopback port this module picks and keeps. moto's backends
are process-wide, so a fresh ThreadedMotoServer started on the same port after a stop serves
the same buckets: that is an endpoint outage and recovery with the stored objects intact
(moto answers every request with ``Connection: close``, so no kept-alive socket outlives a
stop). The outage is forced at two moments: before a push (the endpoint is already down) and
part-way through one (the server stops itself right after storing the K-th uploaded object;
the remote's ``jobs`` is 1, so exactly K new objects are on the bucket after the outage).
"""

from __future__ import annotations

import hashlib
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from radground.dvc import DVC_REMOTE_NAME, DVC_S3_PREFIX, DvcError, DvcRepo
from radground.errors import StoreUnreachableError
from radground.schemas import ImageRecord
from radground.tables import to_arrow
from tasks.version import Manifest, shard_paths, write_version
from tests.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning"),  # dvc 3.67's use of pygtrie
]

SHARD_BYTES = 32 * 1024  # small shards: several per version
FILES_PREFIX = f"{DVC_S3_PREFIX}/files/md5/"  # DVC 3's content-addressed layout: files/md5/<2 hex>/<30 hex>


class MotoOnPort:
    """moto's ThreadedMotoServer on one fixed loopback port, stopped and restarted at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        # ThreadedMotoServer.start() waits forever if its bind fails: check the port first.
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as exc:
                pytest.fail(f"port {self.port} was taken by another process while moto was down: {exc}")
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()  # shutdown + join; werkzeug's serve_forever closes the listening socket

    @property
    def running(self) -> bool:
        return self._server is not None

    def refuses_connections(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) != 0


@pytest.fixture
def moto_on_port() -> Iterator[MotoOnPort]:
    server = MotoOnPort(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


class UploadRecorder:
    """Wraps moto's S3Backend.put_object: records each DVC object stored in one bucket and can
    stop the server right after the K-th one (in the request's thread: in-flight requests
    finish, every later one is refused)."""

    def __init__(self, bucket: str, server: MotoOnPort) -> None:
        self.bucket = bucket
        self.server = server
        self.keys: list[str] = []
        self.stop_after: int | None = None
        self._armed_at = 0

    def arm(self, stop_after: int) -> None:
        self.stop_after, self._armed_at = stop_after, len(self.keys)

    def disarm(self) -> None:
        self.stop_after = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from moto.s3.models import S3Backend

        original = S3Backend.put_object
        recorder = self

        def put_object(backend: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
            stored = original(backend, bucket_name, key_name, *args, **kwargs)
            if bucket_name == recorder.bucket and key_name.startswith(FILES_PREFIX):
                recorder.keys.append(key_name)
                if (recorder.stop_after is not None
                        and len(recorder.keys) - recorder._armed_at == recorder.stop_after):
                    recorder.stop_after = None
                    recorder.server.stop()
            return stored

        monkeypatch.setattr(S3Backend, "put_object", put_object)


# --------------------------------------------------------------------------- helpers


def images_table(n: int, *, patient: str, seed: int):
    rng = np.random.default_rng(seed)
    rows = [ImageRecord(
        image_id=f"2.25.{seed}.{i}", patient_pseudonym=patient, study_uid="2.25.9", series_uid="2.25.8",
        drop_id="drop-A", modality="CT", body_part="CHEST", study_date=date(2020, 1, 2), slice_index=i,
        slice_axis="axial", slice_position_mm=float(i), rows=32, cols=32, row_spacing_mm=0.7,
        col_spacing_mm=0.7, slice_thickness_mm=1.0, image_position=[0.0, 0.0, float(i)],
        image_orientation=[1.0, 0, 0, 0, 1.0, 0], pixel_dtype="int16",
        pixels=rng.integers(-1000, 1000, (32, 32), dtype=np.int16).tobytes(),
        has_report=True, source_sha256=f"{seed:032x}{i:032x}",
    ) for i in range(n)]
    return to_arrow(rows, ImageRecord)


def write(out_dir: Path, table, *, parent: Manifest | None = None, reuse=None, splits=None) -> Manifest:
    return write_version({"images": [table]}, out_dir=out_dir, parent=parent, drops=["drop-A"],
                         settings_hash="s" * 64, code_version="0.1.0", quarantine_counts={},
                         splits=splits or {"P1": "train"}, shard_target_bytes=SHARD_BYTES, reuse=reuse)


def upload_one_at_a_time(root: Path) -> None:
    """Set the remote's ``jobs`` to 1 in the repo config, so an outage leaves an exact number of objects."""
    from dvc.repo import Repo

    dvc = Repo(str(root))
    try:
        with dvc.config.edit("repo") as conf:
            conf["remote"][DVC_REMOTE_NAME]["jobs"] = 1
    finally:
        dvc.close()


def md5_file(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def remote_key(md5: str) -> str:
    return f"{FILES_PREFIX}{md5[:2]}/{md5[2:]}"


def expected_objects(version_dir: Path) -> set[str]:
    """The remote keys one pushed version needs: one per file content, plus its .dir listing."""
    dvc_file = yaml.safe_load(version_dir.with_name(version_dir.name + ".dvc").read_text())
    dir_md5 = dvc_file["outs"][0]["md5"]
    assert dir_md5.endswith(".dir")
    return {remote_key(md5_file(p)) for p in version_dir.rglob("*") if p.is_file()} | {remote_key(dir_md5)}


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="reader", aws_secret_access_key="reader")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def assert_clear(message: str, endpoint: str) -> None:
    assert endpoint in message, message
    assert "S3/MinIO server is running" in message, message
    assert FAKE_SECRET_KEY not in message and FAKE_ACCESS_KEY not in message, message
    assert "\n" not in message, message


# --------------------------------------------------------------------------- the requirement


def test_push_interrupted_by_endpoint_outage_resumes_without_duplicates(
        tmp_path: Path, moto_on_port: MotoOnPort, make_s3_settings: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # botocore's default: 5 tries per object with random backoff (measured ~7 s per object, up to ~15 s)
    # and DVC tries every remaining object; 2 tries keep this test fast.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    server = moto_on_port
    settings = make_s3_settings(server.endpoint)
    bucket = settings.storage.bucket
    uploads = UploadRecorder(bucket, server)
    uploads.install(monkeypatch)

    repo = DvcRepo(tmp_path / "versions", settings)
    repo.init()
    upload_one_at_a_time(repo.root)
    v1 = write(repo.root / "v1", images_table(60, patient="P1", seed=1))
    assert len(v1.tables["images"].shards) >= 4
    repo.track(repo.root / "v1")
    v1_objects = expected_objects(repo.root / "v1")
    assert repo.push() == len(v1_objects)
    assert set(bucket_keys(server.endpoint, bucket)) == v1_objects

    # v2 carries over every v1 shard (same bytes, same md5) and adds a few of its own.
    v2 = write(repo.root / "v2", images_table(30, patient="P2", seed=2), parent=v1,
               reuse=shard_paths(repo.root / "v1"), splits={"P1": "train", "P2": "val"})
    repo.track(repo.root / "v2")
    all_objects = v1_objects | expected_objects(repo.root / "v2")
    new_objects = all_objects - v1_objects
    assert set(v1.tables["images"].shards) < set(v2.tables["images"].shards)
    assert len(new_objects) >= 4  # new shards, manifest, splits, the .dir listing

    # 1. The endpoint is already down when the push starts: the bucket check fails fast, that is
    #    after storage.max_attempts (2) tries and before DVC is opened at all (DVC would try every
    #    object, each with botocore's own retries). The order of events, not the wall time.
    opened: list[Path] = []
    open_dvc = DvcRepo._repo

    def recording_open(self: DvcRepo):
        opened.append(self.root)
        return open_dvc(self)

    monkeypatch.setattr(DvcRepo, "_repo", recording_open)
    server.stop()
    assert server.refuses_connections()
    with pytest.raises(StoreUnreachableError, match=r"\(connection refused\) after 2 attempts") as down:
        repo.push()
    assert opened == []  # refused at the bucket check: DVC never started
    assert_clear(str(down.value), server.endpoint)
    assert f"s3://{bucket}" in str(down.value) and "is unreachable" in str(down.value)

    # 2. The endpoint dies part-way through the upload (after the bucket check passed): the server
    #    stops itself right after storing the 2nd new object; the others are refused.
    server.start()
    assert set(bucket_keys(server.endpoint, bucket)) == v1_objects  # moto's state outlived the restart
    uploads.arm(stop_after=2)
    with pytest.raises(DvcError) as broke:
        repo.push()
    assert opened == [repo.root]  # the control: with the bucket check passed, DVC was opened (once)
    assert not server.running and server.refuses_connections()
    message = str(broke.value)
    assert message.startswith(f"dvc push with remote 'radground' (s3://{bucket}/{DVC_S3_PREFIX} "
                              f"at {server.endpoint}) failed: "), message
    assert message.endswith("then retry."), message
    assert_clear(message, server.endpoint)
    # DVC logs each failed transfer with its cause; no credentials there either. (caplog, not
    # capfd/capsys: DVC binds its log handlers to the sys.stderr of the first test that uses it.)
    assert f'Could not connect to the endpoint URL: "{server.endpoint}/' in caplog.text
    assert FAKE_SECRET_KEY not in caplog.text and FAKE_ACCESS_KEY not in caplog.text

    # 3. The endpoint is back (same port, same objects): the rerun uploads only what is missing.
    uploads.disarm()
    server.start()
    present = set(bucket_keys(server.endpoint, bucket))
    missing = all_objects - present
    assert v1_objects < present and len(present - v1_objects) == 2  # part-way: exactly 2 new objects landed
    assert len(missing) == len(new_objects) - 2 >= 2
    assert remote_key(yaml.safe_load((repo.root / "v2.dvc").read_text())["outs"][0]["md5"]) in missing
    before_rerun = len(uploads.keys)
    assert repo.push() == len(missing)
    assert Counter(uploads.keys[before_rerun:]) == Counter(missing)  # each missing object once, nothing else
    assert repo.push() == 0

    # The bucket: each content hash exactly once, one object per distinct file of both versions
    # (v1's shards carried into v2 are stored once) plus one .dir listing per version.
    keys = bucket_keys(server.endpoint, bucket)
    assert all(k.startswith(FILES_PREFIX) for k in keys), keys
    hashes = Counter(k[len(FILES_PREFIX):].replace("/", "") for k in keys)
    assert all(count == 1 for count in hashes.values()), hashes
    distinct_files = {md5_file(p) for v in ("v1", "v2") for p in (repo.root / v).rglob("*") if p.is_file()}
    assert len(keys) == len(distinct_files) + 2 == len(all_objects)
    assert set(keys) == all_objects
    assert Counter(uploads.keys) == Counter(all_objects)  # across all pushes, nothing was uploaded twice

    # The resumed remote is complete: a fresh clone pulls v2 byte for byte.
    restored = repo.clone(tmp_path / "clone").pull("v2")
    for path in (repo.root / "v2").rglob("*"):
        if path.is_file():
            assert (restored / path.relative_to(repo.root / "v2")).read_bytes() == path.read_bytes()
