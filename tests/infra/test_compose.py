"""infra/compose: the production stack's compose file, checked offline (no Docker engine needed).

Debian's docker-compose 1.29 renders the file with .env.example (`config` validates the schema and
interpolates every variable, so a `${VAR:?}` without a value or a key 1.29 rejects fails here); the
tests then read the rendered services. `make test` installs docker-compose via apt when missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "infra" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PROFILE = REPO / "infra" / "production.example.yaml"

SECRET_NAME = re.compile(r"(PASSWORD|_KEY|_KEY_ID|TOKEN|SECRET)$")
PLACEHOLDER = re.compile(r"^change-me")


def render(compose_file: Path = COMPOSE_FILE, env_file: Path = ENV_EXAMPLE) -> dict:
    """`docker-compose --env-file .env.example config`, parsed. A clean environment, so a variable set
    in the caller's shell cannot stand in for one .env.example lacks."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not found and not installed: `make test` installs it via apt (needs root); "
                    "by hand: apt-get install --no-install-recommends docker-compose")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    done = subprocess.run([binary, "--file", str(compose_file), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, env=env, cwd=compose_file.parent, timeout=120)
    assert done.returncode == 0, f"docker-compose config rejected {compose_file.name}:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return render()


def published(port) -> tuple[str | None, str | None]:
    """(host_ip, published) of one entry of `ports:`, short ("127.0.0.1:5000:5000/tcp") or long form."""
    if isinstance(port, dict):
        published = port.get("published")
        return port.get("host_ip"), None if published is None else str(published)
    parts = str(port).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[1]
    if len(parts) == 2:
        return None, parts[0]
    return None, None  # container port only: published on a random port of every interface


def test_the_stack_has_its_services(config):
    assert set(config["services"]) >= {"postgres", "s3", "s3-init", "mlflow", "prefect-server", "prefect-deploy",
                                       "prefect-worker", "ray-head", "ray-worker"}


def test_every_published_port_is_bound_to_loopback(config):
    seen = []
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port = published(port)
            assert host_ip == "127.0.0.1", f"service {name} publishes {port!r} beyond 127.0.0.1; prefix it " \
                                           "with 127.0.0.1:"
            seen.append(host_port)
    assert len(seen) >= 6  # postgres, s3 (+console), mlflow, prefect, ray dashboard + client


def conditions(service: dict) -> dict[str, str]:
    depends = service.get("depends_on", {})
    if isinstance(depends, list):  # short form: no condition at all
        return {name: "service_started" for name in depends}
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


def test_start_order_waits_for_what_each_service_needs(config):
    services = config["services"]
    assert conditions(services["mlflow"]) == {"postgres": "service_healthy",
                                              "s3-init": "service_completed_successfully"}
    assert conditions(services["prefect-server"])["postgres"] == "service_healthy"
    assert conditions(services["s3-init"])["s3"] == "service_healthy"
    assert conditions(services["prefect-worker"])["prefect-deploy"] == "service_completed_successfully"
    assert conditions(services["ray-worker"])["ray-head"] == "service_healthy"
    # every condition names a service with a healthcheck, or a one-shot
    for name, service in services.items():
        for dependency, condition in conditions(service).items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency} to be healthy, " \
                                                              f"but {dependency} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart", "no") == "no", f"{dependency} is a one-shot"


def test_every_long_running_service_has_a_healthcheck(config):
    for name, service in config["services"].items():
        if service.get("restart") != "no" and name != "ray-worker":
            assert "healthcheck" in service, f"service {name} has no healthcheck"


def test_every_image_is_pinned(config):
    for name, service in config["services"].items():
        image = service.get("image")
        assert image, f"service {name} has no image: name one (with a version tag) next to its build"
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest"), f"service {name}: image {image} is not pinned"
    assert config["services"]["s3"]["image"].startswith("quay.io/minio/minio:RELEASE.")


def test_radground_services_run_the_locked_image(config):
    """One image (docker/Dockerfile) for MLflow, Prefect, the worker and the Ray nodes; its tag names the
    radground version, the locked ray and Python, so a new lock without a new tag fails here."""
    import radground

    ray = re.search(r"^ray==(\S+)$", (REPO / "requirements.lock").read_text(), flags=re.MULTILINE).group(1)
    expected = f"radground:{radground.__version__}-ray{ray}-py{sys.version_info[0]}{sys.version_info[1]}-cpu"
    for name in ("mlflow", "prefect-server", "prefect-deploy", "prefect-worker", "ray-head", "ray-worker"):
        service = config["services"][name]
        assert service["image"] == expected, f"service {name}: image {service['image']}, expected {expected}"
        assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["build"]["args"]["VARIANT"] == "cpu"


def test_secrets_are_variables_with_placeholders_only():
    # compose.yaml: every secret-looking key takes a required variable, never a value
    for number, line in enumerate(COMPOSE_FILE.read_text().splitlines(), 1):
        key, sep, value = line.strip().partition(":")
        if sep and SECRET_NAME.search(key.strip().strip('"')) and value.strip():
            assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value.strip()), \
                f"compose.yaml line {number}: {key.strip()} must be ${{VAR:?message}}, not a value"
    # secrets inside URLs, too
    passwords = re.findall(r"://[\w.-]+:(\$\{[^}]*\}|[^@\s/]+)@", COMPOSE_FILE.read_text())
    assert len(passwords) >= 2  # the MLflow and Prefect database URLs
    for password in passwords:
        assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", password), "compose.yaml: a literal password in a URL"
    # .env.example: every secret is a placeholder
    secrets = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            if SECRET_NAME.search(key.strip()):
                secrets[key.strip()] = value.strip()
    assert {"POSTGRES_PASSWORD", "RADGROUND_DEID_KEY", "RAY_AUTH_TOKEN", "MLFLOW_S3_SECRET_KEY"} <= set(secrets)
    for key, value in secrets.items():
        assert PLACEHOLDER.match(value), f".env.example: {key} holds a value; use a change-me placeholder"


def test_a_missing_secret_stops_compose(tmp_path):
    env = tmp_path / "env"
    env.write_text("\n".join(line for line in ENV_EXAMPLE.read_text().splitlines()
                             if not line.startswith("RAY_AUTH_TOKEN=")) + "\n")
    with pytest.raises(AssertionError, match="RAY_AUTH_TOKEN"):
        render(env_file=env)


def arguments(service: dict) -> str:
    command = service.get("command", [])
    return " ".join(command) if isinstance(command, list) else str(command)


def test_mlflow_answers_to_its_service_name_and_alone_holds_the_artifact_credentials(config):
    services = config["services"]
    args = arguments(services["mlflow"])
    hosts = re.search(r"--allowed-hosts[= ](\S+)", args)
    assert hosts, "mlflow server needs --allowed-hosts (else it answers 403 to Host: mlflow:5000)"
    assert {"mlflow", "mlflow:5000"} <= set(hosts.group(1).split(","))
    assert "--artifacts-destination=s3://" in args and "--serve-artifacts" in args
    # +psycopg2: a bare postgresql:// makes SQLAlchemy load psycopg (v3), which is not installed, and the
    # server exits (seen in tests/integration/test_production_stack.py)
    assert "--backend-store-uri=postgresql+psycopg2://" in args
    for name, service in services.items():
        if name != "mlflow":
            assert "AWS_SECRET_ACCESS_KEY" not in service.get("environment", {}), f"{name} holds S3 credentials"


def test_prefect_and_ray_are_wired_as_the_issue_says(config):
    services = config["services"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://prefect:")
    assert "deploy --all" in arguments(services["prefect-deploy"])
    assert "--num-cpus=0" in arguments(services["ray-head"])
    for name in ("ray-head", "ray-worker", "prefect-worker", "prefect-deploy"):
        env = services[name]["environment"]
        # the merge of x-radground-env survived the service's own keys (merge keys are shallow)
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"], name
        assert env["RADGROUND_CONFIG"] == "/etc/radground/production.yaml", name
        assert "shm_size" in services[name] or not name.startswith("ray"), f"{name} needs shm_size"
    max_connections = int(re.search(r"max_connections=(\d+)", arguments(services["postgres"])).group(1))
    mlflow = 4 * (int(services["mlflow"]["environment"]["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"])
                  + int(services["mlflow"]["environment"]["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"]))
    prefect_env = services["prefect-server"]["environment"]
    prefect = 2 * (int(prefect_env["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"])
                   + int(prefect_env["PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW"]))
    assert max_connections >= mlflow + prefect + 10, "postgres max_connections is below the pools' sum"


def test_the_production_profile_is_valid_and_names_the_stack(monkeypatch):
    from radground.settings import load_settings

    for name in list(os.environ):
        if name.startswith("RADGROUND_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADGROUND_STORAGE__ACCESS_KEY", "test-access")
    monkeypatch.setenv("RADGROUND_STORAGE__SECRET_KEY", "test-secret")
    monkeypatch.setenv("RADGROUND_DEID__KEY", "k" * 32)
    settings = load_settings(PROFILE)
    assert settings.storage.backend == "s3" and settings.storage.endpoint == "http://s3:9000"
    assert settings.mlflow.tracking_uri == "http://mlflow:5000"
    assert settings.prefect.api_url == "http://prefect-server:4200/api"
    assert settings.ray.address == "ray://ray-head:10001"
    profile = yaml.safe_load(PROFILE.read_text())
    assert not {"access_key", "secret_key"} & set(profile["storage"]) and "deid" not in profile, \
        "the profile holds no secret: they come from the environment"
