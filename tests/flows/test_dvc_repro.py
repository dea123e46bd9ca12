"""`dvc repro` for real, as the README tells a user to run it: the version chain survives.

A fresh git repository with this project's dvc.yaml and .dvcignore, `dvc init`, drop a under
drops/, `dvc repro`; drop b beside it, `dvc repro`: the second version holds both drops and
names the first as its parent (DVC deletes a stage's outputs before it runs, and LATEST is what
the parent is read from, so it must persist). A third `dvc repro` with nothing changed runs
nothing; `radground rebuild` and `dvc repro --force` agree with it on the current version.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from radground.synth.drop import generate_drop

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
KEY = "dvc-repro-test-key-0123456789abcdef"
CODE = ("radground", "tasks", "flows")


@pytest.fixture
def clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git repository laid out like a clone: dvc.yaml, .dvcignore, the code (copied: the deps DVC
    hashes must not change under the test), .venv pointing at this environment; `dvc init` done."""
    if shutil.which("git") is None:
        pytest.fail("git is not installed: `dvc init` (as the README says) needs a git repository")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "radground").exists():
        pytest.fail(f"{venv}/bin/radground is missing: run the tests with the project's .venv (make test)")
    repo = tmp_path / "clone"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for folder in CODE:
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".venv").symlink_to(venv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RADGROUND_", "DVC_"))}
    env |= {"RADGROUND_DEID__KEY": KEY, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env, timeout=60)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env, timeout=120)
    return repo, env


def _run(repo: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _repro(repo: Path, env: dict[str, str], *flags: str) -> str:
    return _run(repo, env, sys.executable, "-m", "dvc", "repro", *flags)


def _latest(repo: Path) -> dict:
    versions = repo / ".radground" / "versions"
    return json.loads((versions / (versions / "LATEST").read_text().strip() / "manifest.json").read_text())


def _flow_runs(repo: Path) -> int:
    with sqlite3.connect(repo / ".radground" / "prefect" / "prefect.db") as connection:
        return connection.execute("select count(*) from flow_run").fetchone()[0]


def test_dvc_repro_keeps_the_version_chain_and_agrees_with_radground_rebuild(clone):
    repo, env = clone
    generate_drop(repo / "drops" / "a", patients=2, seed=61)  # a.truth.json lands beside it, in drops/
    _repro(repo, env)
    first = _latest(repo)
    assert first["parent_digest"] is None and len(first["drops"]) == 1

    generate_drop(repo / "drops" / "b", patients=1, seed=62)
    _repro(repo, env)
    second = _latest(repo)
    assert second["drops"] == [*first["drops"], second["drops"][-1]] and len(second["drops"]) == 2
    assert second["parent_digest"] == first["digest"]  # the chain: DVC left LATEST in place

    # Nothing changed (Python's bytecode in the code folders does not count: .dvcignore).
    runs = _flow_runs(repo)
    (repo / "radground" / "__pycache__").mkdir(exist_ok=True)
    (repo / "radground" / "__pycache__" / "settings.cpython-311.pyc").write_bytes(b"bytecode")
    third = _repro(repo, env)
    assert "didn't change, skipping" in third, third
    assert _latest(repo)["digest"] == second["digest"] and _flow_runs(repo) == runs

    # radground's own rebuild agrees: the current version, nothing run.
    direct = _run(repo, env | {"RADGROUND_DATA_DIR": ".radground"}, ".venv/bin/radground", "rebuild")
    assert f"version {second['digest'][:16]}" in direct
    assert _latest(repo)["digest"] == second["digest"] and _flow_runs(repo) == runs

    # A forced repro with drop b no longer under drops/: a version holds the latest version's drops
    # plus the given ones, as with `radground rebuild drops/a` (it used to fall back to an older
    # version holding drop a only, and call it "unchanged").
    shutil.move(repo / "drops" / "b", repo / "b-elsewhere")
    forced = _repro(repo, env, "--force")
    assert f"version {second['digest'][:16]}" in forced
    assert _latest(repo)["digest"] == second["digest"] and _flow_runs(repo) == runs
