"""The synthetic drop: deterministic, real DICOM, anatomy where the truth says, PHI and bad inputs planted."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from radground.errors import SynthError
from radground.schemas import REPORT_COLUMNS, DropInfo
from radground.synth.drop import generate_drop


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "drop"
    result = generate_drop(out, patients=4, seed=7)
    truth = json.loads(result.truth_path.read_text(encoding="utf-8"))
    return result, truth


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _axial_files(truth, modality=None):
    for patient in truth["patients"]:
        for study in patient["studies"]:
            for series in study["series"]:
                if series["kind"] == "axial" and modality in (None, series["modality"]):
                    for f in series["files"]:
                        yield patient, series, f


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    first = generate_drop(tmp_path / "a", patients=2, seed=11)
    second = generate_drop(tmp_path / "b", patients=2, seed=11)
    third = generate_drop(tmp_path / "c", patients=2, seed=12)
    assert _digest_tree(first.drop_dir) == _digest_tree(second.drop_dir)
    assert first.truth_path.read_bytes().replace(b'"drop": "a"', b"") == \
        second.truth_path.read_bytes().replace(b'"drop": "b"', b"")
    assert _digest_tree(first.drop_dir) != _digest_tree(third.drop_dir)


def test_truth_sidecar_lies_outside_the_drop(drop):
    result, _ = drop
    assert result.truth_path.parent == result.drop_dir.parent
    assert not any(p.suffix == ".json" for p in result.drop_dir.rglob("*"))


def test_every_good_file_decodes_as_real_dicom(drop):
    result, truth = drop
    syntaxes = set()
    for patient in truth["patients"]:
        for study in patient["studies"]:
            for series in study["series"]:
                for f in series["files"]:
                    ds = pydicom.dcmread(result.drop_dir / f["path"])
                    pixels = ds.pixel_array
                    syntaxes.add(ds.file_meta.TransferSyntaxUID)
                    assert ds.SOPInstanceUID == f["sop_uid"]
                    assert ds.StudyInstanceUID == study["study_uid"]
                    assert ds.AccessionNumber == study["accession"]
                    if series["kind"] != "axial":
                        assert "LOCALIZER" in ds.ImageType
                        continue
                    expected = (512, 512) if ds.Modality == "CT" else (256, 256)
                    assert pixels.shape == expected
                    assert [float(v) for v in ds.ImageOrientationPatient] == series["image_orientation"]
                    assert len(ds.ImagePositionPatient) == 3 and float(ds.SliceThickness) > 0
                    if ds.Modality == "CT":
                        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
                        assert "RescaleIntercept" in ds and "RescaleSlope" in ds
                    else:
                        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless} <= syntaxes


def test_series_slices_are_parallel_and_ordered_along_the_normal(drop):
    result, truth = drop
    for patient in truth["patients"]:
        for study in patient["studies"]:
            for series in (s for s in study["series"] if s["kind"] == "axial"):
                positions = []
                for f in series["files"]:
                    ds = pydicom.dcmread(result.drop_dir / f["path"], stop_before_pixels=True)
                    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
                    normal = np.cross(iop[:3], iop[3:])
                    positions.append(float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
                gaps = np.diff(positions)
                assert np.all(gaps < 0) and np.allclose(gaps, gaps[0], atol=1e-2)


def test_ct_hounsfield_values_match_the_truth_boxes(drop):
    result, truth = drop
    checked = 0
    for _, _series, f in _axial_files(truth, "CT"):
        boxes = f["boxes"]
        if not {"lung_left", "lung_right"} <= boxes.keys() and "liver" not in boxes:
            continue
        ds = pydicom.dcmread(result.drop_dir / f["path"])
        hu = _hu(ds)
        assert np.median(hu[:8, :8]) < -950  # air in the corner, outside the body box
        for organ in ("lung_left", "lung_right"):
            # Above the diaphragm a lung fills its box; at the base it is a thin rim around the liver.
            if organ in boxes and "liver" not in boxes:
                c0, r0, c1, r1 = boxes[organ]
                assert np.median(hu[r0:r1 + 1, c0:c1 + 1]) < -400, organ
        if "vertebrae" in boxes:
            c0, r0, c1, r1 = boxes["vertebrae"]
            assert hu[r0:r1 + 1, c0:c1 + 1].max() > 500
        if "liver" in boxes:
            c0, r0, c1, r1 = boxes["liver"]
            core = hu[(r0 + r1) // 2 - 3:(r0 + r1) // 2 + 4, (c0 + c1) // 2 - 3:(c0 + c1) // 2 + 4]
            assert -20 < np.median(core) < 160
        checked += 1
    assert checked >= 3


def test_patient_right_lies_on_the_image_left_for_supine_axial(drop):
    # Laterality is derived here from the orientation vector alone: the row direction
    # points to patient left (+x) for supine scans, to patient right when flipped.
    _, truth = drop
    checked = 0
    for _, series, f in _axial_files(truth, "CT"):
        boxes = f["boxes"]
        if {"lung_left", "lung_right"} <= boxes.keys():
            right_col = (boxes["lung_right"][0] + boxes["lung_right"][2]) / 2
            left_col = (boxes["lung_left"][0] + boxes["lung_left"][2]) / 2
            row_dir_x = series["image_orientation"][0]
            assert (right_col < left_col) == (row_dir_x > 0)
            checked += 1
    assert checked > 0


def _header_text(ds: pydicom.Dataset) -> str:
    parts = []
    for elem in ds.iterall():  # recurses into sequences, includes private tags
        if elem.VR not in ("OB", "OW", "SQ"):
            value = elem.value
            # Private elements may come back undecoded (VR UN in implicit VR files).
            parts.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    return "\n".join(parts)


def test_every_planted_phi_value_is_really_in_the_drop(drop):
    result, truth = drop
    reports = (result.drop_dir / "reports.csv").read_text(encoding="utf-8")
    paths = "\n".join(str(p.relative_to(result.drop_dir)) for p in result.drop_dir.rglob("*"))
    for patient in truth["patients"]:
        headers = "\n".join(
            _header_text(pydicom.dcmread(result.drop_dir / series["files"][0]["path"], stop_before_pixels=True))
            for study in patient["studies"] for series in study["series"]
        )
        for value in patient["phi"]:
            assert value in headers or value in reports or value in paths, value
        first = pydicom.dcmread(result.drop_dir / patient["studies"][0]["series"][0]["files"][0]["path"],
                                stop_before_pixels=True)
        assert str(first.PatientName) == patient["name"]
        # The nested-sequence name and the private-tag copy of the patient name.
        assert first.RequestAttributesSequence[0].RequestingPhysician
        block = first.private_block(0x0029, "ACME PACS EXPORT 2.1")
        private_name = block[0x10].value
        if isinstance(private_name, bytes):
            private_name = private_name.decode("utf-8")
        assert private_name.strip() == patient["name"].replace("^", " ")
        family = patient["name"].split("^")[0]
        assert family.casefold() in reports.casefold()  # "GRÖSS" (DICOM upper case) vs "Größ"


def test_bad_inputs_are_bad_in_the_way_the_truth_says(drop):
    result, truth = drop
    kinds = {item["kind"] for item in truth["bad_files"]}
    assert {"truncated", "no_pixel_data", "not_dicom"} <= kinds
    for item in truth["bad_files"]:
        path = result.drop_dir / item["path"]
        assert path.is_file()
        if item["kind"] == "not_dicom":
            with pytest.raises(InvalidDicomError):
                pydicom.dcmread(path)
        elif item["kind"] == "no_pixel_data":
            ds = pydicom.dcmread(path)
            assert "PixelData" not in ds and ds.SOPClassUID.name.endswith("Image Storage")
        elif item["kind"] == "truncated":
            with pytest.raises(Exception):  # noqa: B017 - any read failure is the point
                pydicom.dcmread(path).pixel_array  # noqa: B018


def test_reports_table_follows_the_drop_format(drop):
    result, truth = drop
    with (result.drop_dir / "reports.csv").open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == REPORT_COLUMNS
        rows = list(reader)
    assert {row["language"] for row in rows} <= {"de", "en"}
    assert any("\n" in row["report_text"] for row in rows)
    accessions_in_reports = {row["accession_number"] for row in rows}
    accessions_in_images = {s["accession"] for p in truth["patients"] for s in p["studies"]}
    assert set(truth["orphan_reports"]) <= accessions_in_reports - accessions_in_images
    assert truth["studies_without_report"]
    assert set(truth["studies_without_report"]) <= accessions_in_images - accessions_in_reports
    assert accessions_in_images - accessions_in_reports == set(truth["studies_without_report"])
    info = DropInfo.model_validate(yaml.safe_load((result.drop_dir / "drop.yaml").read_text()))
    assert info.site


def test_reports_state_the_planted_lesion_sizes(drop):
    result, truth = drop
    text = (result.drop_dir / "reports.csv").read_text(encoding="utf-8")
    reported = [s for p in truth["patients"] for s in p["studies"]
                if s["accession"] not in truth["studies_without_report"]]
    sizes = [f["size_mm"] for s in reported for f in s["findings"] if f["size_mm"]]
    assert sizes
    for size_mm in sizes:
        cm = f"{size_mm / 10:.1f}"
        mm = f"{size_mm:.0f}"
        candidates = {cm, cm.replace(".", ","), f"{mm} mm", f"{mm} x "}  # "16 x 12 mm" too
        assert any(c in text for c in candidates), size_mm


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "drop"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SynthError, match=r"not empty.*--force"):
        generate_drop(out, patients=1, seed=0)
    generate_drop(out, patients=1, seed=0, overwrite=True)
    assert not (out / "keep.txt").exists()
