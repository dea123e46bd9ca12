"""``radground forget --patient X --purge`` for real: two drops, two versions, one patient erased.

One data_dir through the module, in order: a dry run changes no byte; the purge (through the CLI)
leaves no byte of the patient's pseudonym or image/series/study ids under data_dir or in the DVC
remote, and keeps everyone else; a rebuild without changes then runs no stage and does not bring
the patient back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.rebuild import run_rebuild
from radground.settings import load_settings
from radground.store import open_store
from radground.synth.drop import generate_drop
from radground.tables import read_table
from tasks.purge import scan
from tasks.version import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

KEY = "purge-flow-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("purge")
    drop_a = generate_drop(root / "drop-a", patients=3, seed=61).drop_dir
    drop_b = generate_drop(root / "drop-b", patients=1, seed=62).drop_dir
    settings = load_settings(data_dir=root / "data", deid={"key": KEY}, ray={"num_cpus": 2},
                             grounding={"overlays": 4})
    (first,) = run_rebuild([str(drop_a)], settings)
    (second,) = run_rebuild([str(drop_b)], settings)
    assert read_manifest(second.version["version_dir"]).parent_digest == first.version["digest"]
    store = open_store(settings)
    rows = [r for key in store.list(f"ingest/{first.ingest.drop_id}/images/")
            for r in read_table(store, key).select(["patient_pseudonym", "image_id", "series_uid", "study_uid"])
            .to_pylist()]
    patient = sorted({r["patient_pseudonym"] for r in rows})[0]  # in drop A: in both versions
    mine = [r for r in rows if r["patient_pseudonym"] == patient]
    needles = {patient} | {r[c] for r in mine for c in ("image_id", "series_uid", "study_uid")}
    others = {r["patient_pseudonym"] for r in rows} - {patient}
    return {"settings": settings, "first": first, "second": second, "patient": patient, "needles": needles,
            "others": others, "drop_a": drop_a}


def _cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env |= {"RADGROUND_DATA_DIR": str(settings.data_dir), "RADGROUND_DEID__KEY": KEY}
    return subprocess.run([sys.executable, "-m", "radground", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "rebuild.lock"}


def _task_runs(settings) -> int:
    with sqlite3.connect(settings.data_dir / "prefect" / "prefect.db") as connection:
        return connection.execute("select count(*) from task_run").fetchone()[0]


def test_a_dry_run_lists_the_versions_and_objects_and_changes_no_byte(world):
    settings = world["settings"]
    before = _tree(settings.data_dir)
    done = _cli(settings, "forget", "--patient", world["patient"], "--purge", "--older", "rewrite", "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and len(plan["versions"]) == 2  # the patient is in both versions
    assert plan["store"]["delete"] and plan["store"]["rewrite"] and plan["quality_caches"]
    assert "nothing was changed" in done.stderr
    assert _tree(settings.data_dir) == before


def test_purge_leaves_no_byte_of_the_patient_in_data_dir_or_the_dvc_remote(world):
    settings, patient = world["settings"], world["patient"]
    # a retyped (lower-case) pseudonym is recognised as the pseudonym
    done = _cli(settings, "forget", "--patient", patient.lower(), "--purge", "--older", "rewrite")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["patient_pseudonym"] == patient and report["scan"]["clean"]
    old = {world["first"].version["digest"][:16], world["second"].version["digest"][:16]}
    assert set(report["versions"]) == old and not old & set(report["versions"].values())
    assert report["dvc"]["dvc_remote_objects_deleted"] > 0 and report["mlflow_runs_tagged"]
    world["report"] = report

    # the scan again, on its own, over data_dir and the remote (<data_dir>/dvc-remote)
    state = settings.data_dir / "state"
    result = scan(settings, world["needles"], kept_by_design=[state / "forgotten.json", Path(report["audit_record"])])
    assert result.clean, result.hits
    assert any((settings.data_dir / "dvc-remote").rglob("*")) and result.scanned > 50
    assert sorted(result.kept_by_design) == sorted(["state/forgotten.json",
                                                    str(Path(report["audit_record"]).relative_to(settings.data_dir))])

    # everyone else is still there, in a chain of rewritten versions
    latest = settings.data_dir / "versions" / (settings.data_dir / "versions" / "LATEST").read_text().strip()
    manifest = read_manifest(latest)
    assert manifest.digest == report["current_version"]["digest"]
    assert manifest.parent_digest[:16] == report["versions"][world["first"].version["digest"][:16]]
    kept = set(pq.read_table(latest / "images", columns=["patient_pseudonym"])["patient_pseudonym"].to_pylist())
    assert world["others"] <= kept and patient not in kept
    where = _cli(settings, "lineage", "where-used", "--patient", patient)
    assert where.returncode != 0 and "no patient with this ID/pseudonym in any version" in where.stderr


def test_a_rebuild_after_the_purge_runs_no_stage_and_does_not_bring_the_patient_back(world):
    settings, patient = world["settings"], world["patient"]
    tasks_before = _task_runs(settings)
    (result, *_) = run_rebuild([str(world["drop_a"])], settings)  # drop A delivered again, unchanged
    assert result.cached and result.version["unchanged"]
    assert result.version["digest"] == world["report"]["current_version"]["digest"]
    assert _task_runs(settings) == tasks_before  # no stage ran (Prefect was not even started)
    latest = Path(result.version["version_dir"])
    assert patient not in pq.read_table(latest / "images", columns=["patient_pseudonym"])[
        "patient_pseudonym"].to_pylist()
