"""Ingest: decode, de-identify and extract the slices of one series; scrub reports.

``ingest_series`` is the unit the flow fans out (one task per series, per-slice work
inside it). Its output is one Parquet shard of the images table, written through the
object store under ``ingest/<drop_id>/images/``. Nothing it writes or returns carries
PHI: rows hold pseudonyms, quarantine rows hold sha256 digests and reason codes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pydicom

from radground import buildstate
from radground.errors import DeidError, RadgroundError, failure_boundary
from radground.keys import load_key
from radground.schemas import ImageRecord, QuarantineRecord, ReportRecord
from radground.settings import Settings
from radground.store import open_store
from radground.tables import parquet_bytes, read_table, relabelled, to_arrow, write_table
from tasks.deid import date_offset_days, deidentify, patient_pseudonym, pseudonym_uid
from tasks.discover import DropPlan, DropReader, ReportJob, SeriesPlan, quiet_dicom, read_dataset
from tasks.scrub import KnownPHI, scrub_report

logger = logging.getLogger(__name__)
STAGE = "ingest"


def stage_prefix(drop_id: str) -> str:
    return f"{STAGE}/{drop_id}/"


@dataclass
class SeriesOutcome:
    """What one series task produced. PHI-free: safe to return through Prefect and Ray."""

    series_uid: str  # de-identified
    shard_key: str | None
    slices: int
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    reused: bool = False  # copied from an earlier drop that delivered the same series


class SourceChangedError(RadgroundError):
    """A drop file changed between discovery and extraction."""


def _series_content(plan: SeriesPlan) -> dict:
    """Everything of a plan its image records depend on, besides the settings and the drop id."""
    return {"files": [sha for _, sha in plan.files], "positions": list(plan.positions), "modality": plan.modality,
            "axis": plan.axis, "has_report": plan.has_report}


def ingest_series(location: str, plan: SeriesPlan, settings: Settings) -> SeriesOutcome:
    """Decode, rescale and de-identify every slice of one series; write its images shard. A series
    an earlier drop delivered identically is copied from that drop's output instead."""
    key = load_key(settings)
    series_uid = pseudonym_uid(key, plan.series_uid)
    store = open_store(settings)
    content_key = buildstate.series_key(STAGE, _series_content(plan), settings)
    shard_key = f"{stage_prefix(plan.drop_id)}images/{series_uid}.parquet"
    earlier = buildstate.find_series_output(store, STAGE, content_key)
    if earlier is not None:
        store.put(shard_key, relabelled(earlier.table, plan.drop_id))
        rejected = [QuarantineRecord.model_validate(q | {"drop_id": plan.drop_id})
                    for q in earlier.extra["quarantine"]]
        logger.info("ingest series %s: identical to an earlier drop's, %d slices copied", series_uid,
                    earlier.extra["slices"])
        return SeriesOutcome(series_uid=series_uid, shard_key=shard_key, slices=earlier.extra["slices"],
                             quarantine=rejected, reused=True)

    reader = DropReader(location, settings)
    records: list[ImageRecord] = []
    rejected: list[QuarantineRecord] = []

    def reject(sha: str, reason: str, detail: str) -> None:
        rejected.append(QuarantineRecord(drop_id=plan.drop_id, stage=STAGE, item="file", reason=reason,
                                         detail=detail, source_sha256=sha, ref=series_uid))

    with quiet_dicom():
        for (path, sha), position in zip(plan.files, plan.positions, strict=True):
            record = _extract_slice(reader.read(path), sha, plan, position, len(records), series_uid, key,
                                    settings, reject)
            if record is not None:
                records.append(record)

    if records:
        data = parquet_bytes(to_arrow(records, ImageRecord))
        store.put(shard_key, data)
        buildstate.remember_series_output(store, STAGE, content_key, shard_key, data, {
            "slices": len(records), "quarantine": [q.model_dump(mode="json") for q in rejected]})
    else:
        shard_key = None
    logger.info("ingest series %s: %d/%d slices ok, %d quarantined", series_uid, len(records), len(plan.files),
                len(rejected))
    return SeriesOutcome(series_uid=series_uid, shard_key=shard_key, slices=len(records), quarantine=rejected)


def ingest_shard(location: str, plans: Sequence[SeriesPlan], settings: Settings) -> list[SeriesOutcome]:
    """Several whole series in one task: Prefect's per-task cost is paid once per shard."""
    key = load_key(settings)
    outcomes = []
    for plan in plans:
        with failure_boundary(f"ingest of series {pseudonym_uid(key, plan.series_uid)} (drop {plan.drop_id})"):
            outcomes.append(ingest_series(location, plan, settings))
    return outcomes


def _extract_slice(data: bytes, sha: str, plan: SeriesPlan, position: float, index: int, series_uid: str,
                   key: bytes, settings: Settings, reject) -> ImageRecord | None:
    """One slice: check, decode, rescale, de-identify; a problem is quarantined via ``reject``."""
    if hashlib.sha256(data).hexdigest() != sha:
        reject(sha, "source_changed", "file changed between discovery and extraction; rerun the rebuild")
        return None
    ds = None
    try:
        ds, cut_short = read_dataset(data)
        if cut_short or is_truncated(ds):
            reject(sha, "truncated", "file ends inside the pixel data; re-export it")
            return None
        pixels = modality_values(ds)
    except NotImplementedError:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        reject(sha, "no_decoder", f"no installed decoder for transfer syntax {ts.name if ts else 'unknown'}")
        return None
    except Exception as exc:  # noqa: BLE001 - corrupt pixel data
        reject(sha, "undecodable", f"pixel data cannot be decoded ({type(exc).__name__})")
        return None
    if pixels is None:
        reject(sha, "unsupported_pixels", "multi-frame or colour image; only single-frame grey slices are used")
        return None
    try:
        result = deidentify(ds, key, max_shift_days=settings.deid.date_shift_max_days)
    except DeidError as exc:  # its message names the element, never the value
        reject(sha, "deid_failed", f"{exc} The file is kept out: it cannot be de-identified safely.")
        return None
    return _image_record(plan, result, pixels, index, position, sha, series_uid)


def is_truncated(ds: pydicom.Dataset) -> bool:
    """Native (uncompressed) pixel data shorter than rows x cols x samples x bytes x frames."""
    if ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
        return False
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                * ((int(ds.BitsAllocated) + 7) // 8) * int(ds.get("NumberOfFrames", 1) or 1))
    return len(ds.PixelData) < expected


def modality_values(ds: pydicom.Dataset) -> np.ndarray | None:
    """CT in Hounsfield units (int16), MR raw intensities (uint16); None for unsupported layouts."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    stored = ds.pixel_array
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = stored.astype(np.float64) * slope + intercept
    if ds.Modality == "CT":
        return np.clip(np.rint(values), -32768, 32767).astype(np.int16)
    return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


def _image_record(plan: SeriesPlan, result, pixels: np.ndarray, index: int, position: float, sha: str,
                  series_uid: str) -> ImageRecord:
    ds = result.dataset
    spacing = [float(v) for v in ds.PixelSpacing]
    thickness = ds.get("SliceThickness")
    return ImageRecord(
        image_id=result.sop_uid,
        patient_pseudonym=result.patient_pseudonym,
        study_uid=result.study_uid,
        series_uid=series_uid,
        drop_id=plan.drop_id,
        modality=plan.modality,
        body_part=str(ds.get("BodyPartExamined", "") or "") or None,
        study_date=_parse_da(ds.get("StudyDate")),
        slice_index=index,
        slice_axis=plan.axis,
        slice_position_mm=position,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        row_spacing_mm=spacing[0],
        col_spacing_mm=spacing[1],
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        image_position=[float(v) for v in ds.ImagePositionPatient],
        image_orientation=[float(v) for v in ds.ImageOrientationPatient],
        pixel_dtype=str(pixels.dtype),
        pixels=pixels.astype(pixels.dtype.newbyteorder("<")).tobytes(),
        has_report=plan.has_report,
        source_sha256=sha,
    )


def _parse_da(value) -> date | None:
    text = str(value or "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def known_phi(job: ReportJob) -> KnownPHI:
    """What the report's study headers (and its reports.csv row) say about the people in it."""
    study = job.study
    return KnownPHI(
        person_names=study.person_names,
        identifiers=tuple(sorted({*study.identifiers, job.report.row.patient_id, job.report.row.accession_number})),
        other=study.other,
    )


def known_phi_by_study(jobs: Sequence[ReportJob], settings: Settings) -> dict[str, KnownPHI]:
    """Known PHI per de-identified study uid, for re-scanning text produced later (curate)."""
    key = load_key(settings)
    return {pseudonym_uid(key, job.study.study_uid): known_phi(job) for job in jobs}


def ingest_reports(jobs: Sequence[ReportJob], drop_id: str, settings: Settings) -> list[ReportRecord]:
    """Scrub each joined report with its study's header PHI and the patient's date offset."""
    key = load_key(settings)
    records = []
    for job in jobs:
        study = job.study
        known = known_phi(job)
        offset = date_offset_days(key, study.patient_id, settings.deid.date_shift_max_days)
        scrubbed = scrub_report(job.report.row.report_text, known, date_offset_days=-offset,
                                language=job.report.row.language)
        records.append(ReportRecord(
            study_uid=pseudonym_uid(key, study.study_uid),
            patient_pseudonym=patient_pseudonym(key, study.patient_id, study.issuer),
            drop_id=drop_id,
            language=job.report.row.language,
            text=scrubbed.text,
            redactions=len(scrubbed.redactions),
        ))
    return records


def read_reports(drop_id: str, settings: Settings) -> list[ReportRecord]:
    """The scrubbed reports an earlier ingest of ``drop_id`` wrote (for a curate stage run again)."""
    table = read_table(open_store(settings), stage_prefix(drop_id) + "reports.parquet")
    return [ReportRecord.model_validate(row) for row in table.to_pylist()]


@dataclass(frozen=True)
class IngestSummary:
    """Counts of one drop's ingest. Files and reports.csv rows are counted apart, each adding up:
    files_in = slices + files_quarantined (by ``file_reasons``), reports_in = reports +
    reports_quarantined (by ``report_reasons``). A study without a report is one more quarantine row
    (``study_reasons``) whose files are already counted under files."""

    drop_id: str
    files_in: int
    slices: int
    files_quarantined: int
    series: int
    reports_in: int
    reports: int
    reports_quarantined: int
    quarantine_reasons: dict[str, int]  # every quarantine row of ingest (files, reports, studies) by reason
    mask_files: int = 0
    series_reused: int = 0  # identical to a series of an earlier drop: copied, not extracted again
    reports_encoding: str = ""  # how reports.csv was decoded: declared in drop.yaml, or detected
    # By item, so that each printed line adds up. Empty in summaries written before they existed.
    file_reasons: dict[str, int] = field(default_factory=dict)
    report_reasons: dict[str, int] = field(default_factory=dict)
    study_reasons: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The summary as printed: one line for files, one for reports.csv rows, one for studies."""
        split = bool(self.file_reasons or self.report_reasons or self.study_reasons)

        def reasons(counts: dict[str, int]) -> str:
            return f" ({', '.join(f'{n} {r}' for r, n in sorted(counts.items()))})" if counts else ""

        files = (f"ingest {self.drop_id}: {self.files_in} files in = {self.slices} slices + "
                 f"{self.files_quarantined} quarantined" + (reasons(self.file_reasons) if split else "")
                 + f"; {self.series} series"
                 + (f" ({self.series_reused} copied from earlier drops)" if self.series_reused else "")
                 + (f"; {self.mask_files} mask files for the imported backend (not counted in)"
                    if self.mask_files else ""))
        reports = (f"  reports.csv{f' (read as {self.reports_encoding})' if self.reports_encoding else ''}: "
                   f"{self.reports_in} rows in = {self.reports} reports + {self.reports_quarantined} quarantined"
                   + (reasons(self.report_reasons) if split else ""))
        lines = [files, reports]
        studies = sum(self.study_reasons.values())
        if studies:
            lines.append(f"  studies: {studies} quarantined{reasons(self.study_reasons)}; their files are counted "
                         "under files")
        if not split and self.quarantine_reasons:  # a summary from before the split: reasons of all rows
            lines.append(f"  quarantine rows (files, reports and studies together):"
                         f"{reasons(self.quarantine_reasons)}")
        return lines

    def line(self) -> str:
        return "\n".join(self.lines())


def finish_ingest(plan: DropPlan, outcomes: Sequence[SeriesOutcome], reports: Sequence[ReportRecord],
                  settings: Settings) -> IngestSummary:
    """Write the reports and quarantine tables and the summary; check that counts reconcile."""
    quarantine = [*plan.quarantine, *(q for o in outcomes for q in o.quarantine)]
    slices = sum(o.slices for o in outcomes)
    files_quarantined = sum(1 for q in quarantine if q.item == "file")
    if slices + files_quarantined != plan.files_in:
        raise RadgroundError(
            f"ingest {plan.drop_id}: counts do not reconcile: {plan.files_in} files in, {slices} slices, "
            f"{files_quarantined} quarantined. This is a bug; please report it with the drop id.")
    reports_quarantined = sum(1 for q in quarantine if q.item == "report")
    if len(reports) + reports_quarantined != plan.reports_in:
        raise RadgroundError(
            f"ingest {plan.drop_id}: counts do not reconcile: {plan.reports_in} report rows in, {len(reports)} "
            f"reports, {reports_quarantined} quarantined. This is a bug; please report it with the drop id.")

    def by_reason(item: str) -> dict[str, int]:
        return dict(Counter(q.reason for q in quarantine if q.item == item))

    summary = IngestSummary(
        drop_id=plan.drop_id, files_in=plan.files_in, slices=slices, files_quarantined=files_quarantined,
        series=sum(1 for o in outcomes if o.slices), reports_in=plan.reports_in, reports=len(reports),
        reports_quarantined=reports_quarantined,
        quarantine_reasons=dict(Counter(q.reason for q in quarantine)),
        mask_files=plan.mask_files, series_reused=sum(1 for o in outcomes if o.reused),
        reports_encoding=plan.reports_encoding,
        file_reasons=by_reason("file"), report_reasons=by_reason("report"), study_reasons=by_reason("study"),
    )
    store = open_store(settings)
    prefix = stage_prefix(plan.drop_id)
    write_table(store, prefix + "reports.parquet", reports, ReportRecord)
    write_table(store, prefix + "quarantine.parquet", quarantine, QuarantineRecord)
    store.put(prefix + "summary.json", json.dumps(summary.__dict__, indent=1, sort_keys=True).encode())
    return summary
