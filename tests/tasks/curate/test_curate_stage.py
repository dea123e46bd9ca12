"""The curate stage on a real ingested synthetic drop: sentences, keywords, VQA, PHI re-scan."""

from __future__ import annotations

import json

import pytest

from radground.settings import load_settings
from radground.store import open_store
from radground.synth.drop import generate_drop
from radground.tables import read_table
from tasks import ingest
from tasks.curate import stage
from tasks.curate.base import ExtractionFailure

KEY = "c" * 40


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, run_ingest):
    root = tmp_path_factory.mktemp("curate")
    result = generate_drop(root / "drop", patients=4, seed=12)
    truth = json.loads(result.truth_path.read_text(encoding="utf-8"))
    settings = load_settings(data_dir=root / "data", deid={"key": KEY})
    plan, summary = run_ingest(str(result.drop_dir), settings)
    reports = [stage.ReportRecord.model_validate(r) for r in
               read_table(open_store(settings), f"ingest/{summary.drop_id}/reports.parquet").to_pylist()]
    known = ingest.known_phi_by_study(plan.reports, settings)
    return truth, settings, summary.drop_id, reports, known


def test_lexicon_curation_annotates_every_report(ingested):
    truth, settings, drop_id, reports, known = ingested
    outcome = stage.curate_batch(reports, known, settings)
    summary = stage.finish_curate(drop_id, [outcome], settings)
    assert len(outcome.reports) == len(reports) == summary["reports"]
    for report in outcome.reports:
        assert report.sentences and report.translation_status == "unavailable"
        assert report.keyword_backend == "lexicon"
        for sentence in report.sentences:
            assert report.text[sentence.start:sentence.end] == sentence.text
            for kw in sentence.keywords:
                assert sentence.text[kw.start:kw.end] == kw.keyword
    classes = {kw.class_name for r in outcome.reports for s in r.sentences for kw in s.keywords}
    assert {"liver", "spleen"} <= classes and ({"lung_left", "lung_right"} & classes)
    assert outcome.vqa and all(item.generator == "template" for item in outcome.vqa)
    assert summary["language_coverage"]["de"] + summary["language_coverage"]["en"] == summary["sentences"] - \
        summary["sentences_quarantined"]
    assert "translation unavailable" in stage.summary_line(summary)
    store = open_store(settings)
    vqa = read_table(store, f"curate/{drop_id}/vqa.parquet").to_pylist()
    assert len(vqa) == len(outcome.vqa)
    written = json.dumps(read_table(store, f"curate/{drop_id}/reports.parquet").to_pylist(), default=str) + \
        json.dumps(vqa)
    for phi in truth["phi_strings"]:
        assert phi.casefold() not in written.casefold()


class _Leaky:
    """A translator that brings a name back, as a careless model might."""

    name = "leaky"

    def __init__(self, name: str) -> None:
        self.name_value = name

    def translate(self, sentences, source_language):
        return [f"{s} (patient {self.name_value})" if i == 0 else ExtractionFailure("timeout", "slow")
                for i, s in enumerate(sentences)]


def test_translations_are_rescanned_for_the_studys_phi(ingested, monkeypatch):
    truth, settings, drop_id, reports, known = ingested
    report = reports[0]
    family = known[report.study_uid].person_names[0].split("^")[0]
    monkeypatch.setattr(stage, "translation_backend", lambda settings, keywords: _Leaky(family))
    outcome = stage.curate_batch([report], known, settings)
    reasons = [q.reason for q in outcome.quarantine]
    assert "phi_rescan" in reasons and "translation_timeout" in reasons
    curated = outcome.reports[0]
    assert curated.translation_status == "failed"
    assert all(family.casefold() not in (s.translation or "").casefold() for s in curated.sentences)


class _Failing:
    name = "failing"

    def extract(self, sentences, language):
        failure = ExtractionFailure("invalid_json", "model said nonsense")
        return [failure if i % 2 else [] for i in range(len(sentences))]


def test_failed_sentences_are_quarantined_never_stored_as_empty(ingested, monkeypatch):
    _, settings, _, reports, known = ingested
    monkeypatch.setattr(stage, "keyword_backend", lambda settings: _Failing())
    outcome = stage.curate_batch(reports[:1], known, settings)
    kept = {s.index for s in outcome.reports[0].sentences}
    failed = {int(q.ref.rsplit("#", 1)[1]) for q in outcome.quarantine if q.reason == "keywords_invalid_json"}
    assert failed and not kept & failed  # a failed sentence is not in the report as "no keywords"
    assert all(i % 2 == 1 for i in failed) and all(i % 2 == 0 for i in kept)


@pytest.mark.integration
def test_openai_mode_against_a_local_server_translates_and_caches(ingested, tmp_path):
    from llm_server import StubLLMServer, lexicon_like_responder

    truth, settings, drop_id, reports, known = ingested
    with StubLLMServer(responder=lexicon_like_responder(), models=("stub-model",)) as server:
        openai_settings = settings.model_copy(update={
            "data_dir": tmp_path,
            "llm": settings.llm.model_copy(update={"backend": "openai", "base_url": server.url,
                                                    "model": "stub-model", "backoff_s": 0.01,
                                                    "max_attempts": 2})})
        outcome = stage.curate_batch(reports[:2], known, openai_settings)
        first = server.requests
        again = stage.curate_batch(reports[:2], known, openai_settings)
        assert server.requests == first  # every answer came from the persistent cache
    assert first > 0
    for report in outcome.reports:
        assert report.keyword_backend == "openai:stub-model"
        assert report.translation_status in ("translated", "partial")
        assert any(s.translation for s in report.sentences)
    languages = {item.language for item in outcome.vqa}
    assert languages == {"de", "en"}  # templated items in the translation's language too
    assert any(item.generator == "llm" for item in outcome.vqa)
    assert [r.model_dump() for r in again.reports] == [r.model_dump() for r in outcome.reports]
