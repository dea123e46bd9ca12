"""Split German/English radiology reports into verbatim sentence spans, each with its section.

Decisions, so callers know what a span is:
- Spans are offsets into the untouched report; ``report[start:end] == text`` always. Nothing
  is normalised: the reference pipeline's punctuation cleaning turned "2.2 cm" into "2. 2 cm".
- A sentence can only end at ". ! ? …" (plus closing brackets/quotes) followed by whitespace,
  so the dots inside "z.B.", "2.2", "2,2 x 1,8 cm" or "03.02.2024" never end one. Whether a
  dot before whitespace ends one depends on the token before it and the word after it
  (``_ends_sentence``): known abbreviations, initials, ordinals ("3. Februar", "7. Rippe").
- Section headers ("Befund:", "Impression:", alone on a line or inline) are not sentences;
  they set the section of what follows. Lines before the first header are "header", the
  signature block after the last section is "closing". A report without any section header
  gets section None throughout (the patient header cannot be told apart from the body).
- A list marker ("1.", "2)", "-", "•") at the start of a line or of a header's inline text is
  not part of the sentence: the span of "1. Progrediente Leberläsion." is "Progrediente Leberläsion.".
- Inside a paragraph a line break is soft: a sentence without final punctuation continues on
  the next line ("Lunge frei\\nbelüftet."). A blank line, a header, a list item or a
  "Label:" line ("Thorax: ...", "Empfehlung: ...") starts a new item and so ends the sentence.
- Header and closing lines are fields, not prose: every line there is its own item.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from tasks.curate.base import CurationError


@dataclass(frozen=True)
class SentenceSpan:
    """One sentence: the verbatim text of ``report[start:end]`` and the section it belongs to."""

    text: str
    start: int
    end: int
    section: str | None  # a SECTION_HEADERS key, "header", "closing", or None (no headers at all)


SECTION_HEADERS: dict[str, tuple[str, ...]] = {
    "clinical_information": ("Klinische Angaben", "Klinische Angabe", "Anamnese", "Indikation",
                             "Rechtfertigende Indikation", "Clinical information", "Clinical history",
                             "History", "Indication"),
    "question": ("Fragestellung", "Frage", "Clinical question", "Question"),
    "technique": ("Technik", "Untersuchungstechnik", "Methode", "Technique", "Protocol"),
    "comparison": ("Vergleich", "Voruntersuchung", "Voruntersuchungen", "Voraufnahmen", "Comparison"),
    "findings": ("Befund", "Befunde", "Findings", "Finding"),
    "impression": ("Beurteilung", "Zusammenfassung", "Impression", "Conclusion", "Conclusions",
                   "Summary", "Assessment"),
}
_HEADER_SECTION = {w.casefold(): s for s, words in SECTION_HEADERS.items() for w in words}
_HEADER_WORDS = "|".join(re.escape(w) for w in sorted(_HEADER_SECTION, key=len, reverse=True))
# Alone on a line the colon is optional ("BEFUND"); inline it is required ("Befund: Leber o.B.").
_HEADER = re.compile(rf"[ \t]*(?P<word>{_HEADER_WORDS})[ \t]*(?::[ \t]*|$)", re.IGNORECASE)
_LIST_MARKER = re.compile(r"[ \t]*(?:\d{1,2}[.)]|[a-z]\)|[-–•*·▪])[ \t]+(?=\S)")
# "Thorax: ...", "Empfehlung: ..." at a line start: a new item inside a paragraph, kept in the text.
_LABEL = re.compile(r"[ \t]*[A-ZÄÖÜ][\w/-]*(?: [\w/-]+){0,2}:(?:[ \t]|$)")
# A signature block: strong phrases close the report wherever a line starts with them ...
_CLOSING_STRONG = re.compile(
    r"[ \t]*(?:mit (?:freundlichen|kollegialen)|freundliche grüße|mfg\b|electronically signed|"
    r"elektronisch (?:signiert|freigegeben|unterschrieben)|befundet (?:und|von|durch)|signed by|"
    r"reported by|dictated by|diktiert|gez\.|kind regards|best regards|yours sincerely|sincerely)",
    re.IGNORECASE)
# ... weak cues (a title, a name placeholder, a phone) only at the start of a new paragraph.
# "OA"/"CA" only before a title or name: "CA 19-9 erhöht" opens a findings paragraph, not a signature.
_CLOSING_WEAK = re.compile(r"[ \t]*(?:(?:Prof|Dr|PD|Priv\.-Doz)\.|(?:OA|OÄ|CA)[ \t]+(?:Dr|Prof|\[NAME\])|\[NAME\])|"
                           r".*(?:,\s*(?:MD|FRCR|PhD)\b|\b(?:Tel|Phone|Fax)\b|\[PHONE\])")

# Abbreviations that never end a sentence (compared case-insensitively: "Ggf." starts one).
_NEVER_FINAL = frozenset(("z.b.", "ca.", "v.a.", "z.n.", "dr.", "med.", "prof.", "ggf.", "bzw.", "vs.", "e.g.",
                          "i.e.", "approx.", "nr.", "no.", "pat.", "st.", "abb.", "fig.", "max.", "min.", "geb.",
                          "tel.", "mr.", "mrs.", "ms.", "hr.", "fr.", "sog.", "evtl.", "inkl.", "ggü.", "vgl.",
                          "u.a.", "d.h.", "z.t.", "u.u.", "dd.", "a.e.", "dipl.", "priv.-doz.", "ref.", "cf.",
                          "resp.", "sr.", "jr.", "dres."))
# Abbreviations that may also close a sentence ("Leber o.B. Milz o.B.", "Z.n. OP re.").
_MONTH_ABBR = ("jan.", "feb.", "mär.", "mrz.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.", "okt.",
               "oct.", "nov.", "dez.", "dec.")
_CAN_END = frozenset(("o.b.", "bds.", "re.", "li.", "i.v.", "p.a.", "a.p.", "etc.", "usw.", "u.ä.",
                      *_MONTH_ABBR))
# After these words "re."/"li."/"i.v." is attributive ("der li. Niere", "nach i.v. Gabe"), and a
# number is an ordinal ("der 7. Rippe", "vom 3. Mai"), so no sentence ends there.
_FUNCTION_WORDS = frozenset(("der", "die", "das", "dem", "den", "des", "ein", "eine", "einer", "einem", "eines", "im",
                             "am", "vom", "zum", "zur", "ab", "seit", "bis", "beim", "in", "an", "auf", "nach", "mit",
                             "ohne", "von", "zu", "the", "of", "at", "on", "to", "with", "after"))
_MONTHS = frozenset(("januar", "februar", "märz", "april", "mai", "juni", "juli", "august", "september", "oktober",
                     "november", "dezember", "january", "february", "march", "may", "june", "july", "october",
                     "december")) | {m[:-1] for m in _MONTH_ABBR}
# Nouns counted by an ordinal in German reports: "7. Rippe", "3. Lebensdekade", "2. Zyklus".
_ORDINAL_NOUNS = ("rippe", "lebensjahr", "lebensdekade", "dekade", "woche", "tag", "monat", "zykl", "segment",
                  "wirbel", "lendenwirbel", "brustwirbel", "halswirbel", "icr", "interkostal", "intercostal",
                  "finger", "zehe", "strahl", "grad", "ordnung", "quartal", "hirnnerv", "kontroll", "sitzung",
                  "metatars", "metacarp", "mittelhand", "mittelfuß", "halsrippe", "etage")
# Names a cardinal number follows ("BWK 11", "Segment 7", "Bosniak 2"): "in BWK 11. Rippen intakt"
# ends a sentence although "Rippen" would make "11." an ordinal after "der".
_LABEL_WORDS = frozenset(("bosniak", "stadium", "typ", "grad", "level", "nr.", "no.", "c", "t", "th", "l", "s"))
_LOWER_STARTERS = frozenset(("s/p",))  # English sentences may open with this lowercase abbreviation
_END = re.compile(r"(?:[.!?]+|…)[)\]\"'”»]*(?=\s|$)")
_OPENERS = "([{\"'„“«‚‘"


def split_sentences(report: str, language: str) -> list[SentenceSpan]:
    """Sentences of ``report`` as verbatim spans with their normalised section."""
    if language not in ("de", "en"):
        raise CurationError(f"split_sentences: language {language!r} is not supported; expected 'de' or 'en'. "
                            "Pass the report's language column from reports.csv.")
    spans: list[SentenceSpan] = []
    for start, end, section in _items(report):
        spans.extend(SentenceSpan(report[a:b], a, b, section) for a, b in _split_item(report, start, end, language))
    return spans


def _lines(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of every line without its terminator; "\\r\\n", "\\r" and "\\n" all end a line."""
    pos = 0
    for m in re.finditer(r"\r\n|\r|\n", text):
        yield pos, m.start()
        pos = m.end()
    yield pos, len(text)


def _items(text: str) -> Iterator[tuple[int, int, str | None]]:
    """Ranges of text to split into sentences (paragraphs, list items, field lines), with their section."""
    section: str | None = "header" if any(_HEADER.match(text, a, b) for a, b in _lines(text)) else None
    item: list[int] | None = None  # [start, end] of the open item
    blank_before, section_has_text = True, False

    for a, b in _lines(text):
        if not text[a:b].strip():
            if item:
                yield item[0], item[1], section
            item, blank_before = None, True
            continue
        new_item = False
        if m := _HEADER.match(text, a, b):
            if item:
                yield item[0], item[1], section
            section, item, section_has_text = _HEADER_SECTION[m.group("word").casefold()], None, False
            a, blank_before = m.end(), False
            if a >= b:  # a header alone on its line
                continue
            new_item = True
        elif section not in ("header", "closing") and (
                _CLOSING_STRONG.match(text, a, b)
                or blank_before and section_has_text and _CLOSING_WEAK.match(text, a, b)):
            if item:
                yield item[0], item[1], section
            section, item = "closing", None
        blank_before = False
        marker = _LIST_MARKER.match(text, a, b)
        if marker and _is_ordinal(text, marker.end(), b, marker.group().strip()):
            marker = None  # "3. Februar 2024 ..." at a line start is a date, not a list item
        if marker or new_item or item is None or section in ("header", "closing") or _LABEL.match(text, a, b):
            if item:
                yield item[0], item[1], section
            item = [marker.end() if marker else a, b]
        else:
            item[1] = b  # soft line break: the paragraph (and its sentence) goes on
        section_has_text = True
    if item:
        yield item[0], item[1], section


def _split_item(text: str, start: int, end: int, language: str) -> Iterator[tuple[int, int]]:
    """Sentence (start, end) ranges inside text[start:end], stripped of surrounding whitespace."""
    pos = start
    for m in _END.finditer(text, start, end):
        if _ends_sentence(text, pos, m.start(), m.end(), end, language):
            yield from _strip(text, pos, m.end())
            pos = m.end()
    yield from _strip(text, pos, end)


def _strip(text: str, a: int, b: int) -> Iterator[tuple[int, int]]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    if a < b:
        yield a, b


def _ends_sentence(text: str, sent_start: int, p: int, q: int, end: int, language: str) -> bool:
    """Does the punctuation text[p:q] (followed by whitespace or the item end) close a sentence?"""
    if text[p] != ".":
        return True  # "?", "!", "…" always end a sentence ("Metastasen? Progress?")
    nxt = text[q:end].split(maxsplit=1)
    if not nxt:
        return True
    head = nxt[0].lstrip(_OPENERS)[:1]
    kind = ("upper" if head.isupper() or nxt[0].casefold() in _LOWER_STARTERS else "lower" if head.islower()
            else "digit" if head.isdigit() else "other")
    if kind == "lower":
        return False  # German and English sentences start with a capital letter
    tokens = text[sent_start:p].split()
    token = (tokens[-1].lstrip(_OPENERS) if tokens else "") + "."
    prev = tokens[-2].lstrip(_OPENERS).casefold() if len(tokens) > 1 else ""
    low = token.casefold()
    if low in _NEVER_FINAL or re.fullmatch(r"[a-zäöü]\.", token):  # "s. Abb. 2"
        return False
    if low in _CAN_END:
        # "Feb. 2024" and "der li. Niere" go on; "Leber o.B. Milz o.B." and "Z.n. OP re. Keine" end.
        starts = ("upper",) if low in _MONTH_ABBR else ("upper", "digit")
        return kind in starts and prev not in _FUNCTION_WORDS
    if re.fullmatch(r"[A-ZÄÖÜ]\.", token):
        # An initial ("H. Bauer") unless it is a Roman numeral: "Lebersegment V. Milz o.B."
        return prev.endswith("segment")
    if re.fullmatch(r"\d+\.", token):
        if kind == "digit":
            return False  # "3. 2. 2024" spelled with spaces
        if prev in _LABEL_WORDS or prev.endswith(("segment", "wk", "-rads")):
            return True
        return not (_is_ordinal(text, q, end, token) or language == "de" and prev in _FUNCTION_WORDS)
    if re.fullmatch(r"\d+\.\d+\.", token):
        return kind != "digit"  # "12.03. 2024" goes on, "vom 12.03. Keine ..." ends
    # An unlisted dotted abbreviation ("z.T.", "u.U.") sits mid-sentence.
    return not re.fullmatch(r"(?:[^\W\d_]{1,3}\.){2,}", token)


def _is_ordinal(text: str, q: int, end: int, token: str) -> bool:
    """Is the number ``token`` an ordinal, judged by the word starting after position q?"""
    if not re.fullmatch(r"\d+\.", token):
        return False
    word = re.match(r"\s*([^\W\d_]*)", text[q:end]).group(1).casefold()
    return bool(word) and (word in _MONTHS or word.startswith(_ORDINAL_NOUNS))
