"""Lineage: build runs in MLflow (SQLite under tmp_path) and record-level lineage queries."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from radground.lineage import (
    LineageError,
    LineageRecord,
    lineage_index,
    mlflow_digest,
    pseudonym_for,
    record_build,
    tracking_uri,
    write_lineage,
)
from radground.settings import load_settings

DEID_KEY = "lineage-test-deid-key-0123456789abcdef"
LLM_TOKEN = "sk-lineage-test-token-never-log-me"
S3_SECRET = "s3-lineage-secret-never-log-me"
SOURCE_PATIENT_ID = "MRN-4711-SMITH"
VERSION_A = "a" * 32  # a 32-hex digest fits MLflow's 36-character digest column as is
VERSION_B = "b1" * 32  # a sha256-length digest: MLflow stores its first 32 characters


def expected_pseudonym(key: str, patient_id: str) -> str:
    """tasks.deid's documented recipe, computed independently: HMAC-SHA256(key, 'patient-id' NUL id)."""
    mac = hmac.new(key.encode(), b"patient-id\x00" + patient_id.encode(), hashlib.sha256).hexdigest()
    return "P" + mac[:20].upper()


@pytest.fixture
def settings(tmp_path, clean_env):
    return load_settings(
        data_dir=tmp_path / "data",
        deid={"key": DEID_KEY},
        llm={"api_key": LLM_TOKEN},
        storage={"access_key": "lineage-access", "secret_key": S3_SECRET},
    )


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(settings))


def _build(settings, tmp_path, digest=VERSION_A, **extra):
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "index.html").write_text("<html>data docs</html>", encoding="utf-8")
    manifest = {"digest": digest, "parent_digest": None, "code_version": "0.1.0+test",
                "row_counts": {"images": 120, "reports": 10}, "quarantine_counts": {"ingest": 8}}
    run_id = record_build(
        settings, manifest=manifest, drops=["2026-11-A", "2026-12-B"],
        stage_counts={"ingest": 128, "ground": 120}, stage_seconds={"ingest": 4.25, "ground": 1.5},
        artifacts=[docs], version_uri=tmp_path / "versions" / digest, **extra)
    return run_id, manifest


def test_record_build_logs_params_metrics_artifacts_and_input(settings, tmp_path):
    run_id, manifest = _build(settings, tmp_path)
    client = _client(settings)
    experiment = client.get_experiment_by_name(settings.mlflow.build_experiment)
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED"
    assert Path(settings.data_dir / "mlflow" / "mlflow.db").is_file()
    assert experiment.artifact_location.startswith((settings.data_dir / "mlflow" / "artifacts").resolve().as_uri())

    params = run.data.params
    assert params["settings_hash"] == settings.settings_hash()
    assert params["code_version"] == "0.1.0+test"
    assert params["drops"] == "2026-11-A,2026-12-B"
    assert params["backend.storage"] == "local"
    assert params["backend.segmentation"] == "classical"
    assert params["settings.llm.api_key"] == "**********"

    metrics = run.data.metrics
    assert metrics["count.ingest"] == 128
    assert metrics["seconds.ingest"] == 4.25
    assert metrics["quarantined.ingest"] == 8
    assert metrics["quarantine_rate.ingest"] == pytest.approx(8 / 128)
    assert metrics["rows.images"] == 120

    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"manifest.json", "docs"} <= names
    logged = json.loads(Path(client.download_artifacts(run_id, "manifest.json", str(tmp_path / "dl"))).read_text())
    assert logged == manifest
    assert {a.path for a in client.list_artifacts(run_id, "docs")} == {"docs/index.html"}

    [item] = run.inputs.dataset_inputs
    assert item.dataset.digest == manifest["digest"]
    assert item.dataset.name == manifest["digest"]
    assert json.loads(item.dataset.source)["uri"] == str(tmp_path / "versions" / VERSION_A)
    assert {t.key: t.value for t in item.tags}["mlflow.data.context"] == "build"


def test_record_build_never_logs_a_secret(settings, tmp_path):
    run_id, _ = _build(settings, tmp_path)
    run = _client(settings).get_run(run_id)
    logged = json.dumps([run.data.params, run.data.tags, [i.to_dictionary() for i in run.inputs.dataset_inputs]])
    for secret in (DEID_KEY, LLM_TOKEN, S3_SECRET):
        assert secret not in logged
    for path in (settings.data_dir / "mlflow").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for secret in (DEID_KEY, LLM_TOKEN, S3_SECRET):
                assert secret.encode() not in blob, path


def test_record_build_strips_credentials_from_urls(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "data", llm={"base_url": "http://user:hunter2@127.0.0.1:8000/v1"})
    run_id, _ = _build(settings, tmp_path)
    params = _client(settings).get_run(run_id).data.params
    assert params["settings.llm.base_url"] == "http://127.0.0.1:8000/v1"
    assert "hunter2" not in json.dumps(params)


def test_long_version_digest_is_logged_within_mlflow_limits(settings, tmp_path):
    run_id, _ = _build(settings, tmp_path, digest=VERSION_B)
    [item] = _client(settings).get_run(run_id).inputs.dataset_inputs
    assert item.dataset.digest == VERSION_B[:32] == mlflow_digest(VERSION_B)
    assert item.dataset.name == VERSION_B
    assert {t.key: t.value for t in item.tags}["radground.version_digest"] == VERSION_B


def test_record_build_reads_the_version_stage_manifest_layout(settings, tmp_path):
    manifest = {"digest": VERSION_B, "parent_digest": VERSION_A, "drops": ["d1"], "code_version": "0.1.0",
                "tables": {"images": {"rows": 7, "shards": []}},
                "quarantine_counts": {"ingest": {"no_pixel_data": 2, "burned_in": 1}}}
    run_id = record_build(settings, manifest=manifest, drops=["d1"], stage_counts={"ingest": 10},
                          stage_seconds={}, artifacts=[])
    metrics = _client(settings).get_run(run_id).data.metrics
    assert metrics["rows.images"] == 7
    assert metrics["quarantined.ingest.no_pixel_data"] == 2
    assert metrics["quarantine_rate.ingest"] == pytest.approx(3 / 10)


def test_record_build_rejects_a_manifest_without_digest(settings, tmp_path):
    with pytest.raises(LineageError, match="manifest has no 'digest'"):
        record_build(settings, manifest={}, drops=[], stage_counts={}, stage_seconds={}, artifacts=[])


def test_telemetry_is_off(settings, tmp_path):
    import os

    _build(settings, tmp_path)
    from mlflow.telemetry.client import get_telemetry_client

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert get_telemetry_client() is None


# ---------------------------------------------------------------- lineage index


def _rec(image, drop, sha, patient, version):
    return LineageRecord(image_id=image, drop_id=drop, source_sha256=sha, series_uid=f"2.25.{image}",
                         study_uid="2.25.9", patient_pseudonym=patient, version_digest=version)


@pytest.fixture
def versions(tmp_path):
    """Two versions: A = drop 1 (patients p1, p2, p4); B = drop 1 without p4 (withdrawn) + drop 2 (p2, p3)."""
    p1, p2 = expected_pseudonym(DEID_KEY, SOURCE_PATIENT_ID), "P" + "2" * 20
    p3, p4 = "P" + "3" * 20, "P" + "4" * 20
    drop1 = [("1", "d1", "s1", p1), ("2", "d1", "s2", p1), ("3", "d1", "s3", p2)]
    withdrawn = [("7", "d1", "s7", p4)]
    drop2 = [("4", "d2", "s4", p2), ("5", "d2", "s5", p3), ("6", "d2", "s5", p3)]  # two slices, one file
    root = tmp_path / "versions"
    write_lineage([_rec(*r, VERSION_A) for r in drop1 + withdrawn], root / VERSION_A / "lineage.parquet")
    write_lineage([_rec(*r, VERSION_B) for r in drop1 + drop2], root / VERSION_B / "lineage.parquet")
    (root / VERSION_A / "images").mkdir()
    (root / VERSION_A / "images" / "part-0.parquet").write_bytes(b"not a lineage table")  # must be ignored
    return root, {"p1": p1, "p2": p2, "p3": p3, "p4": p4}


def test_trace_returns_exactly_the_drops_and_raw_hashes(versions):
    root, _ = versions
    index = lineage_index(root)
    assert index.versions() == sorted([VERSION_A, VERSION_B])
    a = index.trace(VERSION_A)
    assert (a["drops"], a["raw_sha256"], a["images"]) == (["d1"], ["s1", "s2", "s3", "s7"], 4)
    b = index.trace(VERSION_B)
    assert (b["drops"], b["raw_sha256"], b["images"]) == (["d1", "d2"], ["s1", "s2", "s3", "s4", "s5"], 6)


def test_trace_of_an_unknown_version_says_so(versions):
    with pytest.raises(LineageError, match="version ffff is not in the lineage index"):
        lineage_index(versions[0]).trace("ffff")


def test_where_used_returns_exactly_the_versions_holding_the_patient(versions):
    root, p = versions
    index = lineage_index(root)
    assert index.where_used(p["p4"]) == {"patient_pseudonym": p["p4"], "versions": [VERSION_A],
                                         "runs": [], "checkpoints": []}
    assert index.where_used(p["p1"])["versions"] == sorted([VERSION_A, VERSION_B])
    assert index.where_used(p["p3"])["versions"] == [VERSION_B]
    assert index.where_used("P" + "F" * 20)["versions"] == []


def test_source_patient_id_is_mapped_through_the_key_and_never_echoed(versions, settings):
    root, p = versions
    pseudonym = pseudonym_for(settings, SOURCE_PATIENT_ID)
    assert pseudonym == p["p1"]
    assert pseudonym_for(settings, p["p2"]) == p["p2"]  # a pseudonym passes through
    result = lineage_index(root).where_used(pseudonym)
    assert result["versions"] == sorted([VERSION_A, VERSION_B])
    assert SOURCE_PATIENT_ID not in json.dumps(result)
    with pytest.raises(LineageError, match="expected a patient pseudonym") as caught:
        lineage_index(root).where_used(SOURCE_PATIENT_ID)
    assert SOURCE_PATIENT_ID not in str(caught.value)


def test_pseudonym_for_without_a_key_refuses_instead_of_inventing_one(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "nokey")
    with pytest.raises(LineageError, match="no de-identification key") as caught:
        pseudonym_for(settings, SOURCE_PATIENT_ID)
    assert SOURCE_PATIENT_ID not in str(caught.value)
    assert not (tmp_path / "nokey" / "secrets").exists()


def test_where_used_lists_the_runs_that_consumed_the_versions(versions, settings, tmp_path):
    root, p = versions
    run_a, _ = _build(settings, tmp_path, digest=VERSION_A)
    run_b, _ = _build(settings, tmp_path, digest=VERSION_B)
    index = lineage_index(root, settings=settings)
    runs = index.where_used(p["p4"])["runs"]
    assert runs == [{"run_id": run_a, "experiment": settings.mlflow.build_experiment, "version_digest": VERSION_A,
                     "context": "build"}]
    assert {r["run_id"] for r in index.where_used(p["p2"])["runs"]} == {run_a, run_b}
    assert {r["run_id"] for r in index.where_used(p["p3"])["runs"]} == {run_b}


def test_write_lineage_refuses_mixed_versions(tmp_path):
    rows = [_rec("1", "d1", "s1", "P" + "1" * 20, VERSION_A), _rec("2", "d1", "s2", "P" + "1" * 20, VERSION_B)]
    with pytest.raises(LineageError, match="2 version digests"):
        write_lineage(rows, tmp_path / "lineage.parquet")


def test_the_tracking_uri_and_experiment_come_from_the_mlflow_settings(tmp_path, clean_env, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # without a server, MLflow puts a non-embedded store's artifacts in ./mlruns
    server_db = tmp_path / "elsewhere" / "mlflow.db"  # stands in for a tracking server's backend store
    server_db.parent.mkdir()
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": DEID_KEY},
                             mlflow={"tracking_uri": f"sqlite:///{server_db}", "build_experiment": "site-a-builds"})
    run_id, _ = _build(settings, tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{server_db}")
    assert client.get_run(run_id).info.experiment_id == client.get_experiment_by_name("site-a-builds").experiment_id
    assert not (settings.data_dir / "mlflow" / "mlflow.db").exists()  # the embedded database stayed unused


# ---------------------------------------------------------------- no false assurance (where-used, forget)


def test_a_pseudonym_is_recognised_in_any_case_not_hashed_as_a_hospital_id(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "nokey")  # no key: a hashed value would raise
    pseudonym = "P" + "ab12" * 5
    assert pseudonym_for(settings, pseudonym.lower()) == pseudonym.upper()
    assert pseudonym_for(settings, f" {pseudonym} ") == pseudonym.upper()


def _cli(data_dir: Path, *args: str):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env |= {"RADGROUND_DATA_DIR": str(data_dir), "RADGROUND_DEID__KEY": DEID_KEY}
    return subprocess.run([sys.executable, "-m", "radground", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_where_used_and_forget_of_a_patient_found_nowhere_fail_and_record_nothing(tmp_path, clean_env):
    data_dir = tmp_path / "data"
    known = expected_pseudonym(DEID_KEY, SOURCE_PATIENT_ID)
    write_lineage([_rec("1", "d1", "s1", known, VERSION_A)], data_dir / "lineage" / f"{VERSION_A[:16]}.parquet")
    exclusion = data_dir / "state" / "forgotten.json"
    exclusion.parent.mkdir(parents=True)
    exclusion.write_text('["P' + "0" * 20 + '"]\n')
    before = exclusion.read_bytes()

    unknown = "99999999"
    where = _cli(data_dir, "lineage", "where-used", "--patient", unknown)
    assert where.returncode != 0
    assert f"no patient with this ID/pseudonym in any version under {data_dir.resolve()}" in where.stderr
    assert unknown not in where.stdout + where.stderr  # never printed back

    forgot = _cli(data_dir, "forget", "--patient", unknown)
    assert forgot.returncode != 0 and "no patient with this ID/pseudonym" in forgot.stderr
    assert "--not-yet-delivered" in forgot.stderr and unknown not in forgot.stdout + forgot.stderr
    assert exclusion.read_bytes() == before  # nothing recorded

    found = _cli(data_dir, "lineage", "where-used", "--patient", known.lower())  # a retyped pseudonym
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["versions"] == [VERSION_A]
