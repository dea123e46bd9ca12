"""How fast radground gives up: wall seconds from the call to the clear error, against loopback servers.

The tests assert what happens (tries made, backoff asked for, what was opened and in which order:
tests/test_store.py, tests/tasks/curate/test_llm.py, tests/test_dvc_resume.py,
tests/flows/test_rebuild.py); the time it takes is measured here and never asserted. Each figure is
the median of ``repeats`` runs after one warm-up, with the settings the tests use:

- ``s3_open_store_s``: ``open_store()`` of an S3 store (no network I/O: microseconds expected);
- ``s3_dead_endpoint_s``: ``get`` against a port nothing listens on, 2 tries, ``backoff_s`` 0.01;
- ``s3_read_timeout_s``: ``exists`` against a server that never answers, ``read_timeout_s`` 0.2,
  2 tries (lower bound 2 x 0.2 s plus the backoff);
- ``dvc_push_dead_endpoint_s``: ``DvcRepo.push`` with the endpoint down (refused at the bucket
  check, before DVC opens the repo);
- ``llm_slow_server_s``: one sentence against a server slower (0.5 s) than ``llm.timeout_s`` 0.1,
  2 tries, ``backoff_s`` 0.01 (lower bound 2 x 0.1 s);
- ``llm_rejected_credentials_s``: a batch where one sentence is in a 30 s backoff when another is
  refused (HTTP 401): the batch stops at once instead of waiting the backoff out;
- ``rebuild_lock_wait_s``: a second rebuild of a locked data_dir with ``rebuild_lock_timeout_s`` 0.5
  (lower bound 0.5 s: this one is a wait by design).
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: imports, client construction
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _expect(error: type[BaseException], fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except error:
            return
        raise AssertionError(f"expected {error.__name__}")

    return run


class _Silent(BaseHTTPRequestHandler):
    """Accepts the connection, then answers nothing for 2 s."""

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        time.sleep(2)

    def log_message(self, *args: object) -> None:
        pass


def _s3_settings(data_dir: Path, endpoint: str, **storage):
    from radground.settings import load_settings

    values = {"backend": "s3", "endpoint": endpoint, "bucket": "bench-failfast", "access_key": "bench",
              "secret_key": "bench-secret", "max_attempts": 2, "backoff_s": 0.01, "connect_timeout_s": 2.0,
              "read_timeout_s": 10.0, **storage}
    return load_settings(data_dir=data_dir, storage=values)


def _store_figures(tmp: Path, repeats: int) -> dict:
    from radground.dvc import DvcRepo
    from radground.errors import StoreUnreachableError
    from radground.store import open_store

    dead = _s3_settings(tmp / "s3", f"http://127.0.0.1:{_free_port()}")
    figures = {
        "s3_open_store_s": _median_s(lambda: open_store(dead), repeats),
        "s3_dead_endpoint_s": _median_s(_expect(StoreUnreachableError, lambda: open_store(dead).get("a")), repeats),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        silent = _s3_settings(tmp / "s3", f"http://127.0.0.1:{server.server_address[1]}", read_timeout_s=0.2)
        figures["s3_read_timeout_s"] = _median_s(
            _expect(StoreUnreachableError, lambda: open_store(silent).exists("a")), repeats)
    finally:
        server.shutdown()
        server.server_close()
    repo = DvcRepo(tmp / "versions", dead)
    repo.init()
    figures["dvc_push_dead_endpoint_s"] = _median_s(_expect(StoreUnreachableError, repo.push), repeats)
    return figures


def _llm_figures(tmp: Path, repeats: int) -> dict:
    sys.path.insert(0, str(TESTS))
    from llm_server import StubLLMServer, sentence_of

    from radground.settings import load_settings
    from tasks.curate.base import CurationError, ExtractionFailure
    from tasks.curate.llm import OpenAIBackend

    aorta, lungs = "Calcified plaques of the aorta.", "Beide Lungen ohne Infiltrate."

    def backend(server: StubLLMServer, name: str, **llm) -> OpenAIBackend:
        values = {"backend": "openai", "base_url": server.url, "model": "stub-model", "max_attempts": 2,
                  "backoff_s": 0.01, "timeout_s": 5.0, "max_concurrency": 4, **llm}
        # a folder per run: nothing is cached between them
        return OpenAIBackend(load_settings(data_dir=tmp / "llm" / name / str(time.perf_counter_ns()), llm=values))

    figures = {}
    with StubLLMServer(keywords={aorta: [("aorta", "aorta")]}, latency_s=0.5) as slow:
        def slow_server() -> None:
            with backend(slow, "slow", timeout_s=0.1) as client:
                (result,) = client.extract([aorta], "en")
            assert isinstance(result, ExtractionFailure) and result.reason == "timeout", result

        figures["llm_slow_server_s"] = _median_s(slow_server, repeats)

    def respond(messages):
        if sentence_of(messages) == aorta:
            return 500, "busy"
        time.sleep(0.05)  # let AORTA's worker enter its backoff first
        return 401, "no"

    with StubLLMServer(responder=respond) as refusing:
        def rejected() -> None:
            with backend(refusing, "auth", backoff_s=30.0, max_concurrency=2) as client:
                _expect(CurationError, lambda: client.extract([aorta, lungs], "en"))()

        figures["llm_rejected_credentials_s"] = _median_s(rejected, repeats)
    return figures


def _lock_figure(tmp: Path, repeats: int) -> dict:
    from filelock import FileLock

    from radground.buildstate import RebuildLockedError, rebuild_lock
    from radground.settings import load_settings

    settings = load_settings(data_dir=tmp / "locked", rebuild_lock_timeout_s=0.5)
    settings.data_dir.mkdir(parents=True)

    def second_writer() -> None:
        with rebuild_lock(settings):
            pass

    with FileLock(settings.data_dir / "rebuild.lock"):
        return {"rebuild_lock_wait_s": _median_s(_expect(RebuildLockedError, second_writer), repeats)}


def bench_failfast(repeats: int = 3) -> dict:
    """Seconds from the call to the error, for each way radground is meant to give up quickly."""
    import logging

    logging.getLogger("radground").setLevel(logging.ERROR)  # the retry warnings are expected here
    logging.getLogger("tasks").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        return {"repeats": repeats, **_store_figures(tmp, repeats), **_llm_figures(tmp, repeats),
                **_lock_figure(tmp, repeats)}


if __name__ == "__main__":
    print(bench_failfast())
