"""Shared fixtures: hermetic settings and in-process S3 (moto) servers on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from radground.settings import ENV_PREFIX, Settings, load_settings

FAKE_ACCESS_KEY = "radground-test-access"
FAKE_SECRET_KEY = "radground-test-secret-do-not-print"


#: The longest test files, longest first (minutes on 2 cores). `make test` hands whole files to two
#: pytest-xdist workers in collection order; started first, these do not leave one worker running alone
#: at the end. Order within a file is untouched.
LONGEST_FIRST = ("tests/flows/test_incremental.py", "tests/integration/test_production_stack.py",
                 "tests/flows/test_rebuild.py", "tests/flows/test_hostile_drops.py", "tests/flows/test_splits.py",
                 "tests/flows/test_forget_purge.py", "tests/flows/test_dvc_repro.py", "tests/models/test_model_cli.py",
                 "tests/test_quiet_terminal.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = Path(str(config.rootpath))
    items.sort(key=lambda item: rank.get(Path(str(item.path)).relative_to(root).as_posix(), len(rank)))


def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout_s} s")


@pytest.fixture
def free_tcp_port() -> int:
    """A loopback port with nothing listening on it."""
    return free_port()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop RADGROUND_* variables so a developer's shell cannot leak into the settings."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def s3_credentials() -> dict[str, str]:
    """The moto servers' credentials. A fixture, not ``from conftest import``: tests/models has its own
    conftest.py, and which one the module name ``conftest`` means depends on collection order."""
    return {"access_key": FAKE_ACCESS_KEY, "secret_key": FAKE_SECRET_KEY}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server in this process, on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # Port 0 lets the server's own socket take a free port: no window in which another
    # process could grab a port we picked (a failed bind would hang ThreadedMotoServer.start).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[dict[str, str]]:
    """A second moto server that checks credentials; yields its endpoint and one valid key.

    moto reads INITIAL_NO_AUTH_ACTION_COUNT once per process and keeps the switch global, so
    this server runs in a child process (its own environment) and cannot turn on
    authentication for the in-process ``s3_server``. The first 3 requests are unauthenticated:
    they create an IAM user allowed s3:* and its access key.
    """
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, timeout_s=30, proc=proc)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="radground")
        iam.put_user_policy(
            UserName="radground",
            PolicyName="s3-all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}',
        )
        key = iam.create_access_key(UserName="radground")["AccessKey"]
        yield {
            "endpoint": endpoint,
            "access_key": key["AccessKeyId"],
            "secret_key": key["SecretAccessKey"],
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def make_s3_settings(tmp_path: Path, clean_env: None) -> Callable[..., Settings]:
    """Build S3 settings for a test: fake credentials, fast retries, a bucket of its own."""

    def build(endpoint: str, **storage: Any) -> Settings:
        values: dict[str, Any] = {
            "backend": "s3",
            "endpoint": endpoint,
            "bucket": f"rg-{uuid.uuid4().hex[:16]}",
            "access_key": FAKE_ACCESS_KEY,
            "secret_key": FAKE_SECRET_KEY,
            "max_attempts": 2,
            "backoff_s": 0.01,
            "connect_timeout_s": 2.0,
            "read_timeout_s": 10.0,
        }
        values.update(storage)
        return load_settings(data_dir=tmp_path, storage=values)

    return build


@pytest.fixture(scope="session")
def pydicom_files_on_disk() -> list[Path]:
    """pydicom's bundled test files plus pydicom-data's, globbed from disk.

    pydicom.data.get_testdata_files would try to download whatever is missing, and this
    machine is offline: so the files are found on disk instead.
    """
    import pydicom.data

    try:
        import data_store  # the pydicom-data package
    except ImportError:
        pytest.fail(PYDICOM_FILES_MISSING + " (the pydicom-data package is not installed)")
    folders = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]
    found = {folder: [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".py"]
             for folder in folders}
    empty = [str(folder) for folder, files in found.items() if not any(f.suffix == ".dcm" for f in files)]
    if empty:
        pytest.fail(f"{PYDICOM_FILES_MISSING} (no .dcm file under {', '.join(empty)})")
    return sorted(p for files in found.values() for p in files)


#: Why a test that needs pydicom's test files fails (never skips) without them, and the fix.
PYDICOM_FILES_MISSING = (
    "pydicom's test files are missing: they come with pydicom and with pydicom-data (in the dev extras); "
    "install them with `make venv` or `pip install -e '.[dev]'` (pydicom-data==1.0.0)"
)


@pytest.fixture(scope="session")
def run_ingest():
    """The rebuild flow's ingest steps in this process (no Prefect, no Ray), in the flow's order."""
    from tasks import discover, ingest

    def run(location: str, settings):
        reader = discover.DropReader(location, settings)
        scanned = discover.scan_files(reader, discover.image_candidates(reader.list_files(), settings)[0])
        info = discover.read_drop_info(reader)
        drop_id = discover.drop_id_for(info, [s.sha256 for s in scanned])
        reports = discover.read_reports(reader, drop_id, info.encoding if info else None)
        plan = discover.plan_drop(drop_id, scanned, reports, settings)
        outcomes = ingest.ingest_shard(location, plan.series, settings)
        records = ingest.ingest_reports(plan.reports, drop_id, settings)
        summary = ingest.finish_ingest(plan, outcomes, records, settings)
        return plan, summary

    return run
