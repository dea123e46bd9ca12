"""reports.csv as hospitals export it: encodings, delimiters, date forms, broken headers.

Every error message is checked for the row's content: a header-less file or an
undecodable byte must never put a patient ID or report text into an error.
"""

from __future__ import annotations

import csv
import io
from datetime import date
from pathlib import Path

import pytest
from pydantic import ValidationError

from radground.schemas import REPORT_COLUMNS, DropReportRow
from radground.settings import load_settings
from tasks import discover

PATIENT_ID = "77031245"
TEXT_DE = "Lunge ü: kein Infiltrat. Herz normal groß, Größe 2,2 x 1,8 cm."


def _csv(rows: list[list[str]], delimiter: str = ",", header: tuple[str, ...] = REPORT_COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _read(tmp_path: Path, content: bytes, declared: str | None = None) -> discover.ReportsTable:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "reports.csv").write_bytes(content)
    reader = discover.DropReader(str(drop), load_settings(data_dir=tmp_path / "data"))
    return discover.read_reports(reader, "site-x", declared)


ROW = ["ACC1", PATIENT_ID, "2024-03-01", "de", TEXT_DE]


@pytest.mark.parametrize("codec", ["cp1252", "latin-1"])
def test_a_windows_1252_export_is_detected_and_named(tmp_path, codec):
    table = _read(tmp_path, _csv([ROW, ["ACC2", "5511", "2024-03-02", "de", "Leber und Milz unauffällig, Größe"]
                                  ]).encode(codec))
    assert [r.row.report_text for r in table.rows][0] == TEXT_DE  # the umlauts survive
    assert table.encoding in {"cp1252", "latin_1", "iso8859_15", "cp1250"}
    assert not table.rejected


@pytest.mark.parametrize(("data", "expected"), [
    (_csv([ROW]).encode("utf-8"), "utf-8"),
    (b"\xef\xbb\xbf" + _csv([ROW]).encode("utf-8"), "utf-8-sig"),
])
def test_utf8_with_and_without_bom(tmp_path, data, expected):
    table = _read(tmp_path, data)
    assert table.encoding == expected and table.rows[0].row.report_text == TEXT_DE
    assert table.rows[0].row.accession_number == "ACC1"  # the BOM is not part of the first column's name


def test_a_declared_encoding_is_used_and_a_wrong_one_is_one_clear_error_without_the_bytes(tmp_path):
    data = _csv([ROW]).encode("cp1252")
    assert _read(tmp_path, data, "cp1252").rows[0].row.report_text == TEXT_DE
    with pytest.raises(discover.DropError, match=r"reports.csv is not valid utf-8 \(the first bad byte is at "
                                                 r"offset \d+\)\. Re-export it as utf-8, or correct encoding:") as err:
        _read(tmp_path, data, "utf-8")
    assert PATIENT_ID not in str(err.value) and "Lunge" not in str(err.value)
    with pytest.raises(discover.DropError, match="names encoding 'klingon', which Python does not know"):
        _read(tmp_path, data, "klingon")


def test_drop_yaml_may_declare_the_encoding(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "drop.yaml").write_text("site: x\nreceived_at: 2026-11-20T08:00:00Z\nencoding: cp1252\n")
    info = discover.read_drop_info(discover.DropReader(str(drop), load_settings(data_dir=tmp_path / "d")))
    assert info.encoding == "cp1252"


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_comma_semicolon_and_tab_separated_exports_are_read(tmp_path, delimiter):
    # Excel's German default: ';' with decimal commas inside the text, unquoted.
    text = _csv([ROW], delimiter=delimiter)
    table = _read(tmp_path, text.encode("utf-8"))
    assert table.delimiter == delimiter
    assert [r.row.model_dump() for r in table.rows] == [{
        "accession_number": "ACC1", "patient_id": PATIENT_ID, "study_date": date(2024, 3, 1), "language": "de",
        "report_text": TEXT_DE}]


def test_a_row_with_an_unquoted_delimiter_is_quarantined_not_cut(tmp_path):
    text = _csv([]) + f"ACC1;{PATIENT_ID};2024-03-01;de;Herz; Lunge frei\r\n"
    table = _read(tmp_path, text.replace(",", ";").encode("utf-8"))
    assert table.rows == [] and [q.reason for q in table.rejected] == ["invalid_report_row"]
    assert "quote fields that contain semicolons" in table.rejected[0].detail
    assert PATIENT_ID not in table.rejected[0].detail


def test_a_file_without_its_header_row_is_an_error_that_does_not_quote_the_first_row(tmp_path):
    text = f"ACC1,{PATIENT_ID},2024-03-01,de,Wolfsgrübler Ämilie\r\n"
    with pytest.raises(discover.DropError, match=r"first line of reports.csv is not its header row: expected the "
                                                 r"columns .* with commas it has 5 field\(s\), missing \[") as err:
        _read(tmp_path, text.encode("utf-8"))
    message = str(err.value)
    assert PATIENT_ID not in message and "Wolfsgr" not in message and "ACC1" not in message
    assert "5 unknown column(s) (not shown: they may be data)" in message


@pytest.mark.parametrize(("raw", "expected"), [
    ("2024-03-01", date(2024, 3, 1)),  # ISO
    ("20240301", date(2024, 3, 1)),  # DICOM DA
    ("01.03.2024", date(2024, 3, 1)),  # German
    (" 29.02.2024 ", date(2024, 2, 29)),
])
def test_study_date_accepts_the_three_hospital_forms(raw, expected):
    row = DropReportRow.model_validate({"accession_number": "A", "patient_id": "1", "study_date": raw,
                                        "language": "en", "report_text": "x"})
    assert row.study_date == expected


@pytest.mark.parametrize("raw", ["03/01/2024", "1.3.2024", "2024-3-1", "30.02.2024", "20241301", "1709251200", ""])
def test_other_date_forms_are_rejected_in_the_study_date_column(raw):
    with pytest.raises(ValidationError) as err:
        DropReportRow.model_validate({"accession_number": "A", "patient_id": "1", "study_date": raw,
                                      "language": "en", "report_text": "x"})
    assert [e["loc"][0] for e in err.value.errors()] == ["study_date"]


def test_a_bad_date_row_is_quarantined_with_its_column(tmp_path):
    table = _read(tmp_path, _csv([ROW, ["ACC2", "5511", "2024/03/02", "de", "Leber"]], delimiter=";").encode())
    assert len(table.rows) == 1
    assert [q.detail for q in table.rejected] == ["reports.csv row invalid in column(s) study_date"]
