"""Which rows of each drop enter a version: forgotten patients, re-delivered records, conflicts."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from test_version import image

from radground.schemas import QuarantineRecord, arrow_schema
from radground.tables import to_arrow
from tasks.version import ReusedShard, write_shards
from tasks.version_stage import TABLES, CheckedDrop, _VersionParts


def checked(tmp: Path, drop_id: str, images: list, target: int = 2**20) -> CheckedDrop:
    folder = tmp / drop_id
    shards = {}
    for name, model in TABLES.items():
        table = to_arrow(images, model) if name == "images" else arrow_schema(model).empty_table()
        shards[name] = [ReusedShard(folder / e.path, e.sha256, e.rows)
                        for e in write_shards(table, folder, name, target)]
    quarantine = to_arrow([QuarantineRecord(drop_id=drop_id, stage="ingest", item="file", reason="not_dicom",
                                            detail="d", source_sha256="0" * 64, ref=images[0].series_uid)],
                          QuarantineRecord)
    return CheckedDrop(drop_id=drop_id, shards=shards, stats={}, docs=None, quarantine=quarantine)


def test_an_untouched_drop_keeps_its_shards_and_repeats_are_merged(tmp_path):
    a = checked(tmp_path, "A", [image(i, drop="A") for i in range(3)])
    b = checked(tmp_path, "B", [image(i, drop="B") for i in range(2, 5)])  # image 2 again, same content
    parts = _VersionParts(set())
    parts.add(a)
    parts.add(b)
    assert parts.reuse["images"] == a.shards["images"]  # A untouched: carried over
    (b_part,) = parts.parts["images"]
    assert b_part.column("image_id").to_pylist() == ["2.25.3", "2.25.4"] and parts.merged["images"] == 1
    assert parts.quarantine_table().num_rows == 2  # each drop's own quarantine rows


def test_a_conflicting_redelivery_is_quarantined_and_the_first_delivery_kept(tmp_path):
    a = checked(tmp_path, "A", [image(i, drop="A") for i in range(2)])
    changed = image(1, drop="B", seed=7).model_copy(update={"source_sha256": "f" * 64})
    b = checked(tmp_path, "B", [changed, image(5, drop="B")])
    parts = _VersionParts(set())
    parts.add(a)
    parts.add(b)
    assert parts.parts["images"][0].column("image_id").to_pylist() == ["2.25.5"]
    rows = parts.quarantine_table().to_pylist()
    conflict = [r for r in rows if r["reason"] == "conflicting_redelivery"]
    assert conflict == [{"drop_id": "B", "stage": "version", "item": "row", "reason": "conflicting_redelivery",
                         "detail": conflict[0]["detail"], "source_sha256": "f" * 64, "ref": "2.25.1"}]


def test_a_forgotten_patient_leaves_every_row_and_their_quarantine_rows(tmp_path):
    a = checked(tmp_path, "A", [image(0, patient="P1", drop="A"), image(1, patient="P2", drop="A")])
    parts = _VersionParts({"P1"})
    parts.add(a)
    (kept,) = parts.parts["images"]
    assert kept.column("patient_pseudonym").to_pylist() == ["P2"]
    assert parts.quarantine_table().num_rows == 0  # the quarantine row referenced P1's series
    assert pq.read_table(a.shards["images"][0].path).num_rows == 2  # the checked shards stay as they were
    assert isinstance(kept, pa.Table)


def test_forgetting_rewrites_only_the_shards_that_hold_the_patient(tmp_path):
    rows = [image(i, patient="P1" if i == 1 else "P2", drop="A", size=32) for i in range(12)]
    a = checked(tmp_path, "A", rows, target=24 * 2**10)  # a few rows per shard
    assert len(a.shards["images"]) >= 3 and a.shards["images"][0].rows >= 2
    parts = _VersionParts({"P1"})
    parts.add(a)
    (rewritten,) = parts.parts["images"]  # only the first shard held P1
    assert set(rewritten.column("patient_pseudonym").to_pylist()) <= {"P2"}
    assert parts.reuse["images"] == a.shards["images"][1:]
    kept = rewritten.num_rows + sum(s.rows for s in parts.reuse["images"])
    assert kept == 11


# ------------------------------------------------------------------------------- forget: no false assurance
def _settings(tmp_path):
    from radground.settings import load_settings

    return load_settings(data_dir=tmp_path / "data", deid={"key": "forget-unit-test-key-0123456789abcdef"})


def test_forgetting_a_patient_found_nowhere_is_an_error_and_records_nothing(tmp_path, clean_env):
    import pytest

    from radground.buildstate import forgotten_patients
    from tasks.version_stage import ForgetError, forget

    settings = _settings(tmp_path)
    with pytest.raises(ForgetError, match="no patient with this ID/pseudonym in any version or stage output") as caught:
        forget(settings, "P" + "0" * 20)
    assert "--not-yet-delivered" in str(caught.value)
    assert not forgotten_patients(settings) and not (settings.data_dir / "state" / "forgotten.json").exists()


def test_a_patient_not_yet_delivered_is_only_put_on_the_exclusion_list(tmp_path, clean_env):
    from radground.buildstate import forgotten_patients
    from tasks.version_stage import forget

    settings = _settings(tmp_path)
    result = forget(settings, "P" + "0" * 20, not_yet_delivered=True)
    assert result["version"] is None and result["not_yet_delivered"] is True
    assert "recorded on the exclusion list" in result["done"] and "no version written" in result["done"]
    assert forgotten_patients(settings) == {"P" + "0" * 20}
    assert not (settings.data_dir / "versions").exists()


def test_a_patient_delivered_but_not_yet_versioned_counts_as_found(tmp_path, clean_env):
    from radground.buildstate import forgotten_patients
    from radground.schemas import ImageRecord
    from radground.store import open_store
    from radground.tables import write_table
    from tasks.version_stage import forget

    settings = _settings(tmp_path)
    patient = "P" + "C" * 20
    write_table(open_store(settings), "ingest/D/images/2.25.8.parquet", [image(0, patient=patient, drop="D")],
                ImageRecord)
    result = forget(settings, patient)  # no flag needed: the patient is in a stage output
    assert result["version"] is None and "not_yet_delivered" not in result
    assert forgotten_patients(settings) == {patient}


def test_a_forget_names_itself_as_the_lock_holder(tmp_path, clean_env, monkeypatch):
    """A rebuild waiting on a forget must say it waits for a forget, not for a rebuild."""
    import tasks.version_stage as version_stage
    from radground.buildstate import forget_patients, lock_holder

    settings = _settings(tmp_path)
    seen = []

    def record_holder(settings_, pseudonyms):  # runs while forget holds the lock
        seen.append(lock_holder(settings_))
        forget_patients(settings_, pseudonyms)

    monkeypatch.setattr(version_stage, "forget_patients", record_holder)
    version_stage.forget(settings, "P" + "0" * 20, not_yet_delivered=True)
    assert seen and seen[0] is not None and seen[0].command == "forget"
    assert lock_holder(settings) is None  # released
