"""Lineage to the checkpoint: real MLflow training runs (embedded SQLite under tmp_path) made through
radground.lineage's training-run functions, traced back to raw file hashes, and where-used / forget
listing the runs and checkpoints that trained on a patient."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from radground.lineage import (
    BEST_CHECKPOINT_TAG,
    CHECKPOINT_TAG,
    LineageError,
    finish_training_run,
    lineage_index,
    log_checkpoint,
    log_training_metrics,
    start_training_run,
    trace_checkpoint,
    trace_run,
    tracking_uri,
)
from radground.schemas import ImageRecord
from radground.settings import load_settings
from radground.tables import to_arrow

DEID_KEY = "lineage-training-test-key-0123456789abcdef"
TRAINED = "P" + "A1" * 10  # in train
VALIDATED = "P" + "B2" * 10  # in val
TESTED = "P" + "C3" * 10  # only in test: no training run used them


@pytest.fixture
def settings(tmp_path, clean_env):
    return load_settings(data_dir=tmp_path / "data", deid={"key": DEID_KEY})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One version and one training run, shared by the tests that only read them: (settings, digest, run, best)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("RADGROUND_")]:
            patch.delenv(name)
        settings = load_settings(data_dir=tmp_path / "data", deid={"key": DEID_KEY})
    digest, _ = make_version(settings)
    run_id, best = train_run(settings, digest, tmp_path)
    return settings, digest, run_id, best


def _image(i: int, patient: str) -> ImageRecord:
    from datetime import date

    return ImageRecord(
        image_id=f"2.25.{i}", patient_pseudonym=patient, study_uid=f"2.25.9{i}", series_uid=f"2.25.8{i}",
        drop_id="drop-A", modality="CT", body_part="CHEST", study_date=date(2020, 1, 2), slice_index=i,
        slice_axis="axial", slice_position_mm=float(i), rows=4, cols=4, row_spacing_mm=0.7, col_spacing_mm=0.7,
        slice_thickness_mm=1.0, image_position=[0.0, 0.0, float(i)], image_orientation=[1.0, 0, 0, 0, 1.0, 0],
        pixel_dtype="int16", pixels=bytes(32), has_report=True, source_sha256=f"{i + 1:064x}")


def make_version(settings) -> tuple[str, Path]:
    """A real version folder (tasks.version.write_version) with splits and its lineage table, as LATEST."""
    from tasks.version import write_version
    from tasks.version_stage import LATEST, _write_lineage, versions_root

    images = [_image(0, TRAINED), _image(1, TRAINED), _image(2, VALIDATED), _image(3, TESTED)]
    root = versions_root(settings)
    building = root / ".building-test"
    manifest = write_version({"images": [to_arrow(images, ImageRecord)]}, out_dir=building, parent=None,
                             drops=["drop-A"], settings_hash="s" * 16, code_version="0.1.0", quarantine_counts={},
                             splits={TRAINED: "train", VALIDATED: "val", TESTED: "test"})
    folder = root / manifest.digest[:16]
    building.rename(folder)
    (root / LATEST).write_text(folder.name + "\n")
    _write_lineage(folder, manifest.digest, settings)
    return manifest.digest, folder


SPLITS = {"train": {"rows": 2, "patients": 1}, "val": {"rows": 1, "patients": 1}}


def train_run(settings, digest: str, tmp_path: Path, name: str = "radground-train-test") -> tuple[str, Path]:
    """One training run as flows/train.py records it: open, metrics, two checkpoints (the first best), close."""
    run_id = start_training_run(settings, version_digest=digest, splits=SPLITS, run_name=name,
                                params={"preset": "tiny", "max_steps": "4", "learning_rate": "0.001"})
    checkpoints = tmp_path / "data" / "checkpoints" / name
    best = None
    for step, val_loss in ((2, 1.5), (4, 1.7)):
        log_training_metrics(settings, run_id, {"loss": 2.0 / step, "val_loss": val_loss, "nan": float("nan")},
                             step)
        folder = checkpoints / f"checkpoint_00000{step // 2 - 1}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        lineage = {"dataset_digest": digest, "splits": SPLITS, "code_version": "0.1.0",
                   "settings_hash": settings.settings_hash(), "training_run_id": run_id, "ray_run_name": name,
                   "step": step, "epoch": 0, "val_loss": val_loss, "preset": "tiny"}
        (folder / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
        log_checkpoint(settings, run_id, uri=str(folder), lineage=lineage, best=val_loss == 1.5)
        best = best or folder
    finish_training_run(settings, run_id, "FINISHED")
    return run_id, best


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(settings))


def test_a_training_run_is_recorded_with_its_version_input_metrics_and_checkpoints(trained):
    settings, digest, run_id, best = trained
    client = _client(settings)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == settings.mlflow.train_experiment == "training"
    assert run.data.tags["radground.kind"] == "training"
    assert run.data.tags["radground.ray_run_name"] == "radground-train-test"
    assert run.data.tags[BEST_CHECKPOINT_TAG] == str(best)
    assert run.data.tags[CHECKPOINT_TAG].endswith("checkpoint_000001")
    assert run.data.params["preset"] == "tiny" and run.data.params["splits.train.rows"] == "2"
    assert run.data.params["settings_hash"] == settings.settings_hash()
    assert [m.value for m in client.get_metric_history(run_id, "val_loss")] == [1.5, 1.7]
    assert "nan" not in run.data.metrics  # non-finite values are not logged
    [item] = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in item.tags}
    assert (item.dataset.name, tags["mlflow.data.context"], tags["radground.splits"]) == (digest, "training",
                                                                                         "train,val")
    assert tags["radground.version_digest"] == digest
    listed = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert listed == {"checkpoints/checkpoint_000000", "checkpoints/checkpoint_000001"}


def test_trace_from_the_run_and_from_the_checkpoint_reaches_the_raw_file_hashes(trained):
    settings, digest, run_id, best = trained
    raw = [f"{i + 1:064x}" for i in range(4)]  # every image of the version, test split included

    from_run = trace_run(settings, run_id)
    assert from_run["resolved_as"] == "training_run"
    assert from_run["training_run"]["run_id"] == run_id and from_run["training_run"]["status"] == "FINISHED"
    assert from_run["training_run"]["params"]["preset"] == "tiny"
    assert from_run["dataset"] == {"digest": digest, "splits": SPLITS}
    assert from_run["version"]["raw_sha256"] == raw and from_run["version"]["drops"] == ["drop-A"]
    assert [(c["step"], c["val_loss"], c["best"]) for c in from_run["checkpoints"]] == [(2, 1.5, True),
                                                                                       (4, 1.7, False)]

    from_checkpoint = trace_checkpoint(settings, best)
    assert from_checkpoint["checkpoint"]["step"] == 2 and from_checkpoint["checkpoint"]["val_loss"] == 1.5
    assert from_checkpoint["training_run"]["run_id"] == run_id
    assert from_checkpoint["dataset"]["digest"] == digest
    assert from_checkpoint["version"]["raw_sha256"] == raw


def test_a_checkpoint_whose_lineage_names_another_version_than_its_run_is_refused(settings, tmp_path):
    digest, _ = make_version(settings)
    _, best = train_run(settings, digest, tmp_path)
    doc = json.loads((best / "lineage.json").read_text())
    (best / "lineage.json").write_text(json.dumps(doc | {"dataset_digest": "e" * 64}))
    with pytest.raises(LineageError, match="does not belong to that run"):
        trace_checkpoint(settings, best)
    with pytest.raises(LineageError, match="no lineage.json"):
        trace_checkpoint(settings, tmp_path)


def test_where_used_lists_training_runs_and_checkpoints_with_the_patient_split(trained):
    settings, digest, run_id, best = trained
    index = lineage_index(settings.data_dir / "lineage", settings=settings)

    for patient, split in ((TRAINED, "train"), (VALIDATED, "val")):
        used = index.where_used(patient)
        assert used["versions"] == [digest]
        [trained] = used["training_runs"]
        assert (trained["run_id"], trained["split"], trained["version_digest"]) == (run_id, split, digest)
        assert {c["uri"] for c in used["checkpoints"]} == {str(best), str(best.with_name("checkpoint_000001"))}
        assert [c["best"] for c in used["checkpoints"]] == [True, False]

    tested = index.where_used(TESTED)
    assert tested["versions"] == [digest]  # in the version and its build...
    assert run_id in {r["run_id"] for r in tested["runs"]}  # ...which the run read, but not their split:
    assert tested["training_runs"] == [] and tested["checkpoints"] == [] and tested["evaluated_on"] == []


def test_forget_lists_the_training_runs_and_checkpoints_in_its_json(settings, tmp_path, monkeypatch):
    """forget's listing; its new version (publish: stage outputs, DVC) is covered by tests/flows."""
    import tasks.version_stage as version_stage

    digest, folder = make_version(settings)
    run_id, best = train_run(settings, digest, tmp_path)
    monkeypatch.setattr(version_stage, "publish", lambda *a, **k: {
        "digest": "f" * 64, "parent_digest": digest, "version_dir": str(folder), "rows": {"images": 2},
        "mlflow_run": None})
    result = json.loads(json.dumps(version_stage.forget(settings, TRAINED), default=str))
    assert result["still_in_versions"] == [digest]
    assert [(r["run_id"], r["split"]) for r in result["training_runs"]] == [(run_id, "train")]
    assert str(best) in {c["uri"] for c in result["checkpoints"]}
    only_test = version_stage.forget(settings, TESTED)
    assert only_test["training_runs"] == [] and only_test["checkpoints"] == []


def test_no_pseudonym_reaches_the_training_run(trained):
    settings, digest, run_id, best = trained
    run = _client(settings).get_run(run_id)
    logged = json.dumps([run.data.params, run.data.tags, [i.to_dictionary() for i in run.inputs.dataset_inputs]])
    blobs = [p.read_bytes() for p in (settings.data_dir / "mlflow").rglob("*") if p.is_file()]
    assert any(b"checkpoint_uri" in b for b in blobs)  # the artifacts are there to be scanned
    for patient in (TRAINED, VALIDATED, TESTED):
        assert patient not in logged
        for blob in blobs:
            assert patient.encode() not in blob
    with pytest.raises(LineageError, match="holds a patient pseudonym") as caught:
        log_checkpoint(settings, run_id, uri="x/checkpoint_9", lineage={"note": TRAINED}, best=False)
    assert TRAINED not in str(caught.value)
    with pytest.raises(LineageError, match="holds a patient pseudonym"):
        start_training_run(settings, version_digest=digest, splits=SPLITS, run_name="r", params={"p": TESTED})


def _cli(settings, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env |= {"RADGROUND_DATA_DIR": str(settings.data_dir), "RADGROUND_DEID__KEY": DEID_KEY}
    done = subprocess.run([sys.executable, "-m", "radground", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    return done


@pytest.mark.slow
def test_cli_trace_tells_a_version_from_a_run_id_and_a_checkpoint_folder(settings, tmp_path):
    digest, _ = make_version(settings)
    run_id, best = train_run(settings, digest, tmp_path)
    assert not digest.startswith(run_id[:8])
    cases = {run_id: "training_run", digest[:32]: "version", digest[:16]: "version", str(best): "checkpoint"}
    for target, kind in cases.items():
        done = _cli(settings, "lineage", "trace", target)
        assert done.returncode == 0, (target, done.stderr)
        traced = json.loads(done.stdout)
        assert traced["resolved_as"] == kind, target
        raw = traced["raw_sha256"] if kind == "version" else traced["version"]["raw_sha256"]
        assert len(raw) == 4
    remote = _cli(settings, "lineage", "trace", "s3://bucket/checkpoints/run/checkpoint-000004")
    assert remote.returncode == 2 and "not a folder on this machine" in remote.stderr
    unknown = _cli(settings, "lineage", "trace", "0" * 32)
    assert unknown.returncode == 2 and "not a version" in unknown.stderr and "no MLflow run" in unknown.stderr
    where = _cli(settings, "lineage", "where-used", "--patient", VALIDATED)
    assert where.returncode == 0, where.stderr
    assert [(r["run_id"], r["split"]) for r in json.loads(where.stdout)["training_runs"]] == [(run_id, "val")]
    shutil.rmtree(settings.data_dir / "mlflow")  # a run id with no MLflow store: said, and nothing created
    gone = _cli(settings, "lineage", "trace", run_id)
    assert gone.returncode == 2 and "no MLflow runs" in gone.stderr
    assert not (settings.data_dir / "mlflow").exists()


def test_a_purge_dry_run_lists_the_training_runs_and_checkpoints_too(trained):
    from tasks.purge import purge

    settings, digest, run_id, best = trained
    report = purge(settings, VALIDATED, dry_run=True)
    assert [(r["run_id"], r["split"]) for r in report["training_runs"]] == [(run_id, "val")]
    assert str(best) in {c["uri"] for c in report["checkpoints"]}
    assert "does not change model weights" in report["model_registry"]
    assert purge(settings, TESTED, dry_run=True)["training_runs"] == []
