"""Where flows run: Prefect's API and the Ray cluster, embedded or existing.

Embedded (the default) means: one Prefect server started here on 127.0.0.1 with its
SQLite database under ``<data_dir>/prefect``, and a local Ray started by the flow's
RayTaskRunner. Every Ray worker reaches that one API through PREFECT_API_URL; without
it each worker would start a temporary server of its own (measured: 30.6 s instead of
13.7 s for a 20-task map). Analytics and usage statistics that try to reach the
network are off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

from radground.errors import RadgroundError
from radground.settings import Settings

logger = logging.getLogger(__name__)


class RuntimeStartError(RadgroundError):
    """The embedded Prefect server did not come up."""


def prefect_environment(settings: Settings, api_url: str) -> dict[str, str]:
    """Environment for this process, the server and every Ray worker."""
    home = (settings.data_dir / "prefect").resolve()
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "PREFECT_LOGGING_LOG_PRINTS": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:  # noqa: S310 - loopback
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def prefect_api(settings: Settings, while_starting: Callable[[dict[str, str]], None] | None = None
                ) -> Iterator[dict[str, str]]:
    """Make Prefect's API available for a run; yields the environment workers need.

    With ``prefect.api_url`` set, that server is used. Otherwise a server is started on a
    free port of 127.0.0.1 and stopped when the block ends. ``while_starting(env)`` runs while
    the server boots (seconds that other start-up work, such as Ray's, can overlap).
    """
    if settings.prefect.api_url:
        env = prefect_environment(settings, settings.prefect.api_url)
        if while_starting is not None:
            while_starting(env)
        with _applied(env):
            yield env
        return
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_environment(settings, api_url)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    log_path = Path(env["PREFECT_HOME"]) / "server.log"
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            # With its services: they record task runs from the workers' events.
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        if while_starting is not None:
            while_starting(env)
        deadline = time.monotonic() + settings.prefect.server_start_timeout_s
        while not _healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeStartError(
                    f"the embedded Prefect server on 127.0.0.1:{port} did not start within "
                    f"{settings.prefect.server_start_timeout_s:.0f} s (see {log_path}). Set prefect.api_url "
                    "to use an existing server, or raise prefect.server_start_timeout_s.")
            time.sleep(0.25)
        logger.info("Prefect API on %s (embedded, database under %s)", api_url, env["PREFECT_HOME"])
        with _applied(env):
            yield env
    finally:
        _flush_prefect_logs()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _flush_prefect_logs() -> None:
    """Send buffered run logs while the server still listens (else: 'Error logging to API')."""
    if "prefect" not in sys.modules:
        return
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):  # a failed flush must not hide the run's own error
        APILogWorker.drain_all(timeout=10)


@contextlib.contextmanager
def temporary_environ(updates: dict[str, str], remove: tuple[str, ...] = ()) -> Iterator[None]:
    """Set (and unset) environment variables for this process and its children, then restore them.

    For libraries that read their configuration from the environment (Prefect, Ray,
    TotalSegmentator); radground's own settings never come from here.
    """
    saved = {name: os.environ.get(name) for name in (*updates, *remove)}
    os.environ.update(updates)
    for name in remove:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _applied(env: dict[str, str]) -> Iterator[None]:
    """Set the variables for this process (and children), and Prefect's in-process settings."""
    with temporary_environ(env):
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_HOME,
            PREFECT_RESULTS_PERSIST_BY_DEFAULT,
            temporary_settings,
        )

        # Prefect snapshots the environment at import, so tell its settings context too.
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                         PREFECT_HOME: env["PREFECT_HOME"],
                                         PREFECT_RESULTS_PERSIST_BY_DEFAULT: False}):
            yield


def ray_init_kwargs(settings: Settings, env: dict[str, str]) -> dict:
    """Arguments for ray.init: local with the configured CPUs, or the configured cluster."""
    runtime_env = {"env_vars": env}
    if settings.ray.address:
        return {"runtime_env": runtime_env}  # the address goes to RayTaskRunner itself
    return {"num_cpus": settings.ray.num_cpus, "include_dashboard": False, "runtime_env": runtime_env,
            "log_to_driver": False}


# --------------------------------------------------------------------------- progress
ProgressHook = Callable[[str, int, int], None]
_progress_hook: ContextVar[ProgressHook | None] = ContextVar("radground_progress", default=None)


@contextlib.contextmanager
def progress_hook(hook: ProgressHook) -> Iterator[None]:
    """Let a front end (the CLI's progress bar) follow a flow: hook(stage, done, total)."""
    token = _progress_hook.set(hook)
    try:
        yield
    finally:
        _progress_hook.reset(token)


def report_progress(stage: str, done: int, total: int) -> None:
    hook = _progress_hook.get()
    if hook is not None:
        hook(stage, done, total)
