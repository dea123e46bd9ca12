"""tasks/scrub.py against header values in forms the synthetic generator never makes (issue 15, item 2).

The synthetic drop writes a patient's ID and name the way its header holds them; real clerks pad
or strip zeros, add separators, move or abbreviate particles, drop umlauts and shout in capitals.
Every case is checked byte for byte: the PHI replaced by its placeholder, every other character
as it was. Expected texts are written by hand from the cases themselves. Most contexts carry no
title, label or cue ("laut X", "mit X besprochen"), so the header value, not tasks/phi_text.py, is
what must find the PHI; the negatives hold what a looser rule would eat: measurements, decimals,
clock times, particles, clinical abbreviations shaped like initials, and words that a name turns
into once its umlaut is dropped.
"""

from __future__ import annotations

import pytest

from tasks.scrub import KnownPHI, scrub_report
from tests.tasks.test_scrub import assert_only_redactions_changed


def scrub(text: str, *, names: tuple[str, ...] = (), ids: tuple[str, ...] = (), language: str = "de") -> str:
    result = scrub_report(text, KnownPHI(person_names=names, identifiers=ids), date_offset_days=None,
                          language=language)
    assert_only_redactions_changed(text, result)
    return result.text


# ---- identifiers ---------------------------------------------------------------------------------
ID_CASES = [  # (header value, report text, expected)
    # zero-padded in the header, stripped in the report, and the other way round
    ("00012345", "Voraufnahme unter 12345 archiviert.", "Voraufnahme unter [ID] archiviert."),
    ("00004711", "Vergleich mit 4711 vom Vorjahr.", "Vergleich mit [ID] vom Vorjahr."),
    ("12345", "Voraufnahme unter 0012345 archiviert.", "Voraufnahme unter [ID] archiviert."),
    ("4711", "Vergleich mit 04711 vom Vorjahr.", "Vergleich mit [ID] vom Vorjahr."),
    ("00012345", "Voraufnahme unter 0001-2345 archiviert.", "Voraufnahme unter [ID] archiviert."),
    # separators in the report only
    ("12345678", "Akte 123-456-78, 123 456 78, 123.456.78 und 123/45678.", "Akte [ID], [ID], [ID] und [ID]."),
    # separators in the header: every other spelling of the same digits
    ("123-456-78", "Akte 12345678, 123 456 78, 123.456.78 und 123/45678.", "Akte [ID], [ID], [ID] und [ID]."),
    ("123 456 78", "Akte 12345678, 123-456-78 und 123/45678.", "Akte [ID], [ID] und [ID]."),
    ("123.456.78", "Akte 12345678, 123 456 78 und 123/45678.", "Akte [ID], [ID] und [ID]."),
    ("123/45678", "Akte 12345678, 123 456 78 und 123.456.78.", "Akte [ID], [ID] und [ID]."),
    ("0012-3456", "Vergleich mit 123456 vom Vorjahr.", "Vergleich mit [ID] vom Vorjahr."),
]


@pytest.mark.parametrize("header,text,expected", ID_CASES)
def test_known_id_is_removed_padded_stripped_and_with_separators(header: str, text: str, expected: str) -> None:
    assert scrub(text, ids=(header,)) == expected


ID_LOOK_ALIKES = [  # (header value, report text that must stay byte for byte)
    ("00004711", "nach 4711 ml KM, Quotient 0,4711, Wert 4711,5 und 1.4711 mm"),  # zero-stripped "4711"
    ("4711", "nach 4711 ml KM, Quotient 0,4711, Wert 4711,5 und 1.4711 mm"),
    ("00004711", "Serie 14711, Bild 47110, Aufnahme 94711"),  # another number sharing a suffix or prefix
    ("00012345", "Volumen 12345 mm³ und 12.345 ml sowie 1-2345"),  # no separators inside a short form
    ("0001200", "DLP 1200 mGy, 1200 ms, 1200,5 HU, Volumen 1200 cm3"),
]


@pytest.mark.parametrize("header,text", ID_LOOK_ALIKES)
def test_numbers_that_only_resemble_a_known_id_stay(header: str, text: str) -> None:
    assert scrub(text, ids=(header,)) == text


# ---- names with particles ------------------------------------------------------------------------
PARTICLE_CASES = [  # (header PN or name, report text, expected)
    ("von Müller^Hans", "laut Müller, Hans von unauffällig", "laut [NAME] unauffällig"),
    ("von Müller^Hans", "laut Hans von Müller unauffällig", "laut [NAME] unauffällig"),
    ("von Müller^Hans", "laut H. v. Müller unauffällig", "laut [NAME] unauffällig"),
    ("von Müller^Hans", "mit von Müller besprochen", "mit [NAME] besprochen"),
    ("von Müller^Hans", "mit Von Müller und VON MÜLLER besprochen", "mit [NAME] und [NAME] besprochen"),
    ("von Müller^Hans", "Aufkleber VON MÜLLER^HANS am Film", "Aufkleber [NAME] am Film"),
    ("Hans von Müller", "Aufkleber von Müller^Hans am Film", "Aufkleber [NAME] am Film"),
    ("Müller, Hans von", "laut Hans von Müller unauffällig", "laut [NAME] unauffällig"),
    ("VON MÜLLER^HANS", "laut hans von müller unauffällig", "laut [NAME] unauffällig"),
    ("van der Berg^Anna^^Dr.", "laut Berg, Anna van der unauffällig", "laut [NAME] unauffällig"),
    ("van der Berg^Anna^^Dr.", "laut A. v. d. Berg unauffällig", "laut [NAME] unauffällig"),
    ("van der Berg^Anna^^Dr.", "Aufkleber VAN DER BERG^ANNA; mit Van Der Berg besprochen",
     "Aufkleber [NAME]; mit [NAME] besprochen"),
    ("Anna van der Berg", "laut Berg, Anna van der unauffällig", "laut [NAME] unauffällig"),
    ("de la Cruz^Ana", "laut Cruz, Ana de la unauffällig", "laut [NAME] unauffällig"),
    ("de la Cruz^Ana", "Aufkleber DE LA CRUZ^ANA; mit De La Cruz besprochen",
     "Aufkleber [NAME]; mit [NAME] besprochen"),
    ("De La Cruz^Ana", "laut ana de la cruz unauffällig", "laut [NAME] unauffällig"),
]


@pytest.mark.parametrize("pn,text,expected", PARTICLE_CASES)
def test_names_with_particles_in_every_order(pn: str, text: str, expected: str) -> None:
    assert scrub(text, names=(pn,)) == expected


@pytest.mark.parametrize("pn", ["von Müller^Hans", "van der Berg^Anna^^Dr.", "de la Cruz^Ana", "Hans von Müller"])
def test_particles_alone_are_not_the_name(pn: str) -> None:
    text = ("Voraufnahme von 2019, Befund der Leber vom Vorjahr, Läsion de novo, Ansicht von lateral, "
            "kein Anhalt für Morbus van Buchem, zum Ausschluss zu beachten.")
    assert scrub(text, names=(pn,)) == text


# ---- double-barrelled names, each part alone --------------------------------------------------------
@pytest.mark.parametrize("pn,text,expected", [
    ("Müller-Lüdenscheidt^Hans", "laut müller unauffällig, lüdenscheidt informiert",
     "laut [NAME] unauffällig, [NAME] informiert"),
    ("Müller-Lüdenscheidt^Hans", "Frau Müller und Herrn Lüdenscheidt", "Frau [NAME] und Herrn [NAME]"),
    ("Müller-Lüdenscheidt^Hans", "laut Müller Lüdenscheidt unauffällig", "laut [NAME] unauffällig"),
    ("Schmidt Meyer^Anna", "laut schmidt unauffällig, meyer informiert", "laut [NAME] unauffällig, [NAME] informiert"),
    ("Schmidt Meyer^Anna", "Frau Schmidt und Herrn Meyer", "Frau [NAME] und Herrn [NAME]"),
    ("Schmidt Meyer^Anna", "laut Schmidt-Meyer unauffällig", "laut [NAME] unauffällig"),
])
def test_double_barrelled_names_in_part_and_whole(pn: str, text: str, expected: str) -> None:
    assert scrub(text, names=(pn,)) == expected


# ---- initials ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pn,text,expected", [
    ("Müller^Hans", "laut H. M. unauffällig", "laut [NAME] unauffällig"),
    ("Müller^Hans", "laut H.M. unauffällig", "laut [NAME] unauffällig"),
    ("Müller^Hans-Jürgen", "laut H.-J. Müller unauffällig", "laut [NAME] unauffällig"),
    ("Müller^Hans-Jürgen", "laut H.-J. M. unauffällig", "laut [NAME] unauffällig"),
    ("MÜLLER^HANS JÜRGEN", "laut H. J. Müller unauffällig", "laut [NAME] unauffällig"),
    # particles are no given names: "Hans von Müller" is H. M. (or H. v. M.), not H. V. M.
    ("Hans von Müller", "laut H. M. unauffällig", "laut [NAME] unauffällig"),
    ("Müller, Hans von", "laut H. v. M. unauffällig", "laut [NAME] unauffällig"),
    ("van der Berg^Anna", "laut A. v. d. B. unauffällig", "laut [NAME] unauffällig"),
])
def test_initials_of_the_known_name(pn: str, text: str, expected: str) -> None:
    assert scrub(text, names=(pn,)) == expected


@pytest.mark.parametrize("pn,text,language", [
    # bare capitals are somebody's initials and also the report's abbreviations: they stay
    ("Thomas^Claudia", "CT Thorax mit KM, LK unauffällig.", "de"),
    ("Müller^Klaus", "CT Thorax mit KM, LK unauffällig.", "de"),
    ("Müller^Hans", "Befund HM unauffällig, V.a. Metastase, Z.n. OP, Leber o.B.", "de"),
    ("Miller^Anna", "CT at 10 A.M. and 4 P.M., no change.", "en"),  # a clock time, not "A. M."
])
def test_abbreviations_shaped_like_initials_stay(pn: str, text: str, language: str) -> None:
    assert scrub(text, names=(pn,), language=language) == text


# ---- capitals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pn,text,expected", [
    ("Müller^Hans", "laut HANS MÜLLER unauffällig; MÜLLER, HANS", "laut [NAME] unauffällig; [NAME]"),
    ("MUELLER^HANS", "laut Hans Müller unauffällig, müller informiert", "laut [NAME] unauffällig, [NAME] informiert"),
    ("MUELLER^HANS", "mit MÜLLER besprochen", "mit [NAME] besprochen"),
    ("Dupré^René", "mit DUPRÉ besprochen", "mit [NAME] besprochen"),
])
def test_upper_case_in_header_or_report(pn: str, text: str, expected: str) -> None:
    assert scrub(text, names=(pn,)) == expected


# ---- transliterations, both directions -------------------------------------------------------------
TRANSLITERATIONS = [  # (header PN, report text, expected)
    ("Müller^Hans", "mit Mueller und Muller besprochen", "mit [NAME] und [NAME] besprochen"),
    ("Müller^Hans", "mit MUELLER und MULLER besprochen", "mit [NAME] und [NAME] besprochen"),
    ("MUELLER^HANS", "mit Müller und Muller besprochen", "mit [NAME] und [NAME] besprochen"),
    ("Müller^Hans", "laut Hans Muller unauffällig", "laut [NAME] unauffällig"),
    ("Groß^Karin", "mit Gross und GROSS besprochen", "mit [NAME] und [NAME] besprochen"),
    ("Gross^Karin", "mit Groß besprochen", "mit [NAME] besprochen"),
    ("Köhler^Jörg", "mit Koehler und Kohler besprochen", "mit [NAME] und [NAME] besprochen"),
    ("Koehler^Joerg", "laut Jörg Köhler unauffällig", "laut [NAME] unauffällig"),
    ("Bär^Käthe", "mit Baer und BAER besprochen", "mit [NAME] und [NAME] besprochen"),
    ("Baer^Kaethe", "mit Bär besprochen", "mit [NAME] besprochen"),
    ("Schäfer^Jürgen", "mit Schaefer und Schafer besprochen", "mit [NAME] und [NAME] besprochen"),
    ("Dupré^René", "mit Dupre besprochen", "mit [NAME] besprochen"),
    ("DUPRE^RENE", "mit Dupré besprochen", "mit [NAME] besprochen"),
    ("Dupre^Rene", "laut René Dupré unauffällig", "laut [NAME] unauffällig"),
]


@pytest.mark.parametrize("pn,text,expected", TRANSLITERATIONS)
def test_umlaut_and_accent_transliterations_both_ways(pn: str, text: str, expected: str) -> None:
    assert scrub(text, names=(pn,)) == expected


@pytest.mark.parametrize("pn,text", [
    # an umlaut dropped from the surname alone would make it a word: the word stays
    ("Größ^Karin", "Herz normal groß, Milz GROSS, Gross-Befund"),
    ("Schön^Eva", "Befund schon 2019 bekannt, Schon damals klein."),
    ("Bär^Eva", "Druck 2 bar, Bar-Code"),
])
def test_dropped_umlaut_does_not_eat_words(pn: str, text: str) -> None:
    assert scrub(text, names=(pn,)) == text
