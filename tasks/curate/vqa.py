"""Templated VQA items (docs/method.md): per study from the report's sentences, per slice from its mask.

Pure functions, no I/O, deterministic. A study item is answerable from ONE report sentence (its
``source_sentence``): "yes" needs a finding cue (Läsion, cyst, Erguss ...) owned by the keyword
and not negated; "no" needs the keyword negated ("keine Läsion im Pankreas") or described as
normal ("Milz unauffällig") AND no other sentence that makes that organ abnormal or uncertain, so a
"no" never contradicts the rest of the report. Clauses with hedges (V.a., DD, fraglich, suspect,
"?") give no items, and their organs get no "no" items. "Which organ" and size questions are only
asked when the report names one organ (and one measurement) for that kind of finding.

A cue belongs to the nearest keyword of its clause (clauses end at ", ", ";", und/and/sowie),
or of the nearest earlier clause when its own has none; keywords joined by "," / "und" /
identical spans ("Lunge" -> lung_left + lung_right) share their cues ("Leber, Milz und Pankreas
unauffällig"). Negation triggers scope over up to 5 following words within the clause.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from radground.labels import LabelClass, label_map
from radground.schemas import KeywordItem, SentenceItem, VQARecord
from radground.settings import VQASettings

try:  # display names belong to radground/lexicon.py; the local formatter stands in until it exists
    from radground.lexicon import display_name as _lexicon_display_name
except ImportError:  # pragma: no cover - depends on the checkout
    _lexicon_display_name = None

#: Where organ names come from: "radground.lexicon" or "local" (the formatter below).
DISPLAY_SOURCE = "local" if _lexicon_display_name is None else "radground.lexicon"
LANGUAGES = ("de", "en")
_WORDS = {"en": {"yes": "yes", "no": "no", "left": "left", "right": "right", "both": "both sides"},
          "de": {"yes": "Ja", "no": "Nein", "left": "links", "right": "rechts", "both": "beidseits"}}

# German gender of each group's head noun (m/n/p = plural; every other group is feminine), so any
# display name gets its articles: "in der linken Niere", "im Magen", "in den Bandscheiben".
_DE_GENDER = {group: gender for gender, groups in {
    "m": "stomach esophagus small_bowel brachiocephalic_trunk humerus femur gluteus_maximus gluteus_medius "
         "gluteus_minimus iliopsoas skull",
    "n": "pancreas duodenum colon sacrum heart atrial_appendage hip spinal_cord brain sternum",
    "p": "vertebrae costal_cartilages intervertebral_discs"}.items() for group in groups.split()}
# Local fallback names (German for the common organs; the rest keep the English words).
_DE_LOCAL = {"spleen": "Milz", "kidney": "Niere", "gallbladder": "Gallenblase", "liver": "Leber", "stomach": "Magen",
             "pancreas": "Pankreas", "adrenal_gland": "Nebenniere", "lung": "Lunge", "heart": "Herz",
             "aorta": "Aorta", "urinary_bladder": "Harnblase", "brain": "Gehirn", "kidney_cyst": "Nierenzyste"}
_EN_PLURAL = {"vertebrae", "autochthon", "costal_cartilages", "intervertebral_discs"}
_LEVEL = re.compile(r"lung_\w+_lobe_\w+|vertebrae_[CTLS]\d+")  # lobes and single vertebrae: masculine nouns
_SIDE_WORD = re.compile(r"^(?:left|right|linke[rs]?|rechte[rs]?) | (?:left|right|links|rechts)$")
#: Lesion classes: the class itself is the finding; questions are asked about its organ.
_LESION_GROUPS = {"kidney_cyst": "kidney"}
_SIDE_TOKEN = re.compile(r"_?(?:left|right)")


def organ_name(class_name: str, language: str) -> str:
    """Display name of a label-map class in "de" or "en": the one place that names classes."""
    if _lexicon_display_name is not None:
        return _lexicon_display_name(class_name, language)
    cls = label_map().by_name(class_name)
    words = [t for t in class_name.split("_") if t not in ("left", "right")]
    if language == "de" and cls.group in _DE_LOCAL and class_name == "_".join(filter(None, (cls.group, cls.side))):
        ending = {"m": "er", "f": "e", "n": "es", "p": "e"}[_gender(cls)]
        side = {"left": f"link{ending} ", "right": f"recht{ending} ", None: ""}[cls.side]
        return side + _DE_LOCAL[cls.group]
    return " ".join(([cls.side] if cls.side else []) + words)  # "kidney_left" -> "left kidney"


def _gender(cls: LabelClass) -> str:
    return "m" if _LEVEL.fullmatch(cls.name) else _DE_GENDER.get(cls.group, "f")


_ARTICLE = {"nom": {"m": "der", "f": "die", "n": "das", "p": "die"},
            "dat": {"m": "dem", "f": "der", "n": "dem", "p": "den"}}
_ADJECTIVES = re.compile(r"^((?:[a-zäöü]+(?:e|er|es) )+)")  # leading declined adjectives: "linke autochthone "


def _de_with_article(name: str, gender: str, case: str) -> str:
    """'linke Niere' -> 'die linke Niere' (nom) / 'der linken Niere' (dat): weak endings after 'der'."""
    ending = "e" if case == "nom" and gender != "p" else "en"
    if m := _ADJECTIVES.match(name):
        stems = [re.sub(r"(?:e|er|es)$", "", word) + ending for word in m[1].split()]
        name = " ".join(stems) + " " + name[m.end():]
    if case == "dat" and gender == "p" and not name.endswith(("n", "s")):
        name += "n"  # dative plural: den Rippenknorpeln
    return f"{_ARTICLE[case][gender]} {name}"


def _in(cls: LabelClass, language: str, *, sideless: bool = False) -> str:
    """'in the left kidney' / 'in der linken Niere' / 'im Magen'; sideless: 'in the kidney'."""
    name = organ_name(cls.name, language)
    name = _SIDE_WORD.sub("", name) if sideless else name
    if language == "en":
        return f"in the {name}"
    phrase = _de_with_article(name, _gender(cls), "dat")
    return "im " + phrase[4:] if phrase.startswith("dem ") else "in " + phrase


def _subject(cls: LabelClass, language: str) -> tuple[str, bool]:
    """('the liver' / 'die Leber', plural?) for "Is the liver ...?" questions."""
    if language == "en":
        return f"the {organ_name(cls.name, 'en')}", cls.group in _EN_PLURAL and not _LEVEL.fullmatch(cls.name)
    gender = _gender(cls)
    return _de_with_article(organ_name(cls.name, "de"), gender, "nom"), gender == "p"


# ----------------------------------------------------------------------------- report cues
@dataclass(frozen=True)
class _Finding:
    key: str
    family: str  # findings of one family can stand for each other ("a lesion" may be the cyst)
    en: str  # with its article
    de: str
    de_gender: str
    pattern: re.Pattern[str]  # group "pl" set when the match is a plural

    def de_indef(self, case: str = "nom") -> str:
        article = {"m": "einen" if case == "acc" else "ein", "f": "eine", "n": "ein"}[self.de_gender]
        return f"{article} {self.de}"


def _finding(key: str, family: str, en: str, de: str, gender: str, singular: str, plural: str) -> _Finding:
    # English forms match whole words; German forms also inside compounds (Leberläsion, Pleuraerguss).
    return _Finding(key, family, en, de, gender, re.compile(f"(?P<pl>{plural})|(?:{singular})", re.IGNORECASE))


_FINDINGS = (
    _finding("lesion", "focal", "a lesion", "Läsion", "f", r"\blesion\b|l[äa]sion(?!en)|(?<!rund)herd(?!e)",
             r"\blesions\b|l[äa]sionen|(?<!rund)herde"),
    _finding("cyst", "focal", "a cyst", "Zyste", "f", r"\bcyst\b|zyste(?!n)", r"\bcysts\b|zysten"),
    _finding("nodule", "focal", "a nodule", "Rundherd", "m", r"\bnodule\b|rundherd(?!e)",
             r"\bnodules\b|rundherde|(?<!lymph)knoten"),  # "Knoten" may be plural: never sized
    _finding("mass", "focal", "a mass", "Raumforderung", "f", r"\bmass\b|raumforderung(?!en)",
             r"\bmasses\b|raumforderungen"),
    _finding("metastasis", "focal", "a metastasis", "Metastase", "f", r"\bmetastasis\b|metastase(?!n)",
             r"\bmetastases\b|metastasen"),
    _finding("tumor", "focal", "a tumor", "Tumor", "m", r"\btumou?r\b|tumor(?!e)", r"\btumou?rs\b|tumoren|tumore"),
    _finding("effusion", "fluid", "an effusion", "Erguss", "m", r"\beffusion\b|erguss|erguß", r"\beffusions\b|ergüsse"),
    _finding("infiltrate", "airspace", "an infiltrate", "Infiltrat", "n", r"infiltrat(?![ei])",
             r"infiltrates?\b"),  # en "infiltrate" reads as de plural "Infiltrate": never sized
    _finding("stenosis", "stenosis", "a stenosis", "Stenose", "f", r"\bstenosis\b|stenose(?!n)",
             r"\bstenoses\b|stenosen"),
    _finding("calcification", "calcification", "a calcification", "Verkalkung", "f",
             r"\bcalcification\b|verkalkung(?!en)", r"\bcalcifications\b|verkalkungen"),
    _finding("fracture", "fracture", "a fracture", "Fraktur", "f", r"\bfracture\b|fraktur(?!en)",
             r"\bfractures\b|frakturen"),
    _finding("thrombosis", "thrombosis", "a thrombosis", "Thrombose", "f", r"\bthrombosis\b|thrombose(?!n)",
             r"\bthromb(?:oses|i)\b|thrombosen"),
    _finding("aneurysm", "aneurysm", "an aneurysm", "Aneurysma", "n", r"\baneurysm\b|aneurysma(?!ta)",
             r"\baneurysms\b|aneurysmata|aneurysmen"),
)
_CYST = _FINDINGS[1]
_I = re.IGNORECASE
_NORMAL = re.compile(r"(?<!nicht )(?<!not )(?:unauffällig|regelrecht|unremarkable|\bo\.\s?(?:p\.\s?)?b\.|"
                     r"ohne pathologischen befund|normalbefund|within normal limits|"
                     r"\bnormal\b(?![-\s]+(?:in\s+)?(?:size|groß|weit)))", _I)
_NORMAL_WEAK = re.compile(r"\bintakt|\bintact\b|nicht vergrößert|not enlarged|normgroß|normal(?:-|\s+(?:in\s+)?)"
                          r"(?:size|groß|weit)", _I)
_NEG = re.compile(r"\b(?:kein\w*|ohne|nicht|weder|no|not|without|neither|nor)\b|frei von|free of|absence of|"
                  r"negative for", _I)
_POST_NEG = re.compile(r"ausgeschlossen|excluded|\babsent\b|resolved|no longer|"
                       r"vollständig (?:regredient|rückläufig)", _I)
_BREAK = re.compile(r"\b(?:zeigt|zeigen|findet|finden|besteht|bestehen|imponiert|aber|jedoch|sondern|but|however|"
                    r"although|shows?|showed|demonstrates?|reveals?|there)\b", _I)
_HEDGE = re.compile(r"\bv\.\s?a\.|verdacht|fraglich|möglich|wahrscheinlich|vereinbar|\bdd\b|differen[tz]ial|suspekt|"
                    r"suspici|suspect|possibl|probabl|likely|questionabl|cannot be (?:excluded|ruled out)|"
                    r"nicht (?:sicher )?auszuschlie|nicht (?:sicher )?ausgeschlossen|compatible with|consistent with|"
                    r"\?|\bvs\b|am ehesten|\beher\b|\bggf\b|\bevtl\b|eventuell|\bz\.\s?n\.|status post|\bs/p\b|"
                    r"history of|anamnestisch|nicht sicher|not clearly|unklar|unclear|indetermina|equivocal|"
                    r"beurteilbar|assess|\bmay\b|\bmight\b|\bcould\b|\bkann\b|\bkönnte", _I)
# "keine Größenzunahme der Läsion", "no new lesions": the negation is about change, not presence.
_CHANGE = re.compile(r"zunahme|abnahme|änderung|progre|wachstum|\bneu|\bnew\b|increase|decrease|change|growth|"
                     r"enlarg|vergrößer|interval|\bweitere|\bfurther|\badditional|zusätzlich", _I)
_OTHERWISE = re.compile(r"\bsonst|ansonsten|\bübrig|otherwise|remaining|apart from|abgesehen|\bexcept|\baußer", _I)
_SPLIT = re.compile(r",\s|;|\s(?:und|and|sowie|but|aber|jedoch|while|whereas|während)\s", _I)
_COORD = re.compile(r"(?:\s|,|/|\b(?:und|and|sowie|the|die|der|das|both|beide\w*)\b)*", _I)
_MEASURE = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)?(?:\s*[x×*]\s*\d+(?:[.,]\d+)?){0,2}\s*(?:mm|cm)\b")
_ARTICLE_WORD = re.compile(r"\b(?:ein\w*|a|an)\b", _I)
_SIZE_NEXT = re.compile(r"\s*-?(?:groß|messend|large|sized|lang|breit)", _I)


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


@dataclass(frozen=True)
class _Cue:
    finding: _Finding | None  # None: a normal cue ("unauffällig")
    start: int
    end: int
    plural: bool = False
    strong: bool = False  # "unauffällig" (strong) vs "nicht vergrößert" (weak) normal cues


@dataclass(frozen=True)
class _Evidence:
    sentence: int
    keyword: KeywordItem
    organ: LabelClass  # the keyword's class, or the organ of a lesion class (kidney_cyst_right -> kidney_right)
    finding: _Finding | None
    status: str  # pos | neg | unc | normal | other
    strong: bool = False
    size: str | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return self.organ.group, self.organ.side


def _organ(keyword: KeywordItem) -> LabelClass:
    cls = label_map().by_name(keyword.class_name)
    if cls.group in _LESION_GROUPS:
        return label_map().by_name(cls.name.replace(cls.group, _LESION_GROUPS[cls.group]))
    return cls


def _analyse(sentence: SentenceItem) -> list[_Evidence]:
    """Every keyword of one sentence with what the sentence says about it."""
    text = sentence.text
    kws = sorted((k for k in sentence.keywords if text[k.start:k.end] == k.keyword),
                 key=lambda k: (k.start, k.end, k.class_id))  # a non-verbatim keyword cannot justify anything
    chain, protected = list(range(len(kws))), []
    for i in range(1, len(kws)):
        gap = (min(kws[i - 1].end, kws[i].start), kws[i].start)  # empty when the spans overlap
        if _COORD.fullmatch(text[gap[0]:gap[1]]):
            chain[i] = chain[i - 1]
            protected.append(gap)
    bounds = [m.start() for m in _SPLIT.finditer(text) if not any(a <= m.start() < b for a, b in protected)]
    clause = [bisect.bisect_right(bounds, k.start) for k in kws]

    def hedged(c: int) -> bool:  # clause c spans text[bounds[c-1]:bounds[c]]
        return _HEDGE.search(text[bounds[c - 1] if c else 0:bounds[c] if c < len(bounds) else len(text)]) is not None

    cues = [_Cue(f, m.start(), m.end(), plural=m.group("pl") is not None)
            for f in _FINDINGS for m in f.pattern.finditer(text)]
    for k in kws:  # a lesion class is its own finding ("Nierenzyste" -> cyst in the kidney)
        if label_map().by_name(k.class_name).group in _LESION_GROUPS and not any(
                c.start < k.end and k.start < c.end for c in cues):
            cues.append(_Cue(_CYST, k.start, k.end))
    cues += [_Cue(None, m.start(), m.end(), strong=strong)
             for pattern, strong in ((_NORMAL, True), (_NORMAL_WEAK, False)) for m in pattern.finditer(text)]

    out, owning = [], set()
    for cue in sorted(cues, key=lambda c: (c.start, c.finding is None)):
        c = bisect.bisect_right(bounds, cue.start)
        lo, hi = (bounds[c - 1] if c else 0), (bounds[c] if c < len(bounds) else len(text))
        candidates = [i for i in range(len(kws)) if clause[i] == c]
        if not candidates:  # "Leber normal groß, unauffällig": the nearest earlier clause with a keyword
            earlier = [clause[i] for i in range(len(kws)) if clause[i] < c]
            candidates = [i for i in range(len(kws)) if earlier and clause[i] == max(earlier)]
        if not candidates:
            continue
        dist = {i: max(0, cue.start - kws[i].end, kws[i].start - cue.end) for i in candidates}
        chains = {chain[i] for i in candidates if dist[i] == min(dist.values())}
        for i in (i for i in range(len(kws)) if chain[i] in chains):
            owning.add(i)
            unsure = hedged(c) or hedged(clause[i])
            if cue.finding is None:
                status = "unc" if unsure else "other" if _OTHERWISE.search(text[lo:hi]) else "normal"
                out.append(_Evidence(sentence.index, kws[i], _organ(kws[i]), None, status, strong=cue.strong))
                continue
            # the keyword's own negation flag speaks for its clause only ("Keine Milzläsion, Zyste 2 cm")
            status = _finding_status(text, lo, hi, cue, kws[i].negated and clause[i] == c, unsure)
            size = _size(text, lo, hi, cue, kws) if status == "pos" and not cue.plural else None
            out.append(_Evidence(sentence.index, kws[i], _organ(kws[i]), cue.finding, status, size=size))
    for i, k in enumerate(kws):
        if i not in owning:  # mentioned, but neither a finding nor normal: blocks "no" items
            out.append(_Evidence(sentence.index, k, _organ(k), None, "unc" if hedged(clause[i]) else "other"))
    return out


def _finding_status(text: str, lo: int, hi: int, cue: _Cue, negated: bool, hedged: bool) -> str:
    if hedged:
        return "unc"
    before = text[lo:cue.start]
    pre = any(_words(before[m.end():]) <= 5 and not _BREAK.search(before[m.end():]) for m in _NEG.finditer(before))
    if pre or negated:
        return "unc" if _CHANGE.search(text[lo:hi]) else "neg"
    after = text[cue.end:hi]
    return "unc" if _NEG.search(after) or _POST_NEG.search(after) else "pos"


def _size(text: str, lo: int, hi: int, cue: _Cue, kws: list[KeywordItem]) -> str | None:
    """The one measurement of a finding: '2,2 cm große Läsion', 'Läsion (2,2 cm)', 'cyst measuring 22 mm'."""
    def keyword_between(a: int, b: int) -> bool:
        return any(k.start < b and a < k.end for k in kws)

    found = []
    for m in _MEASURE.finditer(text[:hi], lo):
        if m.end() <= cue.start:
            prev = [k for k in kws if k.end <= m.start()]
            gap = text[prev[-1].end:m.start()] if prev else None
            organ_size = gap is not None and _words(gap) <= 2 and not _ARTICLE_WORD.search(gap)  # "Leber 18 cm"
            if _words(text[m.end():cue.start]) <= 2 and not keyword_between(m.end(), cue.start) and not organ_size:
                found.append(m.group())
        elif m.start() >= cue.end and _words(text[cue.end:m.start()]) <= 4 and not keyword_between(
                cue.end, m.start()) and not _SIZE_NEXT.match(text, m.end()):
            found.append(m.group())
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------- items
def _vqa_id(study_uid: str, image_id: str | None, language: str, question: str) -> str:
    return hashlib.sha256("\x1f".join((study_uid, image_id or "", language, question)).encode()).hexdigest()[:16]


def _choices(answer: LabelClass, exclude_groups: set[str], language: str, n: int, rng: random.Random,
             allow: Callable[[LabelClass], bool] = lambda c: True) -> list[str] | None:
    """n shuffled options: the answer and classes of n-1 other groups, the answer's region first."""
    near: dict[str, list[LabelClass]] = {}
    far: dict[str, list[LabelClass]] = {}
    for c in label_map():
        if c.group not in exclude_groups and c.group != answer.group and c.group not in _LESION_GROUPS and allow(c):
            (near if c.region == answer.region else far).setdefault(c.group, []).append(c)
    picked = [answer]
    for bucket in (near, far):
        groups = sorted(g for g in bucket if g not in {p.group for p in picked})
        rng.shuffle(groups)
        picked += [rng.choice(bucket[g]) for g in groups[:n - len(picked)]]
    names = [organ_name(c.name, language) for c in picked]
    if len(names) != n or len(set(names)) != n:
        return None
    rng.shuffle(names)
    return names


def _record(*, study_uid: str, image_id: str | None, patient_pseudonym: str, drop_id: str, language: str,
            question: str, answer: str, kind: str, choices: list[str] | None, sentence: int | None,
            keyword: str | None, class_name: str) -> VQARecord:
    return VQARecord(vqa_id=_vqa_id(study_uid, image_id, language, question), study_uid=study_uid,
                     image_id=image_id, patient_pseudonym=patient_pseudonym, drop_id=drop_id, language=language,
                     question=question, answer=answer, question_type=kind, choices=choices or [],
                     source_sentence=sentence, source_keyword=keyword, class_name=class_name, generator="template")


def _finish(records: list[VQARecord], cap: int, key: str) -> list[VQARecord]:
    seen: set[str] = set()
    unique = [r for r in records if not (r.question in seen or seen.add(r.question))]
    if len(unique) <= cap:
        return unique
    keep = sorted(random.Random(key).sample(range(len(unique)), cap))
    return [unique[i] for i in keep]


def _check(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"VQA language {language!r} is not supported; expected one of {LANGUAGES}")


def study_vqa(sentences: Sequence[SentenceItem], *, language: str, study_uid: str, patient_pseudonym: str,
              drop_id: str, settings: VQASettings) -> list[VQARecord]:
    """Templated question/answer items in ``language``, each answerable from one report sentence."""
    _check(language)
    en, w = language == "en", _WORDS[language]
    evidence = [e for s in sorted(sentences, key=lambda s: s.index) for e in _analyse(s)]
    abnormal = {e.key for e in evidence if e.status in ("pos", "unc")}
    not_normal = abnormal | {e.key for e in evidence if e.status == "other"}
    owners: dict[str, set] = {}  # finding family -> organs with a (possible) finding of that family
    for e in evidence:
        if e.finding is not None and e.status in ("pos", "unc"):
            owners.setdefault(e.finding.family, set()).add(e.key)
    records: list[VQARecord] = []
    ids = dict(study_uid=study_uid, image_id=None, patient_pseudonym=patient_pseudonym, drop_id=drop_id,
               language=language)

    def add(question: str, answer: str, kind: str, e: _Evidence, choices: list[str] | None = None) -> None:
        records.append(_record(**ids, question=question, answer=answer, kind=kind, choices=choices,
                               sentence=e.sentence, keyword=e.keyword.keyword, class_name=e.keyword.class_name))

    for e in evidence:
        f, organ = e.finding, e.organ
        if f is not None and (e.status == "pos" or (e.status == "neg" and e.key not in abnormal)):
            add(f"Is there {f.en} {_in(organ, 'en')}?" if en else f"Zeigt sich {f.de_indef()} {_in(organ, 'de')}?",
                w["yes" if e.status == "pos" else "no"], "closed", e)
        if e.status == "normal" and e.key not in not_normal:
            add(f"Is a lesion described {_in(organ, 'en')}?" if en else
                f"Wird eine Läsion {_in(organ, 'de')} beschrieben?", w["no"], "closed", e)
            if e.strong:
                subject, plural = _subject(organ, language)
                verb = ("Are" if plural else "Is") if en else ("Sind" if plural else "Ist")
                add(f"{verb} {subject} {'unremarkable' if en else 'unauffällig'}?", w["yes"], "closed", e)
        if f is None or e.status != "pos":
            continue
        same_family = [o for o in evidence if o.finding is not None and o.finding.family == f.family
                       and o.status in ("pos", "unc")]
        if organ.side is not None:  # sides per side-free class ("lung_upper_lobe"), not per whole organ
            def sides(items: list[_Evidence], same: str) -> set[str | None]:
                return {o.organ.side for o in items if _SIDE_TOKEN.sub("", o.organ.name) == same}
            same = _SIDE_TOKEN.sub("", organ.name)
            here = sides([o for o in same_family if o.sentence == e.sentence and o.finding == f and o.status == "pos"],
                         same)
            if here == sides(same_family, same):  # no other sentence puts it on another side
                add(f"On which side is the {f.en.split(' ', 1)[1]} {_in(organ, 'en', sideless=True)}?" if en else
                    f"Auf welcher Seite liegt {_ARTICLE['nom'][f.de_gender]} {f.de} {_in(organ, 'de', sideless=True)}?",
                    w["both"] if len(here) == 2 else w[organ.side], "open", e)
        if owners[f.family] == {e.key}:  # the report names one organ for this kind of finding
            add(f"In which organ is there {f.en}?" if en else f"In welchem Organ zeigt sich {f.de_indef()}?",
                organ_name(organ.name, language), "open", e)
            rng = random.Random(f"{settings.seed}|{study_uid}|mc|{organ.name}|{f.key}")
            exclude = {group for group, _ in not_normal}  # organs the report makes abnormal or leaves unclear
            choices = _choices(organ, exclude, language, settings.choices, rng)
            if choices:
                add(f"Which organ shows {f.en}?" if en else f"Welches Organ zeigt {f.de_indef('acc')}?",
                    organ_name(organ.name, language), "multiple", e, choices)
        if e.size and sum(o.key == e.key for o in same_family) == 1:
            add(f"How large is the {f.en.split(' ', 1)[1]} {_in(organ, 'en')}?" if en else
                f"Wie groß ist {_ARTICLE['nom'][f.de_gender]} {f.de} {_in(organ, 'de')}?", e.size, "open", e)
    return _finish(records, settings.max_items_per_study, f"{settings.seed}|{study_uid}|cap")


def slice_vqa(present: Sequence[str], *, image_id: str, study_uid: str, patient_pseudonym: str, drop_id: str,
              language: str, modality: str, settings: VQASettings) -> list[VQARecord]:
    """Presence items for one slice from the classes its segmentation shows (no laterality questions).

    "No" items and distractors come from classes the modality's segmentation task can produce
    (CT: task total; MR: classes with an MR id), in the regions of the present classes, from
    groups none of which is present (so "is the left kidney visible?" never hinges on image
    laterality). Lesion classes (kidney cysts) are no anatomy and are left out. Capped at
    settings.max_items_per_study.
    """
    _check(language)
    if modality not in ("CT", "MR"):
        raise ValueError(f"image {image_id}: modality {modality!r} is not supported; expected 'CT' or 'MR'")
    lm, w, en = label_map(), _WORDS[language], language == "en"
    shown = sorted({lm.by_name(n) for n in present if lm.by_name(n).group not in _LESION_GROUPS}, key=lambda c: c.id)
    groups, regions = {c.group for c in shown}, {c.region for c in shown}

    def segmentable(c: LabelClass) -> bool:
        return c.mr_id is not None if modality == "MR" else c.source_task == "total"

    absent = [c for c in lm if segmentable(c) and c.region in regions and c.group not in groups | set(_LESION_GROUPS)]
    base = f"{settings.seed}|{study_uid}|{image_id}"
    hidden = sorted(random.Random(f"{base}|absent").sample(absent, min(len(shown), len(absent))), key=lambda c: c.id)
    records: list[VQARecord] = []
    ids = dict(study_uid=study_uid, image_id=image_id, patient_pseudonym=patient_pseudonym, drop_id=drop_id,
               language=language)

    def add(question: str, answer: str, kind: str, cls: LabelClass, choices: list[str] | None = None) -> None:
        records.append(_record(**ids, question=question, answer=answer, kind=kind, choices=choices, sentence=None,
                               keyword=None, class_name=cls.name))

    for cls in shown + hidden:
        subject, plural = _subject(cls, language)
        question = (f"{'Are' if plural else 'Is'} {subject} visible in this image?" if en else
                    f"{'Sind' if plural else 'Ist'} {subject} in diesem Bild sichtbar?")
        add(question, w["yes" if cls in shown else "no"], "closed", cls)
    if shown:  # one multiple-choice item: one present class among absent ones
        rng = random.Random(f"{base}|mc")
        cls = rng.choice(shown)
        choices = _choices(cls, groups, language, settings.choices, rng, allow=segmentable)
        if choices:
            add("Which of these organs is visible in this image?" if en else
                "Welches dieser Organe ist in diesem Bild sichtbar?", organ_name(cls.name, language), "multiple",
                cls, choices)
    return _finish(records, settings.max_items_per_study, f"{base}|cap")
