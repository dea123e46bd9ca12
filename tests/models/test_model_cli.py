"""The model commands end to end through the CLI, as a platform engineer runs them after training:
evaluate a training run on the version's test split, register it with that evaluation, promote it,
list and trace it, evaluate the registered version (metrics attached to it), score another system's
answers with --predictions, and predict on a DICOM whose header and file name carry PHI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_inference import PATIENT_NAME, write_ct
from test_registry import trained  # noqa: F401 - the module fixture: a version, a training run, its checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env["RADGROUND_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "radground", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_evaluate_register_promote_trace_and_evaluate_the_registered_version(trained, tmp_path):  # noqa: F811
    settings, digest, run_id, checkpoint = trained
    data = settings.data_dir
    first = cli(data, "evaluate", "--version", digest[:16], "--model", run_id, "--out", str(tmp_path / "e1"))
    assert first.returncode == 0, first.stderr
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text(encoding="utf-8"))
    assert {"closed", "open", "all", "report", "grounding"} <= set(metrics)
    assert metrics["test_set"]["key"] == f"version-{digest[:16]}-test"
    assert metrics["model"]["training_run_id"] == run_id and metrics["model"]["step"] == 4
    assert f"MLflow evaluation run: {metrics['run_id']}" in first.stdout  # the local file names its run

    registered = cli(data, "models", "register", run_id, "--eval", str(tmp_path / "e1"))
    assert registered.returncode == 0, registered.stderr
    version = json.loads(registered.stdout)
    assert "challenger" in version["aliases"] and metrics["test_set"]["key"] in version["evaluations"]
    number = version["version"]

    promoted = cli(data, "models", "promote")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert json.loads(promoted.stdout)["promoted"] is True
    listed = cli(data, "models", "list")
    assert listed.returncode == 0 and "champion" in listed.stdout

    traced = cli(data, "lineage", "trace", "models:/radgrounder@champion")
    assert traced.returncode == 0, traced.stderr
    trace = json.loads(traced.stdout)
    assert trace["resolved_as"] == "registered_model" and trace["version"]["raw_sha256"]

    again = cli(data, "evaluate", "--version", digest[:16], "--model", f"models:/radgrounder/{number}", "--out",
                str(tmp_path / "e2"))
    assert again.returncode == 0, again.stderr
    assert f"metrics attached to radgrounder version {number}" in again.stderr

    # An evaluation of another checkpoint cannot be attached to this one.
    other = json.loads((tmp_path / "e1" / "metrics.json").read_text(encoding="utf-8"))
    other["model"]["step"] = 8
    (tmp_path / "e3").mkdir()
    (tmp_path / "e3" / "metrics.json").write_text(json.dumps(other), encoding="utf-8")
    refused = cli(data, "models", "register", run_id, "--eval", str(tmp_path / "e3"))
    assert refused.returncode == 2 and "it scored another model" in refused.stderr


def test_predictions_of_another_system_are_scored_without_a_model(trained, tmp_path):  # noqa: F811
    settings, digest, run_id, checkpoint = trained
    from models.evaluation import evaluate_version

    # The version's qids come from an evaluation's samples.csv; answer every one "yes" (another system).
    first = evaluate_version(settings, digest, "test", predictions=_empty_predictions(tmp_path), out=tmp_path / "q")
    qids = [line.split(",")[0] for line in (first.samples_path).read_text(encoding="utf-8").splitlines()[1:]]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"qid": q, "answer": "yes"}) + "\n" for q in qids), encoding="utf-8")
    scored = cli(settings.data_dir, "evaluate", "--version", digest[:16], "--predictions", str(answers), "--out",
                 str(tmp_path / "p"))
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["missing"] == 0 and metrics["model"]["kind"] == "predictions"
    assert metrics["all"]["n"] == len([q for q in qids if q.startswith("vqa:")])


def _empty_predictions(tmp_path: Path) -> Path:
    path = tmp_path / "none.jsonl"
    path.write_text("", encoding="utf-8")
    return path


def test_predict_prints_json_on_the_dicom_grid_and_no_phi(trained, tmp_path):  # noqa: F811
    settings, digest, run_id, checkpoint = trained
    dicom = write_ct(tmp_path / "Mustermann_Erika" / "Mustermann_Erika_CT_0001.dcm", z=12.5)
    result = cli(settings.data_dir, "predict", str(dicom), "--model", str(checkpoint), "--task", "ground")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["image"]["rows"] > 0 and Path(found["overlay"]).is_file()
    for box in (g["box"] for g in found["groundings"] if g["box"] is not None):
        assert 0 <= box[0] <= box[2] <= found["image"]["cols"] and 0 <= box[1] <= box[3] <= found["image"]["rows"]
    for text in (result.stdout, result.stderr, found["overlay"]):
        for phi in ("Mustermann", "Erika", "PID-4711-X", "19610812", "Musterstadt", "ACC-99887766", str(dicom.parent)):
            assert phi not in text
    assert PATIENT_NAME.split("^")[0] == "Mustermann"  # the planted name is what the loop looked for

    missing = cli(settings.data_dir, "predict", str(tmp_path / "Mustermann_Erika" / "nope.dcm"), "--model",
                  str(checkpoint))
    assert missing.returncode == 2 and "Mustermann" not in missing.stderr + missing.stdout
