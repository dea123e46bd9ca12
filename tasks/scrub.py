"""Remove PHI from one free-text radiology report (German or English); a pure function, no I/O.

Values from the study's DICOM headers are removed in every spelling a report uses; people who
are not in the headers (signing radiologist, referring physician) are found by the titles,
labels and suffixes that introduce them; dates are shifted per patient or masked; phones,
e-mails and long ID-like digit runs go by pattern. Names, addresses and ID-shaped tokens that no
header knows (relatives, other patients, "Pat. Ämilie Wolfsgrübler", "KVNR-77aa310") are found
by tasks/phi_text.py: name lists, cue words and shapes. Everything else stays byte for byte, so
"2,2 x 1,8 cm", "LWK 5", "Segment IVa" and "Bild 45/120" survive.

Decisions: month-year dates ("03/2024", "Februar 2024") count as dates (a month pins an event);
they are shifted via the 15th of the month. Yearless "03.02." is shifted in the leap year 2000,
so 29.02. parses. Years alone and clock times ("14:30") stay: neither identifies anyone once
the day is shifted. Compact "20240203" falls to the digit-run rule and becomes [ID].
Ambiguous slash dates are read day-first unless the report itself shows month-first.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

from radground.errors import DeidError
from tasks import phi_text

LANGUAGES = ("de", "en")
PLACEHOLDERS = {"name": "[NAME]", "id": "[ID]", "date": "[DATE]", "phone": "[PHONE]",
                "email": "[EMAIL]", "address": "[ADDRESS]", "other": "[REDACTED]"}


@dataclass(frozen=True)
class KnownPHI:
    """PHI values taken from the same study's DICOM headers (and the reports.csv row)."""

    person_names: tuple[str, ...] = ()  # DICOM PN "MÜLLER^HANS", "Müller^Hans^^Dr." or "Hans Müller"
    identifiers: tuple[str, ...] = ()  # patient IDs, other IDs, accession numbers, study IDs
    other: tuple[str, ...] = ()  # institution name/address, patient address, station name ...


@dataclass(frozen=True)
class Redaction:
    category: str  # "name" | "id" | "date" | "phone" | "email" | "address" | "other"
    start: int  # offsets of the replacement in the SCRUBBED text
    end: int


@dataclass(frozen=True)
class ScrubResult:
    text: str
    redactions: tuple[Redaction, ...]


@dataclass(frozen=True)
class _Span:
    start: int  # offsets in the ORIGINAL text
    end: int
    category: str
    replacement: str
    rank: int  # breaks ties between equally long spans: lower wins


# ---- building blocks -------------------------------------------------------------------------
_L = r"[^\W\d_]"  # one letter, umlauts included
_NO_LETTER_BEFORE, _NO_LETTER_AFTER = rf"(?<!{_L})", rf"(?!{_L})"
_UP = "[" + "".join(c for c in map(chr, range(0x41, 0x250)) if c.isupper()) + "]"
_WORD = rf"{_UP}(?:{_L}|['’-](?={_L}))+"  # Müller, O'Brien, McDonald, Meyer-Lüdenscheidt, SCHMIDT
_INITIAL = rf"{_UP}\.(?![a-zäöüß]\.)(?:[ \t]?-?{_UP}\.)?"  # "K.", "H.-P."; not "V.a.", "Z.n."
_PARTICLES = ("von", "van", "de", "der", "den", "zu", "vom", "zum", "da", "di", "del", "le", "la", "ten")
# Capitalised words that follow a name in signatures but are not names (German capitalises nouns).
_STOP = (r"(?:Befund|Beurteilung|Radiologie|Radiology|Rückfragen|Tel|Telefon|Phone|Fax|Klinik|Klinikum|"
         r"Institut|Abteilung|Department|Station|Ihre?|Ihrem|Team|Mit|Und|And|The|Der|Die|Das|MD|FRCR|PhD|"
         r"DOB|MRN|PID|ID|Date|Datum|Patient|Patientin|Name|Kollegen?|Kollegin|Facharzt|Fachärztin|Oberarzt|"
         r"Oberärztin|Assistenzarzt|Assistenzärztin|Chefarzt|Chefärztin|Hausarzt|Hausärztin|GP|"
         # A title is never a name: "signed by: Dr. [NAME]" must leave "Dr" alone on a second pass.
         rf"Dr|Prof|Professor|Doktor|Herrn?|Frau|Mrs?|Ms|Miss|OA|OÄ|med|PD){_NO_LETTER_AFTER}")
_FAMILY = rf"(?:(?:{'|'.join(_PARTICLES)})[ \t]+){{0,2}}{_WORD}"  # "de la Cruz"
_NAME = (rf"(?!{_STOP})(?:{_WORD}[ \t]+{_INITIAL}[ \t]*{_FAMILY}|(?:{_INITIAL}[ \t]*){{1,2}}{_FAMILY}"
         rf"|{_WORD},[ \t]*{_INITIAL}|{_WORD}(?:[ \t](?!{_STOP}){_FAMILY})?)")  # "Smith, J.", "Karl Weber"
# Titles are matched case-sensitively: "ca." is circa, "PD" alone is progressive disease.
_TITLE = (rf"(?:Prof\.|Professor|Dr\.|(?:Dr|Prof)(?=[ \t]+{_UP})|Doktor|PD(?=[ \t]+Dr)|Priv\.-Doz\.|OA|OÄ"
          r"|Oberarzt|Oberärztin|Chefarzt|Chefärztin|Facharzt|Fachärztin|Assistenzarzt|Assistenzärztin|Kollegen?|Kollegin|Dipl\.-Med\.|"
          r"Mrs?\.?|Ms\.?|Miss|Herrn?|Frau|Hr\.|Fr\.)")
_DEGREE = r"(?:med\.|dent\.|rer\.[ \t]?nat\.|phil\.|univ\.|habil\.|h\.[ \t]?c\.)"
_TITLES = rf"(?:{_NO_LETTER_BEFORE}{_TITLE}(?:[ \t]+|(?<=\.))(?:{_DEGREE}[ \t]*)*)+"
_LABEL = (r"(?i:(?:electronically[ \t]+)?signed(?:[ \t]+by)?|(?:reported|dictated|verified|read|approved|seen)"
          r"[ \t]+by|befundet(?:[ \t]+(?:von|durch))?|(?:freigegeben|vidiert|diktiert)(?:[ \t]+(?:von|durch))?"
          r"|gez\.|discussed[ \t]+with|(?:besprochen|rücksprache)[ \t]+mit|(?:unterschrift|überweiser(?:in)?"
          r"|zuweiser(?:in)?|einsender(?:in)?|referring[ \t]+physician|requesting[ \t]+physician|referrer"
          r"|radiologist|radiologe|radiologin)(?=[ \t]*:))")
_PERSON_PATTERNS = [re.compile(p) for p in (
    rf"{_TITLES}(?P<name>{_NAME})",  # "Dr. med. K. Schmidt", "Herr Meier", "OA Dr. J. Schulz"
    rf"{_NO_LETTER_BEFORE}{_LABEL}[ \t]*:?[ \t]*(?:{_TITLES})?(?P<name>{_NAME})",  # "signed by: ..."
    rf"{_NO_LETTER_BEFORE}(?P<name>{_NAME})(?=,?[ \t]*(?:MD|M\.D\.|FRCR|FRCP|PhD|MBBS|DO){_NO_LETTER_AFTER})",
    rf"(?i:grüßen|grüssen|grüße|gruß|regards|sincerely)[,!.]?[ \t]*\n[ \t]*(?:{_TITLES})?(?P<name>{_NAME})",
)]

_PHONE_LABEL = (r"(?i:(?<![^\W\d_])(?:tel(?:efon)?|phone|fax|durchwahl|dw|pager|piepser|funk|bleep|ext|"
                r"mobil|mobile|handy)\.?(?:[ \t]*-?[ \t]*nr\.?)?)")
_PHONES = [  # (pattern, minimum digit count)
    (re.compile(rf"{_PHONE_LABEL}[ \t]*:?[ \t]*(?P<n>-?\+?[\d(][\d ()/.-]*\d)"), 3),
    (re.compile(r"(?<![\w+])\+\d{1,3}(?:[ \t./-]?\(0\))?(?:[ \t./-]?\d+)+"), 7),
    (re.compile(r"(?<![\w.,/])\(?0\d{2,5}\)?(?:[ \t]*[/-][ \t]*|[ \t]+)\d{2,}(?:[ \t-]\d{2,})*(?!\w)"), 7),
    # US: "(555) 010-4477", "555.010.4477", "+1-555-010-4477x123" (an extension belongs to the number)
    (re.compile(r"(?<![\w+])(?:(?:\+1|001)[ \t.-]?)?(?:\(\d{3}\)[ \t]*|\d{3}[.-])\d{3}[ \t.-]\d{4}"
                r"(?:[ \t]*(?:x|ext\.?)[ \t]*\d{1,6})?(?!\w)"), 10),
]
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_ID_RUN = re.compile(r"(?<![\w.,])[A-Za-z]{1,5}[-_/]?\d{6,}(?!\w)|(?<![\d.,])\d{6,}(?!\d)")  # KIS-123456
_ID_GROUPS = re.compile(r"(?<![\w./-])\d{2,}(?:-\d{2,}){1,3}(?![\w/-]|\.\d)")  # 123-45-678 (>= 7 digits)
_UID = re.compile(r"(?<![\d.])[12](?:\.\d+){4,}")  # a DICOM UID is an identifier, not a number
# A short numeric known ID ("4711") must not eat "4711 ml": no unit or decimal part may follow
# (squared and cubed units too: "1200 cm³", "4711 mm3").
_NOT_MEASURE = r"(?![.,]\d)(?![ \t]*(?:mm|cm|m|ml|l|%|kg|g|mg|HU|ms|s|min|mGy|mSv|Gy|kV|mAs|T)[23²³]?(?!\w))"

# ---- dates -----------------------------------------------------------------------------------
_MONTHS = {
    ("de", "full"): "Januar Februar März April Mai Juni Juli August September Oktober November Dezember",
    ("de", "abbr"): "Jan Feb Mär Apr Mai Jun Jul Aug Sep Okt Nov Dez",
    ("en", "full"): "January February March April May June July August September October November December",
    ("en", "abbr"): "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
}
_MONTH_STYLES: dict[str, list[tuple[int, tuple[str, str]]]] = {}  # casefolded name -> [(month, style)]
for _style, _names in _MONTHS.items():
    for _number, _name in enumerate(_names.split(), 1):
        _MONTH_STYLES.setdefault(_name.casefold(), []).append((_number, _style))
for _alias, _target in (("maerz", "märz"), ("jänner", "januar"), ("sept", "sep"), ("mrz", "mär")):
    _MONTH_STYLES[_alias] = _MONTH_STYLES[_target]
_MON = "(?P<mon>(?i:" + "|".join(sorted(_MONTH_STYLES, key=len, reverse=True)) + rf")){_NO_LETTER_AFTER}"
_D, _M = r"(?P<d>0?[1-9]|[12]\d|3[01])", r"(?P<m>0?[1-9]|1[0-2])"
_Y, _Y4 = r"(?P<y>(?:19|20)\d{2}|\d{2})", r"(?P<y>(?:19|20)\d{2})"
_SUF = r"(?P<suf>(?i:st|nd|rd|th))?"
_DATES = [re.compile(p) for p in (
    rf"(?<![\w.]){_D}\.[ \t]?{_M}\.[ \t]?{_Y}(?!\w|\.\d)",  # 03.02.2024, 3.2.24
    r"(?<![\w.])(?P<d>0[1-9]|[12]\d|3[01])\.(?P<m>0[1-9]|1[0-2])\.(?![ \t]?\d|\w)",  # 03.02.
    rf"(?<![\w.-]){_Y4}(?P<s>[-/]){_M}(?P=s){_D}(?!\w|[-/]\d)",  # 2024-02-03
    rf"(?<![\w./-])(?P<a>\d{{1,2}})(?P<s>[/-])(?P<b>\d{{1,2}})(?P=s){_Y}(?!\w|[/-]\d)",  # 03/02/2024
    rf"(?<![\w.]){_D}{_SUF}\.?[ \t-]*(?:of[ \t]+)?{_MON}\.?,?[ \t-]*{_Y}(?!\w)",  # 3. Februar 2024
    rf"(?<!\w){_MON}\.?[ \t]+{_D}{_SUF},?[ \t]+{_Y}(?!\w)",  # February 3, 2024
    rf"(?<!\w){_MON}\.?[ \t]+{_Y4}(?!\w)",  # Februar 2024
    rf"(?<![\w./-]){_M}[/.]{_Y4}(?!\w|[/.]\d)",  # 03/2024, 03.2024
    rf"(?<![\w.-]){_Y4}-(?P<m>0[1-9]|1[0-2])(?!\w|-\d)",  # 2024-03
)]
_SLASH_DATE = _DATES[3]  # day-first or month-first is decided once per report
_RANK = {"name": 5, "address": 3, "id": 6}  # ties of the header-free spans of tasks/phi_text.py


def scrub_report(text: str, known: KnownPHI, *, date_offset_days: int | None, language: str) -> ScrubResult:
    """Replace every PHI span of ``text`` by a placeholder, or dates by dates shifted per patient."""
    if language not in LANGUAGES:
        raise DeidError(f"scrub_report: language {language!r} is not supported; expected one of "
                        f"{LANGUAGES}. Pass the report's language from reports.csv.")
    if date_offset_days is not None and (isinstance(date_offset_days, bool)
                                         or not isinstance(date_offset_days, int)):
        raise DeidError(f"scrub_report: date_offset_days must be an int or None, got "
                        f"{type(date_offset_days).__name__}. Pass the patient's shift in days.")
    out, redactions, pos, length = [], [], 0, 0  # length: of the scrubbed text written so far
    for span in _find(text, known, date_offset_days, language):
        length += span.start - pos
        out += [text[pos:span.start], span.replacement]
        redactions.append(Redaction(span.category, length, length + len(span.replacement)))
        length, pos = length + len(span.replacement), span.end
    out.append(text[pos:])
    return ScrubResult("".join(out), tuple(redactions))


def locate_phi(text: str, known: KnownPHI, *, language: str) -> list[tuple[int, int, str]]:
    """(start, end, category) of each span scrub_report would replace, as offsets in ``text`` itself."""
    if language not in LANGUAGES:
        raise DeidError(f"locate_phi: language {language!r} is not supported; expected one of {LANGUAGES}.")
    return [(s.start, s.end, s.category) for s in _find(text, known, None, language)]


def _find(text: str, known: KnownPHI, offset: int | None, language: str) -> list[_Span]:
    return _resolve([*_known_spans(text, known), *_pattern_spans(text, language),
                     *_date_spans(text, offset, language)])


def _resolve(spans: list[_Span]) -> list[_Span]:
    """Longest span wins; partial overlaps merge, so no fragment of either survives."""
    chosen: list[_Span] = []
    for s in sorted(spans, key=lambda s: (s.start - s.end, s.rank, s.start)):
        if not any(c.start <= s.start and s.end <= c.end for c in chosen):
            chosen.append(s)
    merged: list[_Span] = []
    for s in sorted(chosen, key=lambda s: s.start):
        if merged and s.start < merged[-1].end:
            last = merged[-1]
            keep = last if last.end - last.start >= s.end - s.start else s
            merged[-1] = _Span(last.start, max(last.end, s.end), keep.category,
                               PLACEHOLDERS[keep.category], keep.rank)  # a shifted date cannot stretch
        else:
            merged.append(s)
    return merged


def _spans(pattern: re.Pattern, text: str, category: str, rank: int, group: str | int = 0,
           min_digits: int = 0) -> Iterator[_Span]:
    for m in pattern.finditer(text):
        if m.group(group) and sum(ch.isdigit() for ch in m.group(group)) >= min_digits:
            yield _Span(*m.span(group), category, PLACEHOLDERS[category], rank)


# ---- values known from the headers -------------------------------------------------------------
# Plain letters by base: a header written without accents ("DUPRE") still finds "Dupré" in the report.
_ACCENTED: dict[str, str] = {}
for _cp in range(0xC0, 0x250):
    _nfd = unicodedata.normalize("NFD", chr(_cp))
    if len(_nfd) > 1 and _nfd[0].isascii() and _nfd[0].isalpha() and chr(_cp).islower():
        _ACCENTED[_nfd[0]] = _ACCENTED.get(_nfd[0], "") + chr(_cp)
_GAP = r"(?:[ \t]+|(?<=\.)[ \t]*)"  # between words: "v. Müller", "v.d.Berg"


def _spelling(value: str, drop_umlauts: bool = False) -> str:
    """Regex for ``value`` in the spellings clerks use: Müller ~ MUELLER, Größ ~ GROSS ~ Groess, Dupre ~ Dupré.

    ``drop_umlauts`` also lets ä/ö/ü (ae/oe/ue) stand for a plain a/o/u ("Müller" ~ "Muller", typed on a
    keyboard without umlauts); off by default because "Größ" must not eat the word "groß".
    """
    s = re.sub(r"[\s-]+", " ", unicodedata.normalize("NFC", value.strip()).casefold())  # ß -> ss
    out, i = [], 0
    while i < len(s):
        c, base, step = s[i], unicodedata.normalize("NFD", s[i])[0], 1
        if c in "äöü" or (base in "aou" and s[i:i + 2] == base + "e"):
            # ä = ae (and a + combining diaeresis); plain "a" only when asked (see above).
            plain = f"|{base}" if drop_umlauts else ""
            out.append(f"(?:{'äöü'['aou'.index(base)]}|{base}\u0308|{base}e{plain})")
            step = 1 if c in "äöü" else 2
        elif s[i:i + 2] == "ss":
            out.append("(?:ss|ß)")
            step = 2
        elif c == " ":
            out.append(r"[\s-]+")
        elif c in "'’`´":
            out.append("['’`´]?")
        elif c == ".":
            out.append(r"\.?")
        elif base.isascii() and base.isalpha():  # é ~ e both ways (ä/ö/ü are handled above)
            out.append("[" + "".join(dict.fromkeys(c + base + _ACCENTED.get(base, ""))) + "]")
        else:
            out.append(re.escape(c))
        i += step
    return "".join(out)


def _plain(word: str) -> str:
    """``word`` casefolded with umlauts dropped and accents stripped: "Müller"/"MUELLER" -> "muller"."""
    s = re.sub("(?<=[aou])e", "", unicodedata.normalize("NFC", word).casefold())
    return "".join(unicodedata.normalize("NFD", c)[0] for c in s)


def _initial(word: str) -> str:
    return f"[{re.escape(word[0])}{re.escape(unicodedata.normalize('NFD', word[0])[0])}]"


def _name_parts(raw: str) -> tuple[str, list[str]]:
    """(family, given names) of a DICOM PN "FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX" or a plain name."""
    raw = raw.split("=")[0].strip()  # PN groups after "=" are ideographic/phonetic spellings
    if "^" in raw:
        parts = raw.split("^") + ["", ""]
        family, given = parts[0], f"{parts[1]} {parts[2]}"
    elif "," in raw:
        family, given = raw.split(",", 1)
    else:
        words = raw.split()
        family, given = (words[-1], " ".join(words[:-1])) if words else ("", "")
    # Particles belong to the family name wherever the header writes them: "Hans von Müller",
    # "Müller, Hans von" and "von Müller^Hans" are all family "von Müller", given "Hans".
    words = given.split()
    while len(words) > 1 and words[-1].casefold() in _PARTICLES:
        family = f"{words.pop()} {family}"
    given = " ".join(words)
    givens = [g for g in re.split(r"[\s-]+", given.strip()) if len(g) > 1 and not g.endswith(".")]
    if len(givens) > 1:
        givens.insert(0, " ".join(givens))  # "Hans Peter" / "Hans-Peter" as one
    return family.strip(), givens


def _spelling_ae(word: str) -> str:
    """``word`` with ä/ö/ü written ae/oe/ue in its own case: "Bär" -> "Baer", "BÄR" -> "BAER"."""
    upper = word.isupper()
    for umlaut, plain in (("ä", "ae"), ("ö", "oe"), ("ü", "ue")):
        word = word.replace(umlaut, plain).replace(umlaut.upper(), plain.upper() if upper else plain.capitalize())
    return word


def _alone(word: str, vocabulary: phi_text.Vocabulary) -> list[re.Pattern]:
    """Patterns for one surname written alone ("Frau Müller", "laut MUELLER")."""
    if len(word) <= 3:  # "Li", "Re" would eat the abbreviations "li." / "re.": match as written only
        forms = {word, word.upper(), word.capitalize()}
        forms |= {_spelling_ae(f) for f in forms}  # "Bär" ~ "Baer", "BÄR" ~ "BAER"
        variants = "|".join(re.escape(v) for v in sorted(forms))
        return [re.compile(rf"{_NO_LETTER_BEFORE}(?:{variants}){_NO_LETTER_AFTER}")]
    patterns = [re.compile(rf"{_NO_LETTER_BEFORE}{_spelling(word)}{_NO_LETTER_AFTER}", re.IGNORECASE)]
    # Umlaut dropped ("Muller" for "Müller"), unless that is a word: "Größ" -> "gross", "Schön" -> "schon".
    plain = _plain(word)
    if plain != word.casefold() and plain not in vocabulary.never and plain not in vocabulary.ambiguous:
        patterns.append(re.compile(rf"{_NO_LETTER_BEFORE}{_spelling(word, True)}{_NO_LETTER_AFTER}",
                                   re.IGNORECASE))
    return patterns


def _known_name_patterns(raw: str) -> list[re.Pattern]:
    family, givens = _name_parts(raw)
    words = family.split()
    lead = []  # leading particles: "von", "van der", "de la"
    while len(words) > 1 and words[0].casefold() in _PARTICLES:
        lead.append(words.pop(0))
    core = " ".join(words)
    if len(core) < 2:
        return []
    # A particle may be abbreviated ("v. Müller", "v. d. Berg") or left out ("Hans Müller").
    particles = _GAP.join(rf"(?:{_spelling(p)}|{re.escape(p[0])}\.)" for p in lead)
    f = rf"(?:{particles}{_GAP})?{_spelling(core, True)}" if lead else _spelling(core, True)
    forms = [rf"{f}\^{_L}*(?:\^[\w.]*)*"]  # DICOM PN written into the report
    patterns = []
    if givens:
        g = "|".join(_spelling(x, True) for x in givens)
        first = rf"(?:{g}|(?:{'|'.join(_initial(x) for x in givens)})\.)"  # "Hans" or "H."
        after = rf"(?:[ \t]+{particles})?" if lead else ""  # "Müller, Hans von"
        forms += [rf"{f}[ \t]*,[ \t]*{first}{after}", rf"{first}[ \t]*(?:{_L}\.[ \t]*)?{f}",
                  rf"{f}[ \t]+{first}", rf"(?:{g})[ \t]+{_initial(core)}\."]
        # Initials alone, dotted and upper case as written: "H. M.", "H.M.", "H.-J. M.", "H. v. M." (not
        # after a clock time: "10 A.M."). Bare "HM" is left alone: "CT", "KM", "LK" are somebody's initials too.
        given_initials = r"[ \t]*-?[ \t]*".join(rf"{re.escape(w[0].upper())}\." for w in re.split(r"[\s-]+", givens[0]))
        particle_initials = "".join(rf"[ \t]*{re.escape(p[0].lower())}\." for p in lead)
        patterns.append(re.compile(rf"(?<!\d)(?<!\d[ \t]){_NO_LETTER_BEFORE}{given_initials}(?:{particle_initials})?"
                                   rf"[ \t]*{re.escape(core[0].upper())}\.(?![ \t]?{_L}\.)"))
    patterns += [re.compile(rf"{_NO_LETTER_BEFORE}(?:{p}){_NO_LETTER_AFTER}", re.IGNORECASE) for p in forms]
    vocabulary = phi_text.vocabulary()
    if lead:  # "von Müller", "v. Müller" alone
        patterns.append(re.compile(rf"{_NO_LETTER_BEFORE}{particles}{_GAP}{_spelling(core)}{_NO_LETTER_AFTER}",
                                   re.IGNORECASE))
    parts = re.split(r"[\s-]+", core)  # "Meyer-Lüdenscheidt": each part alone is also the name
    for word in dict.fromkeys([core] + (parts if len(parts) > 1 else [])):
        if len(word) >= 2:
            patterns += _alone(word, vocabulary)
    return patterns


def _known_spans(text: str, known: KnownPHI) -> Iterator[_Span]:
    for value in known.other:
        # An address also appears in pieces: "Hauptstraße 12" or "80331 München" alone.
        for part in dict.fromkeys([value, *re.split(r"\s*[,;\n]\s*", value)]):
            if len(part.strip()) >= 3:
                pattern = re.compile(rf"(?<![^\W_]){_spelling(part)}(?![^\W_])", re.IGNORECASE)
                yield from _spans(pattern, text, "other", 0)
    for value in known.identifiers:
        # Separators come and go: "123-456-78" ~ "12345678" ~ "123 456 78"; so do leading zeros:
        # "00012345" is also written "12345", and "12345" "0012345".
        core = re.sub(r"[\s./-]+", "", value)
        if len(core) < 3:  # "7" or "12" would hit list items and measurements
            continue
        stripped = core.lstrip("0")
        forms = {core, stripped} if len(stripped) >= 4 else {core}
        alternatives = []
        for form in sorted(forms, key=len, reverse=True):
            if len(form) >= 6:  # a long ID is also written in groups: "9882 8391", "9882-8391"
                alternatives.append(r"[ \t./-]?".join(map(re.escape, form)))
            else:  # a short numeric form ("4711") must not eat "4711 ml" or "4711,5"
                alternatives.append(re.escape(form) + (_NOT_MEASURE if form.isdigit() else ""))
        zeros = "0*" if core.isdigit() else ""
        # Not the decimal part of a number: "0,4711" is a value, not the ID 4711.
        yield from _spans(re.compile(rf"(?<![^\W_])(?<!\d[.,]){zeros}(?:{'|'.join(alternatives)})(?![^\W_])",
                                     re.IGNORECASE), text, "id", 1)
    for raw in known.person_names:
        for pattern in _known_name_patterns(raw):
            yield from _spans(pattern, text, "name", 5)


# ---- PHI found by its shape -----------------------------------------------------------------------
def _pattern_spans(text: str, language: str) -> Iterator[_Span]:
    yield from _spans(_EMAIL, text, "email", 2)
    for pattern, min_digits in _PHONES:
        yield from _spans(pattern, text, "phone", 3, "n" if "n" in pattern.groupindex else 0, min_digits)
    for pattern in _PERSON_PATTERNS:
        yield from _spans(pattern, text, "name", 5, "name")
    yield from _spans(_UID, text, "id", 6)
    yield from _spans(_ID_RUN, text, "id", 6)
    yield from _spans(_ID_GROUPS, text, "id", 6, min_digits=7)  # "2024-02-03" is as long; date wins on rank
    for found in phi_text.find_phi(text, language):  # no header needed: name lists, cues, shapes
        yield _Span(found.start, found.end, found.category, PLACEHOLDERS[found.category], _RANK[found.category])


# ---- dates ---------------------------------------------------------------------------------------------
def _date_spans(text: str, offset: int | None, language: str) -> Iterator[_Span]:
    # Slash dates: one reading per report, so intervals between its dates stay true.
    slash = [(int(m["a"]), int(m["b"])) for m in _SLASH_DATE.finditer(text)]
    day_first = any(a > 12 for a, _ in slash) or not any(b > 12 for _, b in slash)
    for pattern in _DATES:
        for m in pattern.finditer(text):
            fields = _date_fields(m, day_first)
            if fields is None:
                continue
            replacement = "[DATE]" if offset is None else _shift(m, fields, offset, language)
            yield _Span(*m.span(), "date", replacement, 4)


def _date_fields(m: re.Match, day_first: bool) -> dict[str, str] | None:
    """Group name of each field present: {"d": "a", "m": "b", "y": "y", ...}; None if not a date."""
    groups = {k for k, v in m.groupdict().items() if v is not None}
    fields = {k: k for k in groups & {"d", "m", "y", "mon", "suf"}}
    if "a" in groups:
        fields["d"], fields["m"] = ("a", "b") if day_first else ("b", "a")
        if not 1 <= int(m[fields["m"]]) <= 12 or not 1 <= int(m[fields["d"]]) <= 31:
            return None
    return fields


def _shift(m: re.Match, fields: dict[str, str], offset: int, language: str) -> str:
    """The date moved by ``offset`` days, written exactly as the original was written."""
    month_style = None
    if "mon" in fields:
        styles = _MONTH_STYLES[m["mon"].casefold()]
        month = styles[0][0]
        # "Mai" is German in full, "Jun" is German or English: prefer the report's language.
        month_style = min((s for _, s in styles), key=lambda s: (s[0] != language, s[1] != "full"))
    else:
        month = int(m[fields["m"]])
    raw_year = m[fields["y"]] if "y" in fields else "2000"  # yearless "03.02.": a leap year
    year = int(raw_year) if len(raw_year) == 4 else 2000 + int(raw_year) - 100 * (int(raw_year) >= 50)
    try:
        shifted = date(year, month, int(m[fields["d"]]) if "d" in fields else 15) + timedelta(days=offset)
    except (ValueError, OverflowError):  # 31.02.2024 is still somebody's date
        return PLACEHOLDERS["date"]
    values = {"d": shifted.day, "m": shifted.month, "y": shifted.year}
    # "24.12.2025" is a zero-padding style ("03.01.2026"), "24.1.2025" and "24. Dezember" are not.
    padded = "mon" not in fields and all(len(m[fields[k]]) == 2 for k in ("d", "m") if k in fields)
    out, pos, text = [], m.start(), m.string
    for field, group in sorted(fields.items(), key=lambda fg: m.start(fg[1])):
        start, end = m.span(group)
        out.append(text[pos:start])
        raw = m[group]
        if field == "mon":
            out.append(_month_name(shifted.month, month_style, raw))
        elif field == "suf":
            suffix = "th" if 10 <= shifted.day <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(shifted.day % 10, "th")
            out.append(suffix.upper() if raw.isupper() else suffix)
        elif field == "y" and len(raw) == 2:
            out.append(f"{shifted.year % 100:02d}")
        else:
            out.append(str(values[field]).zfill(2 if padded or raw.startswith("0") else 1))
        pos = end
    out.append(text[pos:m.end()])
    return "".join(out)


def _month_name(month: int, style: tuple[str, str], raw: str) -> str:
    name = _MONTHS[style].split()[month - 1]
    if raw.casefold() == "maerz":  # written without umlaut, so keep it that way
        name = name.replace("ä", "ae")
    return name.upper() if raw.isupper() and len(raw) > 1 else name.lower() if raw.islower() else name
