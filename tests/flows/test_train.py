"""flows/train.py end to end: train_model with 2 CPU Ray workers (Ray Train v2) on a hand-built version.

Two runs with the same settings share the module: an unbroken one with checkpoints in <data_dir>, and one
with checkpoints on moto's S3 server whose rank 1 dies once after the step-2 checkpoint (FailureConfig
restarts the group from it). Asserted: the MLflow run (params, metrics, the version as input), the best
checkpoint chosen by MIN val_loss, a checkpoint that reloads to the recorded val_loss, and the killed
run reaching the unbroken run's losses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_training_data import TEST, TRAIN, VAL, write_tiny_version  # noqa: E402

TRAIN_SETTINGS = {"batch_size": 2, "effective_batch": 4, "optimizer": "adamw", "lr": 5e-3, "warmup_ratio": 0.0,
                  "epochs": 50, "max_steps": 4, "eval_every": 2, "eval_items": 4, "workers": 2, "use_gpu": "false",
                  "num_to_keep": 2, "max_failures": 2}
KILL_AT_STEP = 3


class KillOnce:
    """Step hook: rank 1 dies (os._exit) once, after step ``step``; a marker file says it happened.

    It waits first, past Ray Train's polling of the step-2 report (~2 s), so that checkpoint is
    registered before the worker goes."""

    def __init__(self, marker: Path, step: int) -> None:
        self.marker, self.step = str(marker), step

    def __call__(self, step: int, rank: int) -> None:
        if rank == 1 and step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed", encoding="utf-8")
            time.sleep(4)
            os._exit(1)


def _version_here(settings) -> Path:
    """The hand-built version as the latest one of settings.data_dir."""
    from tasks.version_stage import LATEST

    folder = write_tiny_version(settings.data_dir / "versions")
    (folder.parent / LATEST).write_text(folder.name + "\n", encoding="utf-8")
    return folder


def _run(settings):
    from radground.runtime import libraries_off_the_terminal

    with libraries_off_the_terminal(settings):
        from flows.train import run_training

        return run_training(None, settings)


def _client(settings):
    from radground.lineage import _mlflow, tracking_uri

    return _mlflow().MlflowClient(tracking_uri(settings))


def _losses(settings, run_id: str, key: str) -> dict[int, float]:
    """The metric's value per step; a step logged twice (before and after a restart) keeps its last value."""
    history = sorted(_client(settings).get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    from radground.settings import load_settings

    root = tmp_path_factory.mktemp("train-flow")
    settings = load_settings(data_dir=root / "data", train=TRAIN_SETTINGS)
    folder = _version_here(settings)
    return settings, folder, _run(settings)


@pytest.mark.slow
@pytest.mark.integration
def test_train_model_records_the_run_and_keeps_the_best_checkpoint(unbroken) -> None:
    from models.data import build_mixture
    from models.radgrounder import RadGrounderForConditionalGeneration, RadGrounderProcessor
    from tasks.version import read_manifest

    settings, folder, result = unbroken
    digest = read_manifest(folder).digest
    assert result.version_digest == digest and result.preset == "tiny"
    run = _client(settings).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["preset"], params["workers"], params["effective_batch"], params["optimizer"]) == (
        "tiny", "2", "4", "adamw")
    assert (params["splits.train.rows"], params["splits.val.rows"]) == ("3", "1")
    assert run.data.tags["radground.ray_run_name"] == result.ray_run_name
    inputs = run.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == [digest]
    assert {(t.key, t.value) for t in inputs[0].tags} >= {("mlflow.data.context", "training"),
                                                           ("radground.version_digest", digest)}
    train_losses = _losses(settings, result.run_id, "train_loss")
    assert sorted(train_losses) == [1, 2, 3, 4]
    val = _losses(settings, result.run_id, "val_loss")
    assert sorted(val) == [2, 4]

    # Best = MIN val_loss (Ray's default order is max): the tag, the result and the metrics agree.
    assert [c["step"] for c in result.checkpoints] == [2, 4]
    best_step = min(val, key=val.get)
    assert result.best_val_loss == pytest.approx(val[best_step])
    assert result.best_checkpoint.endswith(f"checkpoint-{best_step:06d}")
    assert run.data.tags["radground.best_checkpoint_uri"] == result.best_checkpoint
    assert result.best_checkpoint.startswith(str(settings.data_dir.resolve() / "checkpoints" / result.ray_run_name))

    # The checkpoint: lineage.json of the contract, no pseudonym; it reloads to the val_loss it was scored with.
    best = Path(result.best_checkpoint)
    lineage = json.loads((best / "lineage.json").read_text(encoding="utf-8"))
    assert (lineage["dataset_digest"], lineage["training_run_id"], lineage["step"]) == (digest, result.run_id,
                                                                                       best_step)
    assert lineage["splits"] == {"train": {"rows": 3, "patients": 1}, "val": {"rows": 1, "patients": 1}}
    assert not any(p in (best / name).read_text(encoding="utf-8") for name in ("lineage.json", "tokenizer.json")
                   for p in (TRAIN, VAL, TEST))
    model = RadGrounderForConditionalGeneration.from_pretrained(str(best)).eval()
    processor = RadGrounderProcessor.from_pretrained(str(best))
    batch = processor.collate([build_mixture(settings, digest, "val")[0]],
                              max_length=processor.image_seq_length + settings.train.max_length)
    with torch.no_grad():
        loss = model(**batch, logits_on_labels_only=True).loss.item()
        again = RadGrounderForConditionalGeneration.from_pretrained(str(best)).eval()
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert loss == pytest.approx(lineage["val_loss"], rel=1e-4)
    assert result.samples_per_s and result.samples_per_s > 0


@pytest.mark.slow
@pytest.mark.integration
def test_killed_worker_resumes_from_its_s3_checkpoint_to_the_same_losses(unbroken, make_s3_settings, s3_server,
                                                                         tmp_path: Path) -> None:
    import boto3

    from radground.settings import TrainSettings

    settings, folder, first = unbroken
    s3 = make_s3_settings(s3_server)
    # The same data_dir (its version, MLflow and Ray token: Ray keeps the first token it read in-process),
    # checkpoints on S3.
    broken_settings = s3.model_copy(update={"train": TrainSettings(**TRAIN_SETTINGS), "data_dir": settings.data_dir})
    marker = tmp_path / "killed"
    from ray import cloudpickle

    from radground.runtime import libraries_off_the_terminal

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    with libraries_off_the_terminal(broken_settings):
        from flows.train import run_training

        result = run_training(None, broken_settings, step_hook=KillOnce(marker, KILL_AT_STEP))
    assert marker.exists()  # rank 1 did die
    assert result.best_checkpoint.startswith(f"s3://{s3.storage.bucket}/checkpoints/{result.ray_run_name}/")
    keys = [o["Key"] for o in boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x",
    ).list_objects_v2(Bucket=s3.storage.bucket, Prefix=f"checkpoints/{result.ray_run_name}/")["Contents"]]
    assert any(k.endswith("checkpoint-000004/lineage.json") for k in keys)
    assert any(k.endswith("checkpoint-000004/model.safetensors") for k in keys)

    # Same seed, same data, same steps: the resumed run's losses are the unbroken run's.
    for key in ("train_loss", "val_loss"):
        assert _losses(broken_settings, result.run_id, key) == pytest.approx(
            _losses(settings, first.run_id, key), rel=1e-4), key


@pytest.mark.slow
@pytest.mark.integration
def test_retrain_deployment_trains_evaluates_on_test_and_registers_a_challenger(unbroken, clean_env, monkeypatch,
                                                                                tmp_path: Path) -> None:
    """The ``retrain`` entry point of prefect.yaml as its trigger runs it: settings from RADGROUND_CONFIG,
    the flow under a Prefect API; train -> evaluate the best checkpoint on the test split -> register."""
    import yaml

    from flows.deployments import retrain
    from models.registry import CHALLENGER, CHAMPION, list_versions, show_version
    from radground.runtime import libraries_off_the_terminal, prefect_api
    from tasks.version import read_manifest

    settings, folder, first = unbroken  # its data_dir: Ray keeps the first auth token it read in-process
    config = tmp_path / "radground.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(settings.data_dir),
                                      "train": {**TRAIN_SETTINGS, "max_steps": 2, "workers": 1},
                                      "model": {"max_new_tokens": 8}}), encoding="utf-8")
    monkeypatch.setenv("RADGROUND_CONFIG", str(config))
    with libraries_off_the_terminal(settings), prefect_api(settings):
        out = retrain()

    digest = read_manifest(folder).digest
    assert out["version"] == digest and out["training_run"] != first.run_id
    registered = show_version(settings, out["model_version"])
    assert registered["aliases"] == [CHALLENGER] and CHAMPION not in registered["aliases"]  # promotion is a person's
    assert registered["run_id"] == out["training_run"] == registered["training_run"]
    assert registered["dataset_digest"] == digest
    client = _client(settings)
    training = client.get_run(out["training_run"])
    assert training.data.params["max_steps"] == "2" and training.data.params["workers"] == "1"  # the config's
    assert registered["checkpoint"] == training.data.tags["radground.best_checkpoint_uri"]

    # The evaluation: a run of its own on the version's test split, its metrics attached to the version.
    (key, metrics), = registered["evaluations"].items()
    assert registered["eval_runs"] == {key: out["eval_run"]}
    evaluation = client.get_run(out["eval_run"])
    assert evaluation.info.status == "FINISHED"
    assert {i.dataset.name for i in evaluation.inputs.dataset_inputs} == {digest}
    assert metrics and set(metrics) <= set(evaluation.data.metrics)
    for name, value in metrics.items():
        assert evaluation.data.metrics[name] == pytest.approx(value)
    assert [v["version"] for v in list_versions(settings)] == [registered["version"]]


# ------------------------------------------------------------------------------------ refusals, before any runtime


def test_no_version_yet_is_refused_before_prefect_and_ray(tmp_path: Path, clean_env: None) -> None:
    from flows.train import run_training
    from models.training import TrainError
    from radground.settings import load_settings

    settings = load_settings(data_dir=tmp_path / "data")
    with pytest.raises(TrainError, match="no dataset version under .* yet: build one with `radground rebuild"):
        run_training(None, settings)
    assert not (settings.data_dir / "prefect").exists()  # nothing started


def test_version_without_val_patient_is_refused_with_the_way_out(tmp_path: Path, clean_env: None) -> None:
    from test_training_data import build_tables

    from flows.train import run_training
    from models.training import TrainError
    from radground.settings import load_settings
    from tasks.version import write_version
    from tasks.version_stage import LATEST

    settings = load_settings(data_dir=tmp_path / "data")
    root = settings.data_dir / "versions"
    manifest = write_version(build_tables(), out_dir=root / ".building", parent=None, drops=["drop-A"],
                             settings_hash="s" * 64, code_version="0.1.0", quarantine_counts={},
                             splits={TRAIN: "train", VAL: "test", TEST: "test"})  # nobody in val
    (root / ".building").rename(root / manifest.digest[:16])
    (root / LATEST).write_text(manifest.digest[:16], encoding="utf-8")
    with pytest.raises(TrainError, match="no val patient.*checkpoints are selected on val.*version.val"):
        run_training(manifest.digest[:12], settings)
    assert not (settings.data_dir / "prefect").exists()


def test_paligemma_preset_without_its_folder_names_the_setting(tmp_path: Path, clean_env: None) -> None:
    from flows.train import run_training
    from radground.errors import ConfigError
    from radground.settings import load_settings

    settings = load_settings(data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match="model.paligemma_path is not set"):
        run_training(None, settings, preset="paligemma2-3b-224")


# ------------------------------------------------------------------------------------ the demo's seed


def test_demo_predicts_the_synthetic_patient_ids_and_their_splits(tmp_path: Path, clean_env: None) -> None:
    """`radground demo` picks a seed whose patients split into train AND val: it predicts the synthetic
    patient IDs without writing the drop, and splits their pseudonyms with the real split function."""
    from radground.cli import _demo_has_val, _synth_patient_ids
    from radground.keys import load_key
    from radground.settings import load_settings
    from radground.synth.drop import generate_drop
    from tasks.deid import patient_pseudonym
    from tasks.version import assign_splits

    for seed in (0, 3):
        generate_drop(tmp_path / f"drop-{seed}", patients=2, seed=seed)
        truth = json.loads((tmp_path / f"drop-{seed}.truth.json").read_text(encoding="utf-8"))
        assert _synth_patient_ids(seed, 2) == [p["patient_id"] for p in truth["patients"]]
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": "k" * 40})
    key = load_key(settings)
    seen = set()
    for seed in range(12):
        ids = _synth_patient_ids(seed, 6)
        pseudonyms = [patient_pseudonym(key, i, "") for i in ids]
        splits = set(assign_splits(pseudonyms, {}, settings.version, key).values())
        assert _demo_has_val(settings, ids) == ({"train", "val"} <= splits)
        seen.add(_demo_has_val(settings, ids))
    assert seen == {True, False}  # the choice matters: some seeds put nobody in val
