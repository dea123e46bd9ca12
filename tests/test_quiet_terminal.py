"""`radground demo` keeps the terminal to radground's own lines; what the libraries say goes under data_dir.

Runs the demo as a user does (a subprocess, stdout and stderr apart) with HOME pointed at an
empty folder, so that anything a library writes to ~/.ray or ~/.prefect shows. The suite's only
demo run: the check that it writes under data_dir (once in tests/test_cli.py) reads it too.
"""

import os
import re
import stat
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# What Ray (token authentication), DVC, MLflow/alembic (database set-up), Prefect (run logs,
# telemetry notice) printed before; compared case-insensitively.
LIBRARY_NOISE = ("auth_token", "token authentication", "Initialized DVC", "alembic", "INFO  [", "Running upgrade",
                 "database tables", "prefect.flow_runs", "Beginning flow run", "Started a local Ray instance",
                 "anonymous usage data")
# A log record on the terminal is radground's own: "LEVEL logger.name: message" from its packages.
OWN_RECORD = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) (radground|flows|tasks|models)(\.\w+)*: ")


#: The one demo of the suite. One patient: every library still runs (Prefect server, local Ray, DVC init/add/push,
#: MLflow); training is skipped (one patient cannot be in both train and val). Seed 0 given explicitly.
DEMO = ("demo", "--patients", "1", "--seed", "0")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`radground demo`, run once for every test of this module (tests/test_cli.py ran a second one before)."""
    root = tmp_path_factory.mktemp("quiet")
    home, data_dir = root / "home", root / "data"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env.update(HOME=str(home), RADGROUND_DATA_DIR=str(data_dir))
    result = subprocess.run([sys.executable, "-m", "radground", *DEMO], capture_output=True, text=True, env=env,
                            cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr
    return result, home, data_dir


def test_demo_writes_under_data_dir(demo):
    """Moved from tests/test_cli.py: RADGROUND_DATA_DIR decides where everything goes."""
    result, _, data_dir = demo
    assert (data_dir / "drops" / "demo" / "reports.csv").is_file()
    flat = result.stdout.replace("\n", " ")
    assert str(data_dir / "drops" / "demo") in result.stdout.replace("\n", "")
    assert "slices +" in flat and "quarantined" in flat  # the rebuild's summary line
    assert list((data_dir / "store" / "ingest").glob("*/images/*.parquet"))


def test_no_library_line_reaches_the_terminal(demo):
    result, _, _ = demo
    for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        found = [needle for needle in LIBRARY_NOISE if needle.lower() in text.lower()]
        assert not found, f"{stream} shows library output {found}:\n{text}"
    strangers = [line for line in result.stderr.splitlines() if line.strip() and not OWN_RECORD.match(line)]
    assert not strangers, "stderr lines that are not radground's own log records:\n" + "\n".join(strangers)


def test_the_summary_is_still_printed_and_names_the_library_log(demo):
    result, _, data_dir = demo
    flat = " ".join(result.stdout.split())  # rich wraps long lines at the terminal width
    assert "slices +" in flat and "quarantined" in flat  # the rebuild's ingest summary line
    assert "version " in flat and "MLflow run" in flat  # the version summary line
    log = data_dir / "logs" / "libraries.log"
    assert str(log) in result.stdout.replace("\n", "")
    text = log.read_text(encoding="utf-8")
    # routed, not dropped
    assert "Initialized DVC repository" in text and "prefect.flow_runs" in text and "mlflow" in text


def test_nothing_is_written_to_home_and_the_ray_token_lives_under_data_dir(demo):
    _, home, data_dir = demo
    assert not (home / ".ray").exists(), sorted(p.name for p in home.iterdir())
    assert not (home / ".prefect").exists(), sorted(p.name for p in home.iterdir())
    token = data_dir / "ray" / "auth_token"
    assert token.is_file() and len(token.read_text(encoding="ascii")) == 64
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def _drop_id(data_dir) -> str:
    (folder,) = (data_dir / "store" / "ingest").iterdir()
    return folder.name


def test_each_summary_is_printed_once_and_no_dead_prefect_link_anywhere(demo):
    result, _, data_dir = demo
    flat = " ".join(result.stdout.split())
    drop_id = _drop_id(data_dir)
    for stage in ("ingest", "curate", "segment", "ground"):
        assert flat.count(f"{stage} {drop_id}:") == 1, (stage, result.stdout)
    assert flat.count("files in =") == 1 and flat.count("rows in =") == 1 and flat.count("MLflow run") == 1
    # The embedded Prefect server stopped with the demo: its "View at http://127.0.0.1:…" link would be dead.
    log = (data_dir / "logs" / "libraries.log").read_text(encoding="utf-8")
    assert "View at" not in log + result.stdout + result.stderr
    prefect, mlflow = (data_dir / "prefect").resolve(), (data_dir / "mlflow" / "mlflow.db").resolve()
    assert f"Prefect UI on this data: PREFECT_HOME={prefect} " in flat and "server start" in flat
    assert f"ui --backend-store-uri sqlite:///{mlflow}" in flat


def test_a_rebuild_without_change_says_current_per_stage_and_draws_the_overlays_asked_for(demo):
    import shutil

    result, home, data_dir = demo
    drop_id = _drop_id(data_dir)
    shutil.rmtree(data_dir / "overlays" / drop_id)  # the demo drew 4; ask for 2 on the built drop
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env.update(HOME=str(home), RADGROUND_DATA_DIR=str(data_dir))
    again = subprocess.run([sys.executable, "-m", "radground", "rebuild", str(data_dir / "drops" / "demo"),
                            "--overlays", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    flat = " ".join(again.stdout.split())
    for stage in ("ingest", "curate", "segment", "ground"):
        assert re.search(rf"{stage} {drop_id}: current \(built \d{{4}}-\d\d-\d\d \d\d:\d\d \S+, key [0-9a-f]{{12}}…\)",
                         flat), (stage, again.stdout)
    assert "files in =" not in flat and "grounded pairs" not in flat  # old summaries are not shown as new
    pngs = list((data_dir / "overlays" / drop_id).glob("*.png"))
    assert 1 <= len(pngs) <= 2 and f"{len(pngs)} overlays in {data_dir / 'overlays' / drop_id}" in flat
    assert "unchanged" in flat and not (data_dir / "rebuild.lock.json").exists()


def test_a_second_demo_keeps_its_drop_and_starts_neither_prefect_nor_ray(demo):
    _, home, data_dir = demo
    log = data_dir / "logs" / "libraries.log"
    flows_before = log.read_text(encoding="utf-8").count("Beginning flow run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env.update(HOME=str(home), RADGROUND_DATA_DIR=str(data_dir))
    again = subprocess.run([sys.executable, "-m", "radground", *DEMO], capture_output=True, text=True, env=env,
                           timeout=300)  # the same command: the same patients and seed
    assert again.returncode == 0, again.stderr
    flat = " ".join(again.stdout.split())
    assert "demo drop kept:" in flat and flat.count(": current (built ") == 4 and "unchanged" in flat
    assert log.read_text(encoding="utf-8").count("Beginning flow run") == flows_before  # no flow ran
