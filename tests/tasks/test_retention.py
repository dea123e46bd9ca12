"""Retention (tasks/retention.py) on a build of three versions with a local DVC remote and the
embedded MLflow: the plan, a dry run that changes nothing, an apply, what keeps a version, the lock."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from test_version import image

from radground.buildstate import RebuildLockedError, forget_patients, rebuild_lock
from radground.dvc import DvcRepo
from radground.lineage import MODEL_DIGEST_TAG, _client, record_build, register_model_folder, set_model_version_tags
from radground.schemas import ImageRecord, ReportRecord
from radground.settings import load_settings
from radground.tables import to_arrow
from tasks.retention import RETIRED_FILE, RETIRED_TAG, is_retired, retire
from tasks.version import MANIFEST_FILE, read_manifest, write_version
from tasks.version_stage import LATEST, _write_lineage

# dvc 3.67's own use of pygtrie; nothing this module can change.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

KEY = "retention-unit-test-key-0123456789abcdef"
P1, P2, P3 = ("P" + c * 20 for c in "123")


def _part(patient: str, first: int):
    return to_arrow([image(first + i, patient=patient, seed=first) for i in range(3)], ImageRecord)


def _report(patient: str):
    return to_arrow([ReportRecord(study_uid="2.25.9", patient_pseudonym=patient, drop_id="drop-A", language="de",
                                  text="Lunge frei.", redactions=0)], ReportRecord)


def build(tmp_path: Path, **retention) -> tuple:
    """v1 = [A] -> v2 = [A, B] -> v3 = [A, B, C] (LATEST), one day apart; A and B are the same shard
    objects in every version that has them. Each version has a build run in MLflow."""
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": KEY}, retention=retention,
                             rebuild_lock_timeout_s=0.2)
    root = settings.data_dir.resolve() / "versions"
    dvc = DvcRepo(root, settings)
    dvc.init()
    parts = [(p, _part(p, first), _report(p)) for p, first in ((P1, 0), (P2, 10), (P3, 20))]
    versions, parent = [], None
    for n in range(1, 4):
        chosen = parts[:n]
        manifest = write_version({"images": [t for _, t, _ in chosen], "reports": [r for _, _, r in chosen]},
                                 out_dir=root / f"b{n}", parent=parent,
                                 drops=[f"D{i}" for i in range(n)], settings_hash="s", code_version="0",
                                 quarantine_counts={}, splits={p: "train" for p, _, _ in chosen},
                                 shard_target_bytes=2**20)
        folder = root / manifest.digest[:16]
        (root / f"b{n}").rename(folder)
        manifest = manifest.model_copy(update={"created_at": f"2026-01-0{n}T00:00:00+00:00"})
        (folder / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        _write_lineage(folder, manifest.digest, settings)
        dvc.track(folder)
        run = record_build(settings, manifest=manifest.model_dump(mode="json"), drops=manifest.drops,
                           stage_counts={}, stage_seconds={}, artifacts=[], version_uri=folder)
        versions.append((folder, manifest, run))
        parent = manifest
    (root / LATEST).write_text(versions[-1][0].name + "\n")
    dvc.push()
    return settings, dvc, versions


def cache_objects(dvc: DvcRepo) -> set[str]:
    base = dvc.root / ".dvc" / "cache" / "files" / "md5"
    return {p.parent.name + p.name for p in base.rglob("*") if p.is_file()}


def remote_objects(dvc: DvcRepo) -> set[str]:
    base = Path(dvc.remote_url) / "files" / "md5"
    return {p.parent.name + p.name for p in base.rglob("*") if p.is_file()}


def tree(root: Path) -> dict[str, str]:
    """Every file of the versions, the cache and the remote, with its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("versions", "dvc-remote", "lineage") for p in sorted((root / sub).rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def no_models(settings):
    return []


@pytest.mark.slow  # about 25 s on a busy 2-core machine (MLflow's first migration, torch)
@pytest.mark.integration
def test_a_dry_run_lists_the_two_retirable_versions_and_an_apply_retires_them(tmp_path, clean_env):
    from models.data import VersionDataset

    settings, dvc, versions = build(tmp_path, keep_last=1, keep_days=0)
    (v1, m1, run1), (v2, m2, run2), (v3, m3, run3) = versions
    data_dir = settings.data_dir.resolve()
    before = tree(data_dir)
    v3_objects = dvc.referenced_hashes([v3.with_suffix(".dvc")])

    plan = retire(settings, list_versions=no_models)  # the default is a dry run
    assert plan["dry_run"] and plan["kept"] == {v3.name: "latest"}
    assert [r["version"] for r in plan["retired"]] == [v2.name, v1.name]  # newest first
    assert plan["versions"] == 2 and plan["files"] == 3 + 5  # shards A (+ B) of images and reports, splits
    assert plan["bytes"] == sum(p.stat().st_size for v in (v1, v2) for p in v.rglob("*")
                                if p.is_file() and p.name != MANIFEST_FILE)
    assert plan["dvc"]["dvc_objects"] == 4  # both .dir listings and both splits; A and B are v3's too
    assert sorted(plan["mlflow_runs"]) == sorted([run1, run2])
    assert tree(data_dir) == before  # nothing touched
    assert not any(is_retired(v) for v, _, _ in versions)

    done = retire(settings, dry_run=False, list_versions=no_models)
    assert not done["dry_run"] and done["versions"] == 2 and done["files"] == plan["files"]
    for folder, manifest in ((v1, m1), (v2, m2)):
        assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST_FILE, RETIRED_FILE])
        assert read_manifest(folder) == manifest  # kept forever, unchanged
        assert json.loads((folder / RETIRED_FILE).read_text())["digest"] == manifest.digest
    # Only what no remaining version references is gone, from the cache and the remote alike.
    remaining = dvc.referenced_hashes(sorted(p for p in dvc.root.glob("*.dvc") if p.is_file()))
    assert v3_objects <= remaining
    assert cache_objects(dvc) == remaining == remote_objects(dvc)
    assert done["dvc"]["dvc_cache_objects_deleted"] == 4 and done["dvc"]["dvc_remote_objects_deleted"] == 4
    # The retired versions' manifests are in DVC still: a fresh clone pulls them back.
    clone = dvc.clone(tmp_path / "clone")
    assert read_manifest(clone.pull(v1.name)) == m1
    # LATEST is intact and loads.
    assert (dvc.root / LATEST).read_text().strip() == v3.name
    latest = VersionDataset(v3, "train", slices="all")
    assert len(latest) == 9 and latest[8]["pixel_values"].numel() > 0  # its pixels decode
    # Training or evaluating on a retired version is refused by name, not a missing-file error.
    from models.data import DataError, resolve_version

    with pytest.raises(DataError, match=f"version {v1.name} was retired .*RETIRED.json.*its data is gone"):
        resolve_version(settings, m1.digest)
    assert resolve_version(settings, m3.digest) == v3
    tags = {run: _client(settings, None).get_run(run).data.tags for run in (run1, run2, run3)}
    assert tags[run1][RETIRED_TAG] == "true" and tags[run2][RETIRED_TAG] == "true"
    assert RETIRED_TAG not in tags[run3]
    # A second run finds nothing left to retire.
    again = retire(settings, dry_run=False, list_versions=no_models)
    assert again["versions"] == 0 and sorted(again["already_retired"]) == sorted([v1.name, v2.name])


def test_pinned_model_and_age_keep_versions_and_a_forgotten_patient_loses_age(tmp_path, clean_env):
    settings, dvc, versions = build(tmp_path, keep_last=1, keep_days=0)
    (v1, m1, _), (v2, m2, run2), (v3, _, _) = versions
    # A registered model version trained on v2, through the registry itself.
    model_folder = tmp_path / "model"
    model_folder.mkdir()
    (model_folder / "weights.txt").write_text("w")
    registered = register_model_folder(settings, settings.model.registry_name, model_folder, run_id=None,
                                       run_name="m", tags={MODEL_DIGEST_TAG: m2.digest})
    pin = settings.retention.model_copy(update={"pinned": [m1.digest[:12]]})
    pinned = settings.model_copy(update={"retention": pin})
    result = retire(pinned)
    assert result["kept"] == {v3.name: "latest", v1.name: f"pinned ({m1.digest[:12]})",
                              v2.name: f"model ({settings.model.registry_name} v{registered['version']})"}
    assert result["versions"] == 0

    # Young versions are kept by age ...
    young = settings.model_copy(update={"retention": settings.retention.model_copy(update={"keep_days": 10_000})})
    assert retire(young, list_versions=no_models)["kept"][v1.name].startswith("young")
    # ... but not one holding a forgotten patient (P2 is in v2 and v3; v3 is the latest).
    forget_patients(settings, [P2])
    assert [r["version"] for r in retire(young, list_versions=no_models)["retired"]] == [v2.name]
    assert retire(young)["kept"][v2.name].startswith("model")  # the model is not tagged contains_forgotten
    set_model_version_tags(settings, settings.model.registry_name, registered["version"],
                           {"radground.contains_forgotten": "true"})
    report = retire(young, dry_run=False)
    assert [r["version"] for r in report["retired"]] == [v2.name] and report["retired"][0]["holds_forgotten"]
    assert is_retired(v2) and not is_retired(v1)


@pytest.mark.slow  # a real CLI subprocess on a three-version build
@pytest.mark.integration
def test_the_cli_prints_the_plan_and_applies_only_with_apply(tmp_path, clean_env):
    import os
    import subprocess
    import sys

    settings, dvc, versions = build(tmp_path, keep_last=1, keep_days=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")} | {
        "RADGROUND_DATA_DIR": str(settings.data_dir), "RADGROUND_DEID__KEY": KEY,
        "RADGROUND_RETENTION__KEEP_LAST": "1", "RADGROUND_RETENTION__KEEP_DAYS": "0",
        "COLUMNS": "200"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "radground", "datasets", "retire", *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)

    dry = cli()
    assert dry.returncode == 0, dry.stderr
    assert "would retire 2 version(s): 8 file(s)" in dry.stdout and "nothing was changed" in dry.stderr
    for folder, _, _ in versions:
        assert folder.name in dry.stdout
    assert not any(is_retired(v) for v, _, _ in versions)
    done = cli("--apply")
    assert done.returncode == 0, done.stderr
    assert "retired 2 version(s): 8 file(s)" in done.stdout and "2 MLflow run(s) tagged" in done.stdout
    assert [is_retired(v) for v, _, _ in versions] == [True, True, False]
    listed = subprocess.run([sys.executable, "-m", "radground", "datasets", "list", "--json"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert {v["version"]: v["retired"] for v in json.loads(listed.stdout)} == {
        v.name: retired for (v, _, _), retired in zip(versions, (True, True, False), strict=True)}
    table = subprocess.run([sys.executable, "-m", "radground", "datasets", "list"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=300).stdout
    assert table.count("(retired)") == 2 and table.count("(latest)") == 1


def test_retire_refuses_while_another_rebuild_holds_the_lock(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "data", rebuild_lock_timeout_s=0.2)
    held, release = threading.Event(), threading.Event()

    def other():
        with rebuild_lock(settings, command="rebuild"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(RebuildLockedError, match="the rebuild started at .* holds .*rebuild_lock_timeout_s"):
            retire(settings, dry_run=False, list_versions=no_models)
    finally:
        release.set()
        thread.join()


@pytest.mark.slow
@pytest.mark.integration
def test_purge_after_retire_erases_the_patient_from_retired_lineage_tables(tmp_path, clean_env):
    """A retired version is a manifest only; purge skips its (gone) shards and rewrites its lineage table."""
    import pyarrow.parquet as pq

    from tasks.purge import purge, version_folders

    settings, dvc, versions = build(tmp_path, keep_last=1, keep_days=0)
    (v1, _, _), (v2, _, _), (v3, _, _) = versions
    retire(settings, dry_run=False, list_versions=no_models)
    assert version_folders(settings) == [v3]  # retired folders hold nothing to rewrite
    lineage = settings.data_dir.resolve() / "lineage"
    plan = purge(settings, P1, dry_run=True)
    assert sorted(plan["retired_versions_lineage"]) == sorted([v1.name, v2.name])
    report = purge(settings, P1)
    assert sorted(report["retired_lineage_rewritten"]) == sorted([v1.name, v2.name])
    for folder in (v1, v2):
        pseudonyms = pq.read_table(lineage / f"{folder.name}.parquet")["patient_pseudonym"].to_pylist()
        assert P1 not in pseudonyms
