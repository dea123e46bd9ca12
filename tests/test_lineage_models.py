"""Registered models in the audit: a version of radgrounder registered from a real training run (embedded
SQLite under tmp) traces back to the raw file hashes of its dataset version; where-used lists it for a
patient the run trained on and not for a test-only patient; forget tags it contains_forgotten (and the
promotion gate then refuses it); a purge dry run lists it without tagging."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_lineage_training import DEID_KEY, SPLITS, TESTED, TRAINED, VALIDATED, make_version

from radground.lineage import FORGOTTEN_TAG, LineageError, lineage_index, start_training_run, trace_model
from radground.settings import load_settings

TEXTS = ["The liver is normal in size.", "Die Leber ist normal.", "Caption this image:", "Answer:"] * 8
RAW = [f"{i + 1:064x}" for i in range(4)]  # make_version's four raw files: source_sha256 = i + 1


def _checkpoint(folder, digest: str, run_id: str | None):
    from models.radgrounder import build

    torch.manual_seed(0)
    model, processor = build("tiny", texts=TEXTS)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    lineage = {"dataset_digest": digest, "splits": SPLITS, "code_version": "0.1.0", "settings_hash": "s" * 16,
               "training_run_id": run_id, "ray_run_name": "train-models", "step": 2, "epoch": 0, "val_loss": 1.5,
               "preset": "tiny"}
    (folder / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
    return folder, lineage


def _settings(tmp_path):
    return load_settings(data_dir=tmp_path / "data", deid={"key": DEID_KEY})


def _registered(settings, tmp_path):
    """make_version's version, a training run on it, its checkpoint registered as version 1."""
    from models.checkpoints import resolve_model
    from models.registry import register
    from radground.lineage import finish_training_run, log_checkpoint

    digest, folder = make_version(settings)
    run_id = start_training_run(settings, version_digest=digest, splits=SPLITS, run_name="train-models",
                                params={"preset": "tiny"})
    checkpoint, lineage = _checkpoint(tmp_path / "data" / "checkpoints" / "train-models" / "checkpoint-000002",
                                      digest, run_id)
    log_checkpoint(settings, run_id, uri=str(checkpoint), lineage=lineage, best=True)
    finish_training_run(settings, run_id)
    version = register(settings, resolve_model(settings, run_id))
    return digest, folder, run_id, version


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("RADGROUND_")]:
            patch.delenv(name)
        settings = _settings(tmp_path)
    return settings, *_registered(settings, tmp_path)


def test_trace_of_a_registered_version_reaches_the_raw_file_hashes(registered):
    settings, digest, _, run_id, version = registered
    for ref in ("models:/radgrounder/1", "models:/radgrounder@challenger"):
        traced = trace_model(settings, ref)
        assert traced["resolved_as"] == "registered_model"
        assert (traced["model"]["name"], traced["model"]["version"]) == ("radgrounder", "1")
        assert traced["training_run"]["run_id"] == run_id
        assert traced["dataset"]["digest"] == digest
        assert traced["version"]["raw_sha256"] == RAW and traced["version"]["drops"] == ["drop-A"]
    with pytest.raises(LineageError, match=r"has no version 7 \(versions: 1\)"):
        trace_model(settings, "models:/radgrounder/7")
    with pytest.raises(LineageError, match="not a registry reference"):
        trace_model(settings, "models:/radgrounder")


def test_where_used_lists_the_version_for_trained_patients_only(registered):
    settings, digest, _, run_id, version = registered
    index = lineage_index(settings.data_dir / "lineage", settings=settings)
    for patient in (TRAINED, VALIDATED):
        [model] = index.where_used(patient)["models"]
        assert (model["uri"], model["training_run_id"], model["aliases"]) == ("models:/radgrounder/1", run_id,
                                                                             ["challenger"])
        assert model["contains_forgotten"] is False
    assert index.where_used(TESTED)["models"] == []  # only in test: the run never read them


def test_a_version_registered_without_a_training_run_traces_through_its_digest(tmp_path, clean_env):
    """A checkpoint whose lineage.json names no run: logged into a new run of the training experiment."""
    from models.checkpoints import resolve_model
    from models.registry import register, show_version

    settings = _settings(tmp_path)
    digest, _ = make_version(settings)
    folder = tmp_path / "loose-checkpoint"
    folder.mkdir()
    _checkpoint(folder, digest, None)
    version = register(settings, resolve_model(settings, str(folder)))
    shown = show_version(settings, version["version"])
    assert shown["training_run"] is None and shown["run_id"]  # its own registration run
    from mlflow import MlflowClient

    from radground.lineage import tracking_uri

    run = MlflowClient(tracking_uri=tracking_uri(settings)).get_run(shown["run_id"])
    assert run.data.tags["radground.kind"] == "model-registration" and run.info.status == "FINISHED"
    traced = trace_model(settings, "models:/radgrounder/1")
    assert traced["training_run"] is None and traced["version"]["raw_sha256"] == RAW


def test_forget_tags_the_version_and_promotion_refuses_it(tmp_path, clean_env, monkeypatch):
    import tasks.version_stage as version_stage
    from models.registry import promote, show_version

    settings = _settings(tmp_path)
    digest, folder, run_id, version = _registered(settings, tmp_path)
    monkeypatch.setattr(version_stage, "publish", lambda *a, **k: {  # its new version: covered by tests/flows
        "digest": "f" * 64, "parent_digest": digest, "version_dir": str(folder), "rows": {"images": 2},
        "mlflow_run": None})
    only_test = version_stage.forget(settings, TESTED)
    assert only_test["models"] == [] and show_version(settings, "1")["contains_forgotten"] is False
    result = json.loads(json.dumps(version_stage.forget(settings, TRAINED), default=str))
    assert [(m["uri"], m["contains_forgotten"]) for m in result["models"]] == [("models:/radgrounder/1", True)]
    assert show_version(settings, "1")["tags"][FORGOTTEN_TAG] == "true"
    refused = promote(settings)  # even as the first model: the forgotten tag comes first
    assert not refused["promoted"] and FORGOTTEN_TAG in refused["reason"]
    assert show_version(settings, "1")["aliases"] == ["challenger"]  # no champion was made


def test_a_purge_dry_run_lists_the_version_without_tagging_it(registered):
    from models.registry import show_version
    from tasks.purge import purge

    settings, *_ = registered
    report = purge(settings, VALIDATED, dry_run=True)
    assert [m["uri"] for m in report["models"]] == ["models:/radgrounder/1"]
    assert "contains_forgotten" in report["model_registry"]
    assert show_version(settings, "1")["contains_forgotten"] is False
    assert purge(settings, TESTED, dry_run=True)["models"] == []
