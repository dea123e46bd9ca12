"""The production profile on this machine: PostgreSQL 15, S3 (moto), MLflow and Prefect servers on
Postgres, a 2-node Ray cluster and a Prefect process worker, each on 127.0.0.1 and a free port.

Every process started here carries ``RADGROUND_TEST_STACK=<root>`` in its environment (children
inherit it: Ray's workers, the worker's flow-run processes), so :meth:`Stack.stop` finds and ends
exactly this stack's processes, never another stack's or a developer's. ``ray stop --force`` is not
used: it ends every Ray process of the user on the machine, other test runs' included.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MARKER = "RADGROUND_TEST_STACK"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
# The venv's Python, not the console scripts beside it (they may run a shared interpreter without
# radground): Ray's workers run the interpreter their node was started with, and must import radground.
PY = sys.executable
RAY = [PY, "-m", "ray.scripts.scripts"]
PREFECT = [PY, "-m", "prefect"]
MLFLOW = [PY, "-m", "mlflow"]
S3_ACCESS_KEY = "radground-stack-access"
S3_SECRET_KEY = "radground-stack-secret-do-not-print"
BUCKET = "radground-stack"
POOL = "radground-stack-pool"


class StackError(RuntimeError):
    """A service of the stack did not come up; the message names it and its log."""


def missing_prerequisites() -> list[str]:
    """Why the stack cannot start here (empty: it can)."""
    reasons = []
    if not (PG_BIN / "initdb").is_file():
        reasons.append(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): "
                       "apt-get install -y postgresql-15 (make test does it)")
    if shutil.which("runuser") is None:
        reasons.append("runuser not found (util-linux)")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        reasons.append("no 'postgres' user (the postgresql-15 package creates it)")
    for module, package in (("psycopg2", "psycopg2-binary"), ("asyncpg", "asyncpg"), ("moto", "moto[server]")):
        try:
            __import__(module)
        except ImportError:
            reasons.append(f"Python module {module} missing: install {package} from requirements.lock")
    if os.geteuid() != 0:
        reasons.append("not root: initdb must run as the postgres user through runuser")
    return reasons


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Stack:
    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(32))  # Ray's cluster token
    deid_key: str = field(default_factory=lambda: secrets.token_hex(32))  # the rebuilds' de-identification key
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_s: dict[str, float] = field(default_factory=dict)  # service -> seconds until ready
    start_seconds: float = 0.0

    # ------------------------------------------------------------------ addresses
    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ports['ray']}"

    @property
    def ray_dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['ray_dashboard']}"

    def pg_dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports['pg']}/{database}"

    def base_env(self) -> dict[str, str]:
        """What every process of the stack (and a client of it) gets on top of os.environ."""
        return {MARKER: str(self.root), "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                "PREFECT_HOME": str(self.root / "prefect-client")}

    def client_env(self) -> dict[str, str]:
        return {**self.base_env(), "PREFECT_API_URL": self.prefect_api}

    def radground_env(self, data_dir: Path, deid_key: str) -> dict[str, str]:
        """Settings of a rebuild on this stack, as a worker's environment holds them."""
        return {"RADGROUND_DATA_DIR": str(data_dir), "RADGROUND_DEID__KEY": deid_key,
                "RADGROUND_STORAGE__BACKEND": "s3", "RADGROUND_STORAGE__ENDPOINT": self.s3_endpoint,
                "RADGROUND_STORAGE__BUCKET": BUCKET, "RADGROUND_STORAGE__ACCESS_KEY": S3_ACCESS_KEY,
                "RADGROUND_STORAGE__SECRET_KEY": S3_SECRET_KEY,
                "RADGROUND_MLFLOW__TRACKING_URI": self.mlflow_url,
                "RADGROUND_PREFECT__API_URL": self.prefect_api,
                "RADGROUND_RAY__ADDRESS": self.ray_address, "RADGROUND_RAY__NUM_CPUS": "2",
                "RADGROUND_WATCH__INBOX": str(self.inbox), "RADGROUND_WATCH__QUIET_S": "0"}

    # ------------------------------------------------------------------ processes
    def _log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.Popen:
        with self._log(name).open("ab") as log:
            proc = subprocess.Popen(argv, env={**os.environ, **self.base_env(), **(env or {})}, cwd=cwd,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def _run(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 120) -> str:
        done = subprocess.run(argv, env={**os.environ, **self.base_env(), **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        with self._log(name).open("a") as log:
            log.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            raise StackError(f"{name}: `{' '.join(argv)}` exited {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()[-800:]}")
        return done.stdout

    def _wait(self, name: str, ready, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc is not None and proc.poll() is not None:
                raise StackError(f"{name} exited with code {proc.returncode}; see {self._log(name)}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} was not ready within {timeout:.0f} s; see {self._log(name)}")
            time.sleep(0.2)

    def _timed(self, name: str, fn) -> None:
        started = time.perf_counter()
        fn()
        self.started_s[name] = round(time.perf_counter() - started, 1)

    # ------------------------------------------------------------------ services
    def _postgres(self) -> None:
        pgdata, sockets = self.root / "pgdata", self.root / "pgsock"
        for folder in (pgdata, sockets):
            folder.mkdir(mode=0o700)
            shutil.chown(folder, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        self._run("postgres", [*as_pg, str(PG_BIN / "initdb"), "-D", str(pgdata), "--auth=trust", "--no-sync",
                               "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8"])
        # max_connections: Prefect's pool (5 + 10 overflow) + MLflow's + the test's queries
        log = self.root / "pgsock" / "postgres.log"
        for attempt in range(3):
            try:
                self._run("postgres", [*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-w", "-l", str(log),
                                       "-o", f"-c fsync=off -c listen_addresses=127.0.0.1 -p {self.ports['pg']} "
                                       f"-k {sockets} -c max_connections=100", "start"])
                break
            except StackError:
                # The free port was taken between free_port() and the bind (other test processes start Ray
                # and Prefect in parallel): another port, at most three times.
                if attempt == 2 or "Address already in use" not in log.read_text(errors="replace"):
                    raise
                self.ports["pg"] = free_port()
        for database in ("mlflow", "prefect"):
            self._run("postgres", [*as_pg, str(PG_BIN / "createdb"), "-h", "127.0.0.1",
                                   "-p", str(self.ports["pg"]), "-U", "postgres", database])

    def _s3(self) -> None:
        proc = self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                  "-p", str(self.ports["s3"])])
        self._wait("s3", lambda: _listening(self.ports["s3"]), 60, proc)
        import boto3

        boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                     aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY
                     ).create_bucket(Bucket=BUCKET)

    def _mlflow(self) -> None:
        port = self.ports["mlflow"]
        # Only the server holds S3 credentials: clients upload through it (mlflow-artifacts:/).
        env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
               "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        proc = self._spawn("mlflow", [*MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port),
                                      "--workers", "1", "--backend-store-uri",
                                      self.pg_dsn("mlflow").replace("postgresql://", "postgresql+psycopg2://"),
                                      "--artifacts-destination", f"s3://{BUCKET}/mlflow",
                                      "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"], env)
        self._wait("mlflow", lambda: _http_ok(f"{self.mlflow_url}/health"), 180, proc)

    def _prefect(self) -> None:
        env = {"PREFECT_HOME": str(self.root / "prefect-server"),
               "PREFECT_API_DATABASE_CONNECTION_URL":
                   f"postgresql+asyncpg://postgres@127.0.0.1:{self.ports['pg']}/prefect"}
        proc = self._spawn("prefect", [*PREFECT, "server", "start", "--host", "127.0.0.1",
                                       "--port", str(self.ports["prefect"])], env)
        self._wait("prefect", lambda: _http_ok(f"{self.prefect_api}/health"), 180, proc)

    def _ray(self) -> None:
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                  "--temp-dir", str(self.root / "ray")]
        self._run("ray-head", [*RAY, "start", "--head", "--port", str(self.ports["ray"]), *common,
                               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                               "--dashboard-port", str(self.ports["ray_dashboard"]),
                               "--ray-client-server-port", str(free_port()),
                               "--dashboard-agent-listen-port", str(free_port())], timeout=180)
        self._run("ray-node", [*RAY, "start", "--address", self.ray_address, *common,
                               "--dashboard-agent-listen-port", str(free_port())], timeout=180)
        self._wait("ray-node", lambda: len(self.ray_nodes()) == 2, 120)

    def ray_state(self, kind: str) -> list[dict]:
        """Ray's state API (``nodes`` or ``tasks``) in a child process: Ray reads RAY_AUTH_* once, at
        import, and this process may have imported Ray before (or for another cluster)."""
        code = ("import json, sys\n"
                "from ray.util.state import list_nodes, list_tasks\n"
                "fn = {'nodes': list_nodes, 'tasks': list_tasks}[sys.argv[1]]\n"
                "rows = fn(address=sys.argv[2], limit=10000, detail=True, raise_on_missing_output=False)\n"
                "fields = ('node_id', 'state', 'name', 'type')\n"
                "print(json.dumps([{k: r.get(k) for k in fields} for r in map(vars, rows)]))")
        done = subprocess.run([sys.executable, "-c", code, kind, self.ray_dashboard], capture_output=True, text=True,
                              env={**os.environ, **self.base_env()}, timeout=120)
        if done.returncode != 0:
            raise StackError(f"Ray state API ({kind}) failed: {done.stderr.strip()[-600:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def ray_nodes(self) -> list[str]:
        """Ids of the cluster's alive nodes."""
        try:
            return [n["node_id"] for n in self.ray_state("nodes") if n["state"] == "ALIVE"]
        except StackError:  # the dashboard is still starting
            return []

    def _worker(self) -> None:
        self._run("worker", [*PREFECT, "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                  self.client_env())
        env = {**self.client_env(), "PREFECT_HOME": str(self.root / "prefect-worker"),
               "PREFECT_WORKER_QUERY_SECONDS": "1", **self.radground_env(self.deployed_data_dir, self.deid_key)}
        proc = self._spawn("worker", [*PREFECT, "worker", "start", "--pool", POOL, "--type", "process",
                                      "--name", "stack-worker"], env, cwd=self.root)
        self._wait("worker", lambda: "started" in self._log("worker").read_text(errors="replace").lower(), 120, proc)

    @property
    def deployed_data_dir(self) -> Path:
        return self.root / "deployed-data"

    @property
    def inbox(self) -> Path:
        """The folder watch-drops watches (the worker's watch.inbox)."""
        return self.root / "inbox"

    def start(self) -> None:
        for name in ("pg", "s3", "mlflow", "prefect", "ray", "ray_dashboard"):
            self.ports[name] = free_port()
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.inbox.mkdir()
        started = time.perf_counter()

        def databases_then_servers():
            self._timed("postgres", self._postgres)
            with ThreadPoolExecutor(2) as pool:
                jobs = [pool.submit(self._timed, "mlflow", self._mlflow),
                        pool.submit(self._timed, "prefect", self._prefect)]
                for job in jobs:
                    job.result()
            self._timed("worker", self._worker)

        with ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(databases_then_servers), pool.submit(self._timed, "s3", self._s3),
                    pool.submit(self._timed, "ray", self._ray)]
            errors = [job.exception() for job in jobs]
        self.start_seconds = round(time.perf_counter() - started, 1)
        if any(errors):
            raise StackError("; ".join(str(e) for e in errors if e))

    # ------------------------------------------------------------------ teardown
    def processes(self) -> list[psutil.Process]:
        """This stack's live processes: its marker in their environment, or its root on their command line."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == os.getpid():
                continue
            try:
                if str(self.root) in " ".join(proc.info["cmdline"] or ()) or \
                        proc.environ().get(MARKER) == str(self.root):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return [p for p in found if _alive(p)]

    def stop(self) -> None:
        pgdata = self.root / "pgdata"
        for name in ("worker", "prefect", "mlflow", "s3"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        if (pgdata / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-m",
                            "fast", "-w", "stop"], capture_output=True, timeout=60)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        # Ray daemonises its processes (they outlive SIGTERM to a group): end them and any straggler.
        left = self.processes()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def listening_ports(self) -> list[int]:
        return [port for port in self.ports.values() if _listening(port)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def _environ(updates: dict[str, str]):
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def new_root() -> Path:
    """A short folder under /tmp (Ray's socket paths must stay under 108 bytes), traversable by postgres."""
    root = Path(tempfile.mkdtemp(prefix="rgstack-", dir="/tmp"))
    root.chmod(0o755)
    return root
