"""Imported masks: a real DICOM SEG (highdicom) and NIfTI on a 3-slice CT written with pydicom."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from radground.settings import Settings, load_settings
from radground.volume import series_affine
from tasks.deid import pseudonym_uid
from tasks.segment.base import SegmentationError, SeriesVolume
from tasks.segment.imported import ImportedBackend

H, W = 16, 20
KEY = b"k" * 40
SPLEEN, LIVER = 1, 5  # ids of the label map (docs/method.md)
SERIES = "1.2.826.0.1.99.2"
# Written in this order; their z puts them in the volume as (B, C, A): file order is not slice order.
SOPS = {"1.2.826.0.1.99.3.1": 5.0, "1.2.826.0.1.99.3.2": 0.0, "1.2.826.0.1.99.3.3": 2.5}
A, B, C = SOPS
PATIENT = "Doe^Jane"
GOOD = f"labels:\n  Liver: liver\n  Spleen: spleen\n  3: spleen\n  7: liver\nseries:\n  sub/ct.nii.gz: '{SERIES}'\n"


@dataclass
class Case:
    drop: Path
    settings: Settings
    sources: list[Dataset]  # in file order
    volume: SeriesVolume

    @property
    def series_id(self) -> str:
        return pseudonym_uid(KEY, SERIES)

    def backend(self) -> ImportedBackend:
        return ImportedBackend(str(self.drop), self.settings)

    def labels(self, text: str) -> None:
        (self.drop / "masks").mkdir(exist_ok=True)
        (self.drop / "masks" / "labels.yaml").write_text(text)


def ct_slice(sop: str, z: float, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT, "P123", "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.826.0.1.99.1", SERIES, "1.2.826.0.1.99.4"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "ACC1", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "CT", 1, number
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [-20.0, -30.0, z]
    ds.PixelSpacing, ds.SliceThickness = [0.8, 0.6], 2.5  # row spacing 0.8, column spacing 0.6
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = H, W, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = (np.arange(H * W, dtype=np.int16).reshape(H, W) + number).tobytes()
    return ds


def volume_from(files: list[Path]) -> SeriesVolume:
    """The SeriesVolume ingest would build: slices sorted by z, image ids = pseudonyms of the SOP uids."""
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    return SeriesVolume(
        image_ids=tuple(pseudonym_uid(KEY, d.SOPInstanceUID) for d in sources), modality="CT",
        values=np.stack([d.pixel_array for d in sources]), orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        positions=np.array([[float(v) for v in d.ImagePositionPatient] for d in sources]), spacing=(0.8, 0.6))


@pytest.fixture
def case(tmp_path: Path) -> Case:
    drop = tmp_path / "drop"
    (drop / "ct").mkdir(parents=True)
    files = []
    for number, (sop, z) in enumerate(SOPS.items(), start=1):
        files.append(drop / "ct" / f"{number}.dcm")
        ct_slice(sop, z, number).save_as(files[-1], enforce_file_format=True)
    settings = load_settings(data_dir=tmp_path, deid={"key": KEY.decode()})
    return Case(drop, settings, [pydicom.dcmread(f) for f in files], volume_from(files))


def organs() -> dict[str, np.ndarray]:
    """Per source SOP uid: (H, W, 2) liver / spleen masks; asymmetric so a flip would show. B is empty."""
    masks = {sop: np.zeros((H, W, 2), dtype=bool) for sop in SOPS}
    masks[A][2:7, 3:11, 0] = True
    masks[A][10:14, 15:19, 1] = True
    masks[C][9:14, 12:19, 1] = True
    masks[C][0:3, 0:4, 0] = True
    return masks


def write_seg(case: Case, masks: dict[str, np.ndarray], fractional: bool = False, name: str = "seg/organs.dcm",
              segment_labels: tuple[str, str] = ("Liver", "Spleen")) -> None:
    kinds = (codes.SCT.Liver, codes.SCT.Spleen)
    manual = hd.seg.SegmentAlgorithmTypeValues.MANUAL
    descriptions = [hd.seg.SegmentDescription(number, label, codes.SCT.Organ, kind, manual)
                    for number, (label, kind) in enumerate(zip(segment_labels, kinds, strict=True), start=1)]
    pixels = np.stack([masks[d.SOPInstanceUID] for d in case.sources])  # (N, H, W, 2) in source order
    seg = hd.seg.Segmentation(
        case.sources, pixels.astype(np.float32) if fractional else pixels,
        hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        descriptions, series_instance_uid=hd.UID(), series_number=20, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1")
    path = case.drop / "masks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


def expected_from(case: Case, masks: dict[str, np.ndarray]) -> np.ndarray:
    """(S, H, W) class ids, slice k from the SOP whose pseudonym is image_ids[k]; spleen written last."""
    by_id = {pseudonym_uid(KEY, sop): m for sop, m in masks.items()}
    out = np.zeros(case.volume.values.shape, dtype=np.uint8)
    for k, image_id in enumerate(case.volume.image_ids):
        out[k][by_id[image_id][..., 0]] = LIVER
        out[k][by_id[image_id][..., 1]] = SPLEEN
    return out


def nifti_labels(case: Case) -> np.ndarray:
    """(S, H, W) NIfTI label values 3 and 7 on the series grid; written reoriented to RAS+ (x and y flipped)."""
    labels = np.zeros(case.volume.values.shape, dtype=np.uint8)
    labels[0, 1:4, 2:9] = 3
    labels[2, 8:15, 11:17] = 7
    labels[2, 0, 0] = 3
    image = nib.Nifti1Image(labels.transpose(2, 1, 0), series_affine(case.volume))  # (W, H, S)
    canonical = nib.as_closest_canonical(image)
    assert not np.array_equal(np.asanyarray(canonical.dataobj), labels.transpose(2, 1, 0))  # really reoriented
    path = case.drop / "masks" / "sub" / "ct.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(canonical, path)
    return labels


def test_seg_segments_land_on_their_slices_and_pixels(case: Case) -> None:
    masks = organs()
    write_seg(case, masks)
    case.labels("labels:\n  liver: liver\n  SPLEEN: spleen\n")  # segment labels match case-insensitively
    mask = case.backend().segment(case.volume, case.series_id)
    assert mask.dtype == np.uint8 and mask.shape == (3, H, W)
    np.testing.assert_array_equal(mask, expected_from(case, masks))
    assert case.volume.image_ids[2] == pseudonym_uid(KEY, A) and mask[2, 4, 5] == LIVER  # A (file 1) is slice 2
    assert not mask[0].any()  # B: no frame in the SEG


def test_fractional_seg_counts_from_one_half(case: Case) -> None:
    masks = organs()
    write_seg(case, {sop: m * np.float32(0.6) for sop, m in masks.items()} | {B: np.full((H, W, 2), 0.4)},
              fractional=True)
    case.labels("labels:\n  Liver: liver\n  Spleen: spleen\n")
    np.testing.assert_array_equal(case.backend().segment(case.volume, case.series_id), expected_from(case, masks))


def test_nifti_labels_land_on_the_dicom_grid(case: Case) -> None:
    labels = nifti_labels(case)
    case.labels(f"labels:\n  3: spleen\n  7: liver\nseries:\n  sub/ct.nii.gz: '{SERIES}'\n")
    expected = np.select([labels == 3, labels == 7], [SPLEEN, LIVER], 0).astype(np.uint8)
    np.testing.assert_array_equal(case.backend().segment(case.volume, case.series_id), expected)


def test_masks_of_other_series_are_not_used(case: Case) -> None:
    write_seg(case, organs())
    nifti_labels(case)
    case.labels(GOOD)
    other = SeriesVolume(image_ids=tuple(pseudonym_uid(KEY, f"1.2.826.0.1.98.{k}") for k in range(3)), modality="CT",
                         values=case.volume.values, orientation=case.volume.orientation,
                         positions=case.volume.positions, spacing=case.volume.spacing)
    assert not case.backend().segment(other, pseudonym_uid(KEY, "1.2.826.0.1.98")).any()


def test_override_keeps_previous_labels_where_import_has_none(case: Case) -> None:
    masks = organs()
    write_seg(case, masks)
    case.labels("labels:\n  Liver: liver\n  Spleen: spleen\n")
    previous = np.full((3, H, W), 52, dtype=np.uint8)  # aorta everywhere
    merged = case.backend().override(case.volume, case.series_id, previous)
    imported = expected_from(case, masks)
    np.testing.assert_array_equal(merged, np.where(imported > 0, imported, 52))
    assert (merged[0] == 52).all()  # slice B: nothing imported, nothing lost


def test_drop_without_masks_gives_zeros_and_says_so_once(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tasks.segment.imported"):
        for _ in range(2):
            mask = case.backend().segment(case.volume, case.series_id)
            assert mask.shape == (3, H, W) and not mask.any()
    assert [r.levelname for r in caplog.records if "no masks/ folder" in r.message] == ["INFO"]


@pytest.mark.parametrize(("labels", "match"), [
    (None, r"masks/ holds masks but no labels\.yaml"),
    ("labels: [Liver, ", r"masks/labels\.yaml is not valid YAML"),
    ("series: {}\n", r"masks/labels\.yaml has no 'labels:' mapping"),
    (GOOD.replace("7: liver", "7: livre"), r"masks/labels\.yaml: label 7 maps to 'livre', which is not a class"),
    (GOOD.replace("  Spleen: spleen\n", ""), r"masks/seg/organs\.dcm: segment 2 'Spleen' is not under labels:"),
    (GOOD.replace("  7: liver\n", ""), r"masks/sub/ct\.nii\.gz holds label value\(s\) \[7\]"),
    (GOOD.split("series:")[0], r"masks/sub/ct\.nii\.gz is a NIfTI label map but masks/labels\.yaml names no series"),
    (GOOD.replace("sub/ct", "sub/mr"), r"series: lists masks/sub/mr\.nii\.gz, which is not in the drop"),
], ids=["missing", "bad-yaml", "no-labels", "unknown-class", "unknown-segment", "unknown-value", "nifti-no-series",
        "series-file-missing"])
def test_mask_errors_name_the_file_and_what_to_fix(case: Case, labels: str | None, match: str) -> None:
    write_seg(case, organs())
    nifti_labels(case)
    if labels is not None:
        case.labels(labels)
    with pytest.raises(SegmentationError, match=match) as caught:
        case.backend().segment(case.volume, case.series_id)
    message = str(caught.value)
    assert "Doe" not in message and SERIES not in message and A not in message  # no PHI, no source UIDs
