"""Ingest without Prefect/Ray: discovery rules, quarantine reasons, slice extraction, reports.

The flow itself (Ray, Prefect API, PHI scan of everything written) is tested in
tests/flows/test_rebuild.py.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from radground.imaging import pixels_from_bytes
from radground.schemas import DropReportRow
from radground.settings import load_settings
from radground.store import open_store
from radground.synth.drop import generate_drop
from radground.tables import read_table
from tasks import discover, ingest

KEY = "k" * 40  # a fixed test key: pseudonyms are reproducible inside a test


def settings_for(tmp_path: Path, **ingest_options):
    return load_settings(data_dir=tmp_path / "data", deid={"key": KEY}, ingest=ingest_options)


def quarantine_rows(settings, drop_id: str) -> list[dict]:
    return read_table(open_store(settings), f"ingest/{drop_id}/quarantine.parquet").to_pylist()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, run_ingest):
    root = tmp_path_factory.mktemp("ingest")
    result = generate_drop(root / "drop", patients=3, seed=4)
    truth = json.loads(result.truth_path.read_text(encoding="utf-8"))
    settings = settings_for(root)
    plan, summary = run_ingest(str(result.drop_dir), settings)
    return result, truth, settings, plan, summary


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_counts_reconcile_and_every_bad_input_has_the_truths_reason(synthetic):
    result, truth, settings, plan, summary = synthetic
    files = [p for p in result.drop_dir.rglob("*") if p.is_file() and p.name not in ("reports.csv", "drop.yaml")]
    assert summary.files_in == len(files)
    assert summary.files_in == summary.slices + summary.files_quarantined
    rows = quarantine_rows(settings, summary.drop_id)
    by_sha = {r["source_sha256"]: r["reason"] for r in rows if r["item"] == "file"}
    for bad in truth["bad_files"]:
        assert by_sha[_sha(result.drop_dir / bad["path"])] == bad["kind"], bad["kind"]
    localizers = {s["series_uid"] for s in truth["excluded_series"]}
    for patient in truth["patients"]:
        for study in patient["studies"]:
            for series in study["series"]:
                if series["series_uid"] in localizers:
                    assert by_sha[_sha(result.drop_dir / series["files"][0]["path"])] == "localizer"


def test_orphans_are_quarantined_with_their_reason(synthetic):
    result, truth, settings, plan, summary = synthetic
    rows = quarantine_rows(settings, summary.drop_id)
    assert sum(r["reason"] == "orphan_report" and r["item"] == "report" for r in rows) == len(truth["orphan_reports"])
    orphan_studies = [r for r in rows if r["reason"] == "orphan_study" and r["item"] == "study"]
    assert len(orphan_studies) == len(truth["studies_without_report"])
    orphan_files = {r["source_sha256"] for r in rows if r["reason"] == "orphan_study" and r["item"] == "file"}
    for patient in truth["patients"]:
        for study in patient["studies"]:
            if study["accession"] in truth["studies_without_report"]:
                for series in study["series"]:
                    if series["kind"] == "axial":
                        assert {_sha(result.drop_dir / f["path"]) for f in series["files"]} <= orphan_files


def test_quarantine_rows_carry_no_paths_or_names(synthetic):
    result, truth, settings, plan, summary = synthetic
    text = json.dumps(quarantine_rows(settings, summary.drop_id)).casefold()
    for phi in truth["phi_strings"]:
        assert phi.casefold() not in text
    for path in result.drop_dir.rglob("*"):
        if path.is_file():  # neither the path nor a distinctive file name
            assert path.relative_to(result.drop_dir).as_posix().casefold() not in text
            if len(path.name) >= 8:
                assert path.name.casefold() not in text


def test_slices_hold_exactly_the_dicom_hounsfield_values_in_slice_order(synthetic):
    result, truth, settings, plan, summary = synthetic
    store = open_store(settings)
    keys = list(store.list(f"ingest/{summary.drop_id}/images/"))
    assert len(keys) == summary.series
    sha_to_path = {_sha(p): p for p in result.drop_dir.rglob("*") if p.is_file()}
    rows = [row for key in keys for row in read_table(store, key).to_pylist()]
    assert len(rows) == summary.slices
    for row in rows[:: max(1, len(rows) // 12)]:
        ds = pydicom.dcmread(sha_to_path[row["source_sha256"]])
        expected = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0))
        got = pixels_from_bytes(row["pixels"], row["pixel_dtype"], row["rows"], row["cols"])
        assert np.array_equal(got, expected)
        assert row["pixel_dtype"] == ("int16" if ds.Modality == "CT" else "uint16")
        assert row["image_orientation"] == [float(v) for v in ds.ImageOrientationPatient]
    for key in keys:
        series = read_table(store, key).to_pylist()
        positions = [r["slice_position_mm"] for r in series]
        assert [r["slice_index"] for r in series] == list(range(len(series)))
        assert positions == sorted(positions)
        assert len({r["series_uid"] for r in series}) == 1 and series[0]["series_uid"].startswith("2.25.")


def test_reports_are_scrubbed_and_dates_shift_like_the_images(synthetic):
    result, truth, settings, plan, summary = synthetic
    store = open_store(settings)
    reports = read_table(store, f"ingest/{summary.drop_id}/reports.parquet").to_pylist()
    assert len(reports) == summary.reports == plan.reports_in - summary.reports_quarantined
    images = [r for key in store.list(f"ingest/{summary.drop_id}/images/") for r in read_table(store, key).to_pylist()]
    study_dates = {r["study_uid"]: r["study_date"] for r in images}
    phi = [p.casefold() for p in truth["phi_strings"]]
    checked = 0
    for report in reports:
        text = report["text"].casefold()
        assert not [p for p in phi if p in text]
        day = study_dates.get(report["study_uid"])
        if day is not None:  # the report names its study date, shifted by the same offset as the images
            forms = {day.strftime("%d.%m.%Y"), day.isoformat(), day.strftime("%d/%m/%Y"),
                     f"{day:%B} {day.day}, {day.year}".casefold(), f"{day.day}. "}
            assert any(form.casefold() in text for form in forms), report["study_uid"]
            checked += 1
    assert checked >= 2


def test_orphan_studies_can_contribute_image_only_records(tmp_path, synthetic, run_ingest):
    result, truth, _, _, strict = synthetic
    settings = settings_for(tmp_path, orphan_studies_image_only=True)
    _, summary = run_ingest(str(result.drop_dir), settings)
    assert summary.slices > strict.slices
    assert summary.files_in == summary.slices + summary.files_quarantined
    store = open_store(settings)
    rows = [r for key in store.list(f"ingest/{summary.drop_id}/images/") for r in read_table(store, key).to_pylist()]
    assert any(not r["has_report"] for r in rows) and any(r["has_report"] for r in rows)


def _copy_drop(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _first_axial_series(truth) -> list[str]:
    for patient in truth["patients"]:
        for study in patient["studies"]:
            if study["accession"] in truth["studies_without_report"]:
                continue
            for series in study["series"]:
                if series["kind"] == "axial":
                    return [f["path"] for f in series["files"]]
    raise AssertionError("no reported axial series")


def test_series_rules_geometry_duplicates_burned_in(tmp_path, synthetic, run_ingest):
    result, truth, _, _, _ = synthetic
    drop = _copy_drop(result.drop_dir, tmp_path / "drop")
    paths = _first_axial_series(truth)
    # One slice of a different size makes the whole series inconsistent.
    ds = pydicom.dcmread(drop / paths[0])
    ds.Columns = int(ds.Columns) // 2
    ds.save_as(drop / paths[0])
    settings = settings_for(tmp_path)
    _, summary = run_ingest(str(drop), settings)
    rows = quarantine_rows(settings, summary.drop_id)
    assert sum(r["reason"] == "inconsistent_geometry" for r in rows) == len(paths)

    drop2 = _copy_drop(result.drop_dir, tmp_path / "drop2")
    shutil.copy(drop2 / paths[1], drop2 / "duplicate-copy.dcm")  # same SOP instance delivered twice
    burned = pydicom.dcmread(drop2 / paths[2])
    burned.BurnedInAnnotation = "YES"
    burned.save_as(drop2 / paths[2])
    settings2 = settings_for(tmp_path / "2")
    _, summary2 = run_ingest(str(drop2), settings2)
    reasons = [r["reason"] for r in quarantine_rows(settings2, summary2.drop_id)]
    assert reasons.count("duplicate_instance") == 1 and reasons.count("burned_in_annotation") == 1
    assert summary2.files_in == summary2.slices + summary2.files_quarantined


def test_invalid_report_rows_are_quarantined_not_fatal(tmp_path, synthetic, run_ingest):
    result, _, _, _, _ = synthetic
    drop = _copy_drop(result.drop_dir, tmp_path / "drop")
    with (drop / "reports.csv").open("a", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerow(["A1", "123", "not-a-date", "fr", ""])
    settings = settings_for(tmp_path)
    plan, summary = run_ingest(str(drop), settings)
    rows = quarantine_rows(settings, summary.drop_id)
    bad = [r for r in rows if r["reason"] == "invalid_report_row"]
    assert len(bad) == 1 and "language" in bad[0]["detail"] and "study_date" in bad[0]["detail"]


def test_missing_reports_table_and_wrong_columns_are_clear_errors(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    reader = discover.DropReader(str(drop), settings_for(tmp_path))
    with pytest.raises(discover.DropError, match="no reports.csv at its top"):
        discover.read_reports(reader, "d")
    (drop / "reports.csv").write_text("accession,text\n", encoding="utf-8")
    with pytest.raises(discover.DropError, match="expected .*accession_number"):
        discover.read_reports(reader, "d")
    with pytest.raises(discover.DropError, match="no such folder"):
        discover.DropReader(str(tmp_path / "missing"), settings_for(tmp_path))


def test_pydicom_test_files_are_ingested_or_quarantined_never_crash(tmp_path, pydicom_files_on_disk, run_ingest):
    drop = tmp_path / "drop"
    drop.mkdir()
    sources = pydicom_files_on_disk
    for i, source in enumerate(sources):
        shutil.copy(source, drop / f"f{i:04d}_{Path(source).name}")
    (drop / "reports.csv").write_text(",".join(DropReportRow.model_fields) + "\n", encoding="utf-8")
    settings = settings_for(tmp_path, orphan_studies_image_only=True)
    plan, summary = run_ingest(str(drop), settings)
    assert summary.files_in == len(sources)
    assert summary.files_in == summary.slices + summary.files_quarantined
    rows = quarantine_rows(settings, summary.drop_id)
    files = dict(Counter(r["reason"] for r in rows if r["item"] == "file"))
    assert (len(sources), summary.slices, files) == (PYDICOM_CORPUS_FILES, PYDICOM_CORPUS_SLICES,
                                                      PYDICOM_CORPUS_FILE_REASONS)
    assert summary.file_reasons == PYDICOM_CORPUS_FILE_REASONS
    assert summary.study_reasons == {"orphan_study": PYDICOM_CORPUS_STUDIES} and summary.report_reasons == {}
    # the counts pydicom alone can tell, recounted from the files without radground's discovery
    told, studies = _corpus_by_pydicom(sources)
    assert told == {reason: PYDICOM_CORPUS_FILE_REASONS[reason] for reason in told}
    assert set(told) == {"not_dicom", "truncated", "not_an_image", "unsupported_modality", "no_pixel_data",
                         "excluded_orientation"}
    assert studies == PYDICOM_CORPUS_STUDIES


#: pydicom's corpus (pydicom 3.0.2's test_files + pydicom-data 1.0.0, as locked: 244 files) by the reason
#: ingest quarantines each file with; checked file by file. The counts marked "pydicom" are also recounted
#: by ``_corpus_by_pydicom`` from what pydicom alone reads in the files.
PYDICOM_CORPUS_FILES = 244
#: CT_small, 693_J2KR, bad_sequence, explicit_VR-UN, J2K_pixelrep_mismatch (its normal 22 degrees off z),
#: pydicom-data's axial CT 17106/17136/17166/17196 and 2062/2392/2693/3023/3353, and 4981 and 6273
#: (ORIGINAL\PRIMARY\OTHER, axial): 16 slices.
PYDICOM_CORPUS_SLICES = 16
PYDICOM_CORPUS_FILE_REASONS = {
    # pydicom: InvalidDicomError (READMEs, .json/.dump/.icc/.gz files, files without the DICM preamble)
    "not_dicom": 14,
    # pydicom: emri_small_jpeg_2k_lossless_too_short.dcm, its encapsulated pixel data ends before its delimiter
    "truncated": 1,
    # pydicom: 8 DICOMDIRs and 6 data sets without SOP Class/Instance UID (UN_sequence, priv_SQ, nested_priv_SQ,
    # empty_charset_LEI, meta_missing_tsyntax, no_meta_group_length)
    "not_an_image": 14,
    # pydicom: Modality US, CR, NM, OT, SEG, SR, RTDOSE, RTPLAN, ECG, or none
    "unsupported_modality": 108,
    # pydicom: pydicom-data's 50 CT Image Storage instances IM000000..IM00001D, headers without PixelData
    "no_pixel_data": 50,
    # pydicom-data's scouts 6293 and 6924 (ImageType ORIGINAL\PRIMARY\LOCALIZER)
    "localizer": 2,
    # ImageType DERIVED or SECONDARY: MR_small in 9 encodings (MR_truncated included), MR2_J2KI/J2KR/UNCI,
    # MR-SIEMENS-DICOM-WithOverlays, examples_overlay, eCT_Supplemental, pydicom-data's 7 projection images
    # 4467..4678, and 693_UNCI and 693_J2KI, whose first value is "DERIVED " (a padding space)
    "derived_image": 24,
    # emri_small in 5 encodings: PatientID empty
    "missing_patient_id": 5,
    # pydicom: pydicom-data's 6 sagittal (15820, 15970, 4919, 5011, 5641, 6605) and 2 coronal (4950, 6935)
    # originals, and MR2_UNCR (oblique: its normal lies in the x-y plane, 35 degrees off x)
    "excluded_orientation": 9,
    # 693_UNCR: the SOP Instance UID of 693_J2KR (the same slice in another encoding)
    "duplicate_instance": 1,
}
#: pydicom: reports.csv is empty, so each study of a readable image file is one orphan_study row.
PYDICOM_CORPUS_STUDIES = 42


def _corpus_by_pydicom(paths: list[Path]) -> tuple[dict[str, int], int]:
    """What pydicom alone tells of the corpus, rule by rule in the README's order (not radground's discovery):
    files pydicom refuses, cut short, without SOP UIDs, not CT/MR, without pixels; and the originals with a
    PatientID whose slice normal is more than 25 degrees off the z axis. Plus the number of studies."""
    counts: Counter[str] = Counter()
    studies = set()
    for path in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                counts["not_dicom"] += 1
                continue
        if any("end of file" in str(w.message).lower() for w in caught):
            counts["truncated"] += 1
            continue
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            counts["not_an_image"] += 1
            continue
        studies.add(ds.get("StudyInstanceUID"))
        if ds.get("Modality") not in ("CT", "MR"):
            counts["unsupported_modality"] += 1
        elif "PixelData" not in ds:
            counts["no_pixel_data"] += 1
        else:
            image_type = [str(v).strip() for v in ds.get("ImageType", [])]
            orientation = [float(v) for v in ds.get("ImageOrientationPatient", [])]
            if image_type[:2] == ["ORIGINAL", "PRIMARY"] and "LOCALIZER" not in image_type and ds.get("PatientID") \
                    and len(orientation) == 6:
                normal = np.cross(orientation[:3], orientation[3:])
                if np.degrees(np.arccos(abs(normal[2]) / np.linalg.norm(normal))) > 25:
                    counts["excluded_orientation"] += 1
    return dict(counts), len(studies)


@pytest.mark.integration
def test_a_drop_inside_the_s3_store_is_ingested_the_same_way(tmp_path, synthetic, s3_server, run_ingest):
    result, _, _, _, local_summary = synthetic
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": KEY}, storage={
        "backend": "s3", "endpoint": s3_server, "bucket": "ingest-s3-drop", "access_key": "testing",
        "secret_key": "testing", "max_attempts": 2, "backoff_s": 0.01})
    store = open_store(settings)
    for path in result.drop_dir.rglob("*"):
        if path.is_file():
            store.put_file("drops/site/" + path.relative_to(result.drop_dir).as_posix(), path)
    _, summary = run_ingest("store:drops/site", settings)
    assert (summary.drop_id, summary.slices, summary.files_quarantined) == (
        local_summary.drop_id, local_summary.slices, local_summary.files_quarantined)
    assert store.exists(f"ingest/{summary.drop_id}/summary.json")


def test_work_is_cut_into_balanced_batches_and_whole_series_shards():
    assert discover.split_evenly([str(i) for i in range(10)], 4) == [
        ["0", "1", "2"], ["3", "4", "5"], ["6", "7"], ["8", "9"]]
    assert discover.split_evenly(["a"], 4) == [["a"]] and discover.split_evenly([], 4) == []

    def series(uid: str, n: int) -> discover.SeriesPlan:
        return discover.SeriesPlan("d", uid, "s", "CT", "axial", tuple((f"{uid}{i}", "h") for i in range(n)),
                                   tuple(float(i) for i in range(n)), True)

    plans = [series("a", 30), series("b", 12), series("c", 10), series("d", 9), series("e", 1)]
    shards = discover.shard_series(plans, 2)
    loads = sorted(sum(len(p.files) for p in shard) for shard in shards)
    assert loads == [31, 31]  # largest first onto the lighter group: 30 + 1 | 12 + 10 + 9
    assert sorted(p.series_uid for shard in shards for p in shard) == ["a", "b", "c", "d", "e"]
    assert len(discover.shard_series(plans[:1], 4)) == 1


_COUNTS = re.compile(r"(\d+) (?:files|rows) in = (\d+) (?:slices|reports) \+ (\d+) quarantined(?: \(([^)]*)\))?")


def _by_reason(text: str | None) -> dict[str, int]:
    return {reason: int(n) for n, reason in (part.split(" ", 1) for part in text.split(", "))} if text else {}


def test_the_summary_prints_files_and_report_rows_apart_and_every_line_adds_up(synthetic):
    result, truth, settings, plan, summary = synthetic
    files, reports, studies = summary.lines()
    for line in (files, reports):  # "in = kept + quarantined (n reason, ...)", each as printed
        total, kept, quarantined, reasons = _COUNTS.search(line).groups()
        assert int(total) == int(kept) + int(quarantined) == sum((int(kept), *_by_reason(reasons).values()))
    assert "files in" in files and "orphan_report" not in files and "invalid_report_row" not in files
    assert "rows in" in reports and "orphan_study" not in reports and "truncated" not in reports
    assert _by_reason(_COUNTS.search(reports).group(4)) == {"orphan_report": len(truth["orphan_reports"])}
    # a study without a report is its own row; its files are counted (once) on the files line
    assert f"studies: {len(truth['studies_without_report'])} quarantined " in studies
    rows = quarantine_rows(settings, summary.drop_id)
    assert _by_reason(_COUNTS.search(files).group(4)) == dict(Counter(r["reason"] for r in rows if r["item"] == "file"))


def test_a_summary_written_before_the_split_still_prints_without_claiming_a_split():
    old = ingest.IngestSummary(drop_id="d", files_in=3, slices=1, files_quarantined=2, series=1, reports_in=2,
                               reports=1, reports_quarantined=1,
                               quarantine_reasons={"not_dicom": 2, "orphan_report": 1})
    text = old.line()
    assert "3 files in = 1 slices + 2 quarantined; 1 series" in text
    assert "2 rows in = 1 reports + 1 quarantined\n" in text
    assert text.endswith("quarantine rows (files, reports and studies together): (2 not_dicom, 1 orphan_report)")


def test_an_empty_drop_or_one_without_reports_csv_is_refused_before_it_is_read(tmp_path, s3_server):
    settings = settings_for(tmp_path)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)  # folders, but no file
    with pytest.raises(discover.DropError, match=r"drop .*empty: the folder is empty .* reports\.csv at its top"):
        discover.check_drops([str(empty)], settings)
    (empty / "sub" / "a.dcm").write_bytes(b"x")
    with pytest.raises(discover.DropError, match=r"no reports\.csv at its top.*add its reports\.csv there"):
        discover.check_drops([str(empty)], settings)
    (empty / "reports.csv").write_text("accession_number,patient_id,study_date,language,report_text\n")
    discover.check_drops([str(empty)], settings)  # a header-only table is a valid (empty) drop
    with pytest.raises(discover.DropError, match="no such folder"):
        discover.check_drops([str(tmp_path / "missing")], settings)
    assert not (settings.data_dir / "secrets").exists()  # refused before a key was generated

    s3 = load_settings(data_dir=tmp_path / "data", deid={"key": KEY}, storage={
        "backend": "s3", "endpoint": s3_server, "bucket": "ingest-check-drop", "access_key": "testing",
        "secret_key": "testing", "max_attempts": 2, "backoff_s": 0.01})
    open_store(s3).put("drops/site/a.dcm", b"x")
    with pytest.raises(discover.DropError, match=r"no reports\.csv at its top"):
        discover.check_drops(["store:drops/site"], s3)
