"""Tests for tasks/scrub.py: PHI in every format leaves, everything else stays byte for byte."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from radground.errors import DeidError
from radground.synth import drop
from tasks.scrub import PLACEHOLDERS, KnownPHI, ScrubResult, scrub_report

KNOWN_DE = KnownPHI(person_names=("MÜLLER^HANS",), identifiers=("98828391", "A15940713"))
KNOWN_EN = KnownPHI(person_names=("O'Brien^Karen",), identifiers=("29905076", "A30757280"))


NO_KNOWN = KnownPHI()


def scrub(text: str, known: KnownPHI = NO_KNOWN, offset: int | None = None, language: str = "de") -> str:
    result = scrub_report(text, known, date_offset_days=offset, language=language)
    assert_only_redactions_changed(text, result)
    return result.text


def assert_only_redactions_changed(original: str, result: ScrubResult) -> None:
    """Outside its redactions the scrubbed text must be the original, character for character."""
    kept, pos = [], 0
    for r in result.redactions:
        assert r.category in PLACEHOLDERS
        if r.category != "date":
            assert result.text[r.start:r.end] == PLACEHOLDERS[r.category]
        kept.append(result.text[pos:r.start])
        pos = r.end
    kept.append(result.text[pos:])
    assert re.fullmatch("(?s)" + ".+?".join(map(re.escape, kept)), original), result.text


# ---- names ---------------------------------------------------------------------------------------
NAME_CASES = [  # (known PN, text, expected)
    ("MÜLLER^HANS", "Patient: Müller, Hans, geb. 1950", "Patient: [NAME], geb. 1950"),
    ("MÜLLER^HANS", "Patient: Hans Müller (67 J.)", "Patient: [NAME] (67 J.)"),
    ("MÜLLER^HANS", "Name: H. Müller", "Name: [NAME]"),
    ("MÜLLER^HANS", "Name: Müller H., Station 3", "Name: [NAME], Station 3"),
    ("MÜLLER^HANS", "Name: Müller Hans", "Name: [NAME]"),
    ("MÜLLER^HANS", "Herr Müller klagt über Dyspnoe.", "Herr [NAME] klagt über Dyspnoe."),
    ("MÜLLER^HANS", "Patient: MÜLLER^HANS", "Patient: [NAME]"),
    ("Müller^Hans^^Dr.", "Patient: Müller^Hans^^Dr.\nBefund:", "Patient: [NAME]\nBefund:"),
    ("Hans Müller", "Patient: MUELLER, HANS", "Patient: [NAME]"),
    ("Hans Müller", "Name: Mueller Hans", "Name: [NAME]"),
    ("MUELLER^HANS", "Herr Müller", "Herr [NAME]"),
    ("MÜLLER^HANS", "laut müller unauffällig", "laut [NAME] unauffällig"),
    ("Größ^Karin", "Patient: GRÖSS^KARIN", "Patient: [NAME]"),
    ("GROESS^KARIN", "Frau Größ, * 1950", "Frau [NAME], * 1950"),
    ("Weiß^Bärbel", "Frau Weiss (70 J.) und B. Weiß", "Frau [NAME] (70 J.) und [NAME]"),
    ("Strauß^Käthe", "Patientin Käthe Strauß", "Patientin [NAME]"),
    ("Smith^John", "Mr. Smith (67 y/o): Chest pain.", "Mr. [NAME] (67 y/o): Chest pain."),
    ("O'Brien^Karen", "Clinical information: Mrs. O'Brien; Karen O’Brien", "Clinical information: Mrs. [NAME]; [NAME]"),
    ("Brontë^Zoë", "Ms. Bronte; Zoe Brontë; BRONTË^ZOË", "Ms. [NAME]; [NAME]; [NAME]"),
    ("McDonald^George", "Patient: G. McDonald", "Patient: [NAME]"),
    ("Li^Wei", "Lunge li. frei. Herr Li kam, LI^WEI.", "Lunge li. frei. Herr [NAME] kam, [NAME]."),
    ("Meyer-Lüdenscheidt^Uwe", "Herr Lüdenscheidt", "Herr [NAME]"),
]


@pytest.mark.parametrize("pn,text,expected", NAME_CASES)
def test_known_names_are_removed_in_every_format(pn: str, text: str, expected: str) -> None:
    assert scrub(text, KnownPHI(person_names=(pn,))) == expected


TITLED_CASES = [  # physicians who are not in the headers, found by title, label or suffix
    ("Mit freundlichen Grüßen\nDr. med. K. Schmidt\nTel. intern",
     "Mit freundlichen Grüßen\nDr. med. [NAME]\nTel. intern"),
    ("Befundet und elektronisch freigegeben: Prof. Dr. med. S. Wolf",
     "Befundet und elektronisch freigegeben: Prof. Dr. med. [NAME]"),
    ("Überweiser: OA Dr. med. J. Schulz", "Überweiser: OA Dr. med. [NAME]"),
    ("Zuweiser: Dr. Stefan Wolf\nRadiologie, Tel.", "Zuweiser: Dr. [NAME]\nRadiologie, Tel."),
    ("Rücksprache mit OÄ Weber erfolgt.", "Rücksprache mit OÄ [NAME] erfolgt."),
    ("Zuweiser: Klaus Wolf", "Zuweiser: [NAME]"),
    ("Mit freundlichen kollegialen Grüßen\nKlaus Wolf\n", "Mit freundlichen kollegialen Grüßen\n[NAME]\n"),
    ("PD Dr. H.-P. Meyer-Lüdenscheidt", "PD Dr. [NAME]"),
    ("Electronically signed by: J. Smith, MD", "Electronically signed by: [NAME], MD"),
    ("Reported by Zoë O'Brien, MD\nFor questions", "Reported by [NAME], MD\nFor questions"),
    ("Referring physician: Dr. P. Taylor, FRCR", "Referring physician: Dr. [NAME], FRCR"),
    ("Helen Hughes, MD\nRadiology department", "[NAME], MD\nRadiology department"),
    ("Discussed with Dr. Robinson at 14:30.", "Discussed with Dr. [NAME] at 14:30."),
    ("Befund besprochen mit Klaus Wolf.", "Befund besprochen mit [NAME]."),
    ("Assistenzarzt M. Jäger", "Assistenzarzt [NAME]"),
    ("Befundet: Dr.med.K.Schmidt", "Befundet: Dr.med.[NAME]"),
    ("Dr. med. univ. Ana de la Cruz", "Dr. med. univ. [NAME]"),
    ("seen by Smith, J.", "seen by [NAME]"),
    ("Patient: Mrs. Hughes  DOB: [x]", "Patient: Mrs. [NAME]  DOB: [x]"),
    ("Frau Weiß, V.a. Metastase", "Frau [NAME], V.a. Metastase"),
]


@pytest.mark.parametrize("text,expected", TITLED_CASES)
def test_titled_names_are_removed_without_being_known(text: str, expected: str) -> None:
    assert scrub(text, KNOWN_DE) == expected


def test_capitalised_german_nouns_are_not_names() -> None:
    text = "Befund: Leber o.B. Milz o.B. Kalzifizierte Plaques der Aorta. Herz normal groß.\n"
    assert scrub(text, KNOWN_DE) == text


# ---- dates ---------------------------------------------------------------------------------------
DATE_CASES = [  # (language, text, offset, expected with that offset)
    ("de", "vom 03.02.2024.", 10, "vom 13.02.2024."),
    ("de", "vom 3.2.24", 10, "vom 13.2.24"),
    ("de", "am 28.02.2024", 2, "am 01.03.2024"),  # leap year
    ("de", "am 24.12.2025", 10, "am 03.01.2026"),
    ("de", "am 24.1.2025", 10, "am 3.2.2025"),
    ("de", "am 31.12.99", 1, "am 01.01.00"),
    ("de", "Voraufnahme vom 03.02. zum Vergleich", 10, "Voraufnahme vom 13.02. zum Vergleich"),
    ("de", "geb. 3. Februar 2024", 30, "geb. 4. März 2024"),
    ("de", "geb. 24. Dezember 2025", 10, "geb. 3. Januar 2026"),
    ("de", "am 3. Maerz 2024", 1, "am 4. Maerz 2024"),
    ("de", "seit Februar 2024", 30, "seit März 2024"),
    ("de", "seit 03/2024", 30, "seit 04/2024"),
    ("de", "MRT vom 10. Mai 2023", -10, "MRT vom 30. April 2023"),
    ("en", "Date: 2024-02-03", 10, "Date: 2024-02-13"),
    ("en", "DOB: 03/02/2024", 10, "DOB: 13/02/2024"),
    ("en", "prior study of February 3, 2024.", 10, "prior study of February 13, 2024."),
    ("en", "DATE: FEBRUARY 3, 2024", 10, "DATE: FEBRUARY 13, 2024"),
    ("en", "on 3 Feb 2024", 10, "on 13 Feb 2024"),
    ("en", "on Feb 3rd, 2024", 19, "on Feb 22nd, 2024"),
    ("en", "on the 1st of June 2024", 1, "on the 2nd of June 2024"),
    ("en", "since June 2024", -30, "since May 2024"),
    ("en", "2024-03 follow-up", 20, "2024-04 follow-up"),
    # 25 > 12 shows this report writes month first, so 02/03 is February 3rd too.
    ("en", "scans 02/25/2024 and 02/03/2024", 1, "scans 02/26/2024 and 02/04/2024"),
]


@pytest.mark.parametrize("language,text,offset,expected", DATE_CASES)
def test_dates_shift_in_their_own_format(language: str, text: str, offset: int, expected: str) -> None:
    assert scrub(text, offset=offset, language=language) == expected


@pytest.mark.parametrize("language,text,offset,expected", DATE_CASES)
def test_dates_without_offset_become_placeholders(language: str, text: str, offset: int, expected: str) -> None:
    result = scrub_report(text, KnownPHI(), date_offset_days=None, language=language)
    assert "[DATE]" in result.text and not re.search(r"\d{2}", result.text.replace("[DATE]", ""))
    assert [r.category for r in result.redactions] == ["date"] * result.text.count("[DATE]")


def test_shifted_dates_keep_their_interval() -> None:
    result = scrub("Studie 03.02.2024, Voruntersuchung vom 15.11.2023.", offset=-400)
    first, second = re.findall(r"\d{2}\.\d{2}\.\d{4}", result)
    day = lambda s: np.datetime64(f"{s[6:]}-{s[3:5]}-{s[:2]}")  # noqa: E731
    assert (day(first) - day(second)).astype(int) == 80


def test_impossible_date_is_still_removed() -> None:
    assert scrub("am 31.02.2024 erfolgt", offset=5) == "am [DATE] erfolgt"


# ---- phones, e-mail, identifiers, other --------------------------------------------------------------
PATTERN_CASES = [  # (text, expected)
    ("Radiologie, Tel. 089 4400-12345\n", "Radiologie, Tel. [PHONE]\n"),
    ("Rückfragen unter Tel.: 040 7252-81013", "Rückfragen unter Tel.: [PHONE]"),
    ("Zentrale +49 30 1234567.", "Zentrale [PHONE]."),
    ("Tel. 0221/123456", "Tel. [PHONE]"),
    ("Fax: (089) 4400 5555", "Fax: [PHONE]"),
    ("bitte Durchwahl -4711 anrufen", "bitte Durchwahl [PHONE] anrufen"),
    ("Phone: +44 20 7946 0123", "Phone: [PHONE]"),
    ("call (555) 010-4477 for questions", "call [PHONE] for questions"),
    ("Kontakt: k.schmidt@klinikum-nord.de.", "Kontakt: [EMAIL]."),
    ("Fall KIS-123456, Auftrag A12345678", "Fall [ID], Auftrag [ID]"),
    ("Fallnummer 1234567", "Fallnummer [ID]"),
    ("Study UID 1.2.826.0.1.3680043.8.498.17 archived", "Study UID [ID] archived"),
    ("Versicherten-Nr. 123-45-678", "Versicherten-Nr. [ID]"),
]


@pytest.mark.parametrize("text,expected", PATTERN_CASES)
def test_phones_emails_and_ids_by_pattern(text: str, expected: str) -> None:
    assert scrub(text) == expected


def test_known_identifiers_and_other_values() -> None:
    known = KnownPHI(identifiers=("98828391", "A15940713", "1000"),
                     other=("Klinikum Rechts der Isar-Süd", "Hauptstraße 12, 80331 München", "CT1"))
    text = ("PID: 98828391 (alt: 9882 8391), Acc. a15940713, Studien-Nr. 1000; 1000 ml KM.\n"
            "Klinikum rechts der Isar-Süd, Hauptstrasse 12. Gerät CT1.")
    assert scrub(text, known) == ("PID: [ID] (alt: [ID]), Acc. [ID], Studien-Nr. [ID]; 1000 ml KM.\n"
                                  "[REDACTED], [REDACTED]. Gerät [REDACTED].")


def test_redactions_name_categories_and_offsets_not_values() -> None:
    text = "Patient: Hans Müller, geb. 03.02.1950, Tel. 089 4400-12345, PID 98828391, x@y.de"
    result = scrub_report(text, KNOWN_DE, date_offset_days=None, language="de")
    assert result.text == "Patient: [NAME], geb. [DATE], Tel. [PHONE], PID [ID], [EMAIL]"
    assert [r.category for r in result.redactions] == ["name", "date", "phone", "id", "email"]
    assert [result.text[r.start:r.end] for r in result.redactions] == [
        "[NAME]", "[DATE]", "[PHONE]", "[ID]", "[EMAIL]"]


# ---- must stay intact --------------------------------------------------------------------------
INTACT = [
    "Läsion 2.2 cm", "Läsion 2,2 cm", "Läsion 22 mm", "Zyste 2,2 x 1,8 cm", "Milz 11 cm", "3,2 x 2,1 x 1,5 cm",
    "Stenose 70 %", "Stenose 70%", "kortikale Zyste (Bosniak I)", "Osteochondrose LWK 5", "Fraktur BWK 8",
    "Bandscheibe L5/S1", "Degenerative changes at T8.", "Dens C2 intakt", "Lebersegment VII",
    "hepatic segment IVa", "Befund:\nLeber o.B.\n\nBeurteilung:\n1. Zyste.\n2. Erguss.",
    "Bild 45/120", "Serie 3, Bild 12/48", "um 14:30 Uhr", "nach 120 ml KM (Imeron 350)",
    "Schichtdicke 1 mm", "Z.n. OP 2019", "Verlaufskontrolle in 3 Monaten.", "Follow-up CT in 3 months.",
    "Lunge li. und re. frei", "Dichte 35 HU", "Gadoterat 0,1 mmol/kg", "Ratio 1:2", "12.5 mm",
    "V.a. Metastase, DD z.B. Hämangiom", "CT THORAX/ABDOMEN MIT KM", "MR CHEST AND ABDOMEN WITH IV CONTRAST",
    "Pleuraerguss bds., max. 1,5 cm", "Mamma-CA links", "Größenprogredient um 3 mm", "Tumormarker CA 19-9",
]


# Known surnames that are also words or abbreviations: "Größ" vs "groß", "Li" vs "li.".
KNOWN_TRICKY = KnownPHI(person_names=("MÜLLER^HANS", "Größ^Karin", "Li^Wei"), identifiers=("98828391",))


@pytest.mark.parametrize("text", [*INTACT, "Herz normal groß, Milz GROSS", "Lunge li. frei"])
@pytest.mark.parametrize("language", ["de", "en"])
def test_clinical_content_stays_intact(text: str, language: str) -> None:
    result = scrub_report(text, KNOWN_TRICKY, date_offset_days=30, language=language)
    assert (result.text, result.redactions) == (text, ())


def test_rejects_unknown_language_and_bad_offset() -> None:
    with pytest.raises(DeidError, match=r"language 'fr' is not supported; expected one of \('de', 'en'\)"):
        scrub_report("x", KnownPHI(), date_offset_days=None, language="fr")
    with pytest.raises(DeidError, match="date_offset_days must be an int or None, got float"):
        scrub_report("x", KnownPHI(), date_offset_days=1.5, language="de")  # type: ignore[arg-type]


# ---- property: every planted PHI string of synthetic drops leaves ----------------------------------
@pytest.fixture(scope="module")
def synthetic_drops(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict, dict[str, dict]]]:
    """(truth, reports by accession) for two real synthetic drops (no stubs: ~5 s each)."""
    out = []
    for seed in (3, 2026):
        result = drop.generate_drop(tmp_path_factory.mktemp(f"seed{seed}") / "d", patients=8, seed=seed)
        truth = json.loads(Path(result.truth_path).read_text(encoding="utf-8"))
        with open(result.drop_dir / "reports.csv", encoding="utf-8", newline="") as f:
            rows = {row["accession_number"]: row for row in csv.DictReader(f)}
        out.append((truth, rows))
    return out


def _occurs(value: str, text: str) -> bool:
    return re.search(rf"(?<![^\W_]){re.escape(value)}(?![^\W_])", text, re.IGNORECASE) is not None


def _size_forms(size_mm: float) -> list[str]:
    """How the generator may write a size: cm with one decimal ("." or ",") or whole mm."""
    cm, mm = f"{size_mm / 10:.1f}", f"{size_mm:.0f}"
    return [f"{n} {unit}" for n, unit in ((cm, "cm"), (cm.replace(".", ","), "cm"), (mm, "mm"),
                                            (cm, "x"), (cm.replace(".", ","), "x"), (mm, "x"))]


@pytest.mark.parametrize("offset", [None, -4000])
def test_synthetic_reports_lose_all_planted_phi_and_keep_sizes(synthetic_drops, offset: int | None) -> None:
    checked = 0
    for truth, rows in synthetic_drops:
        for patient in truth["patients"]:
            for study in patient["studies"]:
                row = rows.get(study["accession"])
                if study["accession"] in truth["studies_without_report"]:
                    assert row is None
                    continue
                known = KnownPHI(person_names=(patient["name"],),
                                 identifiers=(patient["patient_id"], study["accession"]))
                result = scrub_report(row["report_text"], known, date_offset_days=offset,
                                      language=row["language"])
                assert_only_redactions_changed(row["report_text"], result)
                for phi in study["report_phi"]:
                    # Letter boundaries: the name "Weiß" inside "Nachtschweiß" is not a leak.
                    assert not _occurs(phi, result.text), f"{phi!r} survived in {study['accession']}:\n{result.text}"
                    if offset is None:  # no dates left at all, so no piece of any PHI may remain either:
                        for piece in re.findall(r"[^\W_]{3,}", phi):  # "+49 89 [ID]" keeps "+49 89" < 3
                            assert not _occurs(piece, result.text), (
                                f"{piece!r} of {phi!r} survived in {study['accession']}:\n{result.text}")
                for finding in study["findings"]:
                    if finding["size_mm"] is not None:
                        assert any(form in result.text for form in _size_forms(finding["size_mm"])), (
                            f"size {finding['size_mm']} mm lost in study {study['accession']}:\n{result.text}")
                checked += 1
    assert checked >= 20  # two drops of 8 patients, 1-2 studies each


def test_scrubbing_is_idempotent_so_rescans_of_produced_text_do_not_misfire(synthetic_drops) -> None:
    # curate re-scans translations and generated questions with this function: a second pass
    # over already scrubbed text must find nothing ("signed by: Dr. [NAME]" keeps its "Dr").
    for truth, rows in synthetic_drops:
        for patient in truth["patients"]:
            known = KnownPHI(person_names=(patient["name"],), identifiers=(patient["patient_id"],))
            for study in patient["studies"]:
                row = rows.get(study["accession"])
                if row is None:
                    continue
                once = scrub_report(row["report_text"], known, date_offset_days=None, language=row["language"])
                twice = scrub_report(once.text, known, date_offset_days=None, language=row["language"])
                assert [r.category for r in twice.redactions if r.category != "date"] == [], once.text


def test_phi_no_header_names_is_removed_beside_the_known_values() -> None:
    # tasks/phi_text.py finds what the header cannot know: a relative, her address, an insurance number
    text = "Patient: Hans Müller. Tochter Anna Schmidt, Hauptstraße 12, 80331 München, KV-Nr. X123456789."
    result = scrub_report(text, KNOWN_DE, date_offset_days=None, language="de")
    assert result.text == "Patient: [NAME]. Tochter [NAME], [ADDRESS], [ADDRESS], KV-Nr. [ID]."
    assert [r.category for r in result.redactions] == ["name", "name", "address", "address", "id"]
