"""Every quarantine reason the ingest stage can write, each produced by an input made for it.

Each case builds a small drop with pydicom: one reported study (accession ACC1) whose axial CT
series of three good slices is always kept, plus the bad input(s) of one reason. The drop goes
through the real discover + ingest path (fixture ``run_ingest``: no Prefect, no Ray), and the test
asserts the whole quarantine histogram by item (the case's reason with its exact count, nothing
else), the number of slices kept, and that the files in reconcile with slices + quarantined.

The reasons come from the code's own vocabulary, ``radground.schemas.INGEST_QUARANTINE_REASONS``:
a test checks that the cases cover exactly that set, another that discover.py and ingest.py emit
no reason literal outside it (and QuarantineRecord refuses an ingest row with an undeclared reason).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydantic
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    RLELossless,
)

from radground.schemas import INGEST_QUARANTINE_REASONS, REPORT_COLUMNS, QuarantineRecord
from radground.settings import load_settings
from radground.store import open_store
from radground.tables import read_table
from tasks import discover, ingest

KEY = "q" * 40
STUDY = "1.2.826.0.1.3680043.8.498.15.1"
SERIES = STUDY + ".1"
ROWS = COLS = 8
GOOD_SLICES = 3  # the base series: z = 0, 1, 2 mm, always kept (except where a case spoils one)


# ----------------------------------------------------------------------------- building files
def ct_slice(z: float, *, sop: str, series: str = SERIES, study: str = STUDY, accession: str = "ACC1",
             orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), ts: str = ExplicitVRLittleEndian) -> Dataset:
    """A plain, valid axial CT slice (8x8, int16, HU = stored - 1024) as pydicom writes it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "PID-0042"
    ds.PatientName = "Kowalski^Jana"
    ds.AccessionNumber = accession
    ds.StudyDate = "20250102"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.arange(ROWS * COLS, dtype=np.int16) * 10 + int(z)).tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def uid(tag: str, number: int) -> str:
    """A valid UID (digits only), distinct per (tag, number)."""
    return f"{STUDY}.9.{int(hashlib.sha256(tag.encode()).hexdigest()[:12], 16)}.{number}"


@dataclass
class Drop:
    """A drop being built: files by name, and the rows of reports.csv."""

    root: Path
    files: dict[str, bytes] = field(default_factory=dict)
    reports: list[list[str]] = field(default_factory=lambda: [["ACC1", "PID-0042", "2025-01-02", "en",
                                                               "Liver normal. No lesion."]])

    def add(self, name: str, ds_or_bytes: Dataset | bytes) -> None:
        self.files[name] = ds_or_bytes if isinstance(ds_or_bytes, bytes) else dicom_bytes(ds_or_bytes)

    def write(self) -> Path:
        self.root.mkdir(parents=True)
        for name, data in self.files.items():
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            (self.root / name).write_bytes(data)
        lines = [",".join(REPORT_COLUMNS)] + [",".join(row) for row in self.reports]
        (self.root / "reports.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return self.root


def base_drop(root: Path) -> Drop:
    drop = Drop(root)
    for i in range(GOOD_SLICES):
        drop.add(f"base/IM{i}.dcm", ct_slice(float(i), sop=uid("base", i)))
    return drop


def variant(z: float, tag: str, change: Callable[[Dataset], None], **kwargs) -> Dataset:
    """A slice of the base series at a fresh position, with one thing changed."""
    ds = ct_slice(z, sop=uid(tag, int(z)), **kwargs)
    change(ds)
    return ds


def _without(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)
    return change


def _set(**values) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return change


# ----------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    build: Callable[[Drop], None]
    files: dict[str, int]  # expected file rows by reason (exact: no other file reason)
    slices: int = GOOD_SLICES
    reports: dict[str, int] = field(default_factory=dict)
    studies: dict[str, int] = field(default_factory=dict)
    found_by_ingest: int = 0  # of the files: quarantined while extracting (ref = the series), not at discovery
    after_plan: Callable[[Path], None] | None = None  # runs between discovery's plan and extraction


def _not_dicom(drop: Drop) -> None:
    drop.add("export_log.txt", b"PACS export log\nexport finished with 0 errors\n")
    drop.add("preview.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)


def _unreadable(drop: Drop) -> None:
    # A deflated transfer syntax whose body is not a deflate stream: the file meta reads, the
    # data set cannot be inflated (zlib.error, not InvalidDicomError).
    ds = ct_slice(5.0, sop=uid("deflate", 5), ts=DeflatedExplicitVRLittleEndian)
    data = dicom_bytes(ds)
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, (0002,0000) UL, its value
    drop.add("deflated.dcm", data[:meta_end] + b"\xde\xad\xbe\xef" * 16)


def _truncated(drop: Drop) -> None:
    # Encapsulated (RLE) pixel data cut half-way: the data set itself ends early -> discovery.
    rle = ct_slice(5.0, sop=uid("cut-rle", 5))
    rle.compress(RLELossless, encoding_plugin="pydicom")
    data = dicom_bytes(rle)
    drop.add("cut-rle.dcm", data[: len(data) - len(rle.PixelData) // 2])
    # Native pixel data cut half-way: the header reads whole, the pixels are short -> extraction.
    native = ct_slice(6.0, sop=uid("cut-native", 6))
    data = dicom_bytes(native)
    drop.add("cut-native.dcm", data[: len(data) - len(native.PixelData) // 2])


def _not_an_image(drop: Drop) -> None:
    ds = Dataset()  # a DICOMDIR-like file: valid file meta, no SOP Class/Instance UID in the data set
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid("dir", 1)
    ds.FileSetID = "EXPORT"
    ds.PatientID = "PID-0042"
    drop.add("DICOMDIR", ds)


def _orphan_study(drop: Drop) -> None:
    other = STUDY + ".2"
    for i in range(2):  # a second study of the patient, which reports.csv does not name
        drop.add(f"other/IM{i}.dcm", ct_slice(float(i), sop=uid("other", i), study=other, series=other + ".1",
                                              accession="ACC2"))


def _inconsistent_geometry(drop: Drop) -> None:
    series = STUDY + ".3"
    for i in range(3):  # its own series: one slice of a different size spoils all three
        ds = ct_slice(float(i), sop=uid("mixed", i), series=series)
        if i == 1:
            ds.Rows = ds.Columns = 4
            ds.PixelData = ds.PixelData[: 4 * 4 * 2]
        drop.add(f"mixed/IM{i}.dcm", ds)


def _excluded_orientation(drop: Drop) -> None:
    planes = {"sagittal": (0, 1, 0, 0, 0, -1), "coronal": (1, 0, 0, 0, 0, -1),
              "oblique": (1, 0, 0, 0, 0.6, -0.8)}  # oblique: the normal is 53 degrees off z, 37 off y
    for n, (name, orientation) in enumerate(planes.items()):
        drop.add(f"{name}.dcm", ct_slice(0.0, sop=uid(name, n), series=f"{STUDY}.4{n}", orientation=orientation))


def _source_changed(path: Path) -> None:
    (path / "base" / "IM1.dcm").write_bytes((path / "base" / "IM1.dcm").read_bytes() + b"\0\0")


def _no_decoder(drop: Drop) -> None:
    # MPEG-2 video: pydicom knows the syntax, nothing installed decodes it.
    ds = ct_slice(5.0, sop=uid("mpeg2", 5), ts=MPEG2MPML)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    drop.add("mpeg2.dcm", ds)


def _undecodable(drop: Drop) -> None:
    # RLE Lossless (decodable) whose fragment is not an RLE stream: its header claims 9 segments.
    ds = ct_slice(5.0, sop=uid("rle-garbage", 5), ts=RLELossless)
    ds.PixelData = encapsulate([(9).to_bytes(4, "little") + b"\x00" * 60 + b"\x81" * 64])
    ds["PixelData"].VR = "OB"
    drop.add("rle-garbage.dcm", ds)


def _unsupported_pixels(drop: Drop) -> None:
    frames = ct_slice(5.0, sop=uid("frames", 5))
    frames.NumberOfFrames = 2
    frames.PixelData = frames.PixelData * 2
    drop.add("two-frames.dcm", frames)
    rgb = ct_slice(6.0, sop=uid("rgb", 6))
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit, rgb.PixelRepresentation = 8, 8, 7, 0
    rgb.PixelData = bytes(ROWS * COLS * 3)
    drop.add("rgb.dcm", rgb)


CASES: dict[str, Case] = {
    "not_dicom": Case(_not_dicom, {"not_dicom": 2}),
    "unreadable": Case(_unreadable, {"unreadable": 1}),
    "truncated": Case(_truncated, {"truncated": 2}, found_by_ingest=1),
    "not_an_image": Case(_not_an_image, {"not_an_image": 1}),
    "unsupported_modality": Case(lambda d: (d.add("us.dcm", variant(5, "us", _set(Modality="US"))),
                                            d.add("nomod.dcm", variant(6, "nomod", _without("Modality")))),
                                 {"unsupported_modality": 2}),
    "no_pixel_data": Case(lambda d: d.add("header-only.dcm", variant(5, "nopix", _without("PixelData"))),
                          {"no_pixel_data": 1}),
    "burned_in_annotation": Case(lambda d: d.add("burned.dcm", variant(5, "burned", _set(BurnedInAnnotation="YES"))),
                                 {"burned_in_annotation": 1}),
    "localizer": Case(lambda d: d.add("scout.dcm", variant(5, "scout", _set(
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))), {"localizer": 1}),
    # the third as pydicom's 693_UNCI.dcm has it: "DERIVED " (a CS value's padding space is not significant)
    "derived_image": Case(lambda d: (
        d.add("derived.dcm", variant(5, "derived", _set(ImageType=["DERIVED", "PRIMARY", "AXIAL"]))),
        d.add("secondary.dcm", variant(6, "secondary", _set(ImageType=["ORIGINAL", "SECONDARY", "AXIAL"]))),
        d.add("padded.dcm", variant(7, "padded", _set(ImageType=["DERIVED ", "PRIMARY", "AXIAL"])))),
        {"derived_image": 3}),
    "missing_uid": Case(lambda d: d.add("noseries.dcm", variant(5, "noseries", _without("SeriesInstanceUID"))),
                        {"missing_uid": 1}),
    # "0-" sorts first: the study's first header lacks the PatientID its report is scrubbed and shifted with
    "missing_patient_id": Case(lambda d: (
        d.add("0-nopid.dcm", variant(5, "nopid", _without("PatientID"))),
        d.add("emptypid.dcm", variant(6, "emptypid", _set(PatientID="")))), {"missing_patient_id": 2}),
    "missing_geometry": Case(lambda d: (
        d.add("nospacing.dcm", variant(5, "nospacing", _without("PixelSpacing"))),
        d.add("noposition.dcm", variant(6, "noposition", _without("ImagePositionPatient"))),
        d.add("noorientation.dcm", variant(7, "noorientation", _without("ImageOrientationPatient"))),
        d.add("norows.dcm", variant(8, "norows", _without("Rows")))), {"missing_geometry": 4}),
    "excluded_orientation": Case(_excluded_orientation, {"excluded_orientation": 3}),
    "orphan_report": Case(lambda d: d.reports.append(["ACC-NONE", "PID-0099", "2025-01-03", "de", "Leber o.B."]),
                          {}, reports={"orphan_report": 1}),
    "orphan_study": Case(_orphan_study, {"orphan_study": 2}, studies={"orphan_study": 1}),
    "invalid_report_row": Case(lambda d: d.reports.append(["ACC1", "PID-0042", "2025-01-02", "fr", "Foie normal."]),
                               {}, reports={"invalid_report_row": 1}),
    "inconsistent_geometry": Case(_inconsistent_geometry, {"inconsistent_geometry": 3}),
    "duplicate_instance": Case(lambda d: d.add("copy-of-IM1.dcm", d.files["base/IM1.dcm"]),
                               {"duplicate_instance": 1}),
    "duplicate_position": Case(lambda d: d.add("same-z.dcm", ct_slice(1.0, sop=uid("same-z", 1))),
                               {"duplicate_position": 1}),
    "source_changed": Case(lambda d: None, {"source_changed": 1}, slices=GOOD_SLICES - 1, found_by_ingest=1,
                           after_plan=_source_changed),
    "no_decoder": Case(_no_decoder, {"no_decoder": 1}, found_by_ingest=1),
    "undecodable": Case(_undecodable, {"undecodable": 1}, found_by_ingest=1),
    "unsupported_pixels": Case(_unsupported_pixels, {"unsupported_pixels": 2}, found_by_ingest=2),
    # SOPInstanceUID present (discovery only asks for presence) but empty: no new UID can be derived from it
    "deid_failed": Case(lambda d: d.add("empty-sop.dcm", variant(5, "empty-sop", _set(SOPInstanceUID=""))),
                        {"deid_failed": 1}, found_by_ingest=1),
}


# ----------------------------------------------------------------------------- running a case
def ingest_case(tmp_path: Path, case: Case, run_ingest, monkeypatch: pytest.MonkeyPatch):
    drop = base_drop(tmp_path / "drop")
    case.build(drop)
    root = drop.write()
    if case.after_plan is not None:
        planned = discover.plan_drop

        def plan_then_change(*args, **kwargs):
            plan = planned(*args, **kwargs)
            case.after_plan(root)
            return plan

        monkeypatch.setattr(discover, "plan_drop", plan_then_change)
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": KEY})
    plan, summary = run_ingest(str(root), settings)
    rows = read_table(open_store(settings), f"ingest/{summary.drop_id}/quarantine.parquet").to_pylist()
    return drop, summary, rows


@pytest.mark.parametrize("reason", list(CASES))
def test_each_reason_is_produced_with_its_exact_count(reason, tmp_path, run_ingest, monkeypatch):
    case = CASES[reason]
    drop, summary, rows = ingest_case(tmp_path, case, run_ingest, monkeypatch)

    def histogram(item: str) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in rows if r["item"] == item))

    assert (histogram("file"), histogram("report"), histogram("study")) == (case.files, case.reports, case.studies)
    assert (summary.file_reasons, summary.report_reasons, summary.study_reasons) == (
        case.files, case.reports, case.studies)
    assert summary.slices == case.slices
    # files in = slices + quarantined, counted from what was written into the drop
    assert summary.files_in == len(drop.files) == summary.slices + sum(case.files.values())
    assert summary.reports_in == len(drop.reports) == summary.reports + sum(case.reports.values())
    # where it was found: extraction rows name their (pseudonymous) series, discovery rows do not
    file_rows = [r for r in rows if r["item"] == "file"]
    assert sum(r["ref"] is not None for r in file_rows) == case.found_by_ingest
    shas = {hashlib.sha256(data).hexdigest() for data in drop.files.values()}  # as delivered
    assert all(r["source_sha256"] in shas for r in file_rows)
    text = json.dumps(rows)  # the rows name files by sha256 only: no header value, no file name
    names = [name for name in drop.files if "." in name]  # "DICOMDIR" is also a word of a detail
    assert not [phi for phi in ("Kowalski", "PID-0042", "ACC1", *names) if phi in text]


def test_the_cases_cover_exactly_the_declared_reasons():
    produced = {reason for case in CASES.values() for reason in (*case.files, *case.reports, *case.studies)}
    assert set(CASES) == produced == set(INGEST_QUARANTINE_REASONS)
    assert len(INGEST_QUARANTINE_REASONS) == len(set(INGEST_QUARANTINE_REASONS)) == 24


def _reason_literals(module) -> set[str]:
    """Every string literal discover.py / ingest.py put where a reason goes: ``reason=`` keywords, the
    second argument of Rejection/reject/reject_file, file_problem's returned (reason, detail) pairs and
    plan_series' (sha, reason, detail) triples."""
    found: set[str] = set()

    def text(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            found.update(t for k in node.keywords if k.arg == "reason" and (t := text(k.value)))
            if name in ("Rejection", "reject", "reject_file") and len(node.args) > 1 and text(node.args[1]):
                found.add(text(node.args[1]))
        if isinstance(node, ast.FunctionDef) and node.name in ("file_problem", "plan_series"):
            size, position = (2, 0) if node.name == "file_problem" else (3, 1)
            found.update(t for inner in ast.walk(node) if isinstance(inner, ast.Tuple) and len(inner.elts) == size
                         and (t := text(inner.elts[position])))
    return found


def test_the_code_emits_no_reason_outside_the_declared_set():
    emitted = _reason_literals(discover) | _reason_literals(ingest)
    assert emitted == set(INGEST_QUARANTINE_REASONS)
    with pytest.raises(pydantic.ValidationError, match="not a declared ingest quarantine reason"):
        QuarantineRecord(drop_id="d", stage="ingest", item="file", reason="no_such_reason", detail="d",
                         source_sha256=None)
    # other stages' reasons are theirs (curate, quality, segment and version name their own)
    QuarantineRecord(drop_id="d", stage="quality", item="row", reason="expect_column_values_to_not_be_null",
                     detail="d", source_sha256=None)
