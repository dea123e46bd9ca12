"""The contract with the model: prompts, few-shot examples, and the checks every answer must pass.

Pure functions, no I/O: tasks/curate/llm.py sends the prompts and retries what these
checks reject. Each parse_* takes the model's reply text, the sentence and its language and
returns the result plus the normalised answer JSON that the cache stores (and re-checks
with the same function when it reads it back), or raises AttemptFailed with a stable reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radground.labels import label_map
from tasks.curate.base import Keyword

PROMPT_VERSION = "2026.1"  # bump on any change to a prompt; the cache key also holds a digest of it
LANGUAGES = ("de", "en")
REASONS = ("invalid_json", "schema_error", "unknown_category", "span_not_verbatim", "numbers_not_preserved",
           "placeholders_not_preserved", "unsupported_answer", "http_429", "http_5xx", "http_4xx", "timeout",
           "connection_error")

# --------------------------------------------------------------------------- prompts

_EXTRACT_SYSTEM = """\
You label sentences of CT and MR radiology reports (German or English) for a segmentation dataset. \
Each user message is a JSON object {"language": ..., "sentence": ...}. Find every mention of an \
anatomical structure that one of the segmentation classes listed at the end covers, and name its class.

1. "keyword" is the mention copied character for character from the sentence: same case, umlauts, \
inflection and spacing. Never translate, correct, shorten or reorder it. Take a side or level word into \
the keyword when it stands next to the structure ("rechten Oberlappen", "left kidney", "LWK 5"). A German \
compound that names the structure (Leberläsion, Milzvergrößerung) is kept whole.
2. "category" is a class name from the list, spelled exactly as listed. Class names are English whatever \
the language of the sentence.
3. Pick the most specific class the sentence supports. A lobe is named by its lobe class, not by the lung \
(the middle lobe is lung_middle_lobe_right). A vertebra with a level gets its level class: LWK 5 or L5 -> \
vertebrae_L5, BWK 12, Th12 or T12 -> vertebrae_T12, HWK 2 or C2 -> vertebrae_C2, SWK 1 or S1 -> \
vertebrae_S1. A numbered rib with a side is rib_<side>_<number>. Use a generic class (lung_left, \
vertebrae, intervertebral_discs) only when no specific one fits.
4. Respect the side: rechts/right and links/left choose the class. A plural or a word for both sides \
(Lungen, Nieren, beidseits, lungs, kidneys, bilateral, both) means both sides: give TWO items with the \
same keyword, one with the left class and one with the right class. Leave out a paired structure whose \
side the sentence does not tell.
5. Structures without a class (pleura, lymph nodes, bile ducts, soft tissue ...) are not keywords. \
Findings are not keywords; the structure they sit in is.
6. A structure mentioned twice gives two items, in the order of the sentence.
7. "negated" is true when the sentence says the structure is free of a finding or normal (kein, keine, \
ohne, nicht, unauffällig, regelrecht, intakt, no, without, not, unremarkable, normal, intact); otherwise false.
8. Answer with one JSON object and nothing else: \
{"keywords": [{"keyword": "...", "category": "...", "negated": false}]}. A sentence that mentions no \
listed structure gives {"keywords": []}.

Classes: <CLASSES>"""

# (language, sentence, [(keyword, category, negated)]): each teaches one rule of the prompt.
EXTRACT_EXAMPLES: tuple[tuple[str, str, list[tuple[str, str, bool]]], ...] = (
    ("de", "Beide Lungen ohne Infiltrate, kein Pleuraerguss.",
     [("Lungen", "lung_left", True), ("Lungen", "lung_right", True)]),
    ("de", "Spikulierter Rundherd im rechten Oberlappen, 2,2 cm.",
     [("rechten Oberlappen", "lung_upper_lobe_right", False)]),
    ("de", "Konsolidierung im linken Unterlappen der Lunge.",
     [("linken Unterlappen", "lung_lower_lobe_left", False)]),
    ("de", "Höhenminderung von LWK 4 und LWK 5, keine frische Fraktur.",
     [("LWK 4", "vertebrae_L4", False), ("LWK 5", "vertebrae_L5", False)]),
    ("de", "Hypodense Leberläsion im Segment 7, Milz vergrößert.",
     [("Leberläsion", "liver", False), ("Milz", "spleen", False)]),
    ("de", "Leber unauffällig, Nieren beidseits ohne Harnstau.",
     [("Leber", "liver", True), ("Nieren", "kidney_left", True), ("Nieren", "kidney_right", True)]),
    ("en", "Calcified plaques of the aorta and both common iliac arteries.",
     [("aorta", "aorta", False), ("common iliac arteries", "iliac_artery_left", False),
      ("common iliac arteries", "iliac_artery_right", False)]),
    ("en", "Nondisplaced fracture of the right 7th rib; the sternum is intact.",
     [("right 7th rib", "rib_right_7", False), ("sternum", "sternum", True)]),
    ("en", "Ground-glass opacity in the middle lobe; no focal lesion of the liver.",
     [("middle lobe", "lung_middle_lobe_right", False), ("liver", "liver", True)]),
    ("en", "Comparison with the prior examination of [DATE].", []),
)

_TRANSLATE_SYSTEM = """\
You translate single sentences of radiology reports between German and English for a bilingual training \
set. Each user message is a JSON object {"from": ..., "to": ..., "sentence": ...}.

1. Translate the whole sentence faithfully, in the terse style of a radiology report. Add, drop or explain nothing.
2. Keep every number, written as digits. Only the decimal separator follows the target language: German \
2,2 cm is English 2.2 cm, and back.
3. Keep units, dates as written, and placeholders in square brackets ([NAME], [DATE], [ID] ...) exactly.
4. Vertebra levels: LWK 5 <-> L5, BWK 12 <-> T12, HWK 3 <-> C3, SWK 1 <-> S1.
5. Answer with one JSON object and nothing else: {"translation": "..."}."""

# (from, sentence, translation)
TRANSLATE_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("de", "Rundherd im rechten Unterlappen von 2,2 x 1,8 cm, am [DATE] noch 1,9 cm.",
     "Nodule in the right lower lobe measuring 2.2 x 1.8 cm, 1.9 cm on [DATE]."),
    ("en", "Compression fracture of T12 with 30 % loss of height.",
     "Kompressionsfraktur von BWK 12 mit 30 % Höhenminderung."),
    ("de", "Keine freie Flüssigkeit im Abdomen.", "No free fluid in the abdomen."),
)

_VQA_SYSTEM = """\
You write question-answer pairs for training a visual question answering model on CT and MR images, from \
one sentence of the report that belongs to the image. Each user message is a JSON object \
{"language": ..., "sentence": ...}.

1. Write in the sentence's language. Ask only about what the sentence states: presence of a finding, its \
organ, side, location, size or number. Never ask about names, dates, identifiers or technique.
2. Every answer must follow from the sentence alone.
3. question_type "closed": a yes/no question. The answer is exactly "yes" or "no" in English, "ja" or \
"nein" in German; choices [].
4. question_type "multiple": a question with 2 to 4 options in "choices"; the answer is one of them, \
copied exactly, worded as in the sentence.
5. question_type "open": any other question. The answer is short (one to five words) in the sentence's \
own words; choices [].
6. Write 0 to 3 items. A sentence without a finding (comparison, technique) gives {"items": []}.
7. Answer with one JSON object and nothing else: \
{"items": [{"question": "...", "answer": "...", "question_type": "open", "choices": []}]}."""

# (language, sentence, items)
VQA_EXAMPLES: tuple[tuple[str, str, list[dict]], ...] = (
    ("de", "Rundherd im rechten Oberlappen, 2,2 cm.", [
        {"question": "Gibt es einen Rundherd in der Lunge?", "answer": "ja", "question_type": "closed",
         "choices": []},
        {"question": "Wo liegt der Rundherd?", "answer": "im rechten Oberlappen", "question_type": "multiple",
         "choices": ["im rechten Oberlappen", "im linken Oberlappen", "im Mittellappen"]},
        {"question": "Wie groß ist der Rundherd?", "answer": "2,2 cm", "question_type": "open", "choices": []},
    ]),
    ("en", "Enlarged spleen, no pleural effusion.", [
        {"question": "Which organ is enlarged?", "answer": "spleen", "question_type": "open", "choices": []},
        {"question": "Is there a pleural effusion?", "answer": "no", "question_type": "closed", "choices": []},
    ]),
    ("en", "Comparison with the prior examination of [DATE].", []),
)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _extract_user(sentence: str, language: str) -> str:
    return _dumps({"language": language, "sentence": sentence})


def _translate_user(sentence: str, language: str) -> str:
    return _dumps({"from": language, "to": _other(language), "sentence": sentence})


def _other(language: str) -> str:
    return "en" if language == "de" else "de"


# --------------------------------------------------------------------------- validation


class AttemptFailed(Exception):
    """One try failed: a bad answer or a transient server error (retried unless retryable=False)."""

    def __init__(self, reason: str, detail: str, retryable: bool = True, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a model's extra fields are harmless


class _KeywordItem(_Reply):
    keyword: str = Field(pattern=r"\S")
    category: str
    negated: bool


class _KeywordsReply(_Reply):
    keywords: list[_KeywordItem]


class _TranslationReply(_Reply):
    translation: str


class _VQAItem(_Reply):
    question: str = Field(pattern=r"\S")
    answer: str = Field(pattern=r"\S")
    question_type: Literal["open", "closed", "multiple"]
    choices: list[str] = Field(default_factory=list)


class _VQAReply(_Reply):
    items: list[_VQAItem]


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)  # some models fence JSON despite the prompt


def _load(content: str, schema: type[_Reply], list_key: str | None = None) -> Any:
    text = content.strip()
    fenced = _FENCE.match(text)
    text = fenced.group(1) if fenced else text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AttemptFailed("invalid_json", f"the reply is not JSON ({exc.msg} at character {exc.pos})") from None
    if list_key is not None and isinstance(data, list):
        data = {list_key: data}  # a bare list is the same answer without its wrapper
    try:
        return schema.model_validate(data)
    except ValidationError as exc:  # describe by place and type only: input values may quote the sentence
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['type']}" for e in exc.errors()[:3])
        raise AttemptFailed("schema_error", f"the reply does not match the schema ({where})") from None


def parse_keywords(content: str, sentence: str, language: str) -> tuple[list[Keyword], str]:
    """Keywords (in text order) from a model's answer, and the answer to cache; raises AttemptFailed."""
    reply = _load(content, _KeywordsReply, list_key="keywords")
    labels = label_map()
    for n, item in enumerate(reply.keywords):
        if item.category not in labels:
            raise AttemptFailed("unknown_category", f"item {n}: {item.category[:60]!r} is not a label-map class name")
    items = [(item.keyword.strip(), item.category, item.negated) for item in reply.keywords]
    spans = _locate(sentence, [(keyword, category) for keyword, category, _ in items])
    kept = [(item, span) for item, span in zip(items, spans, strict=True) if span is not None]
    keywords = [Keyword(keyword, category, labels.by_name(category).id, start, end, negated)
                for (keyword, category, negated), (start, end) in kept]
    keywords.sort(key=lambda k: (k.start, k.end, k.class_id))
    answer = {"keywords": [{"keyword": k, "category": c, "negated": n} for (k, c, n), _ in kept]}
    return keywords, _dumps(answer)


def _locate(sentence: str, items: list[tuple[str, str]]) -> list[tuple[int, int] | None]:
    """A span per (keyword, category), None for a repeat of an item already placed.

    An item whose keyword is already placed with another class shares that span ("Lungen" ->
    lung_left and lung_right); a repeat of keyword and class takes the next occurrence
    ("Leber ... Leber"). Among free occurrences, one clear of other keywords' spans and
    standing as a whole word wins ("Niere" after "Nierenzyste").
    """
    taken: dict[tuple[int, int], set[str]] = {}  # span -> the classes placed on it
    spans: list[tuple[int, int] | None] = []
    for n, (keyword, category) in enumerate(items):
        found = [(m.start(), m.start() + len(keyword)) for m in re.finditer(f"(?={re.escape(keyword)})", sentence)]
        if not found:
            raise AttemptFailed("span_not_verbatim", f"item {n} ({category}): the keyword is not a verbatim span "
                                "of the sentence")
        shared = [s for s in found if s in taken and category not in taken[s]]
        free = [s for s in found if s not in taken]
        if shared:
            span = shared[0]
        elif free:
            others = [s for s in taken if sentence[s[0]:s[1]] != keyword]
            span = min(free, key=lambda s: (any(s[0] < o[1] and o[0] < s[1] for o in others),
                                            not _whole_word(sentence, s), s[0]))
        else:
            spans.append(None)  # the same keyword and class once more than the sentence has it
            continue
        taken.setdefault(span, set()).add(category)
        spans.append(span)
    return spans


def _whole_word(text: str, span: tuple[int, int]) -> bool:
    start, end = span
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_MEASUREMENT = re.compile(r"(\d+(?:[.,]\d+)*)\s*(mm|cm|ml|mg|kg|mSv|HU|HE|%)(?![^\W\d_])", re.I)
_PLACEHOLDER = re.compile(r"\[[A-Z][A-Z_]*\]")


def _number(token: str) -> str:
    return token.replace(",", ".")  # 2,2 (de) == 2.2 (en); 1.200,5 (de) == 1,200.5 (en)


def _numbers(text: str) -> Counter[str]:
    return Counter(_number(m) for m in _NUMBER.findall(text))


def _measurements(text: str) -> Counter[tuple[str, str]]:
    unit = {"he": "hu"}  # Hounsfield-Einheiten are Hounsfield units
    return Counter((_number(n), unit.get(u.lower(), u.lower())) for n, u in _MEASUREMENT.findall(text))


def parse_translation(content: str, sentence: str, language: str) -> tuple[str, str]:
    """The translation from a model's answer, and the answer to cache; raises AttemptFailed."""
    text = _load(content, _TranslationReply).translation.strip()
    check_translation(sentence, text)
    return text, _dumps({"translation": text})


def check_translation(sentence: str, text: str) -> None:
    """Raise AttemptFailed unless the translation is non-empty and keeps numbers, units, placeholders.

    Shared by every translation backend (LLM, MarianMT)."""
    if not text.strip():
        raise AttemptFailed("schema_error", "the translation is empty")
    source = _numbers(sentence)
    missing = source - _numbers(text)
    if missing:
        raise AttemptFailed("numbers_not_preserved", f"{missing.total()} of the source's {source.total()} numbers "
                            "are missing from the translation")
    if _measurements(sentence) - _measurements(text):
        raise AttemptFailed("numbers_not_preserved", "a measurement lost or changed its unit in the translation")
    lost = _placeholders(sentence) - _placeholders(text)
    if lost:
        raise AttemptFailed("placeholders_not_preserved", f"the translation lacks {sorted(lost)}")


def _placeholders(text: str) -> Counter[str]:
    return Counter(_PLACEHOLDER.findall(text))


YES_NO = {"de": ("ja", "nein"), "en": ("yes", "no")}
_WORD = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")
_STOPWORDS = frozenset((  # noqa: SIM905 - a word list reads better as text
    "a an the of in on at to is are was were be with without and or no not there this that which what where "
    "der die das den dem des ein eine einer eines einem einen im in am an auf aus bei mit ohne und oder "
    "nicht kein keine ist sind wird es zu zur zum von vom").split())


def _supported(answer: str, sentence: str) -> bool:
    """Every content word of the answer occurs in the sentence (inflection-tolerant: shared stem)."""
    words = [w.lower() for w in _WORD.findall(answer)]
    content = [_number(w) if w[0].isdigit() else w for w in words if w not in _STOPWORDS]
    seen = [_number(w) if w[0].isdigit() else w for w in (w.lower() for w in _WORD.findall(sentence))]
    if not content:
        return False

    def found(word: str) -> bool:
        if word[0].isdigit() or len(word) <= 4:
            return word in seen
        stem = word[:max(4, len(word) - 2)]  # rechter ~ rechten, kidneys ~ kidney
        return any(w.startswith(stem) for w in seen)

    return all(found(w) for w in content)


def parse_vqa(content: str, sentence: str, language: str) -> tuple[list[dict], str]:
    """Question/answer items from a model's answer, and the answer to cache; raises AttemptFailed."""
    items = []
    for n, item in enumerate(_load(content, _VQAReply, list_key="items").items):
        answer, choices = item.answer.strip(), [c.strip() for c in item.choices]
        if item.question_type == "closed":
            answer = answer.rstrip(".!").lower()
            if answer not in YES_NO[language]:
                raise AttemptFailed("unsupported_answer", f"item {n}: a closed answer must be "
                                    f"{' or '.join(YES_NO[language])}")
            choices = []
        elif item.question_type == "multiple":
            if len(choices) < 2 or len(set(map(str.lower, choices))) != len(choices):
                raise AttemptFailed("schema_error", f"item {n}: a multiple-choice item needs 2 or more distinct "
                                    "choices")
            match = [c for c in choices if c.lower() == answer.lower()]
            if not match:
                raise AttemptFailed("unsupported_answer", f"item {n}: the answer is not one of the choices")
            answer = match[0]
        else:
            choices = []
        if item.question_type != "closed" and not _supported(answer, sentence):
            raise AttemptFailed("unsupported_answer", f"item {n} ({item.question_type}): the answer's words do not "
                                "occur in the sentence")
        items.append({"question": item.question.strip(), "answer": answer,
                      "question_type": item.question_type, "choices": choices})
    return items, _dumps({"items": items})


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    kind: str  # "extract" | "translate" | "vqa": part of the cache key
    user: Callable[[str, str], str]  # (sentence, language) -> user message
    parse: Callable[[str, str, str], tuple[Any, str]]  # (content, sentence, language) -> (result, answer JSON)
    prefix: tuple[dict, ...]  # system prompt and few-shot turns
    version: str  # PROMPT_VERSION + digest of the prefix


def _task(kind, system, user, parse, examples: list[tuple[str, str, Any]]) -> Task:
    prefix = [{"role": "system", "content": system}]
    for language, sentence, answer in examples:
        prefix += [{"role": "user", "content": user(sentence, language)},
                   {"role": "assistant", "content": _dumps(answer)}]
    digest = hashlib.sha256(_dumps(prefix).encode()).hexdigest()[:12]
    return Task(kind, user, parse, tuple(prefix), f"{PROMPT_VERSION}-{digest}")


def build_tasks() -> dict[str, Task]:
    classes = ", ".join(label_map().names)
    return {
        "extract": _task("extract", _EXTRACT_SYSTEM.replace("<CLASSES>", classes), _extract_user, parse_keywords,
                         [(lang, s, {"keywords": [{"keyword": k, "category": c, "negated": n} for k, c, n in kws]})
                          for lang, s, kws in EXTRACT_EXAMPLES]),
        "translate": _task("translate", _TRANSLATE_SYSTEM, _translate_user, parse_translation,
                           [(lang, s, {"translation": t}) for lang, s, t in TRANSLATE_EXAMPLES]),
        "vqa": _task("vqa", _VQA_SYSTEM, _extract_user, parse_vqa,
                     [(lang, s, {"items": items}) for lang, s, items in VQA_EXAMPLES]),
    }
