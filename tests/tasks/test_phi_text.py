"""Tests for tasks/phi_text.py: PHI that no DICOM header names leaves, clinical words stay.

Every case runs through scrub_report with an EMPTY KnownPHI, so only the header-free rules can
find anything. Expected texts are written by hand.
"""

from __future__ import annotations

import gzip
import re
from importlib import resources

import pytest

from tasks.phi_text import Found, find_addresses, find_ids, find_names, find_phi, vocabulary
from tasks.scrub import PLACEHOLDERS, KnownPHI, locate_phi, scrub_report


def scrub(text: str, language: str = "de") -> str:
    result = scrub_report(text, KnownPHI(), date_offset_days=None, language=language)
    kept, pos = [], 0  # outside its placeholders the scrubbed text is the original, byte for byte
    for r in result.redactions:
        assert result.text[r.start:r.end] == PLACEHOLDERS[r.category]
        kept.append(result.text[pos:r.start])
        pos = r.end
    kept.append(result.text[pos:])
    assert re.fullmatch("(?s)" + ".+?".join(map(re.escape, kept)), text), result.text
    return result.text


def test_the_motivating_line() -> None:
    assert scrub("Pat. Ämilie Wolfsgrübler, KVNR-77aa310.") == "Pat. [NAME], [ID]."


HEADER_FREE_CASES = [  # (language, text, expected)
    # patients after a cue, in any spelling, known to no list
    ("de", "Pat. Ämilie Wolfsgrübler kommt zur Kontrolle.", "Pat. [NAME] kommt zur Kontrolle."),
    ("de", "Patientin Käthe Strauß, geb. [x]", "Patientin [NAME], geb. [x]"),
    ("de", "Patient: Weihmann, Hans-Gerd (Station 3)", "Patient: [NAME] (Station 3)"),
    ("en", "Name: Gallagher, Ryan  DOB: [x]", "Name: [NAME]  DOB: [x]"),
    # relatives
    ("de", "Tochter Anna Schmidt wurde informiert.", "Tochter [NAME] wurde informiert."),
    ("de", "Rückruf an Ehemann Klaus erbeten.", "Rückruf an Ehemann [NAME] erbeten."),
    ("de", "Lebensgefährtin, Brigitte Oderwald, begleitet.", "Lebensgefährtin, [NAME], begleitet."),
    ("de", "Rückruf an Ehemann Jan-Peter Pechel erbeten.", "Rückruf an Ehemann [NAME] erbeten."),
    # a surname that is also a word, where the cue and a given name leave no doubt; "Sturz" is the fall
    ("de", "Name: Katja Linke (Station 3)", "Name: [NAME] (Station 3)"),
    ("de", "Nach Angaben von Mutter Franziska Sturz am Vortag.", "Nach Angaben von Mutter [NAME] Sturz am Vortag."),
    ("en", "Discussed with her husband John Miller by phone.", "Discussed with her husband [NAME] by phone."),
    ("en", "The patient's daughter (Mary) was present.", "The patient's daughter ([NAME]) was present."),
    # other physicians, with or without a title
    ("de", "Rücksprache mit der Hausärztin Gabriele Wohlgemut.", "Rücksprache mit der Hausärztin [NAME]."),
    ("de", "Überweisung durch Dr. med. Karsten Wieloch-Bolnbach", "Überweisung durch Dr. med. [NAME]"),
    ("de", "gez. Thomas Berger", "gez. [NAME]"),
    ("de", "Kopie an Dr. van der Dussen", "Kopie an Dr. [NAME]"),
    ("en", "Images reviewed with Dr Brown at the workstation.", "Images reviewed with Dr [NAME] at the workstation."),
    ("en", "GP: Helen Hughes", "GP: [NAME]"),
    # names with no cue at all: a listed first name + surname, "Surname, First", an initial
    ("de", "Befund telefonisch an Anna Schmidt übermittelt.", "Befund telefonisch an [NAME] übermittelt."),
    ("de", "Vorbefund von Schmidt, Anna liegt vor.", "Vorbefund von [NAME] liegt vor."),
    ("de", "Information an H. Müller erfolgt.", "Information an [NAME] erfolgt."),
    ("de", "Mit Anna von Bülow besprochen.", "Mit [NAME] besprochen."),
    ("en", "Findings communicated to Gallagher at 14:30.", "Findings communicated to [NAME] at 14:30."),
    # addresses
    ("de", "Wohnhaft Hauptstraße 12, 80331 München.", "Wohnhaft [ADDRESS], [ADDRESS]."),
    ("de", "Adresse: Kurt-Schumacher-Weg 9-11", "Adresse: [ADDRESS]"),
    ("de", "Praxis Am Lindenhof 3a, D-69117 Heidelberg", "Praxis [ADDRESS], [ADDRESS]"),
    ("de", "Sorgatzstr. 6/2, 88360 Bad Waldsee", "[ADDRESS], [ADDRESS]"),
    ("de", "Wohnort A-1010 Wien", "Wohnort [ADDRESS]"),
    ("en", "Lives at 353 Kathleen Highway Apt. 681, Springfield, IL 62704.", "Lives at [ADDRESS], [ADDRESS]."),
    ("en", "Home: 12 N. Main St., London NW1 6XE", "Home: [ADDRESS], London [ADDRESS]"),
    # insurance numbers and other IDs
    ("de", "KV-Nr. X123456789, Versichertennummer: A987654321", "KV-Nr. [ID], Versichertennummer: [ID]"),
    ("de", "Fall-Nr.: 4711-A", "Fall-Nr.: [ID]"),
    ("en", "MRN 0012345, NHS No. 943 476 5919", "MRN [ID], NHS No. [ID]"),
    ("en", "Insurance ID: QWE123456789", "Insurance ID: [ID]"),
    ("en", "phone +1-540-611-0704x123 or (408)389-9579", "phone [PHONE] or [PHONE]"),
]


@pytest.mark.parametrize("language,text,expected", HEADER_FREE_CASES)
def test_phi_is_found_without_the_header(language: str, text: str, expected: str) -> None:
    assert scrub(text, language) == expected


SURVIVES = [  # clinical text that holds name-list words, eponyms, measurements and vertebra levels
    ("de", "Leber o.B. Herz normal groß. Lunge beidseits frei. Niere li. ohne Harnstau."),
    ("de", "Kopf, Hals: unauffällig. Magen und Darm ohne Wandverdickung."),
    ("de", "Fuß: Fraktur des Os metatarsale V. Knochen, Wirbel und Becken ohne Destruktion."),
    ("de", "Leber, Milz, Pankreas und Nieren unauffällig."),
    ("de", "Mark und Rinde der Nieren regelrecht differenziert. Stein im Harnleiter links, 4 mm."),
    ("de", "Gabe von 100 ml Imeron 350. Art der Untersuchung: CT Abdomen."),
    ("de", "Kleiner Rundherd im Oberlappen links, 6 mm. Lange Strecke der Aorta mit Plaques."),
    ("de", "Sprunggelenksfraktur Typ Weber B links. Baker-Zyste rechts. Freie Flüssigkeit im Douglasraum."),
    ("de", "Bosniak IIF Zyste. Spondylolisthesis L5/S1 Meyerding Grad I. Morbus Crohn."),
    ("de", "Osteochondrose LWK 5 und C5/6, Th12 höhengemindert, BWK 8 intakt, Dens C2 intakt."),
    ("de", "Zyste 2,2 x 1,8 cm in Segment IVa und VII. Bild 45/120, Serie 3. 120 kV, 250 mAs."),
    ("de", "CTDIvol 12,3 mGy, DLP 456 mGy*cm. Dosis 12000 IE Heparin, 12000 Einheiten."),
    ("de", "Im Verlauf 3 Monate konstant. Am Unterlappen 2 kleine Noduli. Im Segment 7 eine Zyste."),
    ("de", "Magnetfeld 3 Tesla. Damm 2 cm verdickt. Ring 3 mm."),
    ("de", "Vater verstorben an Herzinfarkt, Mutter Diabetes. Tochter begleitet die Patientin."),
    ("de", "Patient Aufklärung erfolgt. Pat. nüchtern. Hausarzt informiert."),
    ("en", "The Head and Neck are unremarkable. Bone Mass is normal. Liver: normal. Heart size is normal."),
    ("en", "Weber B fracture of the left ankle. Smith fracture of the distal radius. Baker cyst."),
    ("en", "Free fluid in the pouch of Douglas. Circle of Willis patent. Ampulla of Vater."),
    ("en", "Mark the incision site. Will follow up in 3 months. May represent atelectasis."),
    ("en", "Long segment of the aorta. Young patient. Green stick fracture. White matter changes, Fazekas 2."),
    ("en", "2.2 x 1.8 cm lesion in hepatic segment IVa. Degenerative changes at L5/S1, T12 and C5/6."),
    ("en", "2 Femoral Neck views. Patient Details: none. Patient tolerated the procedure well."),
    ("en", "Arnold Chiari malformation. Salter Harris II fracture. Kellgren Lawrence grade 3."),
    ("en", "Performed on a Siemens Somatom Force; filter (Boston Scientific) in place. Transferred from Mayo Clinic."),
    # curate re-scans German questions with language="en": the English rules must not fire
    ("en", "In welchem Organ zeigt sich eine Verkalkung?"),
]


@pytest.mark.parametrize("language,text", SURVIVES)
def test_clinical_text_survives_byte_for_byte(language: str, text: str) -> None:
    result = scrub_report(text, KnownPHI(), date_offset_days=None, language=language)
    assert (result.text, result.redactions) == (text, ())


def test_name_lists_load_and_hold_common_names() -> None:
    vocab = vocabulary()
    assert {"müller", "schmidt", "smith", "yılmaz", "nowak"} <= vocab.last
    assert {"anna", "hans", "mary", "mehmet"} <= vocab.first
    # names-dataset lists anatomy words as surnames; the allowlist is what keeps them
    assert {"leber", "herz"} <= vocab.last and {"leber", "herz", "lunge", "niere", "head"} <= vocab.never
    assert find_phi("Leber und Lunge o.B., Herz und Niere unauffällig.", "de") == []


def test_name_list_files_name_their_source() -> None:
    folder = resources.files("radground.data").joinpath("names")
    for name in ("first_names.txt.gz", "last_names.txt.gz"):
        with gzip.open(folder.joinpath(name).open("rb"), "rt", encoding="utf-8") as f:
            header = [next(f) for _ in range(3)]
        assert header[1].startswith("# source: names-dataset 3.3.1"), header
        assert "scripts/build-name-lists.py" in header[2], header


def test_detectors_return_spans_of_the_text_searched() -> None:
    text = "Tochter Anna Schmidt, Hauptstraße 12, KVNR-77aa310"
    assert find_names(text, "de") == [Found(8, 20, "name")]
    assert find_addresses(text) == [Found(22, 36, "address")]
    assert find_ids(text) == [Found(38, 50, "id")]
    assert locate_phi(text, KnownPHI(), language="de") == [(8, 20, "name"), (22, 36, "address"), (38, 50, "id")]


def test_a_second_pass_over_scrubbed_text_finds_nothing() -> None:
    for language, text, _ in HEADER_FREE_CASES:
        once = scrub_report(text, KnownPHI(), date_offset_days=None, language=language)
        twice = scrub_report(once.text, KnownPHI(), date_offset_days=None, language=language)
        assert twice.redactions == (), (text, once.text)
