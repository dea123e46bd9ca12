"""The bilingual anatomy lexicon (radground/data/lexicon.yaml): synonyms, cues, display names.

The YAML is hand-curated; this module only loads it and refuses to use it when it names
a class the label map does not have, gives a paired structure the wrong sides, lists one
surface form under two structures, or leaves a class without a display name. Numbered
vertebrae and ribs are named by rule here rather than listed (26 + 24 classes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from radground.errors import RadgroundError
from radground.labels import LabelMap, label_map

LANGUAGES = ("de", "en")
SIDES = ("left", "right", "both")
LEXICON_FILE = "lexicon.yaml"

_VERTEBRA = re.compile(r"vertebrae_([CTLS])(\d{1,2})")
_RIB = re.compile(r"rib_(left|right)_(\d{1,2})")
_VERTEBRA_DE = {"C": "HWK", "T": "BWK", "L": "LWK", "S": "SWK"}
_ORDINAL_EN = {1: "1st", 2: "2nd", 3: "3rd"}


class LexiconError(RadgroundError):
    """The lexicon YAML does not fit the label map or its own schema."""


@dataclass(frozen=True)
class Structure:
    """One thing the matcher recognises: fixed classes, or a left/right pair."""

    name: str
    classes: tuple[str, ...]  # fixed classes; empty when paired
    left: str | None  # paired: the class for each side
    right: str | None
    lobe: bool  # a lung lobe: "der linken Lunge" after it names its side
    terms: Mapping[str, tuple[str, ...]]  # language -> surface forms

    @property
    def paired(self) -> bool:
        return self.left is not None


@dataclass(frozen=True)
class LateralityCues:
    before: Mapping[str, tuple[str, ...]]  # side ("left" | "right" | "both") -> cue words
    after: Mapping[str, tuple[str, ...]]
    of_lung: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class NegationCues:
    before: tuple[str, ...]
    after: tuple[str, ...]
    pseudo: tuple[str, ...]
    scope_breaks: tuple[str, ...]
    list_words: tuple[str, ...]
    copulas: tuple[str, ...]  # may stand between a mention and an "after" cue


@dataclass(frozen=True)
class Lexicon:
    """The validated lexicon; per-language tables are keyed "de" / "en"."""

    structures: tuple[Structure, ...]
    ignore: Mapping[str, tuple[str, ...]]
    laterality: Mapping[str, LateralityCues]
    negation: Mapping[str, NegationCues]
    display: Mapping[str, Mapping[str, str]]  # class -> language -> name (listed classes only)

    def synonyms(self, language: str) -> dict[str, tuple[str, ...]]:
        """Structure name -> its surface forms in ``language``."""
        _check_language(language)
        return {s.name: s.terms[language] for s in self.structures}

    def classes_of(self, structure: str) -> tuple[str, ...]:
        """Every class a structure can yield (both sides of a pair)."""
        s = next((s for s in self.structures if s.name == structure), None)
        if s is None:
            raise KeyError(f"structure {structure!r} is not in {LEXICON_FILE}")
        return (s.left, s.right) if s.paired else s.classes  # type: ignore[return-value]


@cache
def load_lexicon() -> Lexicon:
    """The lexicon shipped with radground, validated against the label map (cached)."""
    text = resources.files("radground.data").joinpath(LEXICON_FILE).read_text(encoding="utf-8")
    return parse_lexicon(yaml.safe_load(text), label_map())


def display_name(class_name: str, language: str) -> str:
    """Human name of a class in "en" or "de", e.g. ("kidney_left", "de") -> "linke Niere"."""
    _check_language(language)
    if class_name not in label_map():
        raise KeyError(f"class {class_name!r} is not in the label map; see radground/data/label_map.json")
    return _rule_display(class_name, language) or load_lexicon().display[class_name][language]


def _rule_display(class_name: str, language: str) -> str | None:
    """Display name of a numbered vertebra or rib, or None for every other class."""
    if m := _VERTEBRA.fullmatch(class_name):
        region, level = m.groups()
        return f"{_VERTEBRA_DE[region]} {level}" if language == "de" else f"{region}{level} vertebra"
    if m := _RIB.fullmatch(class_name):
        side, n = m[1], int(m[2])
        if language == "de":
            return f"{n}. Rippe {'links' if side == 'left' else 'rechts'}"
        return f"{side} {_ORDINAL_EN.get(n, f'{n}th')} rib"
    return None


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"language {language!r} is not supported; expected one of {LANGUAGES}")


def parse_lexicon(data: Any, labels: LabelMap) -> Lexicon:
    """Build a Lexicon from the parsed YAML, raising LexiconError on any inconsistency."""
    if not isinstance(data, dict) or data.get("version") != 1:
        raise LexiconError(f"{LEXICON_FILE}: expected a mapping with version: 1; fix the file header")
    structures = tuple(_structure(name, entry, labels) for name, entry in _mapping(data, "structures").items())
    ignore = {lang: _words(_mapping(data, "ignore"), lang, "ignore") for lang in LANGUAGES}
    _check_unique(structures, ignore)
    laterality = {lang: _laterality(_mapping(_mapping(data, "laterality"), lang), lang) for lang in LANGUAGES}
    negation = {lang: _negation(_mapping(_mapping(data, "negation"), lang), lang) for lang in LANGUAGES}
    display = _display(_mapping(data, "display"), labels)
    return Lexicon(structures, ignore, laterality, negation, display)


def _mapping(data: Any, key: str) -> dict:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, dict):
        raise LexiconError(f"{LEXICON_FILE}: section {key!r} is missing or not a mapping")
    return value


def _words(entry: dict, key: str, where: str) -> tuple[str, ...]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() == w and w for w in value):
        raise LexiconError(f"{LEXICON_FILE}: {where}.{key} must be a list of non-empty, unpadded strings, "
                           f"got {value!r}")
    return tuple(value)


def _structure(name: str, entry: Any, labels: LabelMap) -> Structure:
    if not isinstance(entry, dict):
        raise LexiconError(f"{LEXICON_FILE}: structure {name!r} must be a mapping")
    unknown = set(entry) - {"classes", "left", "right", "lobe", *LANGUAGES}
    if unknown:
        raise LexiconError(f"{LEXICON_FILE}: structure {name!r} has unknown keys {sorted(unknown)}; "
                           "allowed: classes, left, right, lobe, de, en")
    paired = "left" in entry or "right" in entry
    if paired == ("classes" in entry):
        raise LexiconError(f"{LEXICON_FILE}: structure {name!r} needs either classes: [...] or left:/right:")
    classes: tuple[str, ...] = () if paired else tuple(entry["classes"] or ())
    if not paired and not classes:
        raise LexiconError(f"{LEXICON_FILE}: structure {name!r} lists no classes")
    for side in ("left", "right") if paired else ():
        cls = entry.get(side)
        if cls not in labels or labels.by_name(cls).side != side:
            raise LexiconError(f"{LEXICON_FILE}: structure {name!r}: {side}: {cls!r} is not a {side}-side class "
                               "of the label map (radground/data/label_map.json)")
    for cls in classes:
        if cls not in labels:
            raise LexiconError(f"{LEXICON_FILE}: structure {name!r} names class {cls!r}, which is not in the "
                               "label map (radground/data/label_map.json); fix the spelling or drop it")
    terms = {lang: _words(entry, lang, f"structures.{name}") for lang in LANGUAGES}
    return Structure(name, classes, entry.get("left"), entry.get("right"), bool(entry.get("lobe")), terms)


def _check_unique(structures: tuple[Structure, ...], ignore: dict[str, tuple[str, ...]]) -> None:
    """One surface form, one meaning: a duplicate would make the match depend on list order."""
    for lang in LANGUAGES:
        seen: dict[str, str] = {}
        owners = [(s.name, s.terms[lang]) for s in structures] + [("ignore", ignore[lang])]
        for owner, terms in owners:
            for term in terms:
                key = term if term.isupper() else term.casefold()
                if key in seen and seen[key] != owner:
                    raise LexiconError(f"{LEXICON_FILE}: {lang} term {term!r} is listed under both "
                                       f"{seen[key]!r} and {owner!r}; keep it in one place")
                seen[key] = owner


def _laterality(entry: dict, lang: str) -> LateralityCues:
    def sides(key: str, allowed: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        table = _mapping(entry, key)
        if set(table) - set(allowed):
            raise LexiconError(f"{LEXICON_FILE}: laterality.{lang}.{key} may only have {allowed}")
        return {side: _words(table, side, f"laterality.{lang}.{key}") for side in allowed}

    return LateralityCues(sides("before", SIDES), sides("after", SIDES), sides("of_lung", ("left", "right")))


def _negation(entry: dict, lang: str) -> NegationCues:
    fields = ("before", "after", "pseudo", "scope_breaks", "list_words", "copulas")
    return NegationCues(*(_words(entry, f, f"negation.{lang}") for f in fields))


def _display(entry: dict, labels: LabelMap) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for cls, names in entry.items():
        if cls not in labels:
            raise LexiconError(f"{LEXICON_FILE}: display names class {cls!r}, which is not in the label map")
        if not isinstance(names, dict) or not all(isinstance(names.get(lang), str) and names[lang].strip()
                                                  for lang in LANGUAGES):
            raise LexiconError(f"{LEXICON_FILE}: display.{cls} needs non-empty 'en' and 'de' names, got {names!r}")
        out[cls] = {lang: names[lang] for lang in LANGUAGES}
    missing = [c.name for c in labels if c.name not in out and _rule_display(c.name, "en") is None]
    if missing:
        raise LexiconError(f"{LEXICON_FILE}: no display name for {missing}; add them under display:")
    return out
