"""radground.runtime: what a rebuild tells its user about the embedded Prefect and MLflow, and its progress hooks."""

from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from radground import runtime
from radground.settings import load_settings


@pytest.fixture
def settings(tmp_path, clean_env):
    return load_settings(data_dir=tmp_path / "data")


def test_the_embedded_servers_link_is_not_offered_an_existing_servers_is(settings):
    from prefect.utilities.urls import url_for

    run = uuid.uuid4()
    # embedded: the server stops with the rebuild, so a "View at http://127.0.0.1:…" link would be dead
    with runtime._applied(runtime.prefect_environment(settings, "http://127.0.0.1:4321/api")):
        assert url_for("flow-run", obj_id=run) is None
    existing = settings.model_copy(update={"prefect": settings.prefect.model_copy(
        update={"api_url": "http://prefect.example:4200/api"})})
    with runtime._applied(runtime.prefect_environment(existing, "http://prefect.example:4200/api")):
        assert url_for("flow-run", obj_id=run) == f"http://prefect.example:4200/runs/flow-run/{run}"


def test_the_ui_commands_point_at_the_embedded_data(settings):
    prefect_line, mlflow_line = runtime.ui_commands(settings)
    data_dir = settings.data_dir.resolve()
    assert f"PREFECT_HOME={data_dir / 'prefect'} " in prefect_line and " server start --analytics-off" in prefect_line
    assert f" ui --backend-store-uri sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}" in mlflow_line
    production = settings.model_copy(update={
        "prefect": settings.prefect.model_copy(update={"api_url": "http://prefect:4200/api"}),
        "mlflow": settings.mlflow.model_copy(update={"tracking_uri": "http://mlflow:5000"})})
    assert runtime.ui_commands(production) == []  # existing servers: their own URLs, nothing to start


@pytest.mark.slow
def test_the_ui_commands_name_options_the_installed_prefect_and_mlflow_have(settings):
    for line in runtime.ui_commands(settings):
        command = shlex.split(line.split(": ", 1)[1].split("  (then")[0])
        command = [word for word in command if "=" not in word]  # the PREFECT_HOME=… assignment
        assert Path(command[0]).is_file(), command[0]  # the venv's own console script
        done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        for option in (w for w in command if w.startswith("--")):
            assert option in done.stdout, (option, done.stdout)


def test_notices_go_to_the_front_end_else_to_the_log(caplog):
    seen: list[str] = []
    with runtime.progress_hook(lambda *_: None, seen.append):
        runtime.notify("waiting for x")
    runtime.notify("waiting for y")
    assert seen == ["waiting for x"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == ["waiting for y"]


def test_console_scripts_are_found_beside_this_interpreter():
    assert runtime._console_script("prefect") == shlex.quote(str(Path(sys.executable).with_name("prefect")))
    assert runtime._console_script("no-such-tool-here") == "no-such-tool-here"
