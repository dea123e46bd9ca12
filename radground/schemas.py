"""Record schemas: one per table, used by writers, readers, expectations and docs.

So far: the two inputs of a hospital drop (see README, "The drop format").
Later stages add the dataset tables here.
"""

from __future__ import annotations

import re
import types
import typing
from datetime import date, datetime
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPORTS_FILE = "reports.csv"
DROP_INFO_FILE = "drop.yaml"


#: The study_date forms reports.csv may use: ISO, DICOM DA, German. (regex, strptime format)
_DATE_FORMS = ((r"\d{4}-\d{2}-\d{2}", "%Y-%m-%d"), (r"\d{8}", "%Y%m%d"), (r"\d{2}\.\d{2}\.\d{4}", "%d.%m.%Y"))


class DropReportRow(BaseModel):
    """One row of a drop's ``reports.csv``: a report joins its images by AccessionNumber."""

    model_config = ConfigDict(extra="forbid")

    accession_number: str = Field(min_length=1)
    patient_id: str = Field(min_length=1)
    study_date: date = Field(description="YYYY-MM-DD (ISO), YYYYMMDD (DICOM DA) or DD.MM.YYYY (German).")
    language: Literal["de", "en"]
    report_text: str = Field(min_length=1)

    @field_validator("study_date", mode="before")
    @classmethod
    def _hospital_date_forms(cls, value):
        """Accept the three forms hospital systems export; anything else fails validation (quarantined)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        for pattern, form in _DATE_FORMS:
            if re.fullmatch(pattern, text):
                try:
                    return datetime.strptime(text, form).date()
                except ValueError:
                    raise ValueError("study_date is not a calendar date") from None
        raise ValueError("study_date must be YYYY-MM-DD, YYYYMMDD or DD.MM.YYYY")


#: Column order of reports.csv, derived from the schema so there is no second list.
REPORT_COLUMNS: tuple[str, ...] = tuple(DropReportRow.model_fields)


class DropInfo(BaseModel):
    """The optional ``drop.yaml`` at the top of a drop."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(min_length=1)
    received_at: datetime
    encoding: str | None = Field(default=None, description="Codec of reports.csv (e.g. cp1252); detected when absent.")


# --------------------------------------------------------------------------- dataset tables
# Pixel data travels as raw little-endian bytes with its dtype and shape beside it, so a
# row is self-describing and Parquet's compression works on the bytes.

Modality = Literal["CT", "MR"]


class ImageRecord(BaseModel):
    """One 2D slice of the images table: pseudonymous ids, geometry, pixels, provenance."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(description="De-identified SOP Instance UID (2.25.…).")
    patient_pseudonym: str
    study_uid: str = Field(description="De-identified Study Instance UID.")
    series_uid: str = Field(description="De-identified Series Instance UID.")
    drop_id: str
    modality: Modality
    body_part: str | None
    study_date: date | None = Field(description="Shifted by the patient's date offset.")
    slice_index: int = Field(ge=0, description="0-based position in the series, sorted along the normal.")
    slice_axis: Literal["axial", "coronal", "sagittal", "oblique"]
    slice_position_mm: float = Field(description="Position along the slice normal (mm).")
    rows: int = Field(gt=0)
    cols: int = Field(gt=0)
    row_spacing_mm: float = Field(gt=0)
    col_spacing_mm: float = Field(gt=0)
    slice_thickness_mm: float | None
    image_position: list[float] = Field(description="ImagePositionPatient (mm, LPS).")
    image_orientation: list[float] = Field(description="ImageOrientationPatient: row then column cosines.")
    pixel_dtype: Literal["int16", "uint16"] = Field(description="int16 HU for CT, uint16 raw for MR.")
    pixels: bytes = Field(description="rows*cols little-endian values, C order (row-major).")
    has_report: bool = Field(description="False for image-only records of a study without a report.")
    source_sha256: str = Field(description="sha256 of the raw DICOM file as delivered.")


class KeywordItem(BaseModel):
    """A mention of a segmentable structure: a verbatim span of its sentence."""

    model_config = ConfigDict(extra="forbid")

    keyword: str
    class_name: str = Field(description="Label-map class name (English), e.g. 'lung_left'.")
    class_id: int = Field(ge=1)
    start: int = Field(ge=0, description="Character offset in the sentence.")
    end: int = Field(gt=0)
    negated: bool = False


class SentenceItem(BaseModel):
    """One sentence of a report with its keywords, and its translation when there is one."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    section: str | None = Field(description="e.g. 'findings', 'impression'; None outside sections.")
    text: str
    start: int = Field(ge=0, description="Character offset in the report text.")
    end: int = Field(gt=0)
    keywords: list[KeywordItem]
    translation: str | None = Field(default=None, description="The sentence in the other language.")
    translation_keywords: list[KeywordItem] = Field(default_factory=list)


TranslationStatus = Literal["not_run", "translated", "partial", "unavailable", "failed"]


class ReportRecord(BaseModel):
    """One report of the reports table: scrubbed at ingest, split and annotated at curate."""

    model_config = ConfigDict(extra="forbid")

    study_uid: str
    patient_pseudonym: str
    drop_id: str
    language: Literal["de", "en"]
    text: str = Field(description="Report text with PHI removed and dates shifted.")
    redactions: int = Field(ge=0, description="How many spans were scrubbed.")
    sentences: list[SentenceItem] = Field(default_factory=list, description="Filled by curate.")
    keyword_backend: str | None = Field(default=None, description="lexicon | openai:<model>; set by curate.")
    translation_status: TranslationStatus = "not_run"


class VQARecord(BaseModel):
    """One question/answer item (docs/method.md): per study, or per slice when image_id is set."""

    model_config = ConfigDict(extra="forbid")

    vqa_id: str = Field(description="Stable id: hash of study, language, question.")
    study_uid: str
    image_id: str | None = Field(description="Set for slice-level items; None for study-level ones.")
    patient_pseudonym: str
    drop_id: str
    language: Literal["de", "en"]
    question: str
    answer: str
    question_type: Literal["open", "closed", "multiple"]
    choices: list[str] = Field(description="The options of a multiple-choice item; empty otherwise.")
    source_sentence: int | None = Field(description="Index of the report sentence the item came from.")
    source_keyword: str | None = Field(description="The keyword (verbatim span) the item came from.")
    class_name: str | None
    generator: Literal["template", "llm"]


QuarantineStage = Literal["ingest", "deid", "curate", "segment", "ground", "quality", "version"]

#: Every reason the ingest stage (tasks/discover.py, tasks/ingest.py) writes into a quarantine row. One
#: place for the vocabulary: QuarantineRecord refuses an ingest row with any other reason, and
#: tests/tasks/test_quarantine_reasons.py produces each of them.
IngestQuarantineReason = Literal[
    "not_dicom", "unreadable", "truncated", "not_an_image",  # the file cannot be used as DICOM
    "unsupported_modality", "no_pixel_data", "burned_in_annotation", "localizer", "derived_image",  # file rules
    "missing_uid", "missing_patient_id", "missing_geometry", "excluded_orientation",
    "inconsistent_geometry", "duplicate_instance", "duplicate_position",  # series rules
    "orphan_report", "orphan_study", "invalid_report_row",  # reports.csv and the study join
    "source_changed", "no_decoder", "undecodable", "unsupported_pixels", "deid_failed",  # extraction
]
INGEST_QUARANTINE_REASONS: tuple[str, ...] = typing.get_args(IngestQuarantineReason)


class QuarantineRecord(BaseModel):
    """Something that was not accepted, and why. Never a path, name or other PHI."""

    model_config = ConfigDict(extra="forbid")

    drop_id: str
    stage: QuarantineStage
    item: Literal["file", "report", "study", "series", "row"]
    reason: str = Field(description="Stable machine-readable code, e.g. 'no_pixel_data'.")
    detail: str = Field(description="Human-readable explanation without PHI.")
    source_sha256: str | None = Field(description="sha256 of the rejected file or report row.")
    ref: str | None = Field(default=None, description="Pseudonymous reference (series/study uid) if known.")

    @model_validator(mode="after")
    def _declared_ingest_reason(self) -> QuarantineRecord:
        if self.stage == "ingest" and self.reason not in INGEST_QUARANTINE_REASONS:
            raise ValueError(f"reason {self.reason!r} is not a declared ingest quarantine reason: add it to "
                             "IngestQuarantineReason in radground/schemas.py")
        return self


class MaskRecord(BaseModel):
    """One class on one slice, as segmentation found it (the segment stage's table)."""

    model_config = ConfigDict(extra="forbid")

    image_id: str
    series_uid: str
    study_uid: str
    drop_id: str
    class_id: int = Field(ge=1)
    class_name: str
    area_px: int = Field(gt=0)
    bbox: list[float] = Field(description="[x1, y1, x2, y2] in pixels, x = column, y = row; x2/y2 exclusive.")
    rle: str = Field(description="COCO RLE counts (pycocotools, column-major) of the class mask.")
    rows: int = Field(gt=0)
    cols: int = Field(gt=0)
    backend: str = Field(description="Which backend labelled it, e.g. 'classical' or 'classical+sam'.")


class GroundingRecord(BaseModel):
    """A keyword of a report sentence grounded on a slice: its class is mentioned AND present."""

    model_config = ConfigDict(extra="forbid")

    image_id: str
    study_uid: str
    patient_pseudonym: str
    drop_id: str
    language: Literal["de", "en"]
    sentence_index: int = Field(ge=0)
    sentence: str
    keyword: str
    keyword_start: int = Field(ge=0)
    keyword_end: int = Field(gt=0)
    negated: bool
    class_id: int = Field(ge=1)
    class_name: str
    bbox: list[float] = Field(description="[x1, y1, x2, y2] pixels (x = column); x2/y2 exclusive.")
    rle: str = Field(description="COCO RLE counts of the class mask on this slice.")
    area_px: int = Field(gt=0)
    rows: int = Field(gt=0)
    cols: int = Field(gt=0)


class SliceRecord(BaseModel):
    """A slice kept for the dataset, and why."""

    model_config = ConfigDict(extra="forbid")

    image_id: str
    study_uid: str
    drop_id: str
    grounded: bool = Field(description="True: >= 1 grounded pair; False: in the seeded ungrounded sample.")
    classes_present: list[str] = Field(description="Classes with >= grounding.min_area_px pixels.")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The pyarrow schema of a record model: the writer's, reader's and checks' one source."""
    scalar = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(), bytes: pa.binary(),
              date: pa.date32(), datetime: pa.timestamp("us", tz="UTC")}

    def convert(annotation) -> tuple[pa.DataType, bool]:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            kind, _ = convert(inner[0])
            return kind, True
        if origin is typing.Literal:
            return scalar[type(args[0])], False
        if origin is list:
            kind, _ = convert(args[0])
            return pa.list_(kind), False
        if annotation in scalar:
            return scalar[annotation], False
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return pa.struct(list(arrow_schema(annotation))), False  # nested records: Arrow structs
        raise TypeError(f"{model.__name__}: no Arrow type for {annotation!r}")

    fields = []
    for name, info in model.model_fields.items():
        kind, nullable = convert(info.annotation)
        fields.append(pa.field(name, kind, nullable=nullable))
    return pa.schema(fields)
