"""The radground command line, run as a user runs it: a real subprocess."""

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "radground", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("synth", "version", "demo", "config"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["synth", "version", "demo", "config", "rebuild"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_version_prints_radground_version():
    from radground import __version__

    result = run_cli("version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_error_is_one_line_with_exit_code_and_debug_shows_traceback(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    result = run_cli("synth", str(busy), "--patients", "1")
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # one message, soft-wrapped at most
    debug = run_cli("--debug", "synth", str(busy), "--patients", "1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_invalid_setting_is_reported_without_traceback(tmp_path):
    result = run_cli("config", "show", env={"RADGROUND_STORAGE__BACKEND": "ftp"})
    assert result.returncode == 2
    assert "storage.backend = 'ftp'" in result.stderr and "Traceback" not in result.stderr


def test_config_show_masks_secrets(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("storage:\n  backend: s3\n  bucket: site-a\n", encoding="utf-8")
    result = run_cli("--config", str(config), "config", "show",
                     env={"RADGROUND_STORAGE__SECRET_KEY": "very-secret-value"})
    assert result.returncode == 0, result.stderr
    assert "site-a" in result.stdout
    assert "very-secret-value" not in result.stdout + result.stderr


def test_synth_writes_a_drop_and_summary(tmp_path):
    out = tmp_path / "drop"
    result = run_cli("synth", str(out), "--patients", "1", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (out / "reports.csv").is_file() and (tmp_path / "drop.truth.json").is_file()
    assert "DICOM files" in result.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_demo_writes_under_data_dir(tmp_path):
    result = run_cli("demo", "--patients", "2", env={"RADGROUND_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "drops" / "demo" / "reports.csv").is_file()
    flat = result.stdout.replace("\n", " ")
    assert str(tmp_path / "data" / "drops" / "demo") in result.stdout.replace("\n", "")
    assert "slices +" in flat and "quarantined" in flat  # the rebuild's summary line
    assert list((tmp_path / "data" / "store" / "ingest").glob("*/images/*.parquet"))
