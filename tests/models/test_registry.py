"""models/checkpoints.py and models/registry.py on a real tiny checkpoint and a real MLflow training run
(embedded SQLite under tmp): each model reference form resolves, registration makes a pyfunc version with
lineage tags and alias challenger, the promotion gate passes the first model, refuses a worse one naming
the metric and both values, passes one within the tolerance, refuses without a common test set or metric
and refuses a version trained on a forgotten patient; the champion loads with mlflow.pyfunc and predicts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_data import TEST, TRAIN, VAL, write_tiny_version

from models.checkpoints import ModelError, ModelSource, load_model, resolve_model
from radground.settings import load_settings

SPLITS = {"train": {"rows": 3, "patients": 1}, "val": {"rows": 1, "patients": 1}}
KEY = "version-0123456789abcdef-test"


def _checkpoint(folder: Path, digest: str, run_id: str | None, texts: list[str]) -> Path:
    """A checkpoint as models/training.py writes it: model + processor + trainer state + lineage.json."""
    import radground
    from models.radgrounder import build

    torch.manual_seed(0)
    model, processor = build("tiny", texts=texts)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.save({"step": 4}, folder / "trainer_state.pt")
    lineage = {"dataset_digest": digest, "splits": SPLITS, "code_version": radground.__version__,
               "settings_hash": "s" * 16, "training_run_id": run_id, "ray_run_name": "train-test", "step": 4,
               "epoch": 0, "val_loss": 1.25, "preset": "tiny"}
    (folder / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_texts):
    """A write_tiny_version version, a training run on it and its best (tiny, random) checkpoint."""
    from radground.lineage import finish_training_run, log_checkpoint, start_training_run
    from tasks.version import read_manifest
    from tasks.version_stage import _write_lineage, versions_root

    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("RADGROUND_")]:
            patch.delenv(name)
        settings = load_settings(data_dir=root / "data")
    folder = write_tiny_version(versions_root(settings))
    digest = read_manifest(folder).digest
    _write_lineage(folder, digest, settings)
    run_id = start_training_run(settings, version_digest=digest, splits=SPLITS, run_name="train-test",
                                params={"preset": "tiny"})
    checkpoint = _checkpoint(root / "data" / "checkpoints" / "train-test" / "checkpoint-000004", digest, run_id,
                             train_texts)
    log_checkpoint(settings, run_id, uri=str(checkpoint), lineage=json.loads((checkpoint / "lineage.json").read_text()),
                   best=True)
    finish_training_run(settings, run_id)
    return settings, digest, run_id, checkpoint


@pytest.fixture(scope="module")
def registered(trained):
    """Version 1 of radgrounder, registered from the training run (before any other version)."""
    from models.registry import register

    settings, digest, run_id, checkpoint = trained
    return register(settings, resolve_model(settings, run_id))


def _client(settings):
    from mlflow import MlflowClient

    from radground.lineage import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri(settings))


def test_a_checkpoint_folder_and_a_run_id_resolve_to_the_checkpoint(trained):
    settings, digest, run_id, checkpoint = trained
    by_folder = resolve_model(settings, str(checkpoint))
    assert (by_folder.kind, by_folder.folder, by_folder.run_id) == ("checkpoint", checkpoint.resolve(), run_id)
    assert by_folder.dataset_digest == digest
    by_run = resolve_model(settings, run_id.upper())  # people paste ids in any case
    assert (by_run.kind, by_run.folder, by_run.run_id, by_run.ref) == ("run", checkpoint.resolve(), run_id, run_id)
    assert by_run.describe() == {"ref": run_id, "kind": "run", "run_id": run_id, "model_name": None,
                                 "model_version": None, "dataset_digest": digest}
    model, processor = load_model(by_run)
    assert not model.training and type(processor).__name__ == "RadGrounderProcessor"


def test_bad_references_say_what_is_wrong_and_what_to_give(trained, tmp_path):
    settings, digest, run_id, checkpoint = trained
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"not a radground checkpoint: .* has no lineage.json"):
        resolve_model(settings, str(empty))
    with pytest.raises(ModelError, match="no MLflow run with this id"):
        resolve_model(settings, "f" * 32)
    with pytest.raises(ModelError, match="no such folder, and not a run id or models:/ URI"):
        resolve_model(settings, str(tmp_path / "missing"))


def test_register_makes_a_pyfunc_version_with_lineage_tags_and_alias_challenger(trained, registered):
    settings, digest, run_id, checkpoint = trained
    assert registered["version"] == "1" and registered["aliases"] == ["challenger"]
    assert registered["champion"] is None and "no champion yet" in registered["note"]
    assert registered["run_id"] == run_id  # logged into the training run itself
    assert (registered["dataset_digest"], registered["training_run"], registered["preset"]) == (digest, run_id, "tiny")
    assert registered["checkpoint"] == str(checkpoint.resolve())
    client = _client(settings)
    version = client.get_model_version("radgrounder", "1")
    assert version.run_id == run_id
    files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "registered_model")}
    assert files  # registered_model/<name> in the training run's artifacts
    local = Path(client.download_artifacts(run_id, "registered_model"))
    mlmodel = next(local.rglob("MLmodel")).read_text()
    assert "python_function" in mlmodel and "transformers" not in mlmodel.split("flavors:")[1].split("\n")[1]
    model_dir = next(local.rglob("MLmodel")).parent
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in requirements and all("==" in r for r in requirements if not r.startswith("-"))
    names = {p.name for p in model_dir.rglob("*") if p.is_file()}
    assert {"config.json", "lineage.json", "model.safetensors", "tokenizer.json"} <= names
    assert "trainer_state.pt" not in names  # optimizer state stays out of the registry
    signature = json.loads(__import__("yaml").safe_load(mlmodel)["signature"]["inputs"])
    assert [c["name"] for c in signature] == ["image", "prompt", "task"]
    # no pseudonym anywhere: tags, and every text file the version holds
    text = json.dumps(version.tags) + "".join(p.read_text(errors="ignore") for p in model_dir.rglob("*.json"))
    assert not any(p in text for p in (TRAIN, VAL, TEST))


def test_registry_references_resolve_and_errors_list_what_exists(trained, registered):
    settings, digest, run_id, checkpoint = trained
    by_version = resolve_model(settings, "models:/radgrounder/1")
    by_alias = resolve_model(settings, "models:/radgrounder@challenger")
    for source in (by_version, by_alias):
        assert (source.kind, source.model_name, source.model_version, source.run_id) == ("registry", "radgrounder",
                                                                                          "1", run_id)
        cache = settings.data_dir.resolve() / "cache" / "models" / "registry" / "radgrounder" / "1"
        assert source.folder.is_relative_to(cache) and (source.folder / "lineage.json").is_file()
        assert source.lineage["dataset_digest"] == digest
    with pytest.raises(ModelError, match=r"no alias 'nosuch' \(aliases: .*challenger"):
        resolve_model(settings, "models:/radgrounder@nosuch")
    with pytest.raises(ModelError, match=r"no version 9 \(versions: 1"):
        resolve_model(settings, "models:/radgrounder/9")
    with pytest.raises(ModelError, match="no registered model 'other'"):
        resolve_model(settings, "models:/other/1")


def _flat(accuracy: float, f1: float, report_f1: float | None = None) -> dict:
    metrics = {"all": {"n": 10, "accuracy": accuracy, "f1": f1, "bleu4": 0.1}}
    if report_f1 is not None:
        metrics["report"] = {"n": 3, "f1": report_f1}
    return metrics


def test_the_promotion_gate_both_ways(trained, registered, monkeypatch):
    from models import registry

    settings, digest, run_id, checkpoint = trained
    source = resolve_model(settings, run_id)

    # 1. The first model passes (no champion to compare with).
    first = registry.promote(settings)
    assert first["promoted"] and first["version"] == "1" and "first champion" in first["reason"]
    assert registry.show_version(settings, "@champion")["version"] == "1"
    assert registry.show_version(settings, "1")["aliases"] == ["champion"]  # challenger moved on
    registry.attach_evaluation(settings, "radgrounder", "1", test_set_key=KEY,
                               metrics=_flat(0.5, 0.6, report_f1=0.4), eval_run_id="a" * 32)

    # 2. A worse challenger on the same test set: all.accuracy 0.48 < 0.5 - 0.01 = 0.49 blocks it.
    second = registry.register(settings, source, evaluation={"test_set_key": KEY, "metrics": _flat(0.48, 0.65, 0.4),
                                                             "eval_run_id": "b" * 32})
    assert second["version"] == "2" and second["aliases"] == ["challenger"] and second["champion"] == "1"
    assert second["evaluations"] == {KEY: {"all.accuracy": 0.48, "all.f1": 0.65, "all.bleu4": 0.1, "report.f1": 0.4}}
    refused = registry.promote(settings)
    assert not refused["promoted"] and refused["test_set"] == KEY
    assert refused["blocked_by"] == {"metric": "all.accuracy", "challenger": 0.48, "champion": 0.5, "floor": 0.49}
    assert "all.accuracy" in refused["reason"] and "0.4800" in refused["reason"] and "0.5000" in refused["reason"]
    assert [c["metric"] for c in refused["compared"]] == ["all.accuracy", "all.f1", "report.f1"]  # bleu4 not gated
    assert registry.show_version(settings, "@champion")["version"] == "1"

    # 3. Within the tolerance: 0.495 >= 0.49, f1 0.6 >= 0.59, report.f1 0.395 >= 0.39 -> promoted.
    third = registry.register(settings, source, evaluation={"test_set_key": KEY, "metrics": _flat(0.495, 0.6, 0.395),
                                                            "eval_run_id": "c" * 32})
    promoted = registry.promote(settings, third["version"])
    assert promoted["promoted"] and promoted["champion"] == "1", promoted
    assert all(c["passed"] for c in promoted["compared"])
    versions = {v["version"]: v["aliases"] for v in registry.list_versions(settings)}
    assert versions == {"1": ["previous-champion"], "2": [], "3": ["champion"]}

    # 4. Evaluated on another test set only: refused, saying what to evaluate.
    fourth = registry.register(settings, source, evaluation={"test_set_key": "slake-test-0123456789ab",
                                                             "metrics": _flat(0.9, 0.9), "eval_run_id": "d" * 32})
    no_common = registry.promote(settings)
    assert not no_common["promoted"] and "never evaluated on the same test set" in no_common["reason"]
    assert f"models:/radgrounder/{fourth['version']}" in no_common["reason"] and KEY in no_common["reason"]
    named = registry.promote(settings, test_set="slake-test-0123456789ab")
    assert not named["promoted"] and "not evaluated for version 3" in named["reason"]

    # 5. Same test set but no promotion metric in common: refused, naming what each has.
    registry.attach_evaluation(settings, "radgrounder", fourth["version"], test_set_key=KEY,
                               metrics={"all.bleu4": 0.3}, eval_run_id="e" * 32)
    no_metric = registry.promote(settings, test_set=KEY)
    assert not no_metric["promoted"] and "no metric of model.promotion_metrics" in no_metric["reason"]

    # 6. A version trained on a forgotten patient is refused whatever its metrics.
    from radground.lineage import FORGOTTEN_TAG, set_model_version_tags

    registry.attach_evaluation(settings, "radgrounder", fourth["version"], test_set_key=KEY,
                               metrics=_flat(0.9, 0.9, 0.9), eval_run_id="e" * 32)
    set_model_version_tags(settings, "radgrounder", fourth["version"], {FORGOTTEN_TAG: "true"})
    forgotten = registry.promote(settings)
    assert not forgotten["promoted"] and FORGOTTEN_TAG in forgotten["reason"] and "Retrain" in forgotten["reason"]
    assert registry.show_version(settings, fourth["version"])["contains_forgotten"] is True
    assert registry.show_version(settings, "@champion")["version"] == "3"


def test_the_champion_loads_with_mlflow_pyfunc_and_predicts_like_the_checkpoint(trained, registered, monkeypatch):
    import mlflow

    from models.registry import encode_image, list_versions, promote
    from radground.lineage import tracking_uri

    settings, digest, run_id, checkpoint = trained
    if not any("champion" in v["aliases"] for v in list_versions(settings)):
        assert promote(settings)["promoted"]  # run alone: version 1 becomes the first champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(settings))
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking_uri(settings))
    pyfunc = mlflow.pyfunc.load_model("models:/radgrounder@champion")
    g = torch.Generator().manual_seed(1)
    image = torch.rand((3, 224, 224), generator=g) * 2 - 1
    frame = __import__("pandas").DataFrame([
        {"image": encode_image(image), "prompt": "Caption this image:", "task": "text"},
        {"image": encode_image(image.numpy()), "prompt": "Caption this image and segment keywords:",
         "task": "segmentation"}])
    out = pyfunc.predict(frame, params={"max_new_tokens": 8})
    assert list(out.columns) == ["text", "plain", "spans", "error"] and len(out) == 2
    model, processor = load_model(resolve_model(settings, str(checkpoint)))
    expected = model.predict(processor, image, "Caption this image:", task="text", max_new_tokens=8)
    assert out["text"][0] == expected.text and isinstance(out["text"][0], str)  # the same greedy answer
    assert isinstance(json.loads(out["spans"][1]), list)
    with pytest.raises(Exception, match="task"):
        pyfunc.predict(frame.assign(task="caption"))


def test_prediction_rows_carry_boxes_and_rle_masks():
    from models.radgrounder import GroundedPrediction
    from models.registry import decode_image, encode_image, prediction_row
    from radground.masks import decode_rle
    from radground.tokens import GroundedSpan

    mask = np.zeros((224, 224), dtype=bool)
    mask[10:20, 30:34] = True  # 40 pixels
    row = prediction_row(GroundedPrediction(text="t", plain="Leber normal.", spans=[(0, 5)], masks=[mask]))
    [span] = json.loads(row["spans"])
    assert (span["keyword"], span["start"], span["end"], span["rows"]) == ("Leber", 0, 5, 224)
    assert np.array_equal(decode_rle(span["rle"], 224, 224), mask)
    box = GroundedSpan(start=0, end=5, keyword="Leber", class_id=5, box=(1.0, 2.0, 30.5, 40.25))
    [det] = json.loads(prediction_row(GroundedPrediction(text="t", plain="Leber", spans=[box]))["spans"])
    assert det == {"keyword": "Leber", "start": 0, "end": 5, "class_id": 5, "box": [1.0, 2.0, 30.5, 40.25]}
    pixels = np.linspace(-1, 1, 3 * 224 * 224, dtype=np.float32).reshape(3, 224, 224)
    assert np.array_equal(decode_image(encode_image(pixels)), pixels)
    with pytest.raises(ValueError, match=r"expected \(3, 224, 224\)"):
        decode_image(encode_image(pixels[:1]))


def test_a_checkpoint_of_a_run_in_the_object_store_is_downloaded_once(trained, s3_server, make_s3_settings):
    """A run whose best checkpoint is an s3:// URI (Ray Train on S3): fetched into the cache, then reused."""
    from radground.lineage import finish_training_run, log_checkpoint, start_training_run
    from radground.store import open_store

    _, digest, _, checkpoint = trained
    settings = make_s3_settings(s3_server, create_bucket=True)
    store = open_store(settings)
    for path in checkpoint.iterdir():
        store.put_file(f"checkpoints/train-s3/checkpoint-000004/{path.name}", path)
    run_id = start_training_run(settings, version_digest=digest, splits=SPLITS, run_name="train-s3", params={})
    uri = f"s3://{settings.storage.bucket}/{settings.storage.prefix}checkpoints/train-s3/checkpoint-000004"
    log_checkpoint(settings, run_id, uri=uri, lineage={"dataset_digest": digest, "training_run_id": run_id},
                   best=True)
    finish_training_run(settings, run_id)
    source = resolve_model(settings, run_id)
    expected = settings.data_dir.resolve() / "cache" / "models" / run_id / "checkpoint-000004"
    assert source.folder == expected and source.checkpoint_uri == uri and source.kind == "run"
    assert not (expected / "trainer_state.pt").exists()
    (expected / "marker").write_text("kept")  # a second resolve reuses the download
    assert resolve_model(settings, run_id).folder == expected and (expected / "marker").exists()
    assert isinstance(source, ModelSource)


def test_without_a_named_test_set_the_gate_uses_the_newest_one_both_were_evaluated_on(trained, tmp_path, clean_env):
    """Both versions have test sets OLD and NEW; NEW's evaluation runs started later, so NEW decides."""
    import shutil

    from models import registry
    from radground.lineage import _client, _experiment_id

    _, digest, _, checkpoint = trained
    settings = load_settings(data_dir=tmp_path / "data")
    loose = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, loose)
    doc = json.loads((loose / "lineage.json").read_text())
    (loose / "lineage.json").write_text(json.dumps({**doc, "training_run_id": None}))  # no run in this store
    client = _client(settings, None)
    experiment = _experiment_id(client, settings, "evaluation", True)
    old_runs = [client.create_run(experiment, start_time=1_000).info.run_id for _ in range(2)]
    new_runs = [client.create_run(experiment, start_time=2_000).info.run_id for _ in range(2)]
    source = resolve_model(settings, str(loose))
    registry.register(settings, source)
    assert registry.promote(settings)["promoted"]  # version 1: first champion
    second = registry.register(settings, source)
    old, new = "version-bbbbbbbbbbbbbbbb-test", "version-aaaaaaaaaaaaaaaa-test"  # newest sorts first: not by name
    # champion: 0.5 on both; challenger: 0.9 on OLD (passes), 0.3 on NEW (0.3 < 0.49: blocks)
    for number, (old_acc, new_acc), (old_run, new_run) in (("1", (0.5, 0.5), (old_runs[0], new_runs[0])),
                                                           ("2", (0.9, 0.3), (old_runs[1], new_runs[1]))):
        registry.attach_evaluation(settings, "radgrounder", number, test_set_key=old,
                                   metrics={"all.accuracy": old_acc}, eval_run_id=old_run)
        registry.attach_evaluation(settings, "radgrounder", number, test_set_key=new,
                                   metrics={"all.accuracy": new_acc}, eval_run_id=new_run)
    result = registry.promote(settings)
    assert (result["promoted"], result["test_set"], result["blocked_by"]["challenger"]) == (False, new, 0.3)
    by_name = registry.promote(settings, second["version"], test_set=old)  # naming OLD: it passes there
    assert by_name["promoted"] and by_name["test_set"] == old


def test_flatten_metrics_keeps_the_scored_sections_of_metrics_json_only():
    """A metrics.json also describes the run (model step, max_new_tokens, missing, test set sizes): none of
    that may become a registry metric the promotion gate could compare."""
    from models.registry import flatten_metrics

    doc = {"all": {"n": 4, "accuracy": 0.5, "cider": None}, "report": {"n": 2, "f1": 0.25},
           "grounding": {"n": 1, "f1_iou50": 1}, "model": {"step": 4, "max_new_tokens": 8}, "missing": 0,
           "test_set": {"key": "k", "items": 4}, "run_id": "a" * 32, "model.step": 4, "all.bleu4": 0.1}
    assert flatten_metrics(doc) == {"all.accuracy": 0.5, "report.f1": 0.25, "grounding.f1_iou50": 1.0,
                                    "all.bleu4": 0.1}
