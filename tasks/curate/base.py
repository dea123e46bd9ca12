"""What every curation backend speaks: keywords found in a sentence, or why none could be.

A backend (``lexicon`` offline, ``openai`` against any OpenAI-compatible server) takes
a batch of sentences in one language and returns, per sentence, either its keywords
(possibly none: a sentence may mention no segmentable structure) or a failure with a
reason. A failure is quarantined; it is never stored as an empty result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from radground.errors import RadgroundError

Language = str  # "de" | "en"


@dataclass(frozen=True)
class Keyword:
    """One mention of a segmentable structure: a verbatim span of its sentence."""

    keyword: str  # == sentence[start:end]
    class_name: str  # label-map name, always English, e.g. "lung_upper_lobe_left"
    class_id: int  # label-map id (1..121)
    start: int  # character offsets into the sentence
    end: int
    negated: bool = False  # "keine Milzläsion" still mentions the spleen, negated


@dataclass(frozen=True)
class ExtractionFailure:
    """A sentence whose keywords could not be obtained, and why (a stable reason code)."""

    reason: str  # e.g. "invalid_json", "unknown_category", "span_not_verbatim", "http_error", "timeout"
    detail: str  # PHI-free explanation


ExtractionResult = list[Keyword] | ExtractionFailure


@runtime_checkable
class KeywordExtractor(Protocol):
    """A keyword backend, chosen by name in settings (``llm.backend``)."""

    name: str

    def extract(self, sentences: Sequence[str], language: Language) -> list[ExtractionResult]:
        """One result per sentence, in order."""
        ...


class CurationError(RadgroundError):
    """A curation backend cannot be used at all (misconfigured, unreachable at start)."""


def check_keyword(sentence: str, keyword: Keyword) -> str | None:
    """Why a keyword is invalid for its sentence, or None: spans must be verbatim."""
    if not 0 <= keyword.start < keyword.end <= len(sentence):
        return f"span {keyword.start}:{keyword.end} outside the sentence ({len(sentence)} characters)"
    if sentence[keyword.start:keyword.end] != keyword.keyword:
        return "keyword is not the verbatim text at its span"
    return None
