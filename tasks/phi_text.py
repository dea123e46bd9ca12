"""Find PHI in report text without the DICOM header: person names, addresses, ID-shaped tokens.

Pure functions over one string that return character spans; tasks/scrub.py merges them with
the header-based and shape-based spans and writes the placeholders. The design follows deduce
(Dutch clinical notes): tokens, lookup lists of first and last names, a list of words that are
never names, and context that turns a capitalised word into a name. It is adapted to German,
where every noun is capitalised, so a capitalised word that a name list knows ("Leber", "Stein",
"Klein") is not a name by itself. Evidence, strongest first:

- a cue before it: "Pat.", "Patient:", "Name:" take one or two capitalised words even when no list
  knows them ("Pat. Ämilie Wolfsgrübler"); relatives, roles and a bare "Patient(in)" ("Tochter",
  "Hausärztin", "wife", "referred by", "gez.") take them when a list knows one of them, or when
  two of them look like a name (capitalised, not a noun by ending or by the allowlist);
- a pair: a listed first name beside a listed or name-like surname ("Anna Schmidt", "Anna von
  Bülow"), "Schmidt, Anna", an initial before a listed name ("H. Müller");
- English text only: a listed name capitalised mid-sentence ("discussed with Gallagher").
A found name grows over neighbouring initials, first names and listed surnames. [never] words of
radground/data/names/not_names.txt, plus every term and cue of the anatomy lexicon, are never list
evidence; [ambiguous] words ("Mark", "May", "Klein", "Weber") count only beside another name.

Name lists: radground/data/names/{first,last}_names.txt.gz, derived from names-dataset by
scripts/build-name-lists.py (loading names-dataset itself takes 18 s and 2 GB, so never here).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources

from radground.errors import DeidError
from radground.lexicon import load_lexicon

CATEGORIES = ("name", "address", "id")
_NAMES_DIR = "names"


@dataclass(frozen=True)
class Found:
    start: int  # offsets in the text searched
    end: int
    category: str  # one of CATEGORIES


@dataclass(frozen=True)
class Vocabulary:
    """Casefolded word sets the name rules consult (loaded once per process)."""

    first: frozenset[str]
    last: frozenset[str]
    never: frozenset[str]
    ambiguous: frozenset[str]
    compound: re.Pattern  # an unlisted word that starts or ends with a [never] noun is a noun


def find_phi(text: str, language: str) -> list[Found]:
    """Every name, address and ID-shaped token in ``text``, found without knowing the patient."""
    return [*find_names(text, language), *find_addresses(text), *find_ids(text)]


# ---- vocabulary --------------------------------------------------------------------------------
def _data_file(name: str):
    path = resources.files("radground.data").joinpath(_NAMES_DIR, name)
    if not path.is_file():
        raise DeidError(f"phi_text: radground/data/{_NAMES_DIR}/{name} is missing; the scrubber cannot find "
                        "names without it. Restore it from git or run scripts/build-name-lists.py.")
    return path


def _read_names(name: str) -> frozenset[str]:
    with gzip.open(_data_file(name).open("rb"), "rt", encoding="utf-8") as f:
        return frozenset(line.strip().casefold() for line in f if line.strip() and not line.startswith("#"))


def _read_not_names() -> tuple[set[str], set[str], set[str]]:
    """([never] words, [ambiguous] words, capitalised [never] words = nouns) of not_names.txt."""
    sections: dict[str, set[str]] = {"never": set(), "ambiguous": set()}
    nouns: set[str] = set()
    current = sections["never"]
    for line in _data_file("not_names.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections[line[1:-1]]
        elif line:
            current.update(w.casefold() for w in line.split())
            if current is sections["never"]:
                nouns.update(w.casefold() for w in line.split() if w[0].isupper() and len(w) >= 5)
    return sections["never"], sections["ambiguous"], nouns


@cache
def vocabulary() -> Vocabulary:
    """The name lists, the allowlist and the anatomy lexicon as one lookup structure (cached)."""
    never, ambiguous, nouns = _read_not_names()
    lexicon = load_lexicon()
    stems = set()
    for structure in lexicon.structures:
        for language, terms in structure.terms.items():
            for term in terms:
                never.update(w.strip(".").casefold() for w in term.split() if w.strip("."))
                if language == "de" and len(term) >= 4 and " " not in term:
                    stems.add(term.casefold())  # German terms also begin compounds: "Leber" in "Leberläsion"
    for language in ("de", "en"):
        never.update(w.casefold() for words in lexicon.ignore[language] for w in words.split())
        cues = lexicon.negation[language]
        for words in (*cues.before, *cues.after, *cues.pseudo, *cues.scope_breaks, *cues.list_words, *cues.copulas):
            never.update(w.strip(".").casefold() for w in words.split())
        for table in (lexicon.laterality[language].before, lexicon.laterality[language].after):
            never.update(w.strip(".").casefold() for words in table.values() for phrase in words
                         for w in phrase.split())
    never -= ambiguous
    nouns -= ambiguous
    heads = "|".join(sorted(map(re.escape, stems | nouns), key=len, reverse=True))
    tails = "|".join(sorted(map(re.escape, nouns), key=len, reverse=True))
    return Vocabulary(_read_names("first_names.txt.gz"), _read_names("last_names.txt.gz"), frozenset(never),
                      frozenset(ambiguous), re.compile(rf"(?:{heads}).|.+(?:{tails})$"))


# ---- names ---------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*(?:-[^\W\d_]+(?:['’][^\W\d_]+)*)*")
_PARTICLES = frozenset({"von", "van", "de", "der", "den", "zu", "vom", "zum", "da", "di", "del", "della", "le",
                        "la", "ten", "ter", "dos", "das", "du", "al", "el", "bin", "ibn"})
# Nouns by their ending, for words no list knows: "Aufklärung", "Embolie", "Sklerose", "Resektion";
# English endings only in English text ("Haering" and "Freising" are German names).
_NOUN_ENDING = {
    # Only endings that surnames do not share: "-enz", "-anz", "-ur", "-um" end Lorenz, Röhrdanz, Blum too.
    "de": re.compile(r"(?:ung|ungen|heit|heiten|keit|keiten|schaft|tion|tionen|sion|ität|ismus|ose|osen|itis"
                     r"|ome|omen|ie|ien|ium|tomie|gramm|graphie|grafie|skopie|ektomie|plastik)$"),
    "en": re.compile(r"(?:tion|tions|sion|sions|ness|ment|ity|ities|ology|osis|itis|oma|omas|ectomy|graphy|scopy"
                     r"|ism|ance|ence|ing|ed|ly|al|ous|ive|ical|ics|ure|ures)$"),
}
_STRONG_CUE = re.compile(  # the next capitalised words ARE the name
    r"(?<![^\W\d_])(?:Pat\.(?:[ \t]*:)?|(?:[Pp]atient(?:in)?|Pat)[ \t]*:|Versicherte[rn]?[ \t]*:"
    r"|(?:Patienten|Pat\.?-?|Vor|Nach|Familien|Geburts|Ruf)?[Nn]ame[ \t]*:"
    r"|(?:First|Last|Full|Given|Family|Maiden)[ \t]+[Nn]ame[ \t]*:|(?:Surname|Forename)[ \t]*:)")
_WEAK_CUE = re.compile(  # the next capitalised words are a name when a list or their shape says so
    r"(?<![^\W\d_])(?:[Pp]atient(?:in)?|"
    r"Tochter|Sohn|Ehemann|Ehefrau|Ehegattin|Ehegatte|Gattin|Gatte|Mutter|Vater|Bruder|Schwester|Enkelin|Enkel"
    r"|Großmutter|Großvater|Oma|Opa|Onkel|Tante|Neffe|Nichte|Schwieger(?:sohn|tochter|mutter|vater)|Schwägerin"
    r"|Schwager|Lebensgefährtin|Lebensgefährte|Lebenspartnerin|Lebenspartner|Partnerin|Partner|Freundin|Freund"
    r"|Nachbarin|Nachbar|Betreuerin|Betreuer|(?:Vorsorge)?[Bb]evollmächtigte[rn]?|Angehörige[rn]?|Begleitperson"
    r"|Dolmetscherin|Dolmetscher|Hausärztin|Hausarzt|Kinderärztin|Kinderarzt|Einweiserin|Einweiser"
    r"|Ansprechpartnerin|Ansprechpartner|Kontaktperson|Pflegerin|Pfleger|Pflegekraft"
    r"|(?:Überweisung|Zuweisung|Einweisung)[ \t]+(?:durch|von)|(?:überwiesen|zugewiesen|eingewiesen)[ \t]+(?:durch|von)"
    r"|gez\.|(?i:son-in-law|daughter-in-law|daughter|son|husband|wife|spouse|partner|mother|father|brother|sister|grandson|granddaughter"
    r"|grandmother|grandfather|niece|nephew|aunt|uncle|friend|neighbou?r|carer|caregiver|guardian|next[ \t]+of[ \t]+kin"
    r"|family[ \t]+doctor|primary[ \t]+care[ \t]+(?:physician|provider)|interpreter"
    r"|(?:referred|requested|ordered|signed|authori[sz]ed|transcribed)[ \t]+by|signed|copy[ \t]+to|cc)"
    r"|GP|PCP)(?:'s)?(?![^\W\d_])")
# curate re-scans German questions with language="en"; the English-only rule must not run on them.
_GERMAN = re.compile(r"(?<![^\W\d_])(?:der|die|das|und|ist|sind|mit|nicht|eine?|einer|zeigt|sich|welche[rsmn]?"
                     r"|keine?|im|vom|zur|zum|bei|nach|oder|auf|wird|wurde)(?![^\W\d_])", re.IGNORECASE)
_TITLE_PARTICLE = re.compile(r"(?<![^\W\d_])(?:Dr\.?|Prof\.?|Herrn?|Frau|Mrs?\.?|Ms\.?)(?:[ \t]+(?:med|dent|univ)\.)*"
                             r"[ \t]+(?=(?:von|van|vom|zu|de|da|di|del|le|la|ten|ter)[ \t])")
# What follows an eponym: "Arnold Chiari malformation", "Salter Harris II", "Kellgren Lawrence Grad 3".
_EPONYM_FOLLOWERS = """malformation malformations syndrome disease fracture fractures lesion lesions sign
    classification grade type score criteria stage variant deformity pouch cyst node nodes tumor tumour sarcoma
    lymphoma murmur anomaly procedure operation repair shunt line lines space ratio index scale syndrom erkrankung
    fraktur läsion zeichen klassifikation einteilung grad typ stadium kriterien variante zyste tumor operation
    morbus krankheit raum linie linien fehlbildung"""
_EPONYM_HEADS = frozenset(_EPONYM_FOLLOWERS.split())
_NAME_END = re.compile(r"[ \t]*(?:[,;:()\n]|\Z)")
_BLANKS, _INITIAL_GAP = re.compile(r"[ \t]+"), re.compile(r"\.[ \t]*-?[ \t]*")
_CUE_GAP = re.compile(r"[ \t]*(?:[:,(][ \t]*)?")
_MAX_NAME_TOKENS = 4
_UP = "[" + "".join(c for c in map(chr, range(0x41, 0x250)) if c.isupper()) + "]"  # upper-case letter
_LOW = "[" + "".join(c for c in map(chr, range(0x61, 0x250)) if c.islower()) + "]"
_W = r"[^\W\d_]"  # any letter


class _Tokens:
    """The words of one text and what the vocabulary says about each (computed once per word)."""

    def __init__(self, text: str, vocab: Vocabulary, language: str) -> None:
        self.text, self.vocab = text, vocab
        self.endings = _NOUN_ENDING["de"], _NOUN_ENDING[language]
        matches = list(_TOKEN.finditer(text))
        self.start = [m.start() for m in matches]
        self.end = [m.end() for m in matches]
        self.word = [m.group() for m in matches]
        self.fold = [w.casefold() for w in self.word]

    def __len__(self) -> int:
        return len(self.word)

    def cap(self, i: int) -> bool:  # "Müller", "McDonald", "O'Brien"; not "CT", not "IVa"
        w = self.word[i]
        return w[0].isupper() and (len(w) == 1 or w[1].islower() or (w[1] in "'’" and w[2:3].isupper()))

    def caps(self, i: int) -> bool:  # "MÜLLER"
        return len(self.word[i]) > 1 and self.word[i].isupper()

    def parts(self, i: int) -> list[str]:
        return self.fold[i].replace("’", "'").split("-")

    def never(self, i: int) -> bool:
        """A [never] word, or a compound with one ("Spiral-CT", "Kurt-Schumacher-Weg"; not "Jan-Peter")."""
        v, parts = self.vocab, self.parts(i)
        return self.fold[i] in v.never or (any(p in v.never for p in parts) and not all(p in v.first for p in parts))

    def ambiguous(self, i: int) -> bool:
        return self.fold[i] in self.vocab.ambiguous

    def first(self, i: int) -> bool:
        v = self.vocab
        return not self.never(i) and (self.fold[i] in v.first or all(p in v.first for p in self.parts(i)))

    def last(self, i: int) -> bool:
        v = self.vocab
        return not self.never(i) and (self.fold[i] in v.last or any(p in v.last for p in self.parts(i)))

    def listed(self, i: int) -> bool:
        return self.first(i) or self.last(i)

    def nounish(self, i: int) -> bool:
        """A word no list knows that looks like a common noun: "Aufklärung", "Leberläsion"."""
        fold = self.fold[i]
        return self.never(i) or (not self.listed(i) and (
            any(e.search(fold) for e in self.endings) or self.vocab.compound.match(fold) is not None))

    def name_like(self, i: int) -> bool:
        return (self.cap(i) or self.caps(i)) and len(self.word[i]) > 1 and not self.nounish(i)

    def initial(self, i: int) -> bool:  # "H." of "H. Müller"; not the "V." of "V.a."
        w, after = self.word[i], self.text[self.end[i]:self.end[i] + 3]
        return len(w) == 1 and w.isupper() and after[:1] == "." and re.match(r"\.[a-zäöüß]\.", after) is None

    def gap(self, i: int) -> str:
        return self.text[self.end[i - 1]:self.start[i]] if i > 0 else self.text[:self.start[0]]

    def joined(self, i: int) -> bool:
        """Are words i-1 and i parts of one name: on one line, only blanks (or an initial's dot) between?"""
        if i <= 0 or i >= len(self):
            return False
        gap = self.gap(i)
        return _BLANKS.fullmatch(gap) is not None or (self.initial(i - 1) and _INITIAL_GAP.fullmatch(gap) is not None)

    def next_name(self, i: int) -> int | None:
        """The next word after i within one name, skipping particles: "Anna von Bülow" -> Bülow."""
        j = i + 1
        while j < len(self) and self.joined(j) and self.fold[j] in _PARTICLES and not self.cap(j):
            j += 1
        return j if j < len(self) and self.joined(j) and not (self.fold[j] in _PARTICLES and not self.cap(j)) else None

    def sentence_start(self, i: int) -> bool:
        # After a placeholder ("[NAME], Smith") counts as a start too: a second pass over scrubbed text
        # must not see more than the first did ("J. Smith, London" -> "[NAME], London").
        gap = self.gap(i)
        return i == 0 or (re.search(r"[.!?:;\n•\]]", gap) is not None and not self.initial(i - 1))

    def span(self, a: int, b: int) -> tuple[int, int]:
        return self.start[a], self.end[b]


def find_names(text: str, language: str) -> list[Found]:
    """Person names found by cue, by name list and by shape; see the module docstring."""
    toks = _Tokens(text, vocabulary(), language)
    english = language == "en" and len(_GERMAN.findall(text)) < 2
    seeds = [*_cued(toks), *_pairs(toks, english)]
    spans = sorted({toks.span(*_grow(toks, a, b)) for a, b in seeds})
    return [Found(s, e, "name") for s, e in spans]


def _run(toks: _Tokens, i: int, comma: bool = False) -> list[int]:
    """Up to 3 capitalised, not-[never] words from i on, one name's worth (initials and particles inside).

    With ``comma``, "Weihmann, Hans-Gerd" is one name too (family name first, as labels write it).
    """
    run: list[int] = []
    k: int | None = i
    while k is not None and len([r for r in run if not toks.initial(r)]) < 3:
        # "Patient: John Smith DOB": a word in capitals continues a name only when a list knows it
        if not (toks.cap(k) or toks.caps(k) and (not run or toks.listed(k))) or (
                toks.never(k) and not (toks.cap(k) and _surname_slot(toks, [*run, k]))):
            break
        run.append(k)
        k = toks.next_name(k)
        if (k is None and comma and len(run) == 1 and run[0] + 1 < len(toks) and toks.first(run[0] + 1)
                and re.fullmatch(r",[ \t]*", toks.gap(run[0] + 1))):
            k = run[0] + 1
    while run and toks.initial(run[-1]):
        run.pop()
    return run


def _first_after(toks: _Tokens, pos: int) -> int | None:
    """The first word after a cue ending at ``pos``, if only blanks and one ":", "," or "(" come between."""
    gap = _CUE_GAP.match(toks.text, pos)
    at = gap.end() if gap else pos
    for i, start in enumerate(toks.start):
        if start >= at:
            return i if start == at else None
    return None


def _cued(toks: _Tokens) -> Iterator[tuple[int, int]]:
    for m in _TITLE_PARTICLE.finditer(toks.text):  # "Dr. van der Dussen": tasks/scrub.py stops at "van"
        i = _first_after(toks, m.end())
        j = toks.next_name(i) if i is not None else None
        if j is not None and toks.cap(j) and not toks.never(j):
            yield i, j
    for strong, cue in ((True, _STRONG_CUE), (False, _WEAK_CUE)):
        for m in cue.finditer(toks.text):
            i = _first_after(toks, m.end())
            run = _run(toks, i, comma=strong) if i is not None else []
            if strong:
                taken = []
                for n, k in enumerate(run):  # "Pat. Ämilie Wolfsgrübler": a nounish word passes before a name
                    if not (toks.name_like(k) or toks.initial(k) or toks.listed(k) or _surname_slot(toks, run[:n + 1])
                            or (n + 1 < len(run) and toks.name_like(run[n + 1]))):
                        break
                    taken.append(k)
                after = toks.text[toks.end[taken[-1]]:].lstrip(" \t")[:1] if taken else ""
                if taken and not (":" not in m.group() and after == ":"):  # "Patient Details:" is a heading
                    yield taken[0], taken[-1]
                continue
            names = [k for k in run if not toks.initial(k)]
            evidence = any(toks.listed(k) for k in names) or (
                len(names) >= 2 and all(toks.name_like(k) for k in names)) or (
                len(names) == 1 and len(run) > 1 and toks.name_like(names[0]))
            while names and not (toks.listed(names[-1]) or toks.name_like(names[-1]) or _surname_slot(toks, names)):
                names.pop()
            if evidence and names:
                yield run[0], names[-1]


def _surname_slot(toks: _Tokens, names: list[int]) -> bool:
    """Does the last word of a cued name stand where a surname goes, right after listed given names?

    Then it is the surname though it looks like a noun ("Gerhardt Hethur"); a [never] word too, when
    the name ends with it ("Name: Katja Linke (KVNR ...", "husband, Kimberly Wall,"), but not in
    "Mutter Franziska Sturz am 4.8.". Only cued names use this; a bare "Anna Leber" is no name.
    """
    given, k = [x for x in names[:-1] if not toks.initial(x)], names[-1]
    if not given or not all(toks.first(x) for x in given):
        return False
    ends_name = _NAME_END.match(toks.text, toks.end[k]) is not None
    return not toks.never(k) or (toks.cap(k) and len(given) == 1 and ends_name)


def _pairs(toks: _Tokens, english: bool) -> Iterator[tuple[int, int]]:
    for i in range(len(toks)):
        cap, caps = toks.cap(i), toks.caps(i)
        if not (cap or caps):
            continue
        j = toks.next_name(i)
        if toks.initial(i):  # "H. Müller", "H.-P. Meyer" ("A." is no article here)
            while j is not None and toks.initial(j):
                j = toks.next_name(j)
            if j is not None and toks.cap(j) and toks.listed(j):
                yield i, j
            continue
        if toks.never(i):
            continue
        if toks.first(i) and j is not None and not toks.never(j) and (toks.cap(j) or (caps and toks.caps(j))):
            # Two words that are also eponyms are a name unless a clinical word follows ("Arnold Chiari
            # malformation", "Salter Harris II"); "Martin Jones (ward nurse)" is one.
            nxt = j + 1 if j + 1 < len(toks) and toks.joined(j + 1) else None
            eponym = toks.ambiguous(i) and toks.ambiguous(j) and nxt is not None and (
                toks.caps(nxt) or toks.fold[nxt] in _EPONYM_HEADS)
            listed = toks.listed(j) and not eponym  # "Anna Schmidt", "Mark Taylor", "HANS MÜLLER"
            shaped = (cap and toks.cap(j) and not toks.ambiguous(i) and not toks.ambiguous(j)
                      and toks.name_like(j))  # "Karsten Wieloch-Bolnbach"
            if listed or shaped:
                yield i, j
        if (cap and toks.last(i) and i + 1 < len(toks) and re.fullmatch(r",[ \t]+", toks.gap(i + 1))
                and toks.cap(i + 1) and toks.first(i + 1) and not (toks.ambiguous(i) and toks.ambiguous(i + 1))):
            yield i, i + 1  # "Schmidt, Anna"
        if (j is not None and cap and toks.cap(j) and not toks.listed(i) and toks.name_like(i)
                and not toks.ambiguous(i) and toks.last(j) and not toks.ambiguous(j) and not toks.sentence_start(i)):
            yield i, j  # "an Hannchen Klemm": a rare given name before a listed surname, mid-sentence
        if (english and cap and len(toks.word[i]) > 2 and toks.listed(i) and not toks.ambiguous(i)
                and not toks.sentence_start(i)):
            yield i, i  # English capitalises names only: "seen by Gallagher"


def _grow(toks: _Tokens, a: int, b: int) -> tuple[int, int]:
    """Extend a name over neighbouring initials and first names (left) and surnames (right)."""
    while b - a + 1 < _MAX_NAME_TOKENS:
        k = toks.next_name(b)
        given_only = all(toks.initial(x) or toks.first(x) and not toks.last(x) for x in range(a, b + 1))
        if k is None or not toks.cap(k) and not toks.caps(k) or toks.never(k) or not (
                toks.last(k) or toks.first(k) or (given_only and toks.name_like(k))):
            break
        b = k
    while a > 0 and b - a + 1 < _MAX_NAME_TOKENS and toks.joined(a) and (
            toks.initial(a - 1) or (toks.cap(a - 1) and toks.first(a - 1) and not toks.ambiguous(a - 1))):
        a -= 1
    return a, b


# ---- addresses ---------------------------------------------------------------------------------------
_HOUSE_NO = r"\d{1,5}[a-zA-Z]?(?:[ \t]*[-/][ \t]*\d{1,5}[a-zA-Z]?)?"
# A house number is not a measurement: "Damm 2 cm" and "Feld 3 T" stay.
_NO_UNIT = (r"(?![\w/]|[.,]\d|[ \t]*(?:mm|cm|m|ml|l|%|kg|g|mg|HU|ms|s|min|mGy|mSv|Gy|kV|mAs|T|Tesla|x|×|Uhr|h)"
            r"(?![^\W\d_]))")
_DE_SUFFIX = r"(?:straße|strasse|str\.|weg|platz|allee|gasse|ring|damm|ufer|chaussee|pfad|steig|stieg|markt|promenade)"
_DE_STREET = re.compile(
    rf"(?<![\w-])(?P<street>{_UP}{_W}*(?:-{_W}+)*-?(?i:{_DE_SUFFIX})"  # "Hauptstraße", "Kurt-Schumacher-Weg"
    rf"|{_UP}{_W}+[ \t]+(?:Straße|Strasse|Str\.|Weg|Platz|Allee|Gasse|Ring|Damm|Ufer|Chaussee|Markt)"
    rf"|(?:Am|An[ \t]+der|An[ \t]+den|Auf[ \t]+der|Auf[ \t]+dem|Im|In[ \t]+der|Zum|Zur|Unter[ \t]+den|Hinter[ \t]+der)"
    rf"[ \t]+(?P<place>{_UP}{_W}+(?:-{_W}+)*))"
    rf"[ \t]*(?<=[ \t.])(?P<no>{_HOUSE_NO}){_NO_UNIT}")
_PLACE_WORD = rf"{_UP}{_LOW}{_W}*(?:[-'’]{_W}+)*"
_DE_CITY = re.compile(  # "80331 München", "D-80331 München", "A-1010 Wien", "Frankfurt am Main", "Bad Tölz"
    rf"(?<![\w.,/-])(?:(?:D-?)?\d{{5}}|(?:A|CH)-\d{{4}})[ \t]+(?P<city>(?:(?:Bad|Sankt|St\.|Markt)[ \t]+)?{_PLACE_WORD}"
    rf"(?P<second>[ \t]+{_PLACE_WORD})?"
    rf"(?:[ \t]+(?:am|an[ \t]+der|im|in|ob[ \t]+der|bei|vor[ \t]+der|vorm|unter|auf[ \t]+der)[ \t]+{_PLACE_WORD}"
    rf"|[ \t]*\({_PLACE_WORD}\)"
    rf"|[ \t]*/[ \t]*{_PLACE_WORD})?)")
# USPS street suffixes (Publication 28). Some are anatomy ("Neck", "Crest", "Wall"), so the words
# before a suffix must not all be [never] words: "2 Femoral Neck" or "3 Chest Wall" is no address.
_EN_SUFFIXES = """Alley Av Ave Avenue Bayou Beach Bend Bluff Bottom Boulevard Blvd Branch Bridge Brook
    Burg Bypass Camp Canyon Cape Causeway Center Centre Circle Cir Cliff Club Common Corner Course Court Ct Cove Creek
    Crescent Cres Crossing Crossroad Curve Dale Dam Divide Drive Dr Estate Estates Expressway Expy Extension Falls Ferry
    Field Fields Flat Flats Ford Forest Forge Fork Fort Freeway Fwy Garden Gardens Gateway Glen Green Grove Harbor
    Harbour Haven Heights Highway Hwy Hill Hills Hollow Inlet Island Isle Key Knoll Lake Landing Lane Ln Light Loaf
    Lock Lodge Loop Mall Manor Meadow Meadows Mews Mill Mission Motorway Mount Mountain Orchard Oval Overpass Park
    Parkway Pkwy Pass Path Pike Pine Pines Place Pl Plain Plains Plaza Point Port Prairie Ranch Rapid Rapids Rest
    Ridge Road Rd Route Row Rue Run Shoal Shore Shores Skyway Spring Springs Square Sq Station Stravenue Stream Street
    St Summit Terrace Ter Throughway Trace Track Trafficway Trail Trl Tunnel Turnpike Underpass Union Valley Via
    Viaduct View Village Ville Vista Walk Wall Way Well Wells Close Crest Neck Spur Junction Fall Passage Arcade
    Annex Point Ramp Square Grove Hollow Radial Trailer Loop Parkway Heights"""
_EN_SUFFIX = "(?:" + "|".join(_EN_SUFFIXES.split()) + ")s?"  # plurals too: "Courts", "Walks"
_EN_STREET = re.compile(  # "353 Kathleen Highway Apt. 681", "12 N. Main St."
    rf"(?<![\w.,/-])\d{{1,6}}[A-Za-z]?[ \t]+(?:[NSEW]\.?[ \t]+)?"
    rf"(?P<words>(?:{_UP}{_W}*(?:['’-]{_W}+)*[ \t]+){{1,3}}){_EN_SUFFIX}"
    rf"(?![^\W\d_])\.?(?:,?[ \t]+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Fl|Floor|No|#)\.?[ \t]*#?[\dA-Z]\w*)?")
_US_STATES = ("AL|AK|AZ|AR|CA|CO|CT|DE|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC"
              "|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|DC|PR|GU|VI|AS|MP|FM|MH|PW|AA|AE|AP")
_US_CITY = re.compile(  # "Bergshire, OH 26694", "New York, NY 10001-1234"
    rf"(?<![\w-])(?:{_UP}{_W}*[ \t]+){{0,2}}{_UP}{_W}*,[ \t]*(?:{_US_STATES})[ \t]+\d{{5}}(?:-\d{{4}})?(?!\d)")
_UK_POSTCODE = re.compile(r"(?<![\w-])(?:[A-Z]{1,2}\d[A-Z\d]?|GIR)[ \t]?\d[ABD-HJLNP-UW-Z]{2}(?![\w-])")


def find_addresses(text: str) -> list[Found]:
    """Street + house number, postcode + city (German, Austrian, Swiss, US, UK) and UK postcodes."""
    vocab, found = vocabulary(), []
    for m in _DE_STREET.finditer(text):
        place = m.group("place")
        if place and (place.casefold() in vocab.never or _NOUN_ENDING["de"].search(place.casefold())):  # "Im Segment 7"
            continue
        found.append(Found(m.start(), m.end(), "address"))
    for m in _DE_CITY.finditer(text):
        city = re.sub(r"^(?:Bad|Sankt|St\.|Markt)[ \t]+", "", m.group("city")).split()[0].rstrip(".")
        if city.casefold() in vocab.never:  # "12000 Einheiten"
            continue
        second = m.group("second")  # "Schwäbisch Gmünd", but not the "Befund" of "80331 München Befund"
        end = m.start("second") if second and second.strip().rstrip(".").casefold() in vocab.never else m.end()
        found.append(Found(m.start(), end, "address"))
    for m in _EN_STREET.finditer(text):
        words = re.findall(rf"{_UP}{_W}*", m.group("words"))
        if all(w.casefold() in vocab.never for w in words):  # "3 Left Lower Lobe Extension"
            continue
        found.append(Found(m.start(), m.end(), "address"))
    for pattern in (_US_CITY, _UK_POSTCODE):
        found += [Found(m.start(), m.end(), "address") for m in pattern.finditer(text)]
    return found


# ---- identifiers ---------------------------------------------------------------------------------------
# Letters and digits mixed, with at least 5 digits: "KVNR-77aa310", "A123456789", "X12-345-67".
# Measurements ("2,2 x 1,8 cm"), levels ("C5/6", "L5/S1", "T12") and doses ("120 kV") have fewer.
_MIXED_ID = re.compile(r"(?<![\w./-])(?=[\w/-]*\d)(?=[\w/-]*[^\W\d_])\w+(?:[-/]\w+)*(?![\w/-]|[.,]\w)")
_ID_LABEL = (
    r"(?i:kv[- ]?nr|kvnr|versicherten[- ]?(?:nr|nummer)|vers\.?[- ]?nr|versicherungs[- ]?(?:nr|nummer)"
    r"|kassen[- ]?nr|fall[- ]?(?:nr|nummer)|fallnr|aufnahme[- ]?(?:nr|nummer)|auftrags?[- ]?(?:nr|nummer)"
    r"|pat(?:ienten)?\.?[- ]?(?:id|nr|nummer)|patient[ \t]+(?:id|number|no)|pid|mrn"
    r"|medical[ \t]+record[ \t]+(?:number|no)|nhs[ \t]+(?:no|number)|ssn|social[ \t]+security[ \t]+(?:number|no)"
    r"|insurance[ \t]+(?:no|number|id)|policy[ \t]+(?:no|number)"
    r"|member[ \t]+id|accession(?:[ \t]+(?:no|number))?|acc\.?[ \t]*no|case[ \t]+(?:no|number)"
    r"|befund[- ]?(?:nr|nummer)|untersuchungs[- ]?(?:nr|nummer)|studien[- ]?(?:nr|nummer)|id)")
_LABELLED_ID = re.compile(  # "MRN 0012345", "NHS No. 943 476 5919", "Fall-Nr.: 4711-A"
    rf"(?<![^\W\d_]){_ID_LABEL}\.?[ \t]*[:#]?[ \t]*(?P<v>[A-Za-z]{{0,5}}[-/]?\d[\dA-Za-z]*"
    rf"(?:(?:[-/.]|[ \t](?=\d))[\dA-Za-z]+)*)(?![\w/-]|[.,]\d)")


def find_ids(text: str) -> list[Found]:
    """ID-shaped tokens: letters mixed with >= 5 digits, and labelled numbers ("MRN 0012345")."""
    found = [Found(m.start(), m.end(), "id") for m in _MIXED_ID.finditer(text)
             if sum(c.isdigit() for c in m.group()) >= 5]
    found += [Found(*m.span("v"), "id") for m in _LABELLED_ID.finditer(text)
              if sum(c.isdigit() for c in m.group("v")) >= 4]
    return [f for f in found if not any(o != f and o.start <= f.start and f.end <= o.end for o in found)]
