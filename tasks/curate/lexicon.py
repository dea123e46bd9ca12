"""Offline keyword backend: a bilingual lexicon plus rules, no model, no network.

Deterministic and fast (one precompiled alternation per language; ~20,000 synthetic report
lines/s on one CPU core), so it can label a whole drop as a baseline or a fallback for the
LLM backend. Decisions, since docs/method.md leaves them open:

- Paired structures: a side cue next to the word picks the side ("linke Niere",
  "Niere li.", "kidney, left", "Oberlappen der linken Lunge"); "beidseits"/"bds."/
  "bilateral"/"both"/"beide" give both sides, two keywords with the same span. A paired
  word with NO cue ("Lunge o.B.", "Nieren", "pulmonal", "Oberlappen") also gives both
  sides: German "Lunge" is the collective organ, one sentence cannot tell the side, and
  grounding keeps per slice only the classes present in its mask. Exception: if the same
  sentence names a side for that organ ("pulmonaler Nodulus in der rechten Lunge"), the
  unsided mention takes that side.
- Spans: the keyword covers the structure word plus its side cue ("Oberlappen links",
  "left kidney", "Lunge beidseits"); a German compound is keyword as a whole word
  ("Leberläsion" -> liver). Spans never end in "." so "Niere li." at the end of a sentence
  gives "Niere li" and the sentence's full stop stays outside.
- Lobes win over the organ: "Lungenoberlappen" is the upper lobe, "Mittellappen" the right
  middle lobe, "Lingula" the left upper lobe.
- Vertebra levels by rule: "LWK 5", "LWK5", "L5", "12. BWK", "Th8", "T8", "HWK 2", "C2",
  "SWK 1", "S1"; a range ("LWK 3-5", "T11-L1") gives one keyword per level (same span); a
  slash ("L4/5", "L5/S1") is a disc level -> intervertebral_discs. "T1"/"T2" next to MR
  weighting words, TNM ("T2 N0") and liver segments ("S1" with "Segment") are not levels.
  Generic "Wirbelsäule"/"LWS"/"spine" -> vertebrae, unless the sentence names a level.
- Ribs by rule: "7. Rippe rechts", "Rippe 7 re.", "right 7th rib", "ribs 7-9 on the left";
  a number without a side gives both sides. Generic "Rippen"/"ribs" give NO keyword: there
  is no class for "some rib", and listing 24 guesses would be noise.
- Negation is an attribute, never a reason to drop a keyword: negated=True when a cue
  ("keine", "ohne", "no", "without", ...) precedes the mention in the same clause, or
  follows it with only copulas between ("Niere rechts ohne Harnstau", "the kidney is not
  enlarged", but not "Schädel-Hirn-Trauma ohne Fraktur"). ", " and ";" and words like
  "aber"/"but" end a clause, except the commas of an enumeration of structures ("Keine
  Läsion in Leber, Milz oder Nieren"); a colon ends a preceding cue's reach ("CT ohne KM:
  Lunge frei"). So "Leber normal groß, homogen, ohne Herde" leaves the liver un-negated:
  the cue sits in a later clause. Pseudo-negations ("nicht ausgeschlossen", "no change")
  negate nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from radground.labels import label_map
from radground.lexicon import LANGUAGES, Lexicon, load_lexicon
from tasks.curate.base import CurationError, ExtractionFailure, ExtractionResult, Keyword, check_keyword

_CUE_WINDOW = 48  # characters searched before a structure word for its side cue
_SIDE_OF = {"left": 0, "right": 1}


@dataclass(frozen=True)
class _Mention:
    start: int
    end: int
    classes: tuple[str, ...]
    side: str | None = None  # "left"/"right"/"both" when named; None when inferred or sideless
    pair: tuple[str, str] | None = None  # (left, right) classes of an unsided paired mention
    group: str | None = None  # organ group shared by sided and unsided mentions (side adoption)


def _phrase(word: str) -> str:
    """Regex for a cue word or phrase: any whitespace between words, whole words only."""
    body = r"\s+".join(re.escape(w) for w in word.split())
    return body + (r"(?!\w)" if word[-1].isalnum() else "")


def _alternation(words: Sequence[str]) -> str:
    return "|".join(_phrase(w) for w in sorted(words, key=len, reverse=True)) or r"(?!x)x"


def _sided(table: dict[str, tuple[str, ...]]) -> str:
    return "|".join(f"(?P<{side}>{_alternation(words)})" for side, words in table.items())


def _side_of_word(word: str) -> str:
    w = word.lower()
    return "left" if w.startswith(("li", "lks", "left")) else "right" if w.startswith(("re", "rts", "right")) \
        else "both"


# --- vertebrae ----------------------------------------------------------------------
_LEVELS = ([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)]
           + [f"L{i}" for i in range(1, 6)] + ["S1"])
_REGION = {"HWK": "C", "BWK": "T", "LWK": "L", "SWK": "S", "TH": "T", "C": "C", "T": "T", "L": "L", "S": "S"}
_ONE = r"(?:(?:HWK|BWK|LWK|SWK)[ \u00a0-]?\d{1,2}|(?:Th|TH|[CTLS])\d{1,2})(?!\d)"
_VERTEBRA = re.compile(
    rf"(?<![\w.])(?:(?P<ord>\d{{1,2}})\.\s?(?P<ordp>HWK|BWK|LWK|SWK)"
    rf"|(?P<a>{_ONE})(?:\s*(?P<sep>-|–|/|bis|to|through)\s*(?P<b>{_ONE}|\d{{1,2}}(?!\d)(?!\s*(?:mm|cm|[,.]\d))))?)"
    r"(?![\w/])")
_LEVEL_TOKEN = re.compile(r"(HWK|BWK|LWK|SWK|Th|TH|[CTLS])?[ \u00a0-]?(\d{1,2})")
_MR_WEIGHTING = re.compile(r"weight|gewicht|sequen|hyperint|hypoint|\bstir\b|flair|signal", re.IGNORECASE)
_LIVER_SEGMENT = re.compile(r"segment|leber|liver|hepat", re.IGNORECASE)
_NOT_A_LEVEL_AFTER = re.compile(r"\s*N[0-3xX]|-?\s*(?:abusus|abuse)", re.IGNORECASE)
_NERVE_ROOT_BEFORE = re.compile(r"(?:wurzel|root)\s*\Z", re.IGNORECASE)  # "Wurzel L5" is a nerve root


def _vertebra_classes(m: re.Match[str], sentence: str) -> tuple[str, ...]:
    """Classes named by a vertebra match, or () when it is not plausibly a level."""
    if m["ord"]:
        tokens = [(m["ordp"], m["ord"])]
    else:
        tokens = _LEVEL_TOKEN.findall(m[0])
        bare = tokens[0][0] in ("C", "T", "L", "S")  # "L5", not "LWK 5"/"Th5": may be MR weighting, TNM, segment
        if bare and m["sep"] is None and (
                _NOT_A_LEVEL_AFTER.match(sentence, m.end())
                or _NERVE_ROOT_BEFORE.search(sentence, 0, m.start())
                or (tokens[0] in (("T", "1"), ("T", "2")) and _MR_WEIGHTING.search(sentence))
                or (tokens[0][0] == "S" and (tokens[0][1] != "1" or _LIVER_SEGMENT.search(sentence)))):
            return ()
    region = _REGION[tokens[0][0].upper()]
    names = []
    for prefix, number in tokens:
        region = _REGION[prefix.upper()] if prefix else region
        names.append("sacrum" if region == "S" and 2 <= int(number) <= 5
                     else f"{region}{int(number)}")
    if any(n != "sacrum" and n not in _LEVELS for n in names):
        return ()
    if m["sep"] == "/":
        return ("intervertebral_discs",)
    if len(names) == 2 and "sacrum" not in names:
        i, j = _LEVELS.index(names[0]), _LEVELS.index(names[1])
        if j <= i:
            return ()
        names = _LEVELS[i:j + 1]
    return tuple(dict.fromkeys(n if n == "sacrum" else f"vertebrae_{n}" for n in names))


# --- ribs ----------------------------------------------------------------------------
_NUM = r"\d{1,2}(?!\d)"
_NOT_SIZE = r"(?!\s*(?:mm|cm|[.,]\d))"
_ORD_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
              "eleventh", "twelfth")
_ORD_EN = rf"(?:\d{{1,2}}(?:st|nd|rd|th)|{'|'.join(_ORD_WORDS)})"
_DE_ADJ = r"(?:linke[nrs]?|rechte[nrs]?|li\.|re\.)"
_DE_POST = r"(?:links|rechts|li\.|re\.|lks\.|rts\.|beidseits|beidseitig|bds\.?)"
_RIBS = {
    "de": (rf"(?<![\w.])(?:(?P<s1>{_DE_ADJ})\s+)?(?P<n>{_NUM}\.(?:\s*(?:,|und|u\.|bis|-|–)\s*{_NUM}\.)*)\s*"
           rf"(?:(?P<s2>{_DE_ADJ})\s+)?Rippen?(?!\w)(?:\s*,?\s*(?P<s3>{_DE_POST})(?!\w))?",
           rf"(?<![\w.])(?:(?P<s1>{_DE_ADJ})\s+)?Rippen?\s+(?P<n>{_NUM}(?:\s*(?:,|und|bis|-|–)\s*{_NUM})*){_NOT_SIZE}"
           rf"(?:\s*(?P<s3>{_DE_POST})(?!\w))?"),
    "en": (rf"(?<![\w.])(?:(?P<s1>left|right|bilateral)\s+)?(?P<n>{_ORD_EN}(?:\s*(?:,|and|to|through|-|–)\s*"
           rf"{_ORD_EN})*)\s+(?:(?P<s2>left|right)\s+)?ribs?(?!\w)(?:\s+on\s+the\s+(?P<s3>left|right)(?!\w))?",
           rf"(?<![\w.])(?:(?P<s1>left|right)\s+)?ribs?\s+(?P<n>{_NUM}(?:\s*(?:,|and|to|through|-|–)\s*{_NUM})*)"
           rf"{_NOT_SIZE}(?:\s+on\s+the\s+(?P<s3>left|right)(?!\w))?"),
}
_RIB_TOKEN = re.compile(rf"(?P<n>\d{{1,2}}|{'|'.join(_ORD_WORDS)})|(?P<range>\b(?:bis|to|through)\b|-|–)",
                        re.IGNORECASE)


def _rib_classes(m: re.Match[str]) -> tuple[str, ...]:
    numbers: list[int] = []
    pending_range = False
    for t in _RIB_TOKEN.finditer(m["n"]):
        if t["range"]:
            pending_range = bool(numbers)
            continue
        n = int(t["n"]) if t["n"].isdigit() else _ORD_WORDS.index(t["n"].lower()) + 1
        numbers += list(range(numbers[-1] + 1, n + 1)) if pending_range and numbers and n > numbers[-1] else [n]
        pending_range = False
    if not numbers or not all(1 <= n <= 12 for n in numbers):
        return ()
    cue = next((v for g in ("s1", "s2", "s3") if (v := m.groupdict().get(g))), None)
    side = _side_of_word(cue) if cue else "both"
    sides = ("left", "right") if side == "both" else (side,)
    return tuple(f"rib_{s}_{n}" for n in dict.fromkeys(numbers) for s in sides)


# --- per-language tables ----------------------------------------------------------------
@dataclass(frozen=True)
class _Patterns:
    terms: re.Pattern[str]  # groups t0..tN, one per surface form
    term_owner: tuple[int | None, ...]  # group index -> structure index (None: ignore list)
    before: re.Pattern[str]
    after: re.Pattern[str]
    of_lung: re.Pattern[str]
    ribs: tuple[re.Pattern[str], ...]
    neg_before: re.Pattern[str]
    neg_after: re.Pattern[str]
    pseudo: re.Pattern[str]
    breaks: re.Pattern[str]
    list_words: frozenset[str]
    copulas: frozenset[str]


def _term_regex(term: str, language: str) -> str:
    body = r"\s+".join(re.escape(w) for w in term.split())
    if term.isupper():  # abbreviation: exact and case-sensitive ("ML" is not "ml")
        return rf"(?-i:{body})(?!\w)"
    # German compounds and inflections hang off the stem; English needs whole words
    return body + (r"\w*" if language == "de" else r"(?!\w)")


def _terms_regex(forms: list[tuple[str, int | None]], language: str) -> re.Pattern[str]:
    """One alternation, longest form first; branches keyed by first letter.

    Python's re tries every alternative at every position; checking the word start once and
    jumping to the branch of the first letter took synthetic reports from ~400 to >19,000 lines/s."""
    branches: dict[str, list[str]] = {}
    for k, (term, _) in enumerate(forms):  # forms are sorted longest first; dicts keep that order
        branches.setdefault(term[0].casefold(), []).append(f"(?P<t{k}>{_term_regex(term, language)})")
    alternation = "|".join(f"(?=[{re.escape(c)}{re.escape(c.upper())}])(?:{'|'.join(alts)})"
                           for c, alts in branches.items())
    return re.compile(rf"(?<!\w)(?:{alternation})", re.IGNORECASE)


def _compile(lexicon: Lexicon, language: str) -> _Patterns:
    forms = [(t, i) for i, s in enumerate(lexicon.structures) for t in s.terms[language]]
    forms += [(t, None) for t in lexicon.ignore[language]]
    forms.sort(key=lambda f: len(f[0]), reverse=True)  # alternation takes the first match: longest first
    terms = _terms_regex(forms, language)
    lat, neg = lexicon.laterality[language], lexicon.negation[language]
    flags = re.IGNORECASE
    return _Patterns(
        terms=terms, term_owner=tuple(i for _, i in forms),
        before=re.compile(rf"(?<!\w)(?:{_sided(lat.before)})[ \t\u00a0]*\Z", flags),
        after=re.compile(rf"(?P<comma>[ \t\u00a0]*,)?[ \t\u00a0]*(?:{_sided(lat.after)})", flags),
        of_lung=re.compile(rf"\s+(?:{_sided(lat.of_lung)})", flags),
        ribs=tuple(re.compile(p, flags) for p in _RIBS[language]),
        neg_before=re.compile(rf"(?<!\w)(?:{_alternation(neg.before)})", flags),
        neg_after=re.compile(rf"(?<!\w)(?:{_alternation(neg.after)})", flags),
        pseudo=re.compile(rf"(?<!\w)(?:{_alternation(neg.pseudo)})", flags),
        breaks=re.compile(rf",(?=\s)|;|\s[-–]\s|(?<!\w)(?:{_alternation(neg.scope_breaks)})", flags),
        list_words=frozenset(w.casefold() for w in neg.list_words),
        copulas=frozenset(w.casefold() for w in neg.copulas))


class LexiconExtractor:
    """Keyword backend ``lexicon``: lexicon + rules, see the module docstring for the rules."""

    name = "lexicon"

    def __init__(self, lexicon: Lexicon | None = None) -> None:
        self.lexicon = lexicon or load_lexicon()
        self._labels = label_map()
        self._patterns = {lang: _compile(self.lexicon, lang) for lang in LANGUAGES}  # once, ~10 ms

    def extract(self, sentences: Sequence[str], language: str) -> list[ExtractionResult]:
        """One result per sentence, in order: its keywords (possibly none) or a failure."""
        if language not in LANGUAGES:
            raise CurationError(f"lexicon backend: language {language!r} is not supported; expected one of "
                                f"{LANGUAGES}. Translate the sentences first or use another backend.")
        patterns = self._patterns[language]
        return [self._extract_one(sentence, patterns) for sentence in sentences]

    def _extract_one(self, sentence: str, p: _Patterns) -> ExtractionResult:
        mentions = self._mentions(sentence, p)
        negated = _negations(sentence, mentions, p)
        keywords, seen = [], set()
        for mention, neg in zip(mentions, negated, strict=True):
            start, end = mention.start, mention.end
            while end > start and sentence[end - 1] == ".":  # "Niere li." keeps the full stop outside
                end -= 1
            for cls in mention.classes:
                if (start, end, cls) in seen:
                    continue
                seen.add((start, end, cls))
                kw = Keyword(sentence[start:end], cls, self._labels.by_name(cls).id, start, end, neg)
                if (why := check_keyword(sentence, kw)) is not None:  # a bug here, never silently empty
                    return ExtractionFailure("span_not_verbatim", f"lexicon produced an invalid span: {why}")
                keywords.append(kw)
        return keywords

    def _mentions(self, sentence: str, p: _Patterns) -> list[_Mention]:
        ruled = [_Mention(m.start(), m.end(), c) for m in _VERTEBRA.finditer(sentence)
                 if (c := _vertebra_classes(m, sentence))]
        ruled += [_Mention(m.start(), m.end(), c) for rx in p.ribs for m in rx.finditer(sentence)
                  if (c := _rib_classes(m))]
        found = [self._resolve(sentence, m, p) for m in p.terms.finditer(sentence)]
        accepted: list[_Mention] = []
        # rules first (a level or numbered rib is the most specific reading), then earliest-longest
        for m in sorted(ruled, key=lambda m: (m.start, -m.end)) + sorted(
                (m for m in found if m is not None), key=lambda m: (m.start, -m.end)):
            if all(m.end <= a.start or m.start >= a.end for a in accepted):
                accepted.append(m)
        if any(c.startswith("vertebrae_") for m in accepted for c in m.classes):
            accepted = [m for m in accepted if m.classes != ("vertebrae",)]  # a named level beats "spine"
        return sorted(_adopt_sides(accepted), key=lambda m: (m.start, m.end))

    def _resolve(self, sentence: str, m: re.Match[str], p: _Patterns) -> _Mention | None:
        owner = p.term_owner[int(m.lastgroup[1:])]  # type: ignore[index]
        if owner is None:
            return None  # ignore list: the span names no segmentable class
        s = self.lexicon.structures[owner]
        start, end = m.span()
        before = p.before.search(sentence, max(0, start - _CUE_WINDOW), start)
        after = p.after.match(sentence, end)
        if after and after["comma"] and not re.match(r"\s*(?:[.,;:)]|$)", sentence[after.end():]):
            after = None  # "lungs, left kidney": the comma starts the next item, not a side
        if not s.paired:
            side = self._labels.by_name(s.classes[0]).side if len(s.classes) == 1 else None
            if side and before and before.lastgroup == side:  # "right middle lobe" is one span
                start = before.start()
            if side and after and after.lastgroup == side:
                end = after.end()
            group = self._labels.by_name(s.classes[0]).group
            return _Mention(start, end, s.classes, side=side, group=group)
        group = _adoption_group(self._labels.by_name(s.left).group)  # type: ignore[arg-type]
        of_lung = p.of_lung.match(sentence, end) if s.lobe else None
        if before:
            side, start = before.lastgroup, before.start()
        elif of_lung:
            side, end = of_lung.lastgroup, of_lung.end()
        elif after:
            side, end = after.lastgroup, after.end()
        else:
            side = None
        pair = (s.left, s.right)
        classes = pair if side in (None, "both") else (pair[_SIDE_OF[side]],)
        return _Mention(start, end, classes, side=side, pair=None if side else pair, group=group)


def _adoption_group(group: str) -> str:
    return group.removesuffix("_cyst")  # "Nierenzyste" takes the side of "linke Niere"


def _adopt_sides(mentions: list[_Mention]) -> list[_Mention]:
    """An unsided paired mention takes the side(s) the same sentence names for its organ."""
    named: dict[str, set[str]] = {}
    for m in mentions:
        if m.group and m.side in ("left", "right", "both"):
            named.setdefault(_adoption_group(m.group), set()).update(
                ("left", "right") if m.side == "both" else (m.side,))
    out = []
    for m in mentions:
        sides = named.get(m.group or "") if m.pair else None
        if sides:
            m = replace(m, classes=tuple(m.pair[_SIDE_OF[s]] for s in ("left", "right") if s in sides))
        out.append(m)
    return out


def _negations(sentence: str, mentions: list[_Mention], p: _Patterns) -> list[bool]:
    """Whether a negation cue governs each mention within its clause (see module docstring)."""
    if not mentions:
        return []
    pseudo = [m.span() for m in p.pseudo.finditer(sentence)]

    def real(cues: re.Pattern[str]) -> list[tuple[int, int]]:
        return [c.span() for c in cues.finditer(sentence) if not any(a <= c.start() < b for a, b in pseudo)]

    before, after = real(p.neg_before), real(p.neg_after)
    if not before and not after:
        return [False] * len(mentions)
    found = [b.start() for b in p.breaks.finditer(sentence)]
    hard = [b for b in found if sentence[b] != ","] + [len(sentence)]
    breaks = [b for b in found if not (sentence[b] == "," and _enumeration_comma(
        sentence, b, min(h for h in hard if h > b), mentions, p))]

    # a colon ends a cue's reach forwards ("CT ohne KM: Lunge frei") but not backwards ("Milz: keine Läsion")
    breaks_forward = breaks + [i for i, ch in enumerate(sentence) if ch == ":"]

    def same_clause(a: int, b: int, cuts: list[int]) -> bool:
        return not any(a <= x < b for x in cuts)

    out = []
    for m in mentions:
        pre = any(ce <= m.start and same_clause(ce, m.start, breaks_forward) for _, ce in before)
        post = any(cs >= m.end and same_clause(m.end, cs, breaks) and _only_copulas(sentence, m.end, cs, mentions, p)
                   for cs, _ in after)
        out.append(pre or post)
    return out


def _only_copulas(sentence: str, start: int, end: int, mentions: list[_Mention], p: _Patterns) -> bool:
    """Only copulas, conjunctions and other structures between a mention and its "after" cue."""
    text = "".join(" " if any(m.start <= i < m.end for m in mentions) else ch
                   for i, ch in enumerate(sentence[start:end], start))  # "Leber und Milz ohne Herde"
    if re.search(r"[^\w\s:]", text):
        return False  # "Schädel-Hirn-Trauma ohne": a hyphen or bracket means another noun intervenes
    return all(w.casefold() in p.copulas or w.casefold() in p.list_words for w in re.findall(r"\w+", text))


def _enumeration_comma(sentence: str, pos: int, stop: int, mentions: list[_Mention], p: _Patterns) -> bool:
    """A comma between two structures of a list ("Leber, Milz oder Nieren") keeps the clause open.

    Up to the clause's end (``stop``) only structures and list words may follow."""
    if not any(sentence[m.end:pos].strip() == "" and m.end <= pos for m in mentions):
        return False
    later = [m for m in mentions if pos < m.start < stop]
    if not later:
        return False
    rest, cursor = [], pos + 1
    for m in later:
        rest.append(sentence[cursor:m.start])
        cursor = m.end
    rest.append(sentence[cursor:stop])
    return all(w.casefold() in p.list_words for w in re.findall(r"\w+", " ".join(rest)))
