"""Quality stage: hand-built tables with planted bad rows; expected outcomes written out by hand."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pyarrow as pa
import pytest

from radground.errors import QualityGateError
from radground.labels import label_map
from radground.schemas import GroundingRecord, ImageRecord, ReportRecord, VQARecord, arrow_schema
from radground.settings import QualitySettings
from tasks.quality import check_gates, check_table, suite_for

DROP = "2026-11-A"


def image(image_id: str, **over) -> dict:
    row = dict(image_id=image_id, patient_pseudonym="P1", study_uid="2.25.1", series_uid="2.25.2", drop_id=DROP,
               modality="CT", body_part="CHEST", study_date=date(2020, 1, 1), slice_index=0, slice_axis="axial",
               slice_position_mm=0.0, rows=4, cols=4, row_spacing_mm=0.7, col_spacing_mm=0.7,
               slice_thickness_mm=None, image_position=[0.0, 0.0, 0.0],
               image_orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], pixel_dtype="int16", pixels=b"\0" * 32,
               has_report=True, source_sha256="ab" * 32)
    return {**row, **over}


def grounding(image_id: str, **over) -> dict:
    spleen = label_map().by_name("spleen")
    row = dict(image_id=image_id, study_uid="2.25.1", patient_pseudonym="P1", drop_id=DROP, language="en",
               sentence_index=0, sentence="The spleen is enlarged.", keyword="spleen", keyword_start=4,
               keyword_end=10, negated=False, class_id=spleen.id, class_name=spleen.name,
               bbox=[10.0, 20.0, 30.0, 40.0], rle="x", area_px=100, rows=64, cols=64)
    return {**row, **over}


def report(study_uid: str, text: str) -> dict:
    return dict(study_uid=study_uid, patient_pseudonym="P1", drop_id=DROP, language="de", text=text, redactions=0,
                sentences=[], keyword_backend=None, translation_status="not_run")


def vqa(vqa_id: str, **over) -> dict:
    row = dict(vqa_id=vqa_id, study_uid="2.25.1", image_id=None, patient_pseudonym="P1", drop_id=DROP,
               language="en", question="Which organ is enlarged?", answer="spleen", question_type="multiple",
               choices=["liver", "spleen"], source_sentence=0, source_keyword="spleen", class_name="spleen",
               generator="template")
    return {**row, **over}


def as_table(rows: list[dict], model) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=arrow_schema(model))


def failed_by_ref(result) -> dict[str, str]:
    return {q.ref: q.reason for q in result.failed}


def test_suite_is_derived_from_the_model():
    names = {(e.expectation_type, getattr(e, "column", None)) for e in suite_for(ImageRecord, "images")}
    for field in ImageRecord.model_fields:
        assert ("expect_column_to_exist", field) in names
    assert ("expect_column_values_to_not_be_null", "image_id") in names
    assert ("expect_column_values_to_not_be_null", "body_part") not in names  # Optional
    assert ("expect_column_values_to_be_unique", "image_id") in names
    assert ("expect_column_values_to_be_between", "rows") in names
    modality = next(e for e in suite_for(ImageRecord, "images") if e.expectation_type ==
                    "expect_column_values_to_be_in_set" and e.column == "modality")
    assert set(modality.value_set) == {"CT", "MR"}


def test_images_duplicates_and_bad_geometry_are_quarantined(tmp_path):
    rows = [image("2.25.10"), image("2.25.11"), image("2.25.12", rows=0), image("2.25.13", modality="US"),
            image("2.25.10", slice_index=1)]
    result = check_table("images", as_table(rows, ImageRecord), ImageRecord, data_dir=tmp_path, drop_id=DROP)
    assert isinstance(result.passed, pa.Table)
    assert result.passed.column("image_id").to_pylist() == ["2.25.11"]
    reasons = [(q.ref, q.reason) for q in result.failed]
    assert reasons == [("2.25.10", "expect_column_values_to_be_unique:image_id"),
                       ("2.25.12", "expect_column_values_to_be_between:rows"),
                       ("2.25.13", "expect_column_values_to_be_in_set:modality"),
                       ("2.25.10", "expect_column_values_to_be_unique:image_id")]
    assert all(q.stage == "quality" and q.item == "row" and q.drop_id == DROP for q in result.failed)
    assert result.stats["rows"] == 5 and result.stats["quarantined"] == 4
    outcomes = {e["name"]: (e["success"], e["unexpected_count"]) for e in result.stats["expectations"]}
    assert len(result.stats["expectations"]) == len(suite_for(ImageRecord, "images"))
    assert outcomes["expect_column_values_to_be_unique:image_id"] == (False, 2)  # both copies of 2.25.10
    assert outcomes["expect_column_values_to_be_between:rows"] == (False, 1)
    assert outcomes["expect_column_values_to_be_in_set:modality"] == (False, 1)
    assert outcomes["expect_column_values_to_not_be_null:image_id"] == (True, 0)
    assert outcomes["expect_column_to_exist:image_id"] == (True, None)  # table-level: no row count
    assert list(tmp_path.iterdir()) == []  # GX runs in memory: no data docs, no stored results with row values


def test_grounding_bbox_area_and_class_rules(tmp_path):
    rows = [grounding("ok1"), grounding("ok2", bbox=[0.0, 0.0, 64.0, 64.0]),
            grounding("outside", bbox=[50.0, 20.0, 70.0, 40.0]),  # x2 = 70 > cols = 64
            grounding("flipped", bbox=[30.0, 20.0, 10.0, 40.0]),  # x1 > x2
            grounding("zero_area", area_px=0),
            grounding("unknown_class", class_id=999, class_name="unobtainium"),
            grounding("wrong_name", class_name="liver")]
    result = check_table("grounding", pd.DataFrame(rows), GroundingRecord, data_dir=tmp_path, drop_id=DROP)
    assert isinstance(result.passed, pd.DataFrame)
    assert result.passed["image_id"].tolist() == ["ok1", "ok2"]
    assert failed_by_ref(result) == {
        "outside": "expect_column_values_to_be_in_set:bbox_in_image",
        "flipped": "expect_column_values_to_be_in_set:bbox_in_image",
        "zero_area": "expect_column_values_to_be_between:area_px",
        "unknown_class": "expect_column_values_to_be_in_set:class_id",
        "wrong_name": "expect_column_pair_values_to_be_in_set:class_id,class_name"}
    assert result.stats["grounded_slices"] == 2


def test_report_text_with_phi_pattern_is_quarantined(tmp_path):
    rows = [report("s1", "Keine Raumforderung der Leber. LWK 5 unauffällig."),
            report("s2", "Rückfragen unter Tel. 089 1234-567."),
            report("s3", "Befundet von Dr. med. K. Schmidt."),
            report("s4", "Milz vergrößert. Befundet von Dr. [NAME].")]  # already scrubbed: fine
    result = check_table("reports", as_table(rows, ReportRecord), ReportRecord, data_dir=tmp_path, drop_id=DROP)
    assert result.passed.column("study_uid").to_pylist() == ["s1", "s4"]
    assert failed_by_ref(result) == {"s2": "expect_column_values_to_be_in_set:no_phi_pattern",
                                     "s3": "expect_column_values_to_be_in_set:no_phi_pattern"}


def test_vqa_answer_must_be_a_choice(tmp_path):
    rows = [vqa("q1"), vqa("q2", question_type="open", choices=[], answer="The spleen."),
            vqa("q3", answer="kidney"), vqa("q4", question_type="essay"), vqa("q1", language="de")]
    result = check_table("vqa", as_table(rows, VQARecord), VQARecord, data_dir=tmp_path, drop_id=DROP)
    assert result.passed.column("vqa_id").to_pylist() == ["q2"]
    assert failed_by_ref(result) == {"q1": "expect_column_values_to_be_unique:vqa_id",
                                     "q3": "expect_column_values_to_be_in_set:answer_in_choices",
                                     "q4": "expect_column_values_to_be_in_set:question_type"}


def test_missing_column_quarantines_every_row(tmp_path):
    df = pd.DataFrame([grounding("a"), grounding("b")]).drop(columns=["rle"])
    result = check_table("grounding", df, GroundingRecord, data_dir=tmp_path, drop_id=DROP)
    assert len(result.passed) == 0
    assert {q.reason for q in result.failed} == {"expect_column_to_exist:rle"}
    assert result.stats["table_failures"][0] == "expect_column_to_exist:rle"


def test_gates_pass_within_limits():
    check_gates({"grounding": {"rows": 400, "quarantine_rate": 0.05, "grounded_slices": 3}}, QualitySettings())


def test_quarantine_rate_gate_names_the_numbers():
    stats = {"images": {"rows": 10, "quarantine_rate": 0.0},
             "grounding": {"rows": 400, "quarantine_rate": 30 / 400, "grounded_slices": 50}}
    with pytest.raises(QualityGateError, match=r"gate max_quarantine_rate: 7\.5% of 400 rows quarantined in "
                                               r"table grounding \(limit 5\.0%\)"):
        check_gates(stats, QualitySettings(max_quarantine_rate=0.05))


def test_zero_grounded_slices_gate():
    with pytest.raises(QualityGateError, match=r"gate min_grounded_slices: 0 grounded slices after quality checks "
                                               r"\(need >= 1\); rows passed per table .*"
                                               r"set quality\.min_grounded_slices=0"):
        check_gates({"grounding": {"rows": 0, "quarantine_rate": 0.0, "grounded_slices": 0}})


def test_no_network_and_no_env_leak(tmp_path, monkeypatch):
    import os
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"quality stage tried to open a connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    before = dict(os.environ)
    result = check_table("vqa", as_table([vqa("q1")], VQARecord), VQARecord, data_dir=tmp_path, drop_id=DROP)
    assert result.stats["passed"] == 1
    assert dict(os.environ) == before


def test_empty_table_passes_with_zero_rate(tmp_path):
    result = check_table("vqa", as_table([], VQARecord), VQARecord, data_dir=tmp_path, drop_id=DROP)
    assert result.passed.num_rows == 0 and result.failed == []
    assert result.stats["quarantine_rate"] == 0.0
