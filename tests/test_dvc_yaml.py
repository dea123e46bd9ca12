"""dvc.yaml: DVC parses it, `dvc repro` would run radground's own rebuild command, and its output persists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from radground.cli import app

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]  # the DVC of this environment, whatever PATH says


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for folder in ("radground", "tasks", "flows"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    (tmp_path / "drops" / "site-a").mkdir(parents=True)
    (tmp_path / "drops" / "site-a" / "reports.csv").write_text("accession_number\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RADGROUND_", "DVC_"))}
    subprocess.run([*DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=env, timeout=60)
    return tmp_path


def test_dvc_repro_runs_the_radground_rebuild_of_every_drop(workspace: Path) -> None:
    done = subprocess.run([*DVC, "repro", "--dry"], cwd=workspace, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "> RADGROUND_DATA_DIR=.radground .venv/bin/radground rebuild drops/*/" in done.stdout

    status = subprocess.run([*DVC, "stage", "list"], cwd=workspace, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith("rebuild"), status.stderr


def test_the_version_pointer_survives_dvc_running_the_stage() -> None:
    # DVC deletes a stage's outputs before running it unless they persist; LATEST is where the
    # next version reads its parent from (tests/flows/test_dvc_repro.py runs the whole sequence).
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["rebuild"]
    ((path, options),) = (next(iter(out.items())) for out in stage["outs"])
    assert path.endswith("/versions/LATEST") and options == {"cache": False, "persist": True}


def test_bytecode_is_not_a_change_dvc_reruns_the_stage_for() -> None:
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_the_stage_command_is_a_real_cli_command() -> None:
    result = CliRunner().invoke(app, ["rebuild", "--help"])
    assert result.exit_code == 0 and "Incremental" in result.output
