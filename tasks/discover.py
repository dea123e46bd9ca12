"""Discover a drop: read every file's header, reject the unusable, group series, join reports.

Plain functions over paths and records; the flow fans ``scan_files`` out in batches
and runs ``plan_drop`` once. Header values that identify people stay in memory (the
``FileHeader``/``StudyPHI`` objects) and are only ever used to de-identify and scrub;
quarantine rows carry a file's sha256, never its path or name.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import charset_normalizer
import numpy as np
import pydicom
import yaml
from pydantic import ValidationError
from pydicom.errors import InvalidDicomError

from radground.buildstate import listing_fingerprint
from radground.errors import RadgroundError
from radground.keys import load_key
from radground.schemas import DROP_INFO_FILE, REPORT_COLUMNS, REPORTS_FILE, DropInfo, DropReportRow, QuarantineRecord
from radground.settings import Settings
from radground.store import open_store
from tasks.deid import pseudonym_uid

STORE_SCHEME = "store:"
SUPPORTED_MODALITIES = ("CT", "MR")
_GEOMETRY_TOLERANCE = 1e-3  # direction cosines / mm


class DropError(RadgroundError):
    """A drop cannot be read at all (missing folder, unreadable reports.csv, ...)."""


@contextlib.contextmanager
def quiet_dicom() -> Iterator[None]:
    """Silence pydicom's value validation: its warnings and log lines quote element values,
    which can be PHI, and nothing that carries PHI may reach a log."""
    settings = pydicom.config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


# ----------------------------------------------------------------------------- reading a drop
def missing_prefix_message(location: str, settings: Settings) -> str:
    """Why ``store:PREFIX`` names no drop: where it was looked for, PREFIX being relative to storage.prefix."""
    prefix = location[len(STORE_SCHEME):].strip("/") + "/"
    storage = settings.storage
    if storage.backend == "s3":
        where = f"bucket {storage.bucket}, storage.prefix {storage.prefix!r}"
        looked = f"s3://{storage.bucket}/{storage.prefix}{prefix}"
    else:  # the local backend has no storage.prefix: PREFIX is a folder under the store root
        where = f"local store {settings.store_root.absolute()}"
        looked = str(settings.store_root.absolute() / prefix)
    return (f"drop {location}: no such prefix in the object store ({where}): nothing is stored under {looked}. "
            "store:PREFIX is relative to storage.prefix (env RADGROUND_STORAGE__PREFIX); check the PREFIX and "
            "storage.prefix, or upload the drop there first.")


class DropReader:
    """Lists and reads the files of a drop: a local folder, or ``store:PREFIX`` in the object store."""

    def __init__(self, location: str, settings: Settings) -> None:
        self.location = location
        self._settings = settings
        if location.startswith(STORE_SCHEME):
            self._prefix = location[len(STORE_SCHEME):].strip("/") + "/"
            self._root = None
            if not open_store(settings).has_objects(self._prefix):
                raise DropError(missing_prefix_message(location, settings))
        else:
            self._root = Path(location)
            if not self._root.is_dir():
                raise DropError(f"drop {location}: no such folder. Pass a drop folder or store:PREFIX.")

    @staticmethod
    def available(location: str, settings: Settings) -> bool:
        """Can the drop at ``location`` still be read (a folder that exists, or a store prefix with files)?"""
        if location.startswith(STORE_SCHEME):
            return open_store(settings).has_objects(location[len(STORE_SCHEME):].strip("/") + "/")
        return Path(location).is_dir()

    def list_files(self) -> list[str]:
        """Relative paths of every file in the drop, sorted."""
        if self._root is not None:
            return sorted(p.relative_to(self._root).as_posix() for p in self._root.rglob("*") if p.is_file())
        store = open_store(self._settings)
        return [key[len(self._prefix):] for key in store.list(self._prefix)]

    def fingerprint(self, files: Sequence[str]) -> str | None:
        """A cheap listing fingerprint (path, size, mtime) of a local drop; None for a store drop,
        whose listing does not show changes, so it is always re-hashed."""
        return listing_fingerprint(self._root, files) if self._root is not None else None

    def check_inputs(self) -> None:
        """What can be told about the drop without reading it, before any runtime starts (no Prefect,
        no Ray, no key): it holds files, and reports.csv at its top. Stops at the first file found."""
        if self.exists(REPORTS_FILE):
            return
        # (an empty store prefix is refused when the reader is made: "no such prefix")
        if self._root is not None and next((p for p in self._root.rglob("*") if p.is_file()), None) is None:
            raise DropError(f"drop {self.location}: the folder is empty (no file in it or below it). Pass the "
                            "folder the hospital delivered: reports.csv at its top, DICOM files anywhere below "
                            "(see README, 'The drop format'), or let the copy finish first.")
        raise missing_reports_error(self.location)

    def read(self, relative: str) -> bytes:
        if self._root is not None:
            return (self._root / relative).read_bytes()
        return open_store(self._settings).get(self._prefix + relative)

    def exists(self, relative: str) -> bool:
        if self._root is not None:
            return (self._root / relative).is_file()
        return open_store(self._settings).exists(self._prefix + relative)


# ----------------------------------------------------------------------------- per-file headers
@dataclass(frozen=True)
class FileHeader:
    """What discovery needs from one DICOM file. Holds PHI: in memory only, never persisted."""

    path: str
    sha256: str
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    patient_id: str
    issuer: str
    modality: str
    image_type: tuple[str, ...]
    burned_in: str
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    spacing: tuple[float, ...] | None
    rows: int
    cols: int
    has_pixels: bool
    person_names: tuple[str, ...]
    identifiers: tuple[str, ...]
    other_phi: tuple[str, ...]


@dataclass(frozen=True)
class Rejection:
    """A file discovery cannot use, with a reason code and a PHI-free explanation."""

    sha256: str
    reason: str
    detail: str


_ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "IssuerOfPatientID")
_OTHER_KEYWORDS = ("InstitutionName", "InstitutionAddress", "PatientAddress", "StationName",
                   "InstitutionalDepartmentName")


def image_candidates(paths: Sequence[str], settings: Settings) -> tuple[list[str], list[str]]:
    """Split a drop's files: candidate images vs. imported masks (the masks folder).

    reports.csv and drop.yaml at the top are neither; everything else is a candidate
    image, which is either accepted as a slice or quarantined with a reason.
    """
    folder = settings.segmentation.masks_folder.strip("/") + "/"
    masks = [p for p in paths if p.startswith(folder)]
    images = [p for p in paths if not p.startswith(folder) and p not in (REPORTS_FILE, DROP_INFO_FILE)]
    return images, masks


def scan_files(reader: DropReader, paths: Sequence[str]) -> list[FileHeader | Rejection]:
    """Read the header of each file; a file that cannot be used becomes a Rejection."""
    studies_seen: set[str] = set()
    with quiet_dicom():  # the header values read below are used in memory only
        return [scan_one(path, reader.read(path), studies_seen) for path in paths]


def read_dataset(data: bytes, **options) -> tuple[pydicom.Dataset, bool]:
    """Parse DICOM bytes; also say whether the file ended before its data set did.

    pydicom reads a cut-off file leniently (it warns and returns what it got), so the
    warning is the signal. Warnings are recorded, never shown: they may quote PHI.
    """
    with quiet_dicom(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(io.BytesIO(data), **options)
    return ds, any("end of file" in str(w.message).lower() for w in caught)


def scan_one(path: str, data: bytes, studies_seen: set[str]) -> FileHeader | Rejection:
    digest = hashlib.sha256(data).hexdigest()
    try:
        ds, truncated = read_dataset(data, defer_size=1024)
    except InvalidDicomError:
        return Rejection(digest, "not_dicom", "not a DICOM file (no DICM preamble or readable dataset)")
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unreadable
        return Rejection(digest, "unreadable", f"DICOM header cannot be parsed ({type(exc).__name__})")
    if truncated:
        return Rejection(digest, "truncated", "file ends before its data set does; re-export it")
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return Rejection(digest, "not_an_image", "DICOM file without SOP Class/Instance UID (e.g. DICOMDIR)")
    modality = str(ds.get("Modality", "")).upper()
    study_uid = str(ds.get("StudyInstanceUID", ""))
    # Every value that could name someone, for scrubbing the study's report. A study's
    # files share these, and decoding every element is the slowest part of a scan, so
    # it is done for the first file of each study in the batch.
    first_of_study = study_uid not in studies_seen
    studies_seen.add(study_uid)
    return FileHeader(
        path=path,
        sha256=digest,
        study_uid=study_uid,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.SOPInstanceUID),
        accession=str(ds.get("AccessionNumber", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        issuer=str(ds.get("IssuerOfPatientID", "") or ""),
        modality=modality,
        image_type=tuple(str(v).strip().upper() for v in _as_list(ds.get("ImageType", []))),  # CS: spaces pad
        burned_in=str(ds.get("BurnedInAnnotation", "") or "").upper(),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        spacing=_floats(ds.get("PixelSpacing"), 2),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        has_pixels=any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        person_names=_person_names(ds) if first_of_study else (),
        identifiers=tuple(sorted({str(v) for k in _ID_KEYWORDS for v in _as_list(ds.get(k)) if v})),
        other_phi=tuple(sorted({str(v) for k in _OTHER_KEYWORDS for v in _as_list(ds.get(k)) if v})),
    )


def _person_names(ds: pydicom.Dataset) -> tuple[str, ...]:
    """Every PN value anywhere in the data set, nested sequences included."""
    return tuple(sorted({str(e.value) for e in ds.iterall() if e.VR == "PN" and e.value}))


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in _as_list(value))
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


# ----------------------------------------------------------------------------- reports.csv
@dataclass(frozen=True)
class ReportRow:
    """A validated row of reports.csv plus its sha256 (for quarantine rows)."""

    row: DropReportRow
    sha256: str


@dataclass(frozen=True)
class ReportsTable:
    """reports.csv as read: valid rows, quarantined rows, and how the file was decoded and split."""

    rows: list[ReportRow]
    rejected: list[QuarantineRecord]
    encoding: str  # the codec used (declared in drop.yaml, or detected)
    delimiter: str  # "," ";" or "\t"


#: Delimiters a hospital export uses: comma, Excel's German default semicolon, tab.
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}


def read_reports(reader: DropReader, drop_id: str, declared_encoding: str | None = None) -> ReportsTable:
    """Parse and validate reports.csv; invalid rows are quarantined, a missing or unreadable file is an error.

    The encoding is ``declared_encoding`` (drop.yaml ``encoding:``) or detected: UTF-8 with or
    without BOM, else charset-normalizer's best guess (German exports are often Windows-1252).
    The delimiter is whichever of comma, semicolon or tab splits the header into the columns.
    """
    if not reader.exists(REPORTS_FILE):
        raise missing_reports_error(reader.location)
    text, encoding = decode_reports(reader.read(REPORTS_FILE), declared_encoding, reader.location)
    delimiter = _delimiter(text, reader.location)
    table = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    table.fieldnames = [name.strip() for name in table.fieldnames or []]
    expected = list(DropReportRow.model_fields)
    rows, rejected = [], []
    for raw in table:
        digest = hashlib.sha256("\x1f".join(raw.get(k) or "" for k in expected).encode()).hexdigest()
        if None in raw:  # more fields than the header: the row's own text would be cut at a delimiter
            rejected.append(QuarantineRecord(drop_id=drop_id, stage="ingest", item="report",
                                             reason="invalid_report_row", source_sha256=digest,
                                             detail=f"reports.csv row has more fields than the header's "
                                                    f"{len(expected)}; quote fields that contain "
                                                    f"{DELIMITERS[delimiter]}s"))
            continue
        try:
            rows.append(ReportRow(DropReportRow.model_validate(raw), digest))
        except ValidationError as exc:
            fields = sorted({str(err["loc"][0]) for err in exc.errors() if err["loc"]})
            rejected.append(QuarantineRecord(drop_id=drop_id, stage="ingest", item="report",
                                             reason="invalid_report_row", source_sha256=digest,
                                             detail=f"reports.csv row invalid in column(s) {', '.join(fields)}"))
    return ReportsTable(rows, rejected, encoding, delimiter)


def missing_reports_error(location: str) -> DropError:
    return DropError(f"drop {location}: no {REPORTS_FILE} at its top. Every drop carries one (see README, "
                     "'The drop format'); an empty table with the header row is allowed. Pass the drop's top "
                     f"folder, or add its {REPORTS_FILE} there.")


def canonical_location(location: str) -> str:
    """One spelling per drop: an absolute folder path (``drops/a``, ``drops/a/`` and ``./drops/a``
    are one drop, and the registry still finds it from another directory), or ``store:PREFIX``
    without outer slashes."""
    if location.startswith(STORE_SCHEME):
        return STORE_SCHEME + location[len(STORE_SCHEME):].strip("/")
    return str(Path(location).expanduser().resolve())


def check_drops(locations: Sequence[str], settings: Settings) -> None:
    """Reject a missing or empty drop, or one without reports.csv, before anything starts."""
    for location in locations:
        DropReader(location, settings).check_inputs()


def decode_reports(data: bytes, declared: str | None, location: str) -> tuple[str, str]:
    """(text, codec used). The error never quotes the bytes: they are patient IDs and report text."""
    if declared:
        try:
            codec = codecs.lookup(declared).name
        except LookupError:
            raise DropError(f"drop {location}: drop.yaml names encoding {declared!r}, which Python does not "
                            "know. Use a codec name such as utf-8, cp1252 or latin-1.") from None
        if codec == "utf-8":
            codec = "utf-8-sig"  # a BOM is not text
        try:
            return data.decode(codec), codec
        except UnicodeDecodeError as exc:
            raise DropError(f"drop {location}: {REPORTS_FILE} is not valid {declared} (the first bad byte is at "
                            f"offset {exc.start}). Re-export it as {declared}, or correct encoding: in drop.yaml "
                            "(remove it to let radground detect the encoding).") from None
    try:
        return data.decode("utf-8-sig"), "utf-8" + ("-sig" if data.startswith(codecs.BOM_UTF8) else "")
    except UnicodeDecodeError:
        pass
    best = charset_normalizer.from_bytes(data).best()
    if best is None:
        raise DropError(f"drop {location}: {REPORTS_FILE} is not UTF-8 and its encoding could not be detected. "
                        "Save it as UTF-8 (Excel: 'CSV UTF-8'), or name its encoding in drop.yaml "
                        "(e.g. encoding: cp1252).")
    return str(best), best.encoding


def _delimiter(text: str, location: str) -> str:
    """The delimiter whose split of the first line gives exactly the expected columns."""
    header = text.splitlines()[0] if text else ""
    expected = set(REPORT_COLUMNS)
    for delimiter in DELIMITERS:
        names = {name.strip() for name in next(csv.reader([header], delimiter=delimiter), [])}
        if names == expected:
            return delimiter
    # Name only the expected columns found or missing: a file without a header row would
    # otherwise put its first record (a patient ID, report text) into this message.
    def split(delimiter: str) -> list[str]:
        return [n.strip() for n in next(csv.reader([header], delimiter=delimiter), [])]

    best = max(DELIMITERS, key=lambda d: len(expected & set(split(d))))
    fields = split(best)
    found = [n for n in fields if n in expected]
    missing = [n for n in REPORT_COLUMNS if n not in found]
    unknown = len(fields) - len(found)
    raise DropError(f"drop {location}: the first line of {REPORTS_FILE} is not its header row: expected the columns "
                    f"{list(REPORT_COLUMNS)} (any order) separated by comma, semicolon or tab; with "
                    f"{DELIMITERS[best]}s it has {len(fields)} field(s), missing {missing}"
                    + (f", and {unknown} unknown column(s) (not shown: they may be data)" if unknown else "")
                    + ". Fix the header row (see README, 'The drop format').")


def read_drop_info(reader: DropReader) -> DropInfo | None:
    if not reader.exists(DROP_INFO_FILE):
        return None
    try:
        return DropInfo.model_validate(yaml.safe_load(reader.read(DROP_INFO_FILE)))
    except (ValidationError, yaml.YAMLError) as exc:
        raise DropError(f"drop {reader.location}: {DROP_INFO_FILE} is invalid ({exc.__class__.__name__}); "
                        "expected keys site and received_at.") from None


def drop_id_for(info: DropInfo | None, file_hashes: Sequence[str]) -> str:
    """Content-derived drop id: same files, same id; carries no path or name."""
    digest = hashlib.sha256("".join(sorted(file_hashes)).encode()).hexdigest()[:12]
    site = info.site if info is not None else "drop"
    return f"{site}-{digest}"


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class SeriesPlan:
    """One accepted series: its files sorted along the slice normal. Holds PHI in memory."""

    drop_id: str
    series_uid: str
    study_uid: str
    modality: str
    axis: str
    files: tuple[tuple[str, str], ...]  # (path, sha256), in slice order
    positions: tuple[float, ...]
    has_report: bool


@dataclass(frozen=True)
class StudyPHI:
    """Everything identifying known about one study, for scrubbing its report."""

    study_uid: str
    patient_id: str
    issuer: str
    person_names: tuple[str, ...]
    identifiers: tuple[str, ...]
    other: tuple[str, ...]


@dataclass(frozen=True)
class ReportJob:
    report: ReportRow
    study: StudyPHI


@dataclass
class DropPlan:
    drop_id: str
    files_in: int
    series: list[SeriesPlan] = field(default_factory=list)
    reports: list[ReportJob] = field(default_factory=list)
    reports_in: int = 0
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    mask_files: int = 0  # files of the masks folder, for the imported segmentation backend
    reports_encoding: str = ""  # how reports.csv was decoded (declared or detected)

    @property
    def files_quarantined(self) -> int:
        return sum(1 for q in self.quarantine if q.item == "file")


def slice_axis(orientation: Sequence[float]) -> str:
    """Name the plane from the slice normal (row cosines x column cosines)."""
    normal = np.cross(orientation[:3], orientation[3:])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:  # more than ~25 degrees off every main plane
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def plan_drop(drop_id: str, scanned: Sequence[FileHeader | Rejection], table: ReportsTable,
              settings: Settings) -> DropPlan:
    """Apply every file- and series-level rule; join reports to studies by accession."""
    reports = table.rows
    plan = DropPlan(drop_id=drop_id, files_in=len(scanned), reports_in=len(reports) + len(table.rejected),
                    reports_encoding=table.encoding)
    plan.quarantine.extend(table.rejected)

    def reject_file(sha: str, reason: str, detail: str) -> None:
        plan.quarantine.append(QuarantineRecord(drop_id=drop_id, stage="ingest", item="file", reason=reason,
                                                detail=detail, source_sha256=sha))

    headers: list[FileHeader] = []
    for item in scanned:
        if isinstance(item, Rejection):
            reject_file(item.sha256, item.reason, item.detail)
            continue
        problem = file_problem(item, settings)
        if problem:
            reject_file(item.sha256, *problem)
        else:
            headers.append(item)

    by_series: dict[tuple[str, str], list[FileHeader]] = defaultdict(list)
    for header in headers:
        by_series[(header.study_uid, header.series_uid)].append(header)

    # PHI is gathered from every readable header, rejected ones included: a study's first
    # file (the one whose names were decoded) may well be its localizer.
    studies = _study_phi([item for item in scanned if isinstance(item, FileHeader)])
    accession_to_study = {h.accession: h.study_uid for h in headers if h.accession}
    reported_studies: set[str] = set()
    for report in reports:
        study_uid = accession_to_study.get(report.row.accession_number)
        if study_uid is None:
            plan.quarantine.append(QuarantineRecord(
                drop_id=drop_id, stage="ingest", item="report", reason="orphan_report",
                source_sha256=report.sha256, detail="report accession matches no study in this drop"))
            continue
        reported_studies.add(study_uid)
        plan.reports.append(ReportJob(report, studies[study_uid]))

    image_only = settings.ingest.orphan_studies_image_only
    key = load_key(settings)
    for study_uid in sorted(set(studies) - reported_studies):
        plan.quarantine.append(QuarantineRecord(
            drop_id=drop_id, stage="ingest", item="study", reason="orphan_study", source_sha256=None,
            ref=pseudonym_uid(key, study_uid),
            detail="study has no report" + ("; kept as image-only records" if image_only else "")))

    for (study_uid, _), files in sorted(by_series.items()):
        has_report = study_uid in reported_studies
        if not has_report and not image_only:
            for header in files:
                reject_file(header.sha256, "orphan_study",
                            "the file's study has no report (set ingest.orphan_studies_image_only=true to keep)")
            continue
        series_plan, rejected = plan_series(drop_id, files, has_report, settings)
        for sha, reason, detail in rejected:
            reject_file(sha, reason, detail)
        if series_plan is not None:
            plan.series.append(series_plan)
    return plan


def file_problem(header: FileHeader, settings: Settings) -> tuple[str, str] | None:
    if header.modality not in SUPPORTED_MODALITIES:
        return "unsupported_modality", f"modality {header.modality or 'missing'}; only CT and MR are used"
    if not header.has_pixels:
        return "no_pixel_data", "image instance without PixelData"
    if header.burned_in == "YES":
        return "burned_in_annotation", "BurnedInAnnotation is YES: pixels may show PHI"
    if "LOCALIZER" in header.image_type:
        return "localizer", "localizer/scout image (ImageType LOCALIZER)"
    if header.image_type[:1] == ("DERIVED",) or "SECONDARY" in header.image_type[1:2]:
        return "derived_image", "derived or secondary image (ImageType)"
    if not header.study_uid or not header.series_uid:
        return "missing_uid", "Study or Series Instance UID missing"
    if not header.patient_id:
        return "missing_patient_id", "PatientID missing: no pseudonym can be assigned"
    if header.orientation is None or header.position is None or header.spacing is None:
        return "missing_geometry", "ImageOrientationPatient, ImagePositionPatient or PixelSpacing missing"
    if header.rows <= 0 or header.cols <= 0:
        return "missing_geometry", "Rows/Columns missing"
    axis = slice_axis(header.orientation)
    if axis not in settings.ingest.slice_axes:
        return "excluded_orientation", f"{axis} slice; ingest.slice_axes keeps {settings.ingest.slice_axes}"
    return None


def plan_series(
    drop_id: str, files: list[FileHeader], has_report: bool, settings: Settings,
) -> tuple[SeriesPlan | None, list[tuple[str, str, str]]]:
    rejected: list[tuple[str, str, str]] = []
    first = files[0]
    consistent = all(
        (h.rows, h.cols) == (first.rows, first.cols)
        and np.allclose(h.orientation, first.orientation, atol=_GEOMETRY_TOLERANCE)
        and np.allclose(h.spacing, first.spacing, atol=_GEOMETRY_TOLERANCE)
        for h in files
    )
    if not consistent:
        detail = f"series mixes sizes, orientations or pixel spacings across its {len(files)} files"
        return None, [(h.sha256, "inconsistent_geometry", detail) for h in files]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    ordered = sorted(files, key=lambda h: (float(np.dot(normal, h.position)), h.sop_uid))
    kept: list[FileHeader] = []
    seen_positions: list[float] = []
    seen_sops: set[str] = set()
    for header in ordered:
        position = float(np.dot(normal, header.position))
        if header.sop_uid in seen_sops:
            rejected.append((header.sha256, "duplicate_instance", "same SOP Instance UID delivered twice"))
        elif seen_positions and abs(position - seen_positions[-1]) < _GEOMETRY_TOLERANCE:
            rejected.append((header.sha256, "duplicate_position", "another slice of the series has this position"))
        else:
            kept.append(header)
            seen_positions.append(position)
            seen_sops.add(header.sop_uid)
    plan = SeriesPlan(
        drop_id=drop_id, series_uid=first.series_uid, study_uid=first.study_uid, modality=first.modality,
        axis=slice_axis(first.orientation), files=tuple((h.path, h.sha256) for h in kept),
        positions=tuple(seen_positions), has_report=has_report,
    )
    return plan, rejected


def _study_phi(headers: Sequence[FileHeader]) -> dict[str, StudyPHI]:
    names: dict[str, set[str]] = defaultdict(set)
    ids: dict[str, set[str]] = defaultdict(set)
    other: dict[str, set[str]] = defaultdict(set)
    patient: dict[str, tuple[str, str]] = {}
    for h in headers:
        names[h.study_uid].update(h.person_names)
        ids[h.study_uid].update(h.identifiers)
        other[h.study_uid].update(h.other_phi)
        if not patient.get(h.study_uid, ("", ""))[0]:  # the first header with a PatientID names the patient
            patient[h.study_uid] = (h.patient_id, h.issuer)
    return {
        uid: StudyPHI(uid, patient[uid][0], patient[uid][1], tuple(sorted(names[uid])), tuple(sorted(ids[uid])),
                      tuple(sorted(other[uid])))
        for uid in patient
    }


def split_evenly(items: Sequence[str], parts: int) -> list[list[str]]:
    """Cut items into at most ``parts`` contiguous batches of near-equal length."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    batches, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        batches.append(list(items[start:end]))
        start = end
    return [b for b in batches if b]


def shard_series(series: Sequence[SeriesPlan], shards: int) -> list[list[SeriesPlan]]:
    """Group whole series into at most ``shards`` groups of similar slice counts.

    Largest series first onto the lightest group (LPT scheduling), so two workers finish
    together; a series is never split, so its 3D context stays in one task.
    """
    groups: list[list[SeriesPlan]] = [[] for _ in range(max(1, min(shards, len(series))))]
    loads = [0] * len(groups)
    for plan in sorted(series, key=lambda p: (-len(p.files), p.series_uid)):
        lightest = loads.index(min(loads))
        groups[lightest].append(plan)
        loads[lightest] += len(plan.files)
    return [g for g in groups if g]
