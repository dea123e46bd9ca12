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
import secrets
import shlex
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


def prefect_home(settings: Settings) -> Path:
    """PREFECT_HOME of the embedded runtime: its database, server log and profiles, under data_dir."""
    return (settings.data_dir / "prefect").resolve()


def prefect_environment(settings: Settings, api_url: str) -> dict[str, str]:
    """Environment for this process, the server and every Ray worker."""
    home = prefect_home(settings)
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "PREFECT_LOGGING_LOG_PRINTS": "false",
        # An embedded server stops with the rebuild: a "View at http://127.0.0.1:…" link to it
        # would be dead by the time anyone opens it (an empty UI URL turns the link off).
        # :func:`ui_commands` says how to look at the runs afterwards instead.
        **({} if settings.prefect.api_url else {"PREFECT_UI_URL": ""}),
        # Prefect's SDK telemetry (a first-run notice on the terminal, events to the network)
        # reads this standard switch; the server's analytics are the setting above.
        "DO_NOT_TRACK": "1",
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
        updates = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"],
                   PREFECT_RESULTS_PERSIST_BY_DEFAULT: False}
        if "PREFECT_UI_URL" in env:
            from prefect.settings import PREFECT_UI_URL

            updates[PREFECT_UI_URL] = env["PREFECT_UI_URL"]
        with temporary_settings(updates=updates):
            yield


def ray_init_kwargs(settings: Settings, env: dict[str, str]) -> dict:
    """Arguments for ray.init: local with the configured CPUs, or the configured cluster."""
    runtime_env = {"env_vars": env}
    if settings.ray.address:
        return {"runtime_env": runtime_env}  # the address goes to RayTaskRunner itself
    # logging_level: the driver's "ray" logger keeps its warnings but not start-up INFO lines
    # ("Started a local Ray instance."); its workers' output stays in Ray's session logs.
    return {"num_cpus": settings.ray.num_cpus, "include_dashboard": False, "runtime_env": runtime_env,
            "log_to_driver": False, "logging_level": logging.WARNING}


def ui_commands(settings: Settings) -> list[str]:
    """How to open the Prefect and MLflow UIs on what an embedded rebuild recorded (its servers are
    gone by then): one line each, for the embedded parts only (an existing server has its own URL)."""
    from radground.lineage import tracking_uri

    lines = []
    if not settings.prefect.api_url:
        prefect = _console_script("prefect")
        lines.append(f"Prefect UI on this data: PREFECT_HOME={shlex.quote(str(prefect_home(settings)))} "
                     f"{prefect} server start --analytics-off  (then http://127.0.0.1:4200)")
    if not settings.mlflow.tracking_uri:
        mlflow = _console_script("mlflow")
        lines.append(f"MLflow UI on this data: {mlflow} ui --backend-store-uri "
                     f"{shlex.quote(tracking_uri(settings))}  (then http://127.0.0.1:5000)")
    return lines


def _console_script(name: str) -> str:
    """The library's command beside this interpreter (the venv's bin), else its bare name."""
    path = Path(sys.executable).with_name(name)
    return shlex.quote(str(path)) if path.is_file() else name


# --------------------------------------------------------------------------- progress
ProgressHook = Callable[[str, int, int], None]
NoticeHook = Callable[[str], None]
_progress_hook: ContextVar[ProgressHook | None] = ContextVar("radground_progress", default=None)
_notice_hook: ContextVar[NoticeHook | None] = ContextVar("radground_notice", default=None)


@contextlib.contextmanager
def progress_hook(hook: ProgressHook, notice: NoticeHook | None = None) -> Iterator[None]:
    """Let a front end (the CLI's progress bar) follow a flow: hook(stage, done, total), where
    total 0 means "size unknown"; ``notice(message)`` shows a line while the bar is up."""
    token = _progress_hook.set(hook)
    notice_token = _notice_hook.set(notice)
    try:
        yield
    finally:
        _notice_hook.reset(notice_token)
        _progress_hook.reset(token)


def report_progress(stage: str, done: int, total: int) -> None:
    hook = _progress_hook.get()
    if hook is not None:
        hook(stage, done, total)


def notify(message: str) -> None:
    """Tell the person running the command something while they wait (e.g. whose lock a rebuild
    waits for): through the front end's notice hook, else as a warning record."""
    hook = _notice_hook.get()
    if hook is not None:
        hook(message)
    else:
        logger.warning("%s", message)


# --------------------------------------------------------------------------- library output
LIBRARY_LOG = Path("logs") / "libraries.log"  # under data_dir
# The run's libraries that log to the terminal on their own: Prefect (run and engine logs) and
# Ray (its driver-side logger). DVC and MLflow are routed where radground opens them
# (radground/dvc.py, radground/lineage.py), after the import that installs their handlers.
RUN_LIBRARY_LOGGERS = ("prefect", "prefect._internal", "prefect_ray", "ray", "great_expectations")


@contextlib.contextmanager
def library_logs_to(data_dir: Path, *names: str, propagate: bool = False) -> Iterator[Path]:
    """Send these loggers' records to ``<data_dir>/logs/libraries.log`` instead of the terminal, for the block.

    Each logger gets the file as its only handler (its own terminal handlers are set aside)
    and, unless ``propagate``, stops passing records up to the root logger, where the CLI's
    terminal handler shows WARNING and up. Levels stay. Import the library first: mlflow, dvc,
    ray and prefect install their own handlers when imported, over what is set here. A logger
    the library reconfigured during the block keeps that configuration afterwards.
    """
    path = Path(data_dir) / LIBRARY_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    routed = []
    for name in names:
        target = logging.getLogger(name)
        # One handler per logger: ray.init restyles every handler of the "ray" logger.
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)
        handler.setFormatter(formatter)
        routed.append((target, handler, target.handlers, target.propagate))
        target.handlers = [handler]
        target.propagate = propagate and target.propagate
    try:
        yield path
    finally:
        for target, handler, saved_handlers, saved_propagate in routed:
            if target.handlers == [handler]:
                target.handlers, target.propagate = saved_handlers, saved_propagate
            else:
                target.removeHandler(handler)
            handler.close()


def embedded_ray_environment(settings: Settings) -> dict[str, str]:
    """Environment to start the local Ray in: token authentication, the token under ``<data_dir>/ray``.

    With RAY_AUTH_MODE unset, Ray 2.60 turns token authentication on for a new local cluster,
    says so on the terminal and writes the token to ~/.ray/auth_token. Here the mode is explicit
    (no message) and the token a file under data_dir (created once, mode 0600); authentication
    stays on, as it guards the cluster's ports. Ray's own processes and workers inherit this
    environment from the process that calls ray.init. Empty with ray.address: an existing
    cluster brings its own authentication.
    """
    if settings.ray.address:
        return {}
    path = (settings.data_dir / "ray" / "auth_token").resolve()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # a concurrent start wrote it first
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


@contextlib.contextmanager
def libraries_off_the_terminal(settings: Settings) -> Iterator[Path]:
    """For a run on the embedded default: library output to ``<data_dir>/logs/libraries.log``, their
    state under data_dir; yields the log's path.

    Prefect reads PREFECT_HOME and DO_NOT_TRACK when imported (else it creates ~/.prefect and,
    on a terminal, prints a telemetry notice); Ray its authentication when started
    (:func:`embedded_ray_environment`). Both set up their loggers here, inside that environment
    and before the loggers are routed: Ray on import, Prefect on first use.
    """
    data_dir = settings.data_dir.resolve()
    env = {"PREFECT_HOME": str(prefect_home(settings)), "DO_NOT_TRACK": "1", **embedded_ray_environment(settings)}
    with temporary_environ(env):
        import ray  # noqa: F401
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()
        with library_logs_to(data_dir, *RUN_LIBRARY_LOGGERS) as path:
            yield path
