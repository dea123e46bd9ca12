"""Tests for the synthetic report writer: determinism, PHI bookkeeping, sizes, organs, style."""

import random
import re
from datetime import date

import pytest

from radground.errors import SynthError
from radground.synth.reports import (
    ENGLISH_FAMILY,
    ENGLISH_GIVEN,
    GERMAN_FAMILY,
    GERMAN_GIVEN,
    KINDS,
    ORGANS,
    Finding,
    Person,
    ReportText,
    random_person,
    random_phone,
    write_report,
)

MONTHS = {
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"],
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"],
}
# Words by which a reader recognises that an organ was talked about (case-insensitive).
ORGAN_WORDS = {
    "lung_left": ("lunge", "pulmonal", "lung", "pulmonary"),
    "lung_right": ("lunge", "pulmonal", "lung", "pulmonary"),
    "heart": ("herz", "kardi", "perikard", "heart", "cardi", "pericardial"),
    "aorta": ("aort",),
    "liver": ("leber", "liver", "hepatic"),
    "spleen": ("milz", "spleen", "splenic"),
    "kidney_left": ("niere", "kidney"),
    "kidney_right": ("niere", "kidney"),
    "vertebrae": ("wirbel", "spine", "vertebra"),
    "ribs": ("rippe", "rib"),
}
# Side words, also inside "linksseitig"/"rechtspulmonal"; "li."/"re." only as standalone abbreviations.
LEFT = re.compile(r"(?<!\w)(?:links\w*|linke[n]?|li\.|left)(?!\w)", re.IGNORECASE)
RIGHT = re.compile(r"(?<!\w)(?:rechts\w*|rechte[n]?|re\.|right)(?!\w)", re.IGNORECASE)
SECTIONS = {"de": ("Klinische Angaben:", "Fragestellung:", "Technik:", "Befund:", "Beurteilung:"),
            "en": ("Clinical information:", "Technique:", "Findings:", "Impression:")}
BIRTH, STUDY, PRIOR = date(1956, 2, 1), date(2024, 2, 3), date(2023, 11, 17)


def date_forms(d: date, language: str) -> set[str]:
    month = MONTHS[language][d.month - 1]
    if language == "de":
        return {f"{d.day:02d}.{d.month:02d}.{d.year}", f"{d.day}. {month} {d.year}"}
    return {f"{d.year}-{d.month:02d}-{d.day:02d}", f"{d.day:02d}/{d.month:02d}/{d.year}",
            f"{month} {d.day}, {d.year}"}


def size_pattern(size_mm: float, language: str) -> re.Pattern:
    """Size as "2,2 cm" / "2.2 cm" / "22 mm", optionally "2,2 x 1,8 cm"; English never uses a comma.

    Rounded independently of the writer: cm with one decimal, or whole mm."""
    sep = "[.,]" if language == "de" else r"\."
    cm_int, cm_frac = f"{size_mm / 10:.1f}".split(".")
    mm = f"{size_mm:.0f}"
    second = rf"(?: x \d+(?:{sep}\d)?)?"
    return re.compile(rf"(?<![\d.,])(?:{cm_int}{sep}{cm_frac}{second} cm|{mm}{second} mm)\b")


def random_findings(rng: random.Random) -> list[Finding]:
    findings = []
    for _ in range(rng.randint(0, 4)):
        organ, kind = rng.choice(ORGANS), rng.choice(KINDS)
        size = rng.choice((None, rng.randint(3, 60), round(rng.uniform(3, 60), 1)))
        detail = {"liver": rng.choice(("IV", "VII", None)),
                  "vertebrae": rng.choice(("L3", "T8", None))}.get(organ)
        findings.append(Finding(organ, kind, size, detail))
    return findings


def make(seed: int, language: str, **overrides) -> tuple[ReportText, dict]:
    """Report for one seed; the arguments come from a separate rng so the writer's rng is untouched."""
    arg_rng = random.Random(f"args-{seed}-{language}")
    args = dict(
        language=language, modality=arg_rng.choice(("CT", "MR")),
        region_organs=arg_rng.sample(ORGANS, arg_rng.randint(1, len(ORGANS))),
        findings=random_findings(arg_rng), patient=random_person(arg_rng, language), birth_date=BIRTH,
        study_date=STUDY, prior_date=arg_rng.choice((None, PRIOR)),
        physician=random_person(arg_rng, language), referring=random_person(arg_rng, language),
        phone=random_phone(arg_rng, language), accession=f"A{seed:07d}", patient_id=f"P{seed:06d}",
    )
    args.update(overrides)
    return write_report(random.Random(seed), **args), args


def section(text: str, language: str, start: str) -> str:
    """Text of one section, up to the next section header."""
    headers = SECTIONS[language]
    begin = text.index(start) + len(start)
    ends = [text.index(h, begin) for h in headers if h != start and h in text[begin:]]
    return text[begin:min(ends, default=len(text))]


CASES = [(seed, language) for seed in range(150) for language in ("de", "en")]


@pytest.fixture(scope="module")
def reports() -> list[tuple[ReportText, dict]]:
    return [make(seed, language) for seed, language in CASES]


def test_same_seed_gives_same_report_whatever_the_global_random_state():
    for seed in range(20):
        for language in ("de", "en"):
            random.seed(1000 + seed)
            first, _ = make(seed, language)
            random.seed(2000 + seed)
            assert make(seed, language)[0] == first


def test_different_seeds_give_different_texts():
    for language in ("de", "en"):
        args = make(0, language)[1]
        texts = {write_report(random.Random(seed), **args).text for seed in range(20)}
        assert len(texts) == 20


def test_every_phi_string_occurs_verbatim_in_text(reports):
    for report, _ in reports:
        assert report.phi, report.text
        assert len(set(report.phi)) == len(report.phi)
        for item in report.phi:
            assert item and item in report.text, (item, report.text)


def test_names_phone_and_dates_are_recorded_as_phi(reports):
    for report, args in reports:
        phi_folded = [p.casefold() for p in report.phi]
        for person in (args["patient"], args["physician"]):
            # casefold: the DICOM style "GRÖSS^JÜRGEN" spells the family name in capitals
            assert any(person.family.casefold() in p for p in phi_folded), (person, report.phi)
        assert args["phone"] in report.phi
        language = args["language"]
        assert date_forms(BIRTH, language) & set(report.phi), report.text
        assert date_forms(STUDY, language) & set(report.phi), report.text
        has_prior = bool(date_forms(PRIOR, language) & set(report.phi))
        assert has_prior == (args["prior_date"] is not None), report.text


def test_every_occurrence_of_an_identifier_lies_inside_a_phi_span(reports):
    for report, args in reports:
        text, covered = report.text, [False] * len(report.text)
        for item in report.phi:
            for match in re.finditer(re.escape(item), text):
                covered[match.start():match.end()] = [True] * len(item)
        people = (args["patient"], args["physician"], args["referring"])
        sensitive = {args["phone"], args["accession"], args["patient_id"]}
        sensitive |= {n for p in people for n in (p.family, p.given, p.family.upper())}
        sensitive |= {d for day in (BIRTH, STUDY, PRIOR) for d in date_forms(day, args["language"])}
        for item in sensitive:
            for match in re.finditer(re.escape(item), text):
                assert all(covered[match.start():match.end()]), (item, report.phi, text)


def test_identifiers_in_text_are_recorded(reports):
    for report, args in reports:
        for key in ("accession", "patient_id"):
            assert (args[key] in report.text) == (args[key] in report.phi)
        if re.search(r"Überweiser:|Zuweiser:|Referring physician:", report.text):
            assert any(args["referring"].family in p for p in report.phi), report.text


def test_all_patient_name_styles_and_date_styles_occur(reports):
    styles, dates = set(), {"de": set(), "en": set()}
    for report, args in reports:
        p = args["patient"]
        forms = {"family_given": f"{p.family}, {p.given}", "given_family": f"{p.given} {p.family}",
                 "initial": f"{p.given[0]}. {p.family}", "dicom": f"{p.family.upper()}^{p.given.upper()}",
                 "salutation": ("Herr " if p.sex == "M" else "Frau ") + p.family
                 if args["language"] == "de" else ("Mr. " if p.sex == "M" else "Mrs. ") + p.family}
        styles |= {style for style, form in forms.items() if form in report.text.split("\n")[0]}
        dates[args["language"]] |= set(report.phi) & date_forms(STUDY, args["language"])
    assert styles == {"family_given", "given_family", "initial", "dicom", "salutation"}
    assert dates["de"] == date_forms(STUDY, "de")
    assert dates["en"] == date_forms(STUDY, "en")


def test_sections_present_in_order(reports):
    for report, args in reports:
        headers = SECTIONS[args["language"]]
        positions = [report.text.find(h) for h in headers]
        assert -1 not in positions and positions == sorted(positions), report.text
    assert any("Befund:\n" in r.text for r, _ in reports) and any("Befund: " in r.text for r, _ in reports)


def test_comparison_sentence_names_the_prior_date(reports):
    for report, args in reports:
        if args["prior_date"] is None:
            continue
        dates = "|".join(re.escape(d) for d in date_forms(PRIOR, args["language"]))
        phrase = r"Voruntersuchung vom" if args["language"] == "de" else r"prior (?:study|examination)"
        assert re.search(rf"{phrase} (?:of |from )?(?:{dates})\.", report.text), report.text


def test_each_finding_size_is_written_in_an_expected_format(reports):
    checked = 0
    for report, args in reports:
        body = section(report.text, args["language"], SECTIONS[args["language"]][-2])
        for finding in args["findings"]:
            if finding.size_mm is not None:
                assert size_pattern(finding.size_mm, args["language"]).search(body), (finding, body)
                checked += 1
    assert checked > 100


def test_size_formats_vary_like_real_reports(reports):
    german = "\n".join(r.text for r, a in reports if a["language"] == "de")
    english = "\n".join(r.text for r, a in reports if a["language"] == "en")
    assert re.search(r"\d,\d cm", german) and re.search(r"\d\.\d cm", german)
    assert re.search(r"\d mm", german) and re.search(r"\d(?:,\d)? x \d", german)
    assert re.search(r"\d\.\d cm", english) and re.search(r"\d mm", english)
    assert not re.search(r"\d,\d (?:cm|mm)", english)


def test_every_region_organ_without_finding_is_mentioned(reports):
    for report, args in reports:
        body = section(report.text, args["language"], SECTIONS[args["language"]][-2]).casefold()
        with_finding = {f.organ for f in args["findings"]}
        for organ in set(args["region_organs"]) - with_finding:
            assert any(w in body for w in ORGAN_WORDS[organ]), (organ, body)


@pytest.mark.parametrize("language", ["de", "en"])
def test_normal_side_of_a_paired_organ_is_named_with_its_side(language):
    lung_right = re.compile(r"Rechte Lunge|Lunge (?:rechts|re\.)|right lung", re.IGNORECASE)
    kidney_left = re.compile(r"Linke Niere|Niere (?:links|li\.)|left kidney", re.IGNORECASE)
    findings = [Finding("lung_left", "lesion", 12.0), Finding("kidney_right", "cyst", 30.0)]
    for seed in range(30):
        report, _ = make(seed, language, findings=findings,
                         region_organs=("lung_left", "lung_right", "kidney_left", "kidney_right"))
        body = section(report.text, language, SECTIONS[language][-2])
        assert lung_right.search(body) and kidney_left.search(body), body


@pytest.mark.parametrize("language", ["de", "en"])
@pytest.mark.parametrize("organ", ["kidney_left", "lung_right"])
def test_finding_is_written_with_its_laterality(language, organ):
    side, other = (LEFT, RIGHT) if organ.endswith("_left") else (RIGHT, LEFT)
    for seed in range(30):
        for kind in ("lesion", "effusion", "calcification"):
            report, _ = make(seed, language, findings=[Finding(organ, kind, 15.0)], region_organs=(organ,))
            body = section(report.text, language, SECTIONS[language][-2])
            assert side.search(body) and not other.search(body), body


@pytest.mark.parametrize(("language", "detail", "expected"),
                         [("de", "L3", "LWK 3"), ("de", "T8", "BWK 8"), ("en", "L3", "L3"),
                          ("en", "T8", "T8")])
def test_vertebra_level_is_written_the_local_way(language, detail, expected):
    for seed in range(10):
        report, _ = make(seed, language, findings=[Finding("vertebrae", "lesion", 14.0, detail)])
        assert expected in section(report.text, language, SECTIONS[language][-2])


def test_liver_segment_is_named():
    for seed in range(10):
        for language in ("de", "en"):
            report, _ = make(seed, language, findings=[Finding("liver", "cyst", 9.0, "VII")])
            assert re.search(r"[Ss]egment VII", report.text)


def test_impression_is_a_numbered_list_when_there_are_several_findings():
    findings = [Finding("liver", "lesion", 22.0, "VII"), Finding("spleen", "cyst", 11.0)]
    for seed in range(20):
        for language in ("de", "en"):
            report, _ = make(seed, language, findings=findings)
            impression = section(report.text, language, SECTIONS[language][-1])
            assert re.search(r"^1\. \S", impression, re.MULTILINE), impression
            assert re.search(r"^2\. \S", impression, re.MULTILINE), impression


def test_abbreviations_are_used(reports):
    german = [r.text for r, a in reports if a["language"] == "de"]
    english = [r.text for r, a in reports if a["language"] == "en"]
    used_de = {a for a in ("o.B.", "V.a.", "z.B.", "ca.", "Z.n.", "i.v.", "KM", "bds.", "li.", "re.")
               if any(a in t for t in german)}
    assert len(used_de) >= 8, used_de
    common = re.compile(r"o\.B\.|V\.a\.|z\.B\.|ca\.|Z\.n\.|i\.v\.")
    assert sum(bool(common.search(t)) for t in german) > 0.8 * len(german)
    used_en = {a for a in ("approx.", "e.g.", "s/p") if any(a in t for t in english)}
    assert used_en == {"approx.", "e.g.", "s/p"}


def test_no_broken_numbers_or_punctuation(reports):
    for report, _ in reports:
        text = report.text
        assert not re.search(r"\d[.,] \d+(?:[.,]\d+)? ?(?:cm|mm)\b", text), text
        assert not re.search(r"\d [.,]\d", text), text
        assert ".." not in text and " ," not in text and " ." not in text, text
        assert "\r" not in text and text.count("\n") > 8 and "  \n" not in text


def test_text_keeps_umlauts_in_names_and_prose():
    patient, physician = Person("Jürgen", "Größ", "M"), Person("Björn", "Schäfer", "M")
    for seed in range(10):
        report, _ = make(seed, "de", patient=patient, physician=physician)
        assert "Größ" in report.text or "GRÖSS^JÜRGEN" in report.text
        assert "Schäfer" in report.text
        prose = report.text.replace("Größ", "").replace("Schäfer", "").replace("Jürgen", "")
        assert re.search(r"[äöüßÄÖÜ]", prose), prose


class _EdgeRng(random.Random):
    """An rng that always draws the first option (last=False) or the last one (last=True): what a
    generator makes from it is known by reading its option lists, without running the generator."""

    def __init__(self, last: bool) -> None:
        super().__init__(0)
        self.last = last

    def _randbelow(self, n: int) -> int:  # choice, randrange and randint all draw through it
        return n - 1 if self.last else 0

    def random(self) -> float:
        return 0.99 if self.last else 0.0


def test_name_lists_and_random_person():
    for given, family in ((GERMAN_GIVEN, GERMAN_FAMILY), (ENGLISH_GIVEN, ENGLISH_FAMILY)):
        assert 20 <= len(given) <= 30 and 20 <= len(family) <= 30
        assert len(set(given)) == len(given) and len(set(family)) == len(family)
    for name in ("Müller", "Größ", "Schäfer"):
        assert name in GERMAN_FAMILY
    assert "Jürgen" in GERMAN_GIVEN and "Björn" in GERMAN_GIVEN
    people = [random_person(random.Random(i), "de") for i in range(50)]
    assert all(p.given in GERMAN_GIVEN and p.family in GERMAN_FAMILY and p.sex in "MF" for p in people)
    assert {p.sex for p in people} == {"M", "F"}
    assert random_person(random.Random(5), "en").family in ENGLISH_FAMILY
    # Every draw goes through the rng passed in (what makes a seeded drop reproducible): an rng that
    # always picks the first (last) option gives the lists' first (last) names, read off the lists.
    assert random_person(_EdgeRng(last=False), "en") == Person("James", "Smith", "M")
    assert random_person(_EdgeRng(last=True), "en") == Person("Zoë", "Hughes", "F")
    assert random_person(_EdgeRng(last=False), "de") == Person("Hans", "Müller", "M")
    assert random_person(_EdgeRng(last=True), "de") == Person("Susanne", "Strauß", "F")


def test_random_phone_formats():
    german = re.compile(r"0\d{2,3} \d{4}-\d{3,5}|\+49 \d{2,3} \d{7}")
    english = re.compile(r"\+44 20 7946 \d{4}|\(555\) 01\d-\d{4}")
    de_phones = [random_phone(random.Random(i), "de") for i in range(40)]
    en_phones = [random_phone(random.Random(i), "en") for i in range(40)]
    assert all(german.fullmatch(p) for p in de_phones), de_phones
    assert all(english.fullmatch(p) for p in en_phones), en_phones
    assert {p[0] for p in de_phones} == {"0", "+"} and {p[0] for p in en_phones} == {"+", "("}
    # Every draw through the rng passed in: first options (area 089, the local form, digits 0, the
    # shortest extension) and last options (area 0351, the international form, digits 9).
    assert random_phone(_EdgeRng(last=False), "de") == "089 0000-000"
    assert random_phone(_EdgeRng(last=True), "de") == "+49 351 9999999"
    assert random_phone(_EdgeRng(last=False), "en") == "+44 20 7946 0000"
    assert random_phone(_EdgeRng(last=True), "en") == "(555) 019-9999"


@pytest.mark.parametrize(("override", "message"), [
    ({"language": "fr"}, "language 'fr'"),
    ({"modality": "US"}, "modality 'US'"),
    ({"region_organs": ("brain",)}, "organ 'brain'"),
    ({"findings": [Finding("liver", "tumour", 10.0)]}, "finding kind 'tumour'"),
    ({"findings": [], "region_organs": ()}, "both empty"),
])
def test_unsupported_input_is_rejected(override, message):
    args = make(0, "de")[1] | override
    with pytest.raises(SynthError, match=message):
        write_report(random.Random(0), **args)
