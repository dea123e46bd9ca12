"""The production profile for real: a rebuild deployed with `prefect deploy`, run by a Prefect process
worker on a 2-node Ray cluster, recorded in MLflow on Postgres, shards and DVC remote in S3; its digest
equals an embedded rebuild's of the same drop and de-identification key. Then a second drop lands in the
inbox: watch-drops announces it, the rebuild-on-drop trigger builds the child version; and a scheduled-style
rebuild-nightly run finds nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml
from stack import BUCKET, MARKER, POOL, PREFECT, PY, S3_ACCESS_KEY, S3_SECRET_KEY, Stack

from radground.settings import load_settings
from radground.synth.drop import generate_drop
from tasks import inbox
from tasks.discover import canonical_location
from tasks.version import read_manifest
from tasks.version_stage import latest_version_dir, versions_root

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "rebuild-on-drop/rebuild-on-drop"  # flow name / deployment name, from the repo's prefect.yaml

# `run NAME PARAMETERS`: run deployment NAME through the worker, as a schedule would; `triggered NAME SECONDS`:
# wait (at most SECONDS) for the run of NAME an automation created to end. Prints the run, its logs, the deployments.
PREFECT_CLIENT = '''
import json, sys, time
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment

command, name, arg = sys.argv[1:4]
run = run_deployment(name, parameters=json.loads(arg), timeout=1500) if command == "run" else None
with get_client(sync_client=True) as client:
    deadline = time.monotonic() + (float(arg) if command == "triggered" else 0)
    while run is None or not run.state.is_final():
        by = DeploymentFilter(id=DeploymentFilterId(any_=[client.read_deployment_by_name(name).id]))
        run = next((r for r in client.read_flow_runs(deployment_filter=by)
                    if r.created_by and r.created_by.type == "AUTOMATION"), None)
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))) if run else []
    deployments = client.read_deployments()
print(json.dumps({"state": run and run.state_type.value, "message": run and run.state.message,
                  "seconds": (run.end_time - run.start_time).total_seconds() if run and run.end_time else None,
                  "parameters": run and run.parameters, "logs": [log.message for log in logs],
                  "deployments": sorted(d.name for d in deployments),
                  "schedules_active": [s.active for d in deployments for s in d.schedules]}))
'''


def _clean_env(stack: Stack) -> dict[str, str]:
    """This process's environment without another cluster's or server's switches."""
    drop = ("RADGROUND_", "PREFECT_", "RAY_", "AWS_", "MLFLOW_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {MARKER: str(stack.root)}


def _deploy(stack: Stack) -> None:
    """`prefect deploy --all` of the repository's prefect.yaml, from the checkout (the worker runs the flows
    from it), with every schedule and trigger off but rebuild-on-drop's, and this stack's work pool: a copy."""
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in project["deployments"]:
        deployment["work_pool"] = {**(deployment.get("work_pool") or {}), "name": POOL}
        for schedule in deployment.get("schedules") or []:
            schedule["active"] = False
        for trigger in deployment.get("triggers") or []:
            trigger["enabled"] = deployment["name"] == "rebuild-on-drop"
    copy = stack.root / "prefect.yaml"
    copy.write_text(yaml.safe_dump(project, sort_keys=False))
    done = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(copy)], cwd=REPO,
                          env={**_clean_env(stack), **stack.client_env()}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _prefect(stack: Stack, *args: str) -> dict:
    """PREFECT_CLIENT in a child process: a client of this stack only."""
    done = subprocess.run([sys.executable, "-c", PREFECT_CLIENT, *args], capture_output=True, text=True,
                          env={**_clean_env(stack), **stack.client_env()}, timeout=1600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _digest(data_dir: Path) -> str:
    folder = latest_version_dir(load_settings(data_dir=data_dir))
    assert folder is not None, f"no dataset version under {data_dir}"
    return read_manifest(folder).digest


@pytest.mark.timeout(3600)  # the stack's start counts too: ~3 min here, several on a busy machine
def test_a_deployed_rebuild_on_the_production_stack(production_stack: Stack, tmp_path, record_property):
    stack = production_stack
    drop = generate_drop(tmp_path / "drop-a", patients=1, seed=7).drop_dir

    # The embedded default, same drop and key: the reference digest (and wall time). It runs while the
    # deployment is made and run (its Prefect server and Ray start-up waits overlap them): ~1 min saved.
    embedded_dir = tmp_path / "embedded-data"
    started = time.perf_counter()
    output = tmp_path / "embedded-rebuild.log"  # a file, not a pipe nobody reads while the deployment runs
    with output.open("w", encoding="utf-8") as log:
        embedded = subprocess.Popen([PY, "-m", "radground", "rebuild", str(drop)], stdout=log,
                                    stderr=subprocess.STDOUT,
                                    env={**_clean_env(stack), "RADGROUND_DATA_DIR": str(embedded_dir),
                                         "RADGROUND_DEID__KEY": stack.deid_key, "RADGROUND_RAY__NUM_CPUS": "2"})
    try:
        _deploy(stack)
        deploy_started = time.perf_counter()
        run = _prefect(stack, "run", DEPLOYMENT, json.dumps({"drops": [str(drop)]}))
        deployed_s = time.perf_counter() - deploy_started
        embedded.wait(timeout=1200)
    finally:
        if embedded.poll() is None:  # the stack's teardown ends its Prefect server and Ray (they carry MARKER)
            embedded.kill()
            embedded.wait()
    embedded_s = time.perf_counter() - started  # concurrent with the deployed run: not a solo time
    assert embedded.returncode == 0, output.read_text(encoding="utf-8")[-4000:]
    embedded_digest = _digest(embedded_dir)

    worker_log = stack.root / "logs" / "worker.log"
    assert run["state"] == "COMPLETED", f"{run}; worker log {worker_log}:\n{worker_log.read_text()[-3000:]}"
    assert run["deployments"] == sorted(d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())
                                        ["deployments"])  # `prefect deploy --all` deployed every one
    assert run["schedules_active"] and not any(run["schedules_active"])  # and no schedule runs in the test

    timings = {"stack_start_s": stack.start_seconds, "services_ready_s": stack.started_s,
               "embedded_rebuild_wall_s": round(embedded_s, 1), "deployed_rebuild_wall_s": round(deployed_s, 1),
               "deployed_flow_run_s": run["seconds"]}
    record_property("timings", timings)
    print(f"\ntimings: {json.dumps(timings)}")

    # Same drop, same key: the same version, whichever runtime built it.
    digest = _digest(stack.deployed_data_dir)
    assert digest == embedded_digest

    # The build's MLflow run and its lineage (the dataset input) live in Postgres.
    import psycopg2

    with psycopg2.connect(stack.pg_dsn("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT r.run_uuid, r.artifact_uri, r.status FROM runs r "
                    "JOIN experiments e ON e.experiment_id = r.experiment_id "
                    "JOIN tags t ON t.run_uuid = r.run_uuid "
                    "WHERE e.name = 'dataset-builds' AND t.key = 'radground.version_digest' AND t.value = %s",
                    (digest,))
        runs = cur.fetchall()
        assert len(runs) == 1, runs
        run_id, artifact_uri, status = runs[0]
        assert artifact_uri.startswith("mlflow-artifacts:/") and status == "FINISHED"
        cur.execute("SELECT count(*) FROM inputs WHERE destination_type = 'RUN' AND destination_id = %s",
                    (run_id,))
        assert cur.fetchone()[0] >= 1
    conn.close()

    # Shards, the DVC remote and MLflow's artifacts are in the bucket (only the server held MLflow's keys).
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert any("/images/" in k and k.endswith(".parquet") for k in keys), keys[:20]
    assert any(k.startswith("dvc/files/md5/") for k in keys), keys[:20]
    assert any(k.startswith("mlflow/") and f"/{run_id}/artifacts/" in k for k in keys), keys[:20]

    # The stage tasks ran on both Ray nodes.
    nodes = set(stack.ray_nodes())
    tasks = [t for t in stack.ray_state("tasks") if t["type"] == "NORMAL_TASK" and t["state"] == "FINISHED"]
    assert len(nodes) == 2 and {t["node_id"] for t in tasks} == nodes, (nodes, tasks)

    # A second drop lands in the inbox (generate_drop writes drop.yaml, the marker, last): watch-drops sees it
    # (first scan: listing recorded; next scan, quiet_s = 0 later: landed, event emitted), the automation of
    # rebuild-on-drop's trigger starts a run for it, and that builds the child of the first version.
    settings = load_settings(data_dir=stack.deployed_data_dir)
    first = read_manifest(latest_version_dir(settings))
    second = canonical_location(str(generate_drop(stack.inbox / "drop-b", patients=1, seed=8).drop_dir))
    for _ in range(3):
        watched = _prefect(stack, "run", "watch-drops/watch-drops", "{}")
        assert watched["state"] == "COMPLETED", watched
        if inbox.read_state(settings)["drops"][second]["landed"]:
            break
    triggered = _prefect(stack, "triggered", DEPLOYMENT, "1500")
    assert triggered["state"] == "COMPLETED", f"{triggered}; worker log {worker_log}:\n{worker_log.read_text()[-3000:]}"
    assert triggered["parameters"] == {"drops": [second]}
    child = read_manifest(latest_version_dir(settings))
    assert child.parent_digest == first.digest == digest
    assert len(child.drops) == 2 and set(first.drops) < set(child.drops)  # both drops

    # A scheduled-style rebuild-nightly run: every registered drop is as built, so no new version.
    versions = sorted(versions_root(settings).iterdir())
    nightly = _prefect(stack, "run", "rebuild-nightly/rebuild-nightly", "{}")
    assert nightly["state"] == "COMPLETED", nightly
    assert any("no registered drop changed" in line for line in nightly["logs"]), nightly
    assert sorted(versions_root(settings).iterdir()) == versions and _digest(stack.deployed_data_dir) == child.digest
    print(f"event-triggered rebuild-on-drop run {triggered['seconds']} s, rebuild-nightly run {nightly['seconds']} s")
