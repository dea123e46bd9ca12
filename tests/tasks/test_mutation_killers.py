"""Tests written against mutants that `make mutate` (scripts/mutate.py, mutmut) found surviving.

Each test names the mutant(s) it kills: the mutation, planted by hand, makes it fail. Expected values
come from the documented contract or are hand-computed, never from the code under test.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from test_version import image

import tasks.version
from radground.schemas import GroundingRecord, QuarantineRecord, ReportRecord, VQARecord
from radground.settings import VersionSettings
from radground.tables import to_arrow
from tasks.deid import deidentify
from tasks.discover import FileHeader, file_problem, slice_axis
from tasks.scrub import KnownPHI, scrub_report
from tasks.version import ReusedShard, VersionError, assign_splits, write_shards
from tasks.version_stage import TABLES, CheckedDrop, _VersionParts

KEY = b"k" * 32


# --------------------------------------------------------------------------- tasks/version.py


def test_split_buckets_are_half_open_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    """A patient's position x in [0, 1) goes to train for x < train, val for train <= x < train + val, else
    test (assign_splits' docstring; split_position). Positions on the boundaries, exact in binary floating
    point, pin which side each boundary belongs to.
    Kills: `x < train_end` -> `x <= train_end`, `x < val_end` -> `x <= val_end` (tasks/version.py:84)."""
    positions = {"at-0": 0.0, "below-train": 0.499, "at-train": 0.5, "below-val": 0.749, "at-val": 0.75,
                 "top": 0.999}
    monkeypatch.setattr(tasks.version, "split_position", lambda patient, key: positions[patient])
    ratios = VersionSettings(train=0.5, val=0.25, test=0.25)
    assert assign_splits(positions, {}, ratios, KEY) == {
        "at-0": "train", "below-train": "train", "at-train": "val", "below-val": "val", "at-val": "test",
        "top": "test"}


def test_an_unknown_previous_split_names_the_expected_splits_and_the_fix() -> None:
    """House rule: an error names the input, the problem and the fix.
    Kills: the list of split names joined with 'XX, XX', and 'DVC' lower- or upper-cased in the fix
    (tasks/version.py:76-77)."""
    with pytest.raises(VersionError) as info:
        assign_splits(["P2"], {"P1": "train", "P9": "holdout"}, VersionSettings(), KEY)
    message = str(info.value)
    assert "P9 -> 'holdout'" in message  # the input
    assert "expected one of train, val, test" in message  # the problem
    assert "restore it from the DVC remote" in message  # the fix


# --------------------------------------------------------------------------- tasks/version_stage.py

STUDY = "2.25.9"  # test_version.image()'s study and series
SERIES = "2.25.8"


def _report(text: str, drop: str, patient: str = "P1", study: str = STUDY) -> ReportRecord:
    return ReportRecord(study_uid=study, patient_pseudonym=patient, drop_id=drop, language="en", text=text,
                        redactions=0)


def _grounding(image_id: str, drop: str, sentence: int = 0, patient: str = "P1") -> GroundingRecord:
    return GroundingRecord(image_id=image_id, study_uid=STUDY, patient_pseudonym=patient, drop_id=drop,
                           language="en", sentence_index=sentence, sentence="Liver lesion.", keyword="Liver",
                           keyword_start=0, keyword_end=5, negated=False, class_id=5, class_name="liver",
                           bbox=[0.0, 0.0, 2.0, 2.0], rle="04", area_px=4, rows=8, cols=8)


def _vqa(vqa_id: str, image_id: str | None, drop: str) -> VQARecord:
    return VQARecord(vqa_id=vqa_id, study_uid=STUDY, image_id=image_id, patient_pseudonym="P1", drop_id=drop,
                     language="en", question="Is the liver visible?", answer="yes", question_type="closed",
                     choices=[], source_sentence=0, source_keyword="Liver", class_name="liver",
                     generator="template")


def _quarantine(drop: str, ref: str | None) -> QuarantineRecord:
    return QuarantineRecord(drop_id=drop, stage="ingest", item="file", reason="not_dicom", detail="d",
                            source_sha256="0" * 64, ref=ref)


def _drop(tmp: Path, drop_id: str, rows: dict[str, list], quarantine: list[QuarantineRecord]) -> CheckedDrop:
    """A checked drop with shards of all four tables (empty where ``rows`` has none)."""
    folder = tmp / drop_id
    shards = {}
    for name, model in TABLES.items():
        entries = write_shards(to_arrow(rows.get(name, []), model), folder, name, 2**20)
        shards[name] = [ReusedShard(folder / e.path, e.sha256, e.rows) for e in entries]
    return CheckedDrop(drop_id=drop_id, shards=shards, stats={}, docs=None,
                       quarantine=to_arrow(quarantine, QuarantineRecord))


def _version_rows(parts: _VersionParts, name: str, column: str) -> list:
    import pyarrow.parquet as pq

    carried = [v for shard in parts.reuse[name] for v in pq.read_table(shard.path).column(column).to_pylist()]
    return carried + [v for table in parts.parts[name] for v in table.column(column).to_pylist()]


def test_rows_grounded_on_a_conflicting_image_follow_it_into_quarantine_and_repeats_merge(tmp_path: Path) -> None:
    """_VersionParts docstring: an image re-delivered under the same image_id with other content is
    quarantined "and the rows grounded on it" (grounding and VQA); exact repeats of earlier records are merged
    and counted, in every table. Drop B re-delivers image 1 changed, grounds a sentence and a VQA item on
    it, repeats two of A's grounding rows and one of A's reports, and brings image 5 with its own rows.
    Kills in tasks/version_stage.py: _keep's grounding/vqa branch (`and` -> `or`, `in` -> `not in`, the
    table names, row.get(None), the conflict's arguments, lines 229-232), conflicting_images.add(None),
    merged[name] = 1 (line 234), and the table names of add()'s loop (line 204). It found a bug: the VQA
    half of that branch was dead (_key_columns did not read a VQA shard's image_id), now fixed."""
    changed = image(1, drop="B", seed=7).model_copy(update={"source_sha256": "f" * 64})
    a = _drop(tmp_path, "A", {
        "images": [image(0, drop="A"), image(1, drop="A")],
        "reports": [_report("No findings.", "A")],
        "grounding": [_grounding("2.25.0", "A", 0), _grounding("2.25.0", "A", 1), _grounding("2.25.1", "A")],
        "vqa": [_vqa("q-a1", "2.25.1", "A")],
    }, [])
    b = _drop(tmp_path, "B", {
        "images": [changed, image(5, drop="B")],
        "reports": [_report("No findings.", "B"), _report("Liver lesion.", "B", study="2.25.99")],
        "grounding": [_grounding("2.25.0", "B", 0), _grounding("2.25.0", "B", 1), _grounding("2.25.1", "B", 2),
                      _grounding("2.25.5", "B")],
        "vqa": [_vqa("q-b1", "2.25.1", "B"), _vqa("q-b5", "2.25.5", "B")],
    }, [])
    parts = _VersionParts(set())
    parts.add(a)
    parts.add(b)

    assert sorted(_version_rows(parts, "images", "image_id")) == ["2.25.0", "2.25.1", "2.25.5"]
    assert sorted(_version_rows(parts, "images", "drop_id")) == ["A", "A", "B"]  # image 1: A's delivery kept
    assert sorted(_version_rows(parts, "reports", "text")) == ["Liver lesion.", "No findings."]
    assert sorted(zip(_version_rows(parts, "grounding", "image_id"), _version_rows(parts, "grounding", "drop_id"),
                      strict=True)) == [("2.25.0", "A"), ("2.25.0", "A"), ("2.25.1", "A"), ("2.25.5", "B")]
    assert sorted(_version_rows(parts, "vqa", "vqa_id")) == ["q-a1", "q-b5"]
    assert dict(parts.merged) == {"reports": 1, "grounding": 2}

    conflicts = sorted(((r["ref"], r["detail"].split(":")[0], r["source_sha256"])
                        for r in parts.quarantine_table().to_pylist()
                        if r["reason"] == "conflicting_redelivery" and r["drop_id"] == "B" and r["stage"] == "version"),
                       key=str)
    assert conflicts == [("2.25.1", "table grounding", None), ("2.25.1", "table images", "f" * 64),
                         ("2.25.1", "table vqa", None)]
    assert parts.quarantine_table().num_rows == 3


def test_forgetting_drops_the_quarantine_rows_of_every_series_and_study_of_the_patient(tmp_path: Path) -> None:
    """A forgotten patient's rows leave, and so do the quarantine rows that reference any of their series,
    studies or images (refs collected over ALL their rows, not the last one); a quarantine row without a ref, or with
    another patient's, stays.
    Kills in tasks/version_stage.py: `_forgotten_refs |=` -> `=` (line 227), "study_uid" dropped from the
    ref columns (line 221). (fill_null(..., False) -> True / None survives it: pc.is_in gives False, never
    null, for a null ref, so the fill is a no-op: an equivalent mutant.)"""
    other_series = image(1, patient="P1", drop="A").model_copy(update={"series_uid": "2.25.81"})
    p2 = image(2, patient="P2", drop="A").model_copy(update={"study_uid": "2.25.92", "series_uid": "2.25.82"})
    p1_image = image(0, patient="P1", drop="A")
    a = _drop(tmp_path, "A", {"images": [p1_image, other_series, p2]}, [
        _quarantine("A", SERIES), _quarantine("A", "2.25.81"), _quarantine("A", STUDY),  # P1's series, study
        _quarantine("A", p1_image.image_id),  # the quality stage's ref for an image or grounding row: P1's
        _quarantine("A", None), _quarantine("A", "2.25.82"),  # no ref; P2's series
    ])
    parts = _VersionParts({"P1"})
    parts.add(a)
    assert _version_rows(parts, "images", "patient_pseudonym") == ["P2"]
    assert sorted(parts.quarantine_table().column("ref").to_pylist(), key=str) == ["2.25.82", None]


# --------------------------------------------------------------------------- tasks/discover.py

_S = 0.19 ** 0.5  # with 0.9: a unit column vector whose slice normal has |z| = 0.9 exactly


@pytest.mark.parametrize(("orientation", "plane"), [
    # ImageOrientationPatient = row cosines + column cosines; the normal is their cross product (PS3.3
    # C.7.6.2.1.1), worked out by hand here.
    ((1, 0, 0, 0, 1, 0), "axial"),  # normal (0, 0, 1)
    ((1, 0, 0, 0, 0, -1), "coronal"),  # normal (0, 1, 0)
    ((0, 1, 0, 0, 0, -1), "sagittal"),  # normal (-1, 0, 0): the sign does not matter
    ((1, 0, 0, 0, 0.9396926, 0.3420201), "axial"),  # tilted 20 degrees: |z| = cos 20 = 0.94
    ((1, 0, 0, 0, 0.8660254, 0.5), "oblique"),  # tilted 30 degrees: |z| = cos 30 = 0.87 < 0.9
    ((1, 0, 0, 0, _S, 0.9), "coronal"),  # normal (0, -0.9, 0.436): |y| = 0.9, on the threshold: not oblique
    ((1, 0, 0, 0, 0.9, _S), "axial"),  # normal (0, -0.436, 0.9): on the threshold, not oblique
])
def test_slice_axis_names_the_plane_of_the_slice_normal(orientation, plane) -> None:
    """slice_axis: the largest component of the slice normal names the plane; "oblique" when it is below
    0.9 (more than ~25 degrees off every main plane); exactly 0.9 is not oblique.
    Kills in tasks/discover.py slice_axis: `< 0.9` -> `<= 0.9` / `< 1.9`, the plane names, and the row /
    column cosines sliced at another index, abs() dropped."""
    assert slice_axis(orientation) == plane


def _header(**changes) -> FileHeader:
    values = dict(path="a.dcm", sha256="0" * 64, study_uid="2.25.1", series_uid="2.25.2", sop_uid="2.25.3",
                  accession="A1", patient_id="P1", issuer="", modality="CT", image_type=("ORIGINAL", "PRIMARY"),
                  burned_in="NO", orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), position=(0.0, 0.0, 0.0),
                  spacing=(0.5, 0.5), rows=2, cols=2, has_pixels=True, person_names=(), identifiers=(),
                  other_phi=())
    values.update(changes)
    return FileHeader(**values)


def test_file_rules_on_their_edges(clean_env) -> None:
    """file_problem's edges: a 1 x 1 image is an image; 0 rows or 0 columns is missing geometry; only
    ImageType value 2 says PRIMARY/SECONDARY (value 3 is free text, PS3.3 C.7.6.1.1.2); the modality
    refusal names the modality found, or says it is missing.
    Kills in tasks/discover.py file_problem: `rows <= 0` -> `rows <= 1`, `cols <= 0` -> `cols < 0` /
    `cols <= 1`, `image_type[1:2]` -> `[1:3]`, `modality or 'missing'` -> `modality and 'missing'`."""
    from radground.settings import load_settings

    settings = load_settings()
    assert file_problem(_header(rows=1, cols=1), settings) is None
    for empty in (dict(rows=0), dict(cols=0)):
        assert (file_problem(_header(**empty), settings) or ("accepted",))[0] == "missing_geometry", empty
    assert file_problem(_header(image_type=("ORIGINAL", "PRIMARY", "SECONDARY")), settings) is None
    assert (file_problem(_header(image_type=("ORIGINAL", "SECONDARY")), settings) or ("accepted",))[0] == (
        "derived_image")
    reason, detail = file_problem(_header(modality="US"), settings)
    assert reason == "unsupported_modality" and "modality US;" in detail
    assert "modality missing;" in file_problem(_header(modality=""), settings)[1]


# --------------------------------------------------------------------------- tasks/deid.py


def test_dates_whose_basic_action_is_z_or_x_are_shifted_not_emptied() -> None:
    """Under the Retain Longitudinal Temporal Information Modified Dates Option (PS3.15 E.3.6) every date of
    the patient moves back by the patient's one offset, whatever its basic-profile action: StudyDate is Z
    and AcquisitionDate X/Z in the basic profile, ContentDate Z/D. pydicom's CT_small.dcm carries all three.
    Kills in tasks/deid.py _clean: `vr in _DATE_VRS` -> `vr not in _DATE_VRS` (the temporal branch), which
    empties Z dates and removes X/Z ones while D dates still move."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = deidentify(source, b"k" * 32, max_shift_days=365).dataset
    shifts = {}
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate"):
        value = out.get(keyword)
        assert value, f"{keyword} was emptied or removed instead of shifted"
        shifts[keyword] = (datetime.strptime(source.data_element(keyword).value, "%Y%m%d")
                           - datetime.strptime(str(value), "%Y%m%d")).days
    assert len(set(shifts.values())) == 1, shifts  # one offset for the patient
    assert 1 <= shifts["StudyDate"] <= 365, shifts


# --------------------------------------------------------------------------- tasks/scrub.py


@pytest.mark.parametrize(("identifiers", "text", "expected"), [
    # an alphanumeric ID, as written in the header and in another case
    (("AB123456",), "Fall AB123456, Kontrolle ab123456.", "Fall [ID], Kontrolle [ID]."),
    (("XR7K",), "Auftrag XR7K, Kopie xr7k.", "Auftrag [ID], Kopie [ID]."),  # short, not a number, any case
    (("A12",), "Akte A12 liegt vor.", "Akte [ID] liegt vor."),  # 3 characters: long enough to be matched
    (("12", "XR7K"), "Auftrag XR7K.", "Auftrag [ID]."),  # a too-short ID before it does not end the list
])
def test_known_ids_that_are_not_plain_numbers(identifiers, text, expected) -> None:
    """A known ID from the header is removed wherever the report repeats it, whether or not it is a number.
    Kills in tasks/scrub.py _known_spans: the zero-prefix of a non-numeric ID "" -> "XXXX" and the suffix of
    a short non-numeric form "" -> "XXXX" (no alphanumeric ID matched at all), re.IGNORECASE dropped,
    `len(core) < 3` -> `<= 3` / `< 4`, `continue` -> `break`."""
    result = scrub_report(text, KnownPHI(identifiers=identifiers), date_offset_days=None, language="de")
    assert result.text == expected
