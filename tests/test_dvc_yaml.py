"""dvc.yaml: DVC parses it, and `dvc repro` would run radground's own rebuild command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
    assert "> RADGROUND_DATA_DIR=.radground radground rebuild drops/*" in done.stdout

    status = subprocess.run([*DVC, "stage", "list"], cwd=workspace, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith("rebuild"), status.stderr


def test_the_stage_command_is_a_real_cli_command() -> None:
    result = CliRunner().invoke(app, ["rebuild", "--help"])
    assert result.exit_code == 0 and "Incremental" in result.output
