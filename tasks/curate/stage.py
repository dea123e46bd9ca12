"""The curate stage: sentences, keywords, translation, VQA for a batch of scrubbed reports.

Plain functions; the flow runs ``curate_batch`` on batches of reports and
``finish_curate`` once per drop. A sentence whose keywords could not be obtained is
quarantined with the backend's reason and left out of its report: it is never stored
as "no keywords". Everything produced (translations, LLM answers, questions) is
re-scanned for the study's PHI before it is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from radground.schemas import KeywordItem, QuarantineRecord, ReportRecord, SentenceItem, VQARecord
from radground.settings import Settings
from radground.store import open_store
from radground.tables import read_table, write_table
from tasks.curate.base import ExtractionFailure, Keyword, KeywordExtractor
from tasks.curate.sentences import split_sentences
from tasks.curate.vqa import study_vqa
from tasks.scrub import KnownPHI, scrub_report

logger = logging.getLogger(__name__)
STAGE = "curate"
OTHER_LANGUAGE = {"de": "en", "en": "de"}
_LEAK_CATEGORIES = {"name", "id", "other", "phone", "email", "address"}  # dates were shifted, not removed


def keyword_backend(settings: Settings) -> KeywordExtractor:
    """The keyword extractor named by ``llm.backend``."""
    if settings.llm.backend == "openai":
        from tasks.curate.llm import OpenAIBackend

        return OpenAIBackend(settings)
    from tasks.curate.lexicon import LexiconExtractor

    return LexiconExtractor()


def translation_backend(settings: Settings, keywords: KeywordExtractor):
    """Something with ``translate(sentences, source_language)``, or None when unavailable."""
    choice = settings.translation.backend
    if choice == "auto":
        choice = "openai" if settings.llm.backend == "openai" else "none"
    if choice == "none":
        return None
    if choice == "openai":
        if getattr(keywords, "name", "") == "openai":
            return keywords
        from tasks.curate.llm import OpenAIBackend

        return OpenAIBackend(settings)
    from tasks.curate.marian import MarianTranslator

    return MarianTranslator(settings.translation)


@dataclass
class CurateOutcome:
    """A batch's results; PHI-free, safe to return through Prefect and Ray."""

    reports: list[ReportRecord] = field(default_factory=list)
    vqa: list[VQARecord] = field(default_factory=list)
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def curate_batch(reports: Sequence[ReportRecord], known: Mapping[str, KnownPHI], settings: Settings
                 ) -> CurateOutcome:
    """Split, annotate, translate and question every report of the batch."""
    keywords = keyword_backend(settings)
    translator = translation_backend(settings, keywords)
    outcome = CurateOutcome()
    for report in reports:
        _curate_one(report, known.get(report.study_uid, KnownPHI()), keywords, translator, settings, outcome)
    logger.info("curate batch: %d reports, %d sentences, %d keywords, %d vqa items, %d quarantined",
                len(reports), outcome.counts["sentences"], outcome.counts["keywords"], len(outcome.vqa),
                len(outcome.quarantine))
    return outcome


def _curate_one(report: ReportRecord, known: KnownPHI, keywords: KeywordExtractor, translator,
                settings: Settings, outcome: CurateOutcome) -> None:
    def quarantine(reason: str, detail: str, index: int | None = None) -> None:
        where = f"{report.study_uid}#{index}" if index is not None else report.study_uid
        outcome.quarantine.append(QuarantineRecord(
            drop_id=report.drop_id, stage=STAGE, item="row", reason=reason, detail=detail,
            source_sha256=None, ref=where))

    spans = split_sentences(report.text, report.language)
    results = keywords.extract([s.text for s in spans], report.language)
    sentences: list[SentenceItem] = []
    for index, (span, result) in enumerate(zip(spans, results, strict=True)):
        if isinstance(result, ExtractionFailure):
            quarantine(f"keywords_{result.reason}", result.detail, index)
            continue
        sentences.append(SentenceItem(index=index, section=span.section, text=span.text, start=span.start,
                                      end=span.end, keywords=[_item(k) for k in result]))
    outcome.counts["sentences"] += len(spans)
    outcome.counts["keywords"] += sum(len(s.keywords) for s in sentences)

    status = "unavailable"
    if translator is not None and sentences:
        status = _translate(sentences, report, known, keywords, translator, quarantine, outcome)
    curated = report.model_copy(update={
        "sentences": sentences, "translation_status": status,
        "keyword_backend": getattr(keywords, "label", None) or keywords.name})
    outcome.reports.append(curated)
    outcome.counts[f"sentences_{report.language}"] += len(sentences)

    items = study_vqa(sentences, language=report.language, study_uid=report.study_uid,
                      patient_pseudonym=report.patient_pseudonym, drop_id=report.drop_id, settings=settings.vqa)
    translated = [s.model_copy(update={"text": s.translation, "keywords": s.translation_keywords})
                  for s in sentences if s.translation]
    if translated:
        items += study_vqa(translated, language=OTHER_LANGUAGE[report.language], study_uid=report.study_uid,
                           patient_pseudonym=report.patient_pseudonym, drop_id=report.drop_id,
                           settings=settings.vqa)
    if settings.vqa.free_form and hasattr(keywords, "free_vqa") and sentences:
        items += _free_form_vqa(sentences, report, keywords, quarantine)
    for item in items:
        if _leaks(f"{item.question}\n{item.answer}\n{' '.join(item.choices)}", known):
            quarantine("phi_rescan", "a generated question/answer carries a PHI value of the study",
                       item.source_sentence)
        else:
            outcome.vqa.append(item)


def _translate(sentences: list[SentenceItem], report: ReportRecord, known: KnownPHI,
               keywords: KeywordExtractor, translator, quarantine, outcome: CurateOutcome) -> str:
    target = OTHER_LANGUAGE[report.language]
    translations = translator.translate([s.text for s in sentences], report.language)
    done = []
    for position, (sentence, translation) in enumerate(zip(sentences, translations, strict=True)):
        if isinstance(translation, ExtractionFailure):
            quarantine(f"translation_{translation.reason}", translation.detail, sentence.index)
        elif _leaks(translation, known):
            quarantine("phi_rescan", "a translation brought back a PHI value of the study", sentence.index)
        else:
            done.append((position, translation))
    if done:
        results = keywords.extract([t for _, t in done], target)
        for (position, translation), result in zip(done, results, strict=True):
            if isinstance(result, ExtractionFailure):
                quarantine(f"keywords_{result.reason}", f"on the translation: {result.detail}",
                           sentences[position].index)
                continue
            sentences[position] = sentences[position].model_copy(update={
                "translation": translation, "translation_keywords": [_item(k) for k in result]})
    translated = sum(1 for s in sentences if s.translation)
    outcome.counts[f"sentences_{target}"] += translated
    if translated == len(sentences):
        return "translated"
    return "partial" if translated else "failed"


def _free_form_vqa(sentences: list[SentenceItem], report: ReportRecord, backend, quarantine) -> list[VQARecord]:
    items = []
    results = backend.free_vqa([s.text for s in sentences], report.language)
    for sentence, result in zip(sentences, results, strict=True):
        if isinstance(result, ExtractionFailure):
            quarantine(f"vqa_{result.reason}", result.detail, sentence.index)
            continue
        for qa in result:
            key = f"{report.study_uid}||{report.language}|{qa['question']}"
            items.append(VQARecord(
                vqa_id=hashlib.sha256(key.encode()).hexdigest()[:16], study_uid=report.study_uid, image_id=None,
                patient_pseudonym=report.patient_pseudonym, drop_id=report.drop_id, language=report.language,
                question=qa["question"], answer=qa["answer"], question_type=qa["question_type"],
                choices=list(qa.get("choices") or []), source_sentence=sentence.index, source_keyword=None,
                class_name=None, generator="llm"))
    return items


def _leaks(text: str, known: KnownPHI) -> bool:
    """Does produced text carry a PHI value again? The scrubber itself is the detector."""
    found = scrub_report(text, known, date_offset_days=None, language="en").redactions
    return any(r.category in _LEAK_CATEGORIES for r in found)


def _item(keyword: Keyword) -> KeywordItem:
    return KeywordItem(keyword=keyword.keyword, class_name=keyword.class_name, class_id=keyword.class_id,
                       start=keyword.start, end=keyword.end, negated=keyword.negated)


def finish_curate(drop_id: str, outcomes: Sequence[CurateOutcome], settings: Settings) -> dict:
    """Write the curated reports, vqa and quarantine tables; return the stage summary."""
    reports = [r for o in outcomes for r in o.reports]
    vqa = [v for o in outcomes for v in o.vqa]
    quarantine = [q for o in outcomes for q in o.quarantine]
    counts: Counter = sum((o.counts for o in outcomes), Counter())
    store = open_store(settings)
    prefix = f"{STAGE}/{drop_id}/"
    write_table(store, prefix + "reports.parquet", reports, ReportRecord)
    write_table(store, prefix + "vqa.parquet", vqa, VQARecord)
    write_table(store, prefix + "quarantine.parquet", quarantine, QuarantineRecord)
    summary = {
        "drop_id": drop_id,
        "reports": len(reports),
        "sentences": counts["sentences"],
        "sentences_quarantined": sum(1 for q in quarantine if q.reason.startswith("keywords_")),
        "keywords": counts["keywords"],
        "vqa_items": len(vqa),
        "language_coverage": {lang: counts[f"sentences_{lang}"] for lang in ("de", "en")},
        "translation": dict(Counter(r.translation_status for r in reports)),
        "quarantine_reasons": dict(Counter(q.reason for q in quarantine)),
    }
    store.put(prefix + "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def read_curated(drop_id: str, settings: Settings) -> list[ReportRecord]:
    """The curated reports an earlier curate of ``drop_id`` wrote (for a ground stage run again)."""
    table = read_table(open_store(settings), f"{STAGE}/{drop_id}/reports.parquet")
    return [ReportRecord.model_validate(row) for row in table.to_pylist()]


def summary_line(summary: dict) -> str:
    coverage = ", ".join(f"{n} {lang}" for lang, n in summary["language_coverage"].items())
    translated = summary["translation"]
    reasons = summary.get("quarantine_reasons") or {}  # sentences (keywords_*), VQA items, leaks: by reason
    return (f"curate {summary['drop_id']}: {summary['reports']} reports, {summary['sentences']} sentences "
            f"({summary['sentences_quarantined']} quarantined), {summary['keywords']} keywords, "
            f"{summary['vqa_items']} vqa items; language coverage: {coverage} sentences"
            + ("" if "translated" in translated or "partial" in translated
               else " (translation unavailable with this backend)")
            + (f"; {sum(reasons.values())} rows quarantined ("
               + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + ")" if reasons else ""))
