"""Write phantom slices as DICOM files the way a PACS export carries them — PHI included.

Everything identifying that real exports carry is planted on purpose (names, IDs,
dates, addresses, a person name inside a nested sequence, a private tag holding
the patient name) so that de-identification has something real to remove.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)

from radground.synth.reports import Person

#: The transfer syntaxes a synthetic drop mixes; the first three always occur when
#: a drop has at least three series.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
)
PRIVATE_CREATOR = "ACME PACS EXPORT 2.1"
PRIVATE_GROUP = 0x0029


def dicom_name(person: Person, upper: bool = False) -> str:
    """DICOM PN form FAMILY^GIVEN."""
    name = f"{person.family}^{person.given}"
    return name.upper() if upper else name


def dicom_date(value: date) -> str:
    return value.strftime("%Y%m%d")


@dataclass(frozen=True)
class PatientHeader:
    name: str  # already in DICOM PN form
    patient_id: str
    other_id: str
    birth_date: date
    sex: str
    age: str  # DICOM AS, e.g. "067Y"
    address: str


@dataclass(frozen=True)
class StudyHeader:
    study_uid: str
    accession: str
    study_id: str
    study_date: date
    study_time: str  # HHMMSS
    description: str
    referring: Person
    requesting: Person  # lands in a nested sequence
    operator: Person
    institution: str
    institution_address: str
    station: str


@dataclass(frozen=True)
class SeriesHeader:
    series_uid: str
    frame_of_reference_uid: str
    modality: str  # CT | MR
    number: int
    description: str
    transfer_syntax: UID
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_thickness: float
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    ct_signed: bool = False  # CT stored as signed HU, else unsigned with intercept -1024


def image_dataset(
    patient: PatientHeader, study: StudyHeader, series: SeriesHeader, *, sop_uid: str,
    instance: int, position: tuple[float, float, float], pixels: np.ndarray | None,
) -> Dataset:
    """A complete CT/MR image dataset for one slice; ``pixels`` are HU (CT) or raw MR values.

    ``pixels=None`` writes a header-only instance (a "no PixelData" bad input).
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names carry umlauts
    ds.ImageType = list(series.image_type)
    ds.SOPClassUID = CTImageStorage if series.modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = sop_uid
    study_day = dicom_date(study.study_date)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_day
    ds.StudyTime = study.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = study.institution
    ds.InstitutionAddress = study.institution_address
    ds.ReferringPhysicianName = dicom_name(study.referring)
    ds.StationName = study.station
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.OperatorsName = dicom_name(study.operator)
    ds.ManufacturerModelName = "Synthia 128" if series.modality == "CT" else "Magnia 1.5T"

    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = dicom_date(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age
    ds.PatientAddress = patient.address
    ds.OtherPatientIDs = patient.other_id

    ds.BodyPartExamined = "CHEST" if series.modality == "CT" else "ABDOMEN"
    ds.SliceThickness = f"{series.slice_thickness:.2f}"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in (*series.row_dir, *series.col_dir)]
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{position[2]:.3f}"
    ds.PatientPosition = "HFS" if series.row_dir[0] > 0 else "HFP"

    # Where real exports hide a person name: inside a nested sequence.
    request = Dataset()
    request.RequestedProcedureID = f"RP{study.accession[-6:]}"
    request.ScheduledProcedureStepID = f"SPS{study.accession[-6:]}"
    request.RequestingPhysician = dicom_name(study.requesting)
    ds.RequestAttributesSequence = Sequence([request])

    # A vendor private tag that carries the patient name again.
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", patient.name.replace("^", " "))
    block.add_new(0x11, "LO", f"export {study_day}")

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = series.rows
    ds.Columns = series.cols
    ds.PixelSpacing = [f"{v:.6f}" for v in series.pixel_spacing]
    ds.BitsAllocated = 16
    if series.modality == "CT":
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "0" if series.ct_signed else "-1024"
    signed = series.modality == "CT" and series.ct_signed
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if pixels is None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    stored = _stored_values(series, pixels)
    if series.transfer_syntax.is_compressed:
        # Keep the SOP Instance UID: pydicom would otherwise draw a random one.
        ds.compress(series.transfer_syntax, stored, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = series.transfer_syntax
        ds.PixelData = stored.tobytes()
    return ds


def _stored_values(series: SeriesHeader, pixels: np.ndarray) -> np.ndarray:
    """Inverse of the modality LUT: what the file stores for the given HU / MR values."""
    if series.modality != "CT":
        return pixels.astype(np.uint16)
    if series.ct_signed:
        return pixels.astype(np.int16)
    return (pixels.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)


def write_dataset(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
