"""Record schemas: one per table, used by writers, readers, expectations and docs.

So far: the two inputs of a hospital drop (see README, "The drop format").
Later stages add the dataset tables here.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

REPORTS_FILE = "reports.csv"
DROP_INFO_FILE = "drop.yaml"


class DropReportRow(BaseModel):
    """One row of a drop's ``reports.csv``: a report joins its images by AccessionNumber."""

    model_config = ConfigDict(extra="forbid")

    accession_number: str = Field(min_length=1)
    patient_id: str = Field(min_length=1)
    study_date: date
    language: Literal["de", "en"]
    report_text: str = Field(min_length=1)


#: Column order of reports.csv, derived from the schema so there is no second list.
REPORT_COLUMNS: tuple[str, ...] = tuple(DropReportRow.model_fields)


class DropInfo(BaseModel):
    """The optional ``drop.yaml`` at the top of a drop."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(min_length=1)
    received_at: datetime
