"""Synthetic German/English radiology reports with planted, recorded PHI.

The text is meant to test PHI scrubbing, sentence splitting (abbreviations such as "z.B.",
"ca.", "li." end in a dot mid-sentence) and keyword extraction (laterality written many
ways) honestly. Every PHI string is returned exactly as it occurs in the text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date

from radground.errors import SynthError


@dataclass(frozen=True)
class Person:
    given: str
    family: str
    sex: str  # "M" or "F"


@dataclass(frozen=True)
class Finding:
    organ: str  # one of ORGANS
    kind: str  # "lesion" | "cyst" | "effusion" | "degenerative" | "calcification"
    size_mm: float | None = None  # diameter for lesion/cyst
    detail: str | None = None  # liver segment "VII", vertebra level "L3"/"T8"


@dataclass(frozen=True)
class ReportText:
    text: str
    phi: tuple[str, ...]  # every PHI string exactly as it occurs in text


ORGANS = ("lung_left", "lung_right", "heart", "aorta", "liver", "spleen",
          "kidney_left", "kidney_right", "vertebrae", "ribs")
KINDS = ("lesion", "cyst", "effusion", "degenerative", "calcification")
LANGUAGES = ("de", "en")
MODALITIES = ("CT", "MR")

_GIVEN = {
    "de": {"M": ("Hans", "Jürgen", "Björn", "Klaus", "Stefan", "Michael", "Thomas", "Günter", "Jörg", "Uwe",
                 "Matthias", "Andreas", "Peter", "Wolfgang"),
           "F": ("Karin", "Ursula", "Sabine", "Jutta", "Brigitte", "Monika", "Käthe", "Renate", "Anja",
                 "Bärbel", "Claudia", "Heike", "Gisela", "Susanne")},
    "en": {"M": ("James", "John", "Robert", "Michael", "David", "William", "Richard", "Thomas", "Daniel",
                 "Paul", "Mark", "George", "Edward"),
           "F": ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Susan", "Margaret", "Sarah", "Karen",
                 "Emily", "Helen", "Chloë", "Zoë")},
}
GERMAN_GIVEN = _GIVEN["de"]["M"] + _GIVEN["de"]["F"]
ENGLISH_GIVEN = _GIVEN["en"]["M"] + _GIVEN["en"]["F"]
# Surnames avoid report vocabulary ("Klein" would hit "kleine"), so PHI spans stay unambiguous.
GERMAN_FAMILY = ("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Schulz",
                 "Hoffmann", "Schäfer", "Koch", "Größ", "Bauer", "Richter", "Wolf", "Schröder", "Neumann",
                 "Schwarz", "Zimmermann", "Krüger", "Hofmann", "Hartmann", "Köhler", "Weiß", "Jäger", "Böhm",
                 "Strauß")
ENGLISH_FAMILY = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson",
                  "Taylor", "Thomas", "Moore", "Jackson", "Martin", "Thompson", "White", "Harris", "Clarke",
                  "Lewis", "Robinson", "Walker", "O'Brien", "McDonald", "Brontë", "Hughes")

_MONTHS = {
    "de": ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"),
    "en": ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"),
}
_DATE_STYLES = {"de": ("{d:02d}.{m:02d}.{y}",) * 4 + ("{d}. {month} {y}",),
                "en": ("{y}-{m:02d}-{d:02d}",) * 2 + ("{d:02d}/{m:02d}/{y}", "{month} {d}, {y}")}

# Laterality: word variants, dative adjective, nominative adjective (sentence start).
_SIDE = {"de": {"left": (("links", "li."), "linken", "Linke"),
                "right": (("rechts", "re."), "rechten", "Rechte")},
         "en": {"left": (("left",), "left", "Left"), "right": (("right",), "right", "Right")}}
_VERTEBRA_DE = {"C": "HWK", "T": "BWK", "L": "LWK", "S": "SWK"}

# Normal statements; "lungs"/"kidneys" cover both sides at once. Alternatives separated by "|".
_NORMAL = {
    "de": {"lungs": "Lunge beidseits ohne Infiltrate.|Lungen bds. frei belüftet, keine Rundherde.|"
                    "Beide Lungen o.B.|Keine pulmonalen Rundherde, Lunge beidseits frei.",
           "lung": "{Adj} Lunge ohne Infiltrate.|Lunge {side} ohne Rundherde.|Lunge {side} o.B.|"
                   "{Adj} Lunge frei belüftet.",
           "heart": "Herz normal groß, kein Perikarderguss.|Herz o.B.|Keine Kardiomegalie, kein Erguss.",
           "aorta": "Aorta normkalibrig.|Aorta nicht erweitert, keine Dissektion.|Aorta o.B.",
           "liver": "Leber normal groß, homogen, ohne Herde.|Leber o.B.|Keine fokalen Leberläsionen.",
           "spleen": "Milz o.B.|Keine Milzläsion.|Milz normal groß, homogen.",
           "kidneys": "Nieren bds. o.B.|Beide Nieren regelrecht, kein Harnstau.|"
                      "Nieren beidseits ohne Raumforderung, kein Aufstau.",
           "kidney": "{Adj} Niere o.B.|Niere {side} ohne Harnstau.|{Adj} Niere unauffällig.",
           "vertebrae": "Keine suspekten ossären Läsionen der Wirbelsäule.|"
                        "Wirbelsäule altersentsprechend, Wirbelkörper höhenerhalten.",
           "ribs": "Rippen intakt, keine Frakturen.|Keine Rippenfrakturen.|Rippen o.B."},
    "en": {"lungs": "Both lungs are clear.|The lungs are clear bilaterally.|"
                    "No pulmonary nodules or consolidation in either lung.",
           "lung": "The {side} lung is clear.|No nodule in the {side} lung.|{Adj} lung: unremarkable.",
           "heart": "The heart is normal in size. No pericardial effusion.|Heart size is normal.|"
                    "No cardiomegaly or pericardial effusion.",
           "aorta": "The aorta is normal in caliber.|No aortic aneurysm or dissection.",
           "liver": "The liver is unremarkable.|No focal hepatic lesion.|Liver: normal size, homogeneous.",
           "spleen": "The spleen is unremarkable.|No focal splenic lesion.|Spleen normal in size.",
           "kidneys": "Both kidneys are unremarkable, no hydronephrosis.|"
                      "Kidneys: no mass or hydronephrosis bilaterally.",
           "kidney": "The {side} kidney is unremarkable.|No hydronephrosis of the {side} kidney.|"
                     "{Adj} kidney: normal.",
           "vertebrae": "No suspicious osseous lesion of the spine.|Vertebral body heights are maintained.",
           "ribs": "The ribs are intact.|No rib fracture."},
}

# "family.kind" -> nouns; an organ-family entry overrides the "*" default.
_NOUN = {
    "de": {"*.lesion": "{dens} Läsion|Raumforderung|fokale {dens} Läsion",
           "lung.lesion": "Rundherd|pulmonaler Nodulus|solider Rundherd",
           "bone.lesion": "osteolytische Läsion|sklerotische Läsion",
           "*.cyst": "Zyste|glatt begrenzte Zyste|blande Zyste",
           "kidney.cyst": "kortikale Zyste (Bosniak I)|Zyste",
           "lung.cyst": "dünnwandige Zyste", "*.effusion": "Flüssigkeitsansammlung|freie Flüssigkeit",
           "lung.effusion": "Pleuraerguss|schmaler Pleuraerguss", "heart.effusion": "Perikarderguss",
           "*.degenerative": "degenerative Veränderungen",
           "bone.degenerative": "Osteochondrose|Spondylophyten",
           "aorta.degenerative": "Arteriosklerose|arteriosklerotische Wandveränderungen",
           "*.calcification": "Verkalkung|punktförmige Verkalkung",
           "aorta.calcification": "kalzifizierte Plaques|Wandverkalkungen",
           "heart.calcification": "Koronarkalk|Verkalkungen der Koronararterien",
           "kidney.calcification": "Konkrement|Nierenstein", "lung.calcification": "verkalktes Granulom"},
    "en": {"*.lesion": "{dens} lesion|mass|focal {dens} lesion",
           "lung.lesion": "nodule|solid pulmonary nodule",
           "bone.lesion": "lytic lesion|sclerotic lesion", "*.cyst": "cyst|simple cyst",
           "kidney.cyst": "simple cortical cyst (Bosniak I)|cyst", "lung.cyst": "thin-walled cyst",
           "*.effusion": "fluid collection|free fluid",
           "lung.effusion": "pleural effusion|small pleural effusion",
           "heart.effusion": "pericardial effusion", "*.degenerative": "degenerative changes",
           "bone.degenerative": "degenerative changes|osteophytes",
           "aorta.degenerative": "atherosclerotic changes",
           "*.calcification": "calcification|punctate calcification",
           "aorta.calcification": "calcified plaques|mural calcifications",
           "heart.calcification": "coronary artery calcifications",
           "kidney.calcification": "calculus|non-obstructing stone",
           "lung.calcification": "calcified granuloma"},
}
_DENSITY = {("de", "CT"): "hypodense", ("de", "MR"): "T2w-hyperintense",
            ("en", "CT"): "hypodense", ("en", "MR"): "T2-hyperintense"}
# Location templates per organ family; "_detail" variants are used when Finding.detail is set,
# "_plain" where the noun already names the organ ("Perikarderguss").
_LOC = {
    "de": {"lung": ("im {adj} {lobe}", "im {lobe} {side}", "in der {adj} Lunge", "{dir}pulmonal"),
           "lung_effusion": ("{side}", "{dir}seitig"),
           "kidney": ("in der {adj} Niere", "in der Niere {side}"),
           "liver": ("in der Leber", "im rechten Leberlappen"),
           "liver_detail": ("in Lebersegment {detail}", "im Lebersegment {detail}"),
           "bone": ("der Wirbelsäule",), "bone_detail": ("in {level}",), "ribs": ("an den Rippen",),
           "heart": ("kardial",), "heart_plain": ("",), "aorta": ("der Aorta",),
           "spleen": ("in der Milz",)},
    "en": {"lung": ("in the {adj} {lobe}", "in the {adj} lung"),
           "lung_effusion": ("on the {adj}", "on the {adj} side"),
           "kidney": ("in the {adj} kidney", "of the {adj} kidney"),
           "liver": ("in the liver", "in the right hepatic lobe"),
           "liver_detail": ("in liver segment {detail}", "in hepatic segment {detail}"),
           "bone": ("of the spine",), "bone_detail": ("in the {detail} vertebral body", "at {detail}"),
           "ribs": ("in the ribs",), "heart": ("of the heart",), "heart_plain": ("",),
           "aorta": ("of the aorta",), "spleen": ("in the spleen",)},
}
_LOBES = {"de": ("Oberlappen", "Unterlappen"), "en": ("upper lobe", "lower lobe")}
_INTERPRET = {
    "de": {"lesion": (", V.a. Metastase", ", DD Hämangiom", ", suspekt", ", DD z.B. Metastase"),
           "cyst": (", am ehesten blande", "")},
    "en": {"lesion": (", suspicious for metastasis", ", e.g. hemangioma vs. metastasis",
                      ", indeterminate"), "cyst": (", likely benign", "")},
}
_HISTORY = {  # "clinical history|question"
    "de": ("Z.n. Kolonkarzinom, Tumornachsorge.|Metastasen?", "Z.n. Nierenteilresektion re.|Rezidiv?",
           "Z.n. Mammakarzinom links, Staging.|Progress? Metastasen?", "Dyspnoe, V.a. LAE.|Erguss?",
           "Unklare Oberbauchschmerzen seit 2 Wochen.|Fokus? Raumforderung?",
           "Gewichtsverlust, Nachtschweiß.|V.a. Malignom, Tumorsuche.",
           "Fieber und Husten, CRP erhöht.|Pneumonie? Abszess?",
           "Rückenschmerzen, bekannte Osteoporose.|Fraktur? Metastasen?"),
    "en": ("s/p right hemicolectomy for colon cancer, surveillance.|Evaluate for metastases.",
           "History of left breast cancer, staging.|Progression?", "Abdominal pain for 2 weeks.|Mass?",
           "Weight loss and night sweats.|Evaluate for malignancy.", "Shortness of breath.|Rule out PE.",
           "Fever and cough, elevated CRP.|Pneumonia? Abscess?", "s/p right nephrectomy.|Recurrence?",
           "Back pain, known osteoporosis.|Fracture? Metastases?"),
}
_GROUP = {"thorax": ("lung_left", "lung_right", "heart", "aorta"),
          "abdomen": ("liver", "spleen", "kidney_left", "kidney_right"),
          "bone": ("vertebrae", "ribs")}
_GROUP_LABEL = {"de": {"thorax": "Thorax", "abdomen": "Abdomen", "bone": "Skelett"},
                "en": {"thorax": "Chest", "abdomen": "Abdomen", "bone": "Bones"}}
_REGION = {"de": {"thorax": "Thorax", "abdomen": "Abdomen", "bone": "Wirbelsäule", "join": "/"},
           "en": {"thorax": "chest", "abdomen": "abdomen", "bone": "spine", "join": " and "}}
_TECHNIQUE = {
    ("de", "CT"): ("Spiral-CT {r} nach i.v. Gabe von {ml} ml KM (Imeron 350), portalvenöse Phase.",
                   "Mehrzeilen-CT {r} nach i.v. KM-Gabe, Schichtdicke 1 mm, MPR koronar und sagittal."),
    ("de", "MR"): ("MRT {r} mit T1w-, T2w- und DWI-Sequenzen, nach i.v. Gabe von Gadoterat.",
                   "Multiplanare MRT {r}, nativ und nach i.v. KM-Gabe."),
    ("en", "CT"): ("Helical CT of the {r} after IV administration of {ml} mL iohexol.",
                   "Contrast-enhanced CT of the {r}; axial 1 mm slices with multiplanar reformats."),
    ("en", "MR"): ("Multiplanar, multisequence MRI of the {r} before and after IV gadolinium.",
                   "MRI of the {r} with T1, T2 and diffusion-weighted sequences."),
}
_TEXT = {  # fixed phrases: (German, English) alternatives
    "compare": (("Zum Vergleich Voruntersuchung vom {}.", "Vergleich mit der Voruntersuchung vom {}."),
                ("Comparison is made with the prior study of {}.",
                 "Compared with the prior examination from {}.")),
    "no_prior": (("Keine Voruntersuchung zum Vergleich.",), ("No prior imaging available for comparison.",)),
    "course": (("Im Verlauf unverändert.", "Gegenüber der Voruntersuchung größenprogredient."),
               ("Unchanged from the prior study.", "Increased in size compared with the prior study.")),
    "normal": (("Kein Nachweis von Metastasen.", "Altersentsprechender Normalbefund.",
                "Unauffälliger Befund, insbesondere kein Malignomnachweis."),
               ("No evidence of metastatic disease.", "Normal study.", "No acute abnormality.")),
    "recommend": (("Empfehlung: Verlaufskontrolle in 3 Monaten.", "Ggf. weitere Abklärung, z.B. MRT."),
                  ("Follow-up CT in 3 months is recommended.", "Consider further work-up, e.g. MRI.")),
    "sized": (("{N} {L}, {A}{S}.", "{N} {L} ({A}{S}).", "{N} {L}, Durchmesser {A}{S}."),
              ("{N} {L}, measuring {A}{S}.", "{N} {L} ({A}{S}).", "{N} {L} with a diameter of {A}{S}.")),
    "approx": (("ca. ", "", "max. "), ("approx. ", "", "up to ")),
    "dob": ((", geb. {}", " (geb. am {})", ", * {}"), (", DOB {}", "  DOB: {}", ", Date of birth: {}")),
    "pid": (("Pat.-ID", "PID"), ("MRN", "Patient ID")),
    "acc": (("Auftragsnr.", "Auftrags-Nr."), ("Accession", "Acc. No.")),
    "exam": (("Untersuchung: {t} vom {d}", "{t}\nUntersuchungsdatum: {d}"),
             ("Exam: {t}   Date: {d}", "{t}\nStudy date: {d}")),
    "referring": (("Überweiser", "Zuweiser"), ("Referring physician",)),
    "title": (("Dr. med. {}", "Dr. {}", "Prof. Dr. med. {}", "OA Dr. med. {}"),
              ("Dr. {}", "{}, MD", "Dr. {}, FRCR")),
    "footer": (("Mit freundlichen kollegialen Grüßen\n{s}\nTel. {t}",
                "Befundet und elektronisch freigegeben: {s}\nRückfragen unter Tel.: {t}",
                "{s}\nRadiologie, Tel. {t}"),
               ("Electronically signed by: {s}\nPhone: {t}",
                "Reported by {s}\nFor questions, Phone: {t}", "{s}\nRadiology department, Tel: {t}")),
}


def random_person(rng: random.Random, language: str) -> Person:
    """Draw a person with a language-typical name."""
    _check(language, LANGUAGES, "language")
    sex = rng.choice(("M", "F"))
    family = rng.choice(GERMAN_FAMILY if language == "de" else ENGLISH_FAMILY)
    return Person(rng.choice(_GIVEN[language][sex]), family, sex)


def random_phone(rng: random.Random, language: str) -> str:
    """Draw a phone number in a format typical for the language's country."""
    _check(language, LANGUAGES, "language")
    digits = lambda n: "".join(str(rng.randrange(10)) for _ in range(n))  # noqa: E731
    if language == "de":
        area = rng.choice(("089", "030", "040", "0221", "069", "0711", "0351"))
        if rng.random() < 0.5:
            return f"{area} {digits(4)}-{digits(rng.randint(3, 5))}"
        return f"+49 {area[1:]} {digits(7)}"
    if rng.random() < 0.5:
        return f"+44 20 7946 {digits(4)}"
    return f"(555) 01{digits(1)}-{digits(4)}"


def write_report(rng: random.Random, *, language: str, modality: str,
                 region_organs: Sequence[str], findings: Sequence[Finding], patient: Person,
                 birth_date: date, study_date: date, prior_date: date | None,
                 physician: Person, referring: Person, phone: str, accession: str,
                 patient_id: str) -> ReportText:
    """Write one report of ``findings`` plus normal statements for the other region organs."""
    _check(language, LANGUAGES, "language")
    _check(modality, MODALITIES, "modality")
    for organ in [*region_organs, *(f.organ for f in findings)]:
        _check(organ, ORGANS, "organ")
    for f in findings:
        _check(f.kind, KINDS, "finding kind")
    de = language == "de"
    phrase = lambda key: rng.choice(_TEXT[key][0 if de else 1])  # noqa: E731
    phi: list[str] = []

    def mark(s: str) -> str:
        phi.append(s)
        return s

    date_style = rng.choice(_DATE_STYLES[language])
    fmt = lambda d: mark(date_style.format(  # noqa: E731
        d=d.day, m=d.month, y=d.year, month=_MONTHS[language][d.month - 1]))
    organs = [o for o in ORGANS if o in region_organs or any(f.organ == o for f in findings)]
    if not organs:
        raise SynthError("region_organs and findings are both empty, so the report would have no findings "
                         "section. Pass the organs visible in the scan as region_organs.")
    region = _region(language, organs)

    name = _patient_name(rng, language, patient, mark)
    header = [f"{rng.choice(('Patient', 'Patient', 'Name'))}: {name}" + phrase("dob").format(fmt(birth_date))]
    ids = [f"{phrase(key)}: {mark(value)}" for key, value in (("pid", patient_id), ("acc", accession))
           if rng.random() < 0.5]
    if ids:
        header.append("   ".join(ids))
    title = (f"{'CT' if modality == 'CT' else 'MRT'} {region} "
             f"{rng.choice(('mit KM', 'nativ und mit KM', 'mit KM i.v.'))}" if de else
             f"{modality} {region} {rng.choice(('with contrast', 'with IV contrast'))}".upper())
    header.append(phrase("exam").format(t=title, d=fmt(study_date)))
    if rng.random() < 0.5:
        header.append(f"{phrase('referring')}: {_doctor(rng, language, referring, mark)}")

    history, question = rng.choice(_HISTORY[language]).split("|")
    if rng.random() < 0.25:  # PHI inside free text, not only in the header
        age = study_date.year - birth_date.year - (
            (study_date.month, study_date.day) < (birth_date.month, birth_date.day))
        history = (f"{_salutation(language, patient.sex)} {mark(patient.family)} "
                   f"({age} {'J.' if de else 'y/o'}): {history}")
    technique = rng.choice(_TECHNIQUE[(language, modality)]).format(
        r=region, ml=rng.choice((60, 80, 100, 120)))
    if prior_date is not None:
        technique += " " + phrase("compare").format(fmt(prior_date))
    elif rng.random() < 0.4:
        technique += " " + phrase("no_prior")
    # Noun, location and size are drawn once per finding so Befund and Beurteilung agree.
    described = [(f, _noun(rng, language, modality, f), _location(rng, language, f),
                  "" if f.size_mm is None else _size(rng, language, f.size_mm))
                 for f in sorted(findings, key=lambda f: ORGANS.index(f.organ))]
    body = _findings_body(rng, language, organs, region_organs, described,
                          prior_date is not None, phrase)
    sections = ([("Klinische Angaben", history), ("Fragestellung", question)] if de
                else [("Clinical information", f"{history} {question}")])
    sections += [("Technik" if de else "Technique", technique), ("Befund" if de else "Findings", body),
                 ("Beurteilung" if de else "Impression", _impression(rng, language, described, phrase))]
    parts = [label + (":\n" if "\n" in content or rng.random() < 0.5 else ": ") + content
             for label, content in sections]
    footer = phrase("footer").format(s=_doctor(rng, language, physician, mark), t=mark(phone))
    text = "\n".join(header) + "\n\n" + "\n\n".join(parts) + "\n\n" + footer + "\n"
    return ReportText(text, tuple(sorted(dict.fromkeys(phi), key=text.find)))


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise SynthError(f"{what} {value!r} is not supported; expected one of {allowed}. "
                         "Fix the study specification passed to the generator.")


def _salutation(language: str, sex: str) -> str:
    return {"de": ("Herr", "Frau"), "en": ("Mr.", "Mrs.")}[language][sex != "M"]


def _patient_name(rng: random.Random, language: str, p: Person, mark: Callable[[str], str]) -> str:
    style = rng.randrange(5)
    if style == 0:  # the salutation is not identifying, only the name is PHI
        return f"{_salutation(language, p.sex)} {mark(p.family)}"
    return mark((f"{p.family}, {p.given}", f"{p.given} {p.family}", f"{p.given[0]}. {p.family}",
                 f"{p.family.upper()}^{p.given.upper()}")[style - 1])


def _doctor(rng: random.Random, language: str, p: Person, mark: Callable[[str], str]) -> str:
    """Title plus name; only the name (not "Dr. med.") is recorded as PHI."""
    name = mark(rng.choice((f"{p.given[0]}. {p.family}", f"{p.given} {p.family}")))
    return rng.choice(_TEXT["title"][language != "de"]).format(name)


def _region(language: str, organs: Sequence[str]) -> str:
    words = _REGION[language]
    parts = [g for g in ("thorax", "abdomen") if any(o in _GROUP[g] for o in organs)]
    if not parts:
        return words["bone" if "vertebrae" in organs else "thorax"]
    return words["join"].join(words[p] for p in parts)


def _family(organ: str) -> str:
    return organ.split("_")[0] if "_" in organ else "bone" if organ == "vertebrae" else organ


def _noun(rng: random.Random, language: str, modality: str, f: Finding) -> str:
    table, family = _NOUN[language], _family(f.organ)
    family = "bone" if family == "ribs" else family
    options = table.get(f"{family}.{f.kind}", table[f"*.{f.kind}"])
    return rng.choice(options.split("|")).format(dens=_DENSITY[(language, modality)])


def _location(rng: random.Random, language: str, f: Finding) -> str:
    table, family = _LOC[language], _family(f.organ)
    key = family
    if family == "lung" and f.kind == "effusion":
        key = "lung_effusion"
    elif family == "heart" and f.kind in ("effusion", "calcification"):
        key = "heart_plain"
    elif f.detail and f"{family}_detail" in table:
        key = f"{family}_detail"
    side = "left" if f.organ.endswith("_left") else "right"
    words, adj, _ = _SIDE[language][side]
    level = f.detail or ""
    if language == "de" and level[:1] in _VERTEBRA_DE and level[1:].isdigit():
        level = f"{_VERTEBRA_DE[level[0]]} {level[1:]}"
    return rng.choice(table[key]).format(
        adj=adj, side=rng.choice(words), dir="links" if side == "left" else "rechts",
        lobe=rng.choice(_LOBES[language]), detail=f.detail, level=level)


def _size(rng: random.Random, language: str, size_mm: float) -> str:
    """Size as a radiologist writes it: the first number is size_mm in cm with one decimal or in whole mm."""
    comma = language == "de" and rng.random() < 0.8
    use_mm = rng.random() < (0.8 if size_mm < 10 else 0.25)

    def num(value_mm: float) -> str:
        s = f"{value_mm:.0f}" if use_mm else f"{value_mm / 10:.1f}"  # CT/MR do not resolve 0.1 mm
        return s.replace(".", ",") if comma else s

    text = num(size_mm)
    if rng.random() < 0.3:
        second = size_mm * rng.uniform(0.55, 0.95)
        text += " x " + num(second)
    return f"{text} {'mm' if use_mm else 'cm'}"


def _sentence(*words: str) -> str:
    """Join words into a capitalised sentence; a trailing ", clause" attaches without a space."""
    text = " ".join(w for w in words if w).replace(" ,", ",")
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _finding_sentence(rng: random.Random, language: str, described: tuple[Finding, str, str, str],
                      has_prior: bool, phrase: Callable[[str], str]) -> str:
    f, noun, loc, size = described
    if not size:
        text = _sentence(noun, loc)
    else:
        # "LWK 3, 22 mm" would read as a number "3, 22"; keep a word between the level and the size
        approx = phrase("approx") if not loc[-1:].isdigit() else ("ca. " if language == "de" else "approx. ")
        text = phrase("sized").format(N=noun[:1].upper() + noun[1:], L=loc, A=approx, S=size)
        text = text.replace("  ", " ").replace(" ,", ",")  # an empty location leaves gaps
    if has_prior and rng.random() < 0.4:
        text += " " + phrase("course")
    return text


def _normal_sentences(rng: random.Random, language: str, organs: Sequence[str]) -> dict[str, str]:
    """Normal statement per organ; a paired organ normal on both sides may share one sentence."""
    table, out = _NORMAL[language], {}
    for pair, single, both in ((("lung_left", "lung_right"), "lung", "lungs"),
                               (("kidney_left", "kidney_right"), "kidney", "kidneys")):
        present = [o for o in pair if o in organs]
        if len(present) == 2 and rng.random() < 0.7:
            out[pair[0]], out[pair[1]] = rng.choice(table[both].split("|")), ""
            continue
        for organ in present:
            words, _, nominative = _SIDE[language][organ.split("_")[1]]
            out[organ] = rng.choice(table[single].split("|")).format(Adj=nominative, side=rng.choice(words))
    return out | {o: rng.choice(table[o].split("|")) for o in organs if o not in out}


def _findings_body(rng: random.Random, language: str, organs: Sequence[str],
                   region_organs: Sequence[str], described: list[tuple[Finding, str, str, str]],
                   has_prior: bool, phrase: Callable[[str], str]) -> str:
    with_finding = [d[0].organ for d in described]
    normal = _normal_sentences(rng, language, [o for o in organs if o in region_organs
                                               and o not in with_finding])
    per_organ = {o: [_finding_sentence(rng, language, d, has_prior, phrase)
                     for d in described if d[0].organ == o] or [normal.get(o, "")]
                 for o in organs}
    if rng.random() < 0.35:  # subheadings per body region, as many report templates have
        lines = [(_GROUP_LABEL[language][g], " ".join(s for o in organs if o in members
                                                      for s in per_organ[o] if s))
                 for g, members in _GROUP.items()]
        return "\n".join(f"{label}: {text}" for label, text in lines if text)
    return ("\n" if rng.random() < 0.5 else " ").join(s for o in organs for s in per_organ[o] if s)


def _impression(rng: random.Random, language: str, described: list[tuple[Finding, str, str, str]],
                phrase: Callable[[str], str]) -> str:
    if not described:
        return phrase("normal")
    items = []
    for f, noun, loc, size in described:
        shown = f"({size})" if size and rng.random() < 0.5 else ""
        interpret = rng.choice(_INTERPRET[language].get(f.kind, ("",)))
        items.append(_sentence(noun, loc, shown, interpret))
    if any(d[0].kind == "lesion" for d in described) and rng.random() < 0.5:
        items.append(phrase("recommend"))
    if len(items) == 1 and rng.random() < 0.5:
        return items[0]
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))
