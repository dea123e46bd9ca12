"""Tests for tasks/curate/sentences.py: verbatim sentence spans with sections, German and English."""

from __future__ import annotations

import csv
import io
import random
import re
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import pytest

from radground.synth.drop import generate_drop
from radground.synth.reports import ORGANS, Finding, random_person, write_report
from tasks.curate.base import CurationError
from tasks.curate.sentences import SECTION_HEADERS, SentenceSpan, split_sentences

# Written out here, not taken from the module, so the expectations are independent of it.
SYNTH_HEADERS = {"Klinische Angaben": "clinical_information", "Fragestellung": "question", "Technik": "technique",
                 "Befund": "findings", "Beurteilung": "impression", "Clinical information": "clinical_information",
                 "Technique": "technique", "Findings": "findings", "Impression": "impression"}
SYNTH_HEADER_LINE = re.compile(r"^(" + "|".join(SYNTH_HEADERS) + r"):", re.MULTILINE)
SIZE = re.compile(r"\d+(?:[.,]\d+)?(?: x \d+(?:[.,]\d+)?)? (?:mm|cm)\b")
BROKEN_NUMBER = re.compile(r"\d[.,] \d")
US_DATE = re.compile(r"[A-Z][a-z]+ \d{1,2}, \d{4}")  # "May 6, 1981" is written so, not a broken number


def split(report: str, language: str = "de") -> list[SentenceSpan]:
    spans = split_sentences(report, language)
    for s in spans:
        assert report[s.start:s.end] == s.text, s
        assert s.text and s.text == s.text.strip(), s
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:], strict=False)), "spans overlap"
    return spans


def texts(report: str, language: str = "de") -> list[str]:
    return [s.text for s in split(report, language)]


# (language, report, expected sentences): each abbreviation mid-sentence, then a second sentence
# proving that the real sentence end is still found.
ABBREVIATIONS = [
    ("de", "Mehrere Herde, z.B. Leber und Milz. Kein Erguss.", ["Mehrere Herde, z.B. Leber und Milz."]),
    ("de", "Rundherd ca. 8 mm. Kein Erguss.", ["Rundherd ca. 8 mm."]),
    ("de", "Kleine Läsion, V.a. Metastase. Kein Erguss.", ["Kleine Läsion, V.a. Metastase."]),
    ("de", "Z.n. Hemikolektomie. Kein Erguss.", ["Z.n. Hemikolektomie."]),
    ("de", "Erguss re. und li. basal. Kein Infiltrat.", ["Erguss re. und li. basal."]),
    ("de", "Zyste der li. Niere, Konkrement der re. Niere. Kein Harnstau.",
     ["Zyste der li. Niere, Konkrement der re. Niere."]),
    ("de", "Leber o.B. und Milz o.B. Keine Lymphome.", ["Leber o.B. und Milz o.B."]),
    ("de", "Nieren bds. ohne Harnstau. Milz o.B.", ["Nieren bds. ohne Harnstau.", "Milz o.B."]),
    ("de", "Rücksprache mit Prof. Dr. med. Weber erfolgt. Kein Erguss.",
     ["Rücksprache mit Prof. Dr. med. Weber erfolgt."]),
    ("de", "Nach i.v. Gabe von KM keine Anreicherung. Milz o.B.", ["Nach i.v. Gabe von KM keine Anreicherung."]),
    ("de", "Gabe von 80 ml KM (Imeron 350), portalvenöse Phase. Kein Erguss.",
     ["Gabe von 80 ml KM (Imeron 350), portalvenöse Phase."]),
    ("de", "Ggf. Verlaufskontrolle bzw. MRT in 3 Monaten. Kein Erguss.",
     ["Ggf. Verlaufskontrolle bzw. MRT in 3 Monaten."]),
    ("de", "Auftrag Nr. 5 und Pat. Müller verwechselt. Kein Erguss.", ["Auftrag Nr. 5 und Pat. Müller verwechselt."]),
    ("de", "Voraufnahmen aus dem St. Josef Hospital. Kein Erguss.", ["Voraufnahmen aus dem St. Josef Hospital."]),
    ("de", "Siehe Abb. 2 und Fig. 3. Kein Erguss.", ["Siehe Abb. 2 und Fig. 3."]),
    ("de", "Läsion im re. Leberlappen, vergr. im Verlauf. Kein Erguss.",
     ["Läsion im re. Leberlappen, vergr. im Verlauf."]),
    ("de", "Metastasen u.a. Leber, Läsion i.S. Hämangiom. Kein Erguss.",
     ["Metastasen u.a. Leber, Läsion i.S. Hämangiom."]),
    ("de", "Voruntersuchung vom 3. Feb. 2024 zum Vergleich. Kein Erguss.",
     ["Voruntersuchung vom 3. Feb. 2024 zum Vergleich."]),
    ("en", "Hemangioma vs. Metastasis cannot be resolved. No effusion.",
     ["Hemangioma vs. Metastasis cannot be resolved."]),
    ("en", "Consider further work-up, e.g. MRI. No effusion.", ["Consider further work-up, e.g. MRI."]),
    ("en", "Likely benign, i.e. A simple cyst. No effusion.", ["Likely benign, i.e. A simple cyst."]),
    ("en", "Lesion measuring approx. 12 mm. No effusion.", ["Lesion measuring approx. 12 mm."]),
    ("en", "s/p right nephrectomy. No recurrence.", ["s/p right nephrectomy."]),
    ("en", "No recurrence. s/p right nephrectomy.", ["No recurrence.", "s/p right nephrectomy."]),
    ("en", "Prior CT from Feb. 2024 is unchanged. No effusion.", ["Prior CT from Feb. 2024 is unchanged."]),
    ("en", "Discussed with Dr. Smith. No effusion.", ["Discussed with Dr. Smith."]),
]

NUMBERS = [  # decimals, sizes, dates, ordinals, levels, placeholders
    ("en", "Nodule measuring 2.2 cm. No effusion.", ["Nodule measuring 2.2 cm.", "No effusion."]),
    ("de", "Zyste 2,2 cm. Kein Erguss.", ["Zyste 2,2 cm.", "Kein Erguss."]),
    ("de", "Läsion 2,2 x 1,8 cm im Segment VII. Milz o.B.", ["Läsion 2,2 x 1,8 cm im Segment VII.", "Milz o.B."]),
    ("en", "Mass of 2.2 x 1.8 cm. Spleen normal.", ["Mass of 2.2 x 1.8 cm.", "Spleen normal."]),
    ("de", "Voruntersuchung vom 03.02.2024. Kein Erguss.", ["Voruntersuchung vom 03.02.2024.", "Kein Erguss."]),
    ("de", "Befund vom 03.02.2024 unverändert. Kein Erguss.", ["Befund vom 03.02.2024 unverändert.", "Kein Erguss."]),
    ("de", "Vergleich vom 12.03. Keine Änderung.", ["Vergleich vom 12.03.", "Keine Änderung."]),
    ("de", "Voruntersuchung vom 3. Februar 2024. Kein Erguss.",
     ["Voruntersuchung vom 3. Februar 2024.", "Kein Erguss."]),
    ("de", "Fraktur der 7. Rippe links. Kein Erguss.", ["Fraktur der 7. Rippe links.", "Kein Erguss."]),
    ("de", "Fraktur 7. Rippe links. Kein Erguss.", ["Fraktur 7. Rippe links.", "Kein Erguss."]),
    ("de", "Erstdiagnose im 3. Lebensjahrzehnt. Kein Erguss.", ["Erstdiagnose im 3. Lebensjahrzehnt.", "Kein Erguss."]),
    ("de", "Keilwirbel LWK 3. Keine Myelonkompression.", ["Keilwirbel LWK 3.", "Keine Myelonkompression."]),
    ("de", "Osteochondrose in BWK 11. Rippen intakt.", ["Osteochondrose in BWK 11.", "Rippen intakt."]),
    ("de", "Höhenminderung LWK 3.", ["Höhenminderung LWK 3."]),
    ("en", "Osteophytes at L3. No fracture.", ["Osteophytes at L3.", "No fracture."]),
    ("de", "Läsion in Lebersegment V. Milz o.B.", ["Läsion in Lebersegment V.", "Milz o.B."]),
    ("en", "Cyst in liver segment V. Spleen normal.", ["Cyst in liver segment V.", "Spleen normal."]),
    ("de", "Telefonisch an H. Weber übermittelt. Kein Erguss.",
     ["Telefonisch an H. Weber übermittelt.", "Kein Erguss."]),
    ("de", "Voruntersuchung vom [DATE]. Herr [NAME] wurde informiert.",
     ["Voruntersuchung vom [DATE].", "Herr [NAME] wurde informiert."]),
    ("en", "Compared with [DATE]. Dr. [NAME] was notified on [PHONE]. [NAME] agreed.",
     ["Compared with [DATE].", "Dr. [NAME] was notified on [PHONE].", "[NAME] agreed."]),
    ("de", "Progress? Metastasen? Kein Erguss!", ["Progress?", "Metastasen?", "Kein Erguss!"]),
    ("de", "Lunge frei (s. Voraufnahme). Herz o.B.", ["Lunge frei (s. Voraufnahme).", "Herz o.B."]),
]


@pytest.mark.parametrize(("language", "report", "expected"), ABBREVIATIONS,
                         ids=[r[:28] for _, r, _ in ABBREVIATIONS])
def test_abbreviation_mid_sentence_does_not_split(language: str, report: str, expected: list[str]) -> None:
    got = texts(report, language)
    assert got[:len(expected)] == expected
    assert "".join(got).replace(" ", "") == report.replace(" ", "")  # nothing dropped


@pytest.mark.parametrize(("language", "report", "expected"), NUMBERS, ids=[r[:28] for _, r, _ in NUMBERS])
def test_numbers_dates_and_placeholders(language: str, report: str, expected: list[str]) -> None:
    assert texts(report, language) == expected


STRUCTURE = [  # (report, expected [(text, section)])
    ("Beurteilung:\n1. Progrediente Leberläsion.\n2. Kein Erguss.",
     [("Progrediente Leberläsion.", "impression"), ("Kein Erguss.", "impression")]),
    ("Beurteilung: 1. Progrediente Leberläsion. Größenprogredient.\n2. Kein Erguss",
     [("Progrediente Leberläsion.", "impression"), ("Größenprogredient.", "impression"),
      ("Kein Erguss", "impression")]),
    ("Befund:\n- Leber o.B.\n• Milz o.B.\n1) Nieren bds. o.B.",
     [("Leber o.B.", "findings"), ("Milz o.B.", "findings"), ("Nieren bds. o.B.", "findings")]),
    ("Befund:\n1. Leberläsion\n2. Kein Erguss", [("Leberläsion", "findings"), ("Kein Erguss", "findings")]),
    ("Befund:\n3. Februar 2024: Erstdiagnose.", [("3. Februar 2024: Erstdiagnose.", "findings")]),
    ("Befund: Leber o.B.\nBeurteilung: Normalbefund.", [("Leber o.B.", "findings"), ("Normalbefund.", "impression")]),
    ("BEFUND\nLeber o.B.\n\nZUSAMMENFASSUNG:\nNormalbefund.",
     [("Leber o.B.", "findings"), ("Normalbefund.", "impression")]),
    ("Fragestellung: Metastasen?\nTechnik: CT nach i.v. KM-Gabe.\nVergleich: Keine Voraufnahmen.",
     [("Metastasen?", "question"), ("CT nach i.v. KM-Gabe.", "technique"), ("Keine Voraufnahmen.", "comparison")]),
    ("Clinical information: Cough.\nComparison: Prior CT [DATE].\nFindings:\nLungs clear.\n\nConclusion:\nNormal.",
     [("Cough.", "clinical_information"), ("Prior CT [DATE].", "comparison"), ("Lungs clear.", "findings"),
      ("Normal.", "impression")]),
    ("Befund:\nLeber unauffällig\n\n\nMilz o.B.", [("Leber unauffällig", "findings"), ("Milz o.B.", "findings")]),
    ("Befund:\nDie Leber ist\nunauffällig. Milz o.B.", [("Die Leber ist\nunauffällig.", "findings"),
                                                         ("Milz o.B.", "findings")]),
    ("Befund:\nThorax: Lunge frei\nAbdomen: Leber o.B.", [("Thorax: Lunge frei", "findings"),
                                                          ("Abdomen: Leber o.B.", "findings")]),
    ("Befund:\r\nLeber o.B.\r\nMilz\r\nunauffällig.\r\n\r\nBeurteilung:\r\n1. Normalbefund.\r\n",
     [("Leber o.B.", "findings"), ("Milz\r\nunauffällig.", "findings"), ("Normalbefund.", "impression")]),
    ("Patient: [NAME], geb. [DATE]\nPID: [ID]\nCT Thorax mit KM\n\nBefund: Normalbefund.\n\n"
     "Mit freundlichen Grüßen\nDr. med. [NAME]",
     [("Patient: [NAME], geb. [DATE]", "header"), ("PID: [ID]", "header"), ("CT Thorax mit KM", "header"),
      ("Normalbefund.", "findings"), ("Mit freundlichen Grüßen", "closing"), ("Dr. med. [NAME]", "closing")]),
    ("Befund: Normalbefund.\n\nBeurteilung:\n1. Normal.\n\n[NAME]\nRadiologie, Tel. [PHONE]\n",
     [("Normalbefund.", "findings"), ("Normal.", "impression"), ("[NAME]", "closing"),
      ("Radiologie, Tel. [PHONE]", "closing")]),
    ("Impression:\nNormal study.\nElectronically signed by: Dr. [NAME]",
     [("Normal study.", "impression"), ("Electronically signed by: Dr. [NAME]", "closing")]),
    ("Leber o.B. Milz o.B.", [("Leber o.B.", None), ("Milz o.B.", None)]),
    ("Befund:\nLeber o.B.\n\nCA 19-9 erhöht.\n\nOA Dr. [NAME]\nTel. [PHONE]",
     [("Leber o.B.", "findings"), ("CA 19-9 erhöht.", "findings"), ("OA Dr. [NAME]", "closing"),
      ("Tel. [PHONE]", "closing")]),
]


@pytest.mark.parametrize(("report", "expected"), STRUCTURE, ids=[r[:30] for r, _ in STRUCTURE])
def test_headers_lists_lines_and_sections(report: str, expected: list[tuple[str, str | None]]) -> None:
    assert [(s.text, s.section) for s in split(report)] == expected


@pytest.mark.parametrize("report", ["", "   ", "\n\r\n\t \n"])
def test_empty_input_gives_no_spans(report: str) -> None:
    assert split_sentences(report, "de") == []


def test_headers_alone_are_not_sentences() -> None:
    assert split_sentences("Befund:\n\nBeurteilung:\n", "de") == []


def test_unknown_language_is_rejected() -> None:
    with pytest.raises(CurationError, match="language 'fr' is not supported; expected 'de' or 'en'"):
        split_sentences("Foie normal.", "fr")


@pytest.mark.parametrize(("word", "section"), [
    ("Klinische Angaben", "clinical_information"), ("Fragestellung", "question"), ("Technik", "technique"),
    ("Befund", "findings"), ("Beurteilung", "impression"), ("Zusammenfassung", "impression"),
    ("Findings", "findings"), ("Impression", "impression"), ("Clinical information", "clinical_information"),
    ("Technique", "technique"), ("Comparison", "comparison"), ("Conclusion", "impression")])
def test_required_header_words_are_known(word: str, section: str) -> None:
    assert word in SECTION_HEADERS[section]
    assert [(s.text, s.section) for s in split(f"{word.upper()}: Text.")] == [("Text.", section)]


# ---- properties over synthetic reports --------------------------------------------------------------
def _drop(args: tuple[Path, int]) -> Path:
    out, seed = args
    generate_drop(out, patients=6, seed=seed)
    return out / "reports.csv"


@pytest.fixture(scope="module")
def drop_reports(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """(language, report_text) of two generated drops, built in parallel; seeds 4 and 7 are small drops
    (218 DICOM files together) that still hold 4 English reports."""
    root = tmp_path_factory.mktemp("sentences")
    with ProcessPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(_drop, [(root / f"d{seed}", seed) for seed in (4, 7)]))
    rows = [row for p in paths for row in csv.DictReader(io.StringIO(p.read_text(encoding="utf-8"), newline=""))]
    assert len(rows) >= 10
    return [(row["language"], row["report_text"]) for row in rows]


def _placeholder(phi: str) -> str:
    """The placeholder the scrubber would put in place of ``phi`` (by its shape)."""
    if re.fullmatch(r"A?\d{6,}", phi):
        return "[ID]"
    if re.search(r"\d{4}|\d\.\d", phi) and not phi.startswith(("+", "(", "0")):
        return "[DATE]"
    return "[PHONE]" if re.search(r"\d", phi) else "[NAME]"


def _scrubbed_reports(n: int) -> list[tuple[str, str]]:
    """Many more synthetic reports, cheaply, with their PHI replaced by placeholders as the scrubber does."""
    out = []
    for seed in range(n):
        rng = random.Random(seed)
        language = rng.choice(("de", "en"))
        findings = [Finding("liver", "lesion", rng.uniform(4, 40), rng.choice(("VII", "V", "IVa"))),
                    Finding("kidney_right", "cyst", rng.uniform(4, 30)),
                    Finding("vertebrae", "degenerative", None, rng.choice(("T8", "L1", "L3"))),
                    Finding(rng.choice(("lung_left", "lung_right")), "effusion"),
                    Finding("aorta", "calcification")]
        report = write_report(
            rng, language=language, modality=rng.choice(("CT", "MR")), region_organs=ORGANS,
            findings=rng.sample(findings, rng.randint(0, len(findings))), patient=random_person(rng, language),
            birth_date=date(1950, 3, 4), study_date=date(2024, 2, 3),
            prior_date=rng.choice((None, date(2023, 5, 6))), physician=random_person(rng, language),
            referring=random_person(rng, language), phone="+49 89 1234567", accession="A12345678",
            patient_id="87654321")
        text = report.text
        for phi in sorted(report.phi, key=len, reverse=True):
            text = text.replace(phi, _placeholder(phi))
        out.append((language, text))
    return out


def _check_report(language: str, report: str) -> None:
    spans = split(report, language)  # verbatim, stripped, non-empty, ordered
    for s in spans:
        assert not BROKEN_NUMBER.search(US_DATE.sub("", s.text)), s
    for a, b in zip(spans, spans[1:], strict=False):  # no number torn across two sentences ("2." | "2 cm")
        torn = re.search(r"\d[.,]$", a.text) and b.text[:1].isdigit() and not report[a.end:b.start].strip()
        assert not torn, (a, b)
    for m in SIZE.finditer(report):
        assert any(s.start <= m.start() and m.end() <= s.end for s in spans), m.group()

    # Every letter is in some span, except the section header words themselves.
    covered = bytearray(len(report))
    for s in spans:
        covered[s.start:s.end] = b"\1" * (s.end - s.start)
    gaps = re.sub(r"\x00+", "\n", "".join(ch if not c else "\0" for ch, c in zip(report, covered, strict=True)))
    leftover = SYNTH_HEADER_LINE.sub("", "\n".join(line.strip() for line in gaps.splitlines()))
    assert not re.search(r"[^\W\d_]", leftover), leftover

    # Sections follow the headers; lines before the first are "header", the footer is "closing".
    headers = [(m.start(), SYNTH_HEADERS[m.group(1)]) for m in SYNTH_HEADER_LINE.finditer(report)]
    footer = [m.end() for m in re.finditer(r"(?:\r?\n){2}", report.rstrip())][-1]
    if SYNTH_HEADER_LINE.match(report, footer):
        footer = len(report)  # the orphan report has no signature
    for s in spans:
        expected = "closing" if s.start >= footer else max(
            ((p, sec) for p, sec in headers if p <= s.start), default=(0, "header"))[1]
        assert s.section == expected, (s, report)


def test_every_drop_report_splits_cleanly(drop_reports: list[tuple[str, str]]) -> None:
    for language, report in drop_reports:
        _check_report(language, report)


def test_many_scrubbed_reports_split_cleanly() -> None:
    reports = _scrubbed_reports(300)
    assert any("[DATE]" in r for _, r in reports) and any("[NAME]" in r for _, r in reports)
    for language, report in reports:
        _check_report(language, report)
        _check_report(language, report.replace("\n", "\r\n"))
