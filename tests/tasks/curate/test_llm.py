"""tasks/curate/llm.py against a real OpenAI-compatible HTTP server on loopback (tests/llm_server.py).

Expected spans are written out by hand (counted characters), not computed by the code under test.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.synchronize
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_server import StubLLMServer, keywords_answer, sentence_of
from tenacity import RetryCallState

from radground.settings import load_settings
from tasks.curate.base import CurationError, ExtractionFailure, Keyword, KeywordExtractor, check_keyword
from tasks.curate.llm import PROMPT_VERSION, OpenAIBackend
from tasks.curate.llm_cache import CacheKey, LLMCache, server_id
from tasks.curate.llm_prompts import (
    EXTRACT_EXAMPLES,
    REASONS,
    TRANSLATE_EXAMPLES,
    VQA_EXAMPLES,
    AttemptFailed,
    parse_keywords,
    parse_translation,
    parse_vqa,
)

pytestmark = pytest.mark.integration

LUNGS = "Beide Lungen ohne Infiltrate."
LOBE = "Rundherd im rechten Oberlappen, 2,2 cm."
SPINE = "Höhenminderung von LWK 4 und LWK 5."
AORTA = "Calcified plaques of the aorta."
TABLE = {
    LUNGS: [("Lungen", "lung_left", True), ("Lungen", "lung_right", True)],
    LOBE: [("rechten Oberlappen", "lung_upper_lobe_right")],
    SPINE: [("LWK 4", "vertebrae_L4"), ("LWK 5", "vertebrae_L5")],
    AORTA: [("aorta", "aorta")],
}
GOOD = (200, keywords_answer([("aorta", "aorta")]))  # the right answer for AORTA


@pytest.fixture
def llm_server() -> Iterator[StubLLMServer]:
    """A stub OpenAI server that answers TABLE's sentences; tests script or replace the rest."""
    with StubLLMServer(keywords=TABLE) as server:
        yield server


@pytest.fixture
def make_backend(tmp_path: Path, clean_env: None):
    """Build an OpenAIBackend for a server: fast retries, a cache under tmp_path (or data_dir)."""
    made: list[OpenAIBackend] = []

    def build(server: StubLLMServer | str, data_dir: Path | None = None, **llm) -> OpenAIBackend:
        values = {"backend": "openai", "base_url": server if isinstance(server, str) else server.url,
                  "model": "stub-model", "max_attempts": 3, "backoff_s": 0.01, "timeout_s": 5.0,
                  "max_concurrency": 4, **llm}
        backend = OpenAIBackend(load_settings(data_dir=data_dir or tmp_path, llm=values))
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


class _Waits(list):
    """The backoff waits the backend asks for, as (seconds asked, woken by the batch's stop event)."""


@pytest.fixture
def backoff_waits(monkeypatch: pytest.MonkeyPatch) -> _Waits:
    """A fake clock for the backend's backoff: its stop event (whose wait is tenacity's sleep) records
    every wait it is asked for and returns at once, as if the time had passed, unless the event is
    already set. Patched into tasks.curate.llm only: the stub server and the thread pool keep theirs."""
    import threading
    from types import SimpleNamespace

    import tasks.curate.llm as llm_module

    waits = _Waits()

    class FakeClockEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            woken = self.is_set()
            waits.append((timeout, woken))
            return woken

    monkeypatch.setattr(llm_module, "threading", SimpleNamespace(Event=FakeClockEvent, Lock=threading.Lock))
    return waits


@pytest.fixture
def real_waits(monkeypatch: pytest.MonkeyPatch) -> _Waits:
    """Like backoff_waits, but each wait really waits (at most 10 s, so a batch that is never stopped
    fails this test in 10 s, not in its backoff's time) and records whether the stop event woke it."""
    import threading
    from types import SimpleNamespace

    import tasks.curate.llm as llm_module

    waits = _Waits()

    class RecordingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            woken = super().wait(None if timeout is None else min(timeout, 10.0))
            waits.append((timeout, woken))
            return woken

    monkeypatch.setattr(llm_module, "threading", SimpleNamespace(Event=RecordingEvent, Lock=threading.Lock))
    return waits


def test_good_answers_give_keywords_with_verbatim_spans(llm_server, make_backend):
    backend = make_backend(llm_server)
    assert isinstance(backend, KeywordExtractor) and backend.name == "openai"
    lungs, lobe, spine = backend.extract([LUNGS, LOBE, SPINE], "de")
    # "Beide " is 6 characters: both lungs share the one span 6..12.
    assert lungs == [Keyword("Lungen", "lung_left", 118, 6, 12, True),
                     Keyword("Lungen", "lung_right", 119, 6, 12, True)]
    assert lobe == [Keyword("rechten Oberlappen", "lung_upper_lobe_right", 12, 12, 30, False)]
    assert spine == [Keyword("LWK 4", "vertebrae_L4", 28, 19, 24), Keyword("LWK 5", "vertebrae_L5", 27, 29, 34)]
    for sentence, keywords in ((LUNGS, lungs), (LOBE, lobe), (SPINE, spine)):
        assert all(check_keyword(sentence, k) is None for k in keywords)
    assert llm_server.requests == 3


def test_request_carries_model_temperature_json_mode_and_few_shot(llm_server, make_backend):
    make_backend(llm_server).extract([AORTA], "en")
    body = llm_server.bodies[0]
    assert body["model"] == "stub-model" and body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"}
    roles = [m["role"] for m in body["messages"]]
    assert roles[0] == "system" and roles[-1] == "user" and roles.count("assistant") == len(EXTRACT_EXAMPLES)
    assert json.loads(body["messages"][-1]["content"]) == {"language": "en", "sentence": AORTA}
    assert "lung_middle_lobe_right" in body["messages"][0]["content"]  # the class list is in the prompt


def test_repeated_keywords_take_successive_occurrences(llm_server, make_backend):
    sentence = "Nierenzyste links, Niere rechts, Leber und Leber."
    llm_server.keywords[sentence] = [("Nierenzyste", "kidney_cyst_left"), ("Niere", "kidney_right"),
                                     ("Leber", "liver"), ("Leber", "liver"), ("Leber", "liver")]
    (keywords,) = make_backend(llm_server).extract([sentence], "de")
    # "Niere" skips the occurrence inside "Nierenzyste"; the third "Leber" repeats one already placed.
    assert [(k.keyword, k.class_name, k.start, k.end) for k in keywords] == [
        ("Nierenzyste", "kidney_cyst_left", 0, 11), ("Niere", "kidney_right", 19, 24),
        ("Leber", "liver", 33, 38), ("Leber", "liver", 43, 48)]


def test_a_plural_mentioned_twice_gives_both_sides_at_each_mention(llm_server, make_backend):
    sentence = "Lungen belüftet, in den Lungen keine Herde."
    llm_server.keywords[sentence] = [("Lungen", "lung_left"), ("Lungen", "lung_right"),
                                     ("Lungen", "lung_left", True), ("Lungen", "lung_right", True)]
    (keywords,) = make_backend(llm_server).extract([sentence], "de")
    assert [(k.class_name, k.start, k.end, k.negated) for k in keywords] == [
        ("lung_left", 0, 6, False), ("lung_right", 0, 6, False),
        ("lung_left", 24, 30, True), ("lung_right", 24, 30, True)]


def test_malformed_json_then_good_is_retried(llm_server, make_backend):
    llm_server.script(AORTA, [(200, "Sure! Here are the keywords: aorta"), (200, '{"keywords": [')])
    (result,) = make_backend(llm_server).extract([AORTA], "en")
    assert result == [Keyword("aorta", "aorta", 52, 25, 30)]
    assert llm_server.requests == 3


def test_always_malformed_json_fails_after_max_attempts(llm_server, make_backend):
    llm_server.responder = lambda messages: (200, "not json")
    backend = make_backend(llm_server, max_attempts=4)
    (result,) = backend.extract([AORTA], "en")
    assert isinstance(result, ExtractionFailure) and result.reason == "invalid_json"
    assert llm_server.requests == 4
    assert backend.stats["retries"] == 3 and backend.failure_reasons == {"invalid_json": 1}
    backend.extract([AORTA], "en")  # a failure is never cached: asked again
    assert llm_server.requests == 8


@pytest.mark.parametrize(("answer", "reason"), [
    ([("aorta", "aortic_arch")], "unknown_category"),
    ([("Aorta", "aorta")], "span_not_verbatim"),  # case differs: not verbatim
    ([("aorta", "aorta"), ("heart", "heart")], "span_not_verbatim"),  # one bad item spoils the answer
    ({"keywords": [{"keyword": "aorta", "category": "aorta"}]}, "schema_error"),  # negated missing
    ({"words": []}, "schema_error"),
])
def test_invalid_answers_fail_with_their_reason(llm_server, make_backend, answer, reason):
    llm_server.responder = lambda messages: (200, answer if isinstance(answer, dict) else keywords_answer(answer))
    (result,) = make_backend(llm_server, max_attempts=2).extract([AORTA], "en")
    assert result == ExtractionFailure(reason, result.detail) and result.reason in REASONS
    assert "Calcified" not in result.detail
    assert llm_server.requests == 2


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_are_retried(llm_server, make_backend, status):
    llm_server.script(AORTA, [(status, "busy"), (status, "busy"), GOOD])
    (result,) = make_backend(llm_server).extract([AORTA], "en")
    assert result == [Keyword("aorta", "aorta", 52, 25, 30)]
    assert llm_server.requests == 3


def test_retries_back_off_doubling_between_tries(llm_server, make_backend, backoff_waits):
    """Four tries against a server that stays down: three waits between them, each twice the one
    before (backoff_s = 1 s: 1, 2, 4 s, each times the jitter 1 to 1.25), asked of the fake clock."""
    llm_server.responder = lambda messages: (503, "busy")
    backend = make_backend(llm_server, max_attempts=4, backoff_s=1.0)
    (result,) = backend.extract([AORTA], "en")
    assert result.reason == "http_5xx" and llm_server.requests == 4 and backend.stats["retries"] == 3
    asked = [seconds for seconds, _ in backoff_waits]
    assert len(asked) == 3, backoff_waits
    for seconds, base in zip(asked, (1.0, 2.0, 4.0), strict=True):
        assert base <= seconds <= base * 1.25, asked


@pytest.mark.parametrize(("status", "reason"), [(429, "http_429"), (502, "http_5xx")])
def test_persistent_server_errors_become_failures(llm_server, make_backend, status, reason):
    llm_server.responder = lambda messages: (status, "down")
    (result,) = make_backend(llm_server, max_attempts=2).extract([AORTA], "en")
    assert result.reason == reason and llm_server.requests == 2


def test_client_errors_are_not_retried(llm_server, make_backend):
    llm_server.responder = lambda messages: (400, "context length exceeded")
    (result,) = make_backend(llm_server, max_attempts=3).extract([AORTA], "en")
    assert result.reason == "http_4xx" and llm_server.requests == 1


def test_slow_server_times_out(llm_server, make_backend, backoff_waits):
    """llm.timeout_s bounds each try: a server slower than it (0.5 s against 0.1 s) gives a timeout on
    every try, one backoff between the two tries, then the failure. Had the client waited the server
    out, the stub's answer would have come back as keywords."""
    llm_server.latency_s = 0.5
    (result,) = make_backend(llm_server, timeout_s=0.1, max_attempts=2, backoff_s=1.0).extract([AORTA], "en")
    assert isinstance(result, ExtractionFailure), result
    assert result.reason == "timeout" and "llm.timeout_s = 0.1 s" in result.detail
    assert llm_server.requests == 2
    # one backoff, between try 1 and try 2: backoff_s x 2**0, times the jitter (1 to 1.25)
    assert len(backoff_waits) == 1 and 1.0 <= backoff_waits[0][0] <= 1.25, backoff_waits


def test_unreachable_server_is_a_connection_error(free_tcp_port, make_backend):
    (result,) = make_backend(f"http://127.0.0.1:{free_tcp_port}/v1", max_attempts=2).extract([AORTA], "en")
    assert result.reason == "connection_error"


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_stop_at_once(llm_server, make_backend, status):
    llm_server.responder = lambda messages: (status, "invalid api key")
    backend = make_backend(llm_server, api_key="sk-do-not-print-me", max_concurrency=1)
    with pytest.raises(CurationError, match=r"llm\.api_key .*RADGROUND_LLM__API_KEY") as caught:
        backend.extract([AORTA, LUNGS, LOBE, SPINE], "en")
    assert "sk-do-not-print-me" not in str(caught.value)
    assert llm_server.requests == 1


def test_rejected_credentials_cut_other_sentences_backoff_short(llm_server, make_backend, real_waits):
    """AORTA fails first (500) and its worker starts a 30 s backoff; then LUNGS is refused (401). The
    CurationError stops the batch: the waiting worker is woken by the stop event, not by its backoff
    running out, and AORTA is never asked again."""
    import threading

    aorta_failed = threading.Event()

    def respond(messages):
        if sentence_of(messages) == AORTA:
            aorta_failed.set()
            return 500, "busy"
        aorta_failed.wait(timeout=10)  # the order of events: AORTA's failure, then the refusal
        return 401, "no"

    llm_server.responder = respond
    backend = make_backend(llm_server, backoff_s=30.0, max_concurrency=2)
    with pytest.raises(CurationError, match=r"HTTP 401"):
        backend.extract([AORTA, LUNGS], "en")
    assert llm_server.per_sentence == {AORTA: 1, LUNGS: 1}
    # AORTA's one backoff: 30 s asked for (times the jitter, 1 to 1.25), cut short by the stop event
    assert len(real_waits) == 1, real_waits
    (asked, woken), = real_waits
    assert 30.0 <= asked <= 37.5 and woken, real_waits


def test_backoff_doubles_and_honours_retry_after(llm_server, make_backend):
    backend = make_backend(llm_server, backoff_s=1.0)

    def wait_after(attempt: int, error: Exception) -> float:
        state = RetryCallState(backend._policy, fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        state.set_exception((type(error), error, None))
        return backend._wait(state)

    busy = AttemptFailed("http_5xx", "busy")
    assert 1.0 <= wait_after(1, busy) <= 1.25 and 2.0 <= wait_after(2, busy) <= 2.5
    assert 8.0 <= wait_after(4, busy) <= 10.0
    assert 60.0 <= wait_after(12, busy) <= 75.0  # capped at MAX_BACKOFF_S (plus jitter)
    assert 7.0 <= wait_after(1, AttemptFailed("http_429", "slow down", retry_after=7.0)) <= 8.75


def test_unknown_model_stops_at_once(llm_server, make_backend):
    llm_server.responder = lambda messages: (404, "model does not exist")
    with pytest.raises(CurationError, match=r"llm\.model"):
        make_backend(llm_server, max_concurrency=1).extract([AORTA, LUNGS], "en")
    assert llm_server.requests == 1


def test_check_lists_models_and_names_a_missing_one(llm_server, make_backend):
    assert make_backend(llm_server).check() == ["stub-model"]
    with pytest.raises(CurationError, match=r"does not serve model 'other'.*RADGROUND_LLM__MODEL"):
        make_backend(llm_server, model="other").check()


def test_second_run_is_served_from_the_cache(llm_server, make_backend, tmp_path):
    first = make_backend(llm_server).extract([LUNGS, LOBE, SPINE], "de")
    again = make_backend(llm_server)  # a new backend: the cache is on disk, not in memory
    assert again.extract([LUNGS, LOBE, SPINE], "de") == first
    assert llm_server.requests == 3
    assert again.stats["cache_hits"] == 3 and again.stats["cache_misses"] == 0 and again.stats["requests"] == 0
    with sqlite3.connect(tmp_path / "cache" / "llm.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT backend, model, prompt_version, kind, language, server FROM llm_answers"
                            ).fetchall()
    assert len(rows) == 3 and all(r[:2] == ("openai", "stub-model") and r[3:5] == ("extract", "de") for r in rows)
    assert all(r[2].startswith(PROMPT_VERSION) and r[5] == llm_server.url.rstrip("/") for r in rows)


def test_cache_key_holds_model_task_and_language(llm_server, make_backend):
    make_backend(llm_server).extract([AORTA], "en")
    make_backend(llm_server, model="other-model").extract([AORTA], "en")  # another model: asked again
    make_backend(llm_server).extract([AORTA], "de")  # another language: asked again
    assert llm_server.requests == 3


def test_another_server_with_the_same_model_name_is_asked_not_replayed(llm_server, make_backend):
    """llm.base_url is part of the key: a second server's answers are its own, the first's stay cached."""
    with StubLLMServer(responder=lambda messages: (200, keywords_answer([]))) as other:
        assert make_backend(llm_server).extract([AORTA], "en")[0][0].class_name == "aorta"
        assert make_backend(other).extract([AORTA], "en") == [[]]  # its own answer, not the cached one
        assert other.requests == 1
        assert make_backend(llm_server).extract([AORTA], "en")[0][0].class_name == "aorta"  # still cached
        assert make_backend(other).extract([AORTA], "en") == [[]]
    assert llm_server.requests == 1 and other.requests == 1


def test_server_id_keeps_no_credentials_and_names_one_server_once():
    assert server_id("http://user:s3cret@LLM.example.org:8000/v1/") == "http://llm.example.org:8000/v1"
    assert server_id("HTTP://llm.example.org/v1") == "http://llm.example.org/v1"
    assert server_id("http://127.0.0.1:8000/v1") != server_id("http://127.0.0.1:8001/v1")


def test_answers_cached_before_keys_named_the_server_are_dropped(tmp_path):
    """A cache written before the server was in the key cannot say whose answers it holds."""
    path = tmp_path / "cache" / "llm.sqlite"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE llm_results (backend TEXT, model TEXT, prompt_version TEXT, kind TEXT, "
                     "language TEXT, sentence_sha256 TEXT, result TEXT, created_at REAL)")
        conn.execute("INSERT INTO llm_results VALUES ('openai', 'm', 'v', 'extract', 'en', 'x', '{}', 0)")
    cache = LLMCache(path)
    assert len(cache) == 0
    tables = {row[0] for row in cache._connection().execute("SELECT name FROM sqlite_master WHERE type='table'")}
    cache.close()
    assert tables == {"llm_answers"}


def test_interrupted_run_resumes_with_the_missing_sentences(llm_server, make_backend, tmp_path):
    sentences = [f"Calcified plaques of the aorta, segment {i}." for i in range(8)]
    served = []

    def first_three_then_down(messages):
        if len(served) < 3:
            served.append(sentence_of(messages))
            return GOOD
        return 500, "the server went away"

    llm_server.responder = first_three_then_down
    results = make_backend(llm_server, max_attempts=1, max_concurrency=1).extract(sentences, "en")
    assert sum(isinstance(r, list) for r in results) == 3
    assert {r.reason for r in results if isinstance(r, ExtractionFailure)} == {"http_5xx"}

    llm_server.responder = lambda messages: GOOD
    llm_server.reset_counters()
    rerun = make_backend(llm_server).extract(sentences, "en")
    assert all(isinstance(r, list) for r in rerun)
    assert llm_server.requests == 5 and not set(llm_server.per_sentence) & set(served)


def test_concurrency_is_bounded_and_order_kept(llm_server, make_backend):
    sentences = [f"Calcified plaques of the aorta, segment {i}." for i in range(12)]
    llm_server.keywords.update({s: [("segment", "aorta"), (str(i), "aorta")] for i, s in enumerate(sentences)})
    llm_server.latency_s = 0.2  # each request stays in flight long enough for the others to join it
    results = make_backend(llm_server, max_concurrency=3).extract(sentences, "en")
    # parallel (3 at once, not 1), yet bounded (never 4 or more); its throughput is bench/llm.py's
    assert llm_server.peak_in_flight == 3 and llm_server.requests == 12
    for i, (sentence, keywords) in enumerate(zip(sentences, results, strict=True)):
        assert [k.keyword for k in keywords] == ["segment", str(i)], sentence


def test_repeated_sentences_are_asked_once(llm_server, make_backend):
    results = make_backend(llm_server).extract([AORTA, LUNGS, AORTA, AORTA], "en")
    assert llm_server.requests == 2 and results[0] == results[2] == results[3]
    assert results[0] is not results[2]


def test_logs_carry_no_sentence_text_at_info(llm_server, make_backend, caplog):
    llm_server.script(AORTA, [(200, "not json")])
    with caplog.at_level(logging.DEBUG):
        make_backend(llm_server).extract([AORTA, LUNGS], "en")
    ours = [r for r in caplog.records if r.name.startswith("tasks.curate")]
    assert any(r.levelno == logging.INFO and "2 sentences" in r.getMessage() for r in ours)
    assert all("Calcified" not in r.getMessage() and "Lungen" not in r.getMessage() for r in ours)


def test_unsupported_language_is_rejected_before_any_request(llm_server, make_backend):
    with pytest.raises(CurationError, match="language 'fr'"):
        make_backend(llm_server).extract([AORTA], "fr")
    assert llm_server.requests == 0


# ----------------------------------------------------------------------------- translation


def _translator(table: dict[str, str]):
    return lambda messages: (200, {"translation": table[sentence_of(messages)]})


def test_translation_keeps_numbers_across_decimal_separators(llm_server, make_backend):
    llm_server.responder = _translator({LOBE: "Nodule in the right upper lobe, 2.2 cm.",
                                        "Vergleich mit [DATE].": "Comparison with [DATE]."})
    backend = make_backend(llm_server)
    assert backend.translate([LOBE, "Vergleich mit [DATE]."], "de") == [
        "Nodule in the right upper lobe, 2.2 cm.", "Comparison with [DATE]."]
    asked = [json.loads(body["messages"][-1]["content"]) for body in llm_server.bodies]
    assert {"from": "de", "to": "en", "sentence": LOBE} in asked


@pytest.mark.parametrize(("source", "translation", "reason"), [
    (LOBE, "Nodule in the right upper lobe.", "numbers_not_preserved"),  # dropped "2,2 cm"
    (LOBE, "Nodule in the right upper lobe, 22 cm.", "numbers_not_preserved"),
    (LOBE, "Nodule in the right upper lobe, 2.2 mm.", "numbers_not_preserved"),  # unit changed
    ("Vergleich mit [DATE].", "Comparison with the prior study.", "placeholders_not_preserved"),
    (LOBE, "   ", "schema_error"),
])
def test_translation_checks_catch_lost_content(llm_server, make_backend, source, translation, reason):
    llm_server.responder = _translator({source: translation})
    (result,) = make_backend(llm_server, max_attempts=1).translate([source], "de")
    assert isinstance(result, ExtractionFailure) and result.reason == reason


def test_translation_english_to_german(llm_server, make_backend):
    source = "Compression fracture of T12 with 30 % loss of height."
    llm_server.responder = _translator({source: "Kompressionsfraktur von BWK 12 mit 30 % Höhenminderung."})
    assert make_backend(llm_server).translate([source], "en") == [
        "Kompressionsfraktur von BWK 12 mit 30 % Höhenminderung."]


# ----------------------------------------------------------------------------- free-form VQA


def _vqa(items: list[dict]):
    return lambda messages: (200, {"items": items})


def test_free_vqa_returns_validated_items(llm_server, make_backend):
    llm_server.responder = _vqa([
        {"question": "Gibt es einen Rundherd?", "answer": "Ja.", "question_type": "closed", "choices": ["ja", "nein"]},
        {"question": "Wo liegt er?", "answer": "rechter Oberlappen", "question_type": "multiple",
         "choices": ["rechter Oberlappen", "linker Unterlappen"]},
        {"question": "Wie groß?", "answer": "2.2 cm", "question_type": "open", "choices": []},
    ])
    (items,) = make_backend(llm_server).free_vqa([LOBE], "de")
    assert items == [
        {"question": "Gibt es einen Rundherd?", "answer": "ja", "question_type": "closed", "choices": []},
        {"question": "Wo liegt er?", "answer": "rechter Oberlappen", "question_type": "multiple",
         "choices": ["rechter Oberlappen", "linker Unterlappen"]},
        {"question": "Wie groß?", "answer": "2.2 cm", "question_type": "open", "choices": []},
    ]


@pytest.mark.parametrize(("item", "reason"), [
    ({"question": "Wo?", "answer": "linker Unterlappen", "question_type": "open"}, "unsupported_answer"),
    ({"question": "Wie groß?", "answer": "3,5 cm", "question_type": "open"}, "unsupported_answer"),
    ({"question": "Rundherd?", "answer": "yes", "question_type": "closed"}, "unsupported_answer"),  # German: ja
    ({"question": "Wo?", "answer": "Mittellappen", "question_type": "multiple",
      "choices": ["rechten Oberlappen", "linken Oberlappen"]}, "unsupported_answer"),
    ({"question": "Wo?", "answer": "linken Oberlappen", "question_type": "multiple",
      "choices": ["rechten Oberlappen", "linken Oberlappen"]}, "unsupported_answer"),
    ({"question": "Wo?", "answer": "x", "question_type": "freeform"}, "schema_error"),
])
def test_free_vqa_rejects_unsupported_answers(llm_server, make_backend, item, reason):
    llm_server.responder = _vqa([item])
    (result,) = make_backend(llm_server, max_attempts=1).free_vqa([LOBE], "de")
    assert isinstance(result, ExtractionFailure) and result.reason == reason


def test_tasks_are_cached_apart(llm_server, make_backend):
    llm_server.responder = lambda messages: (
        (200, {"translation": "Calcified plaques of the aorta."}) if '"to"' in messages[-1]["content"]
        else (200, {"items": []}) if "question" in messages[0]["content"] else GOOD)
    for _ in range(2):
        backend = make_backend(llm_server)
        assert backend.extract([AORTA], "en")[0][0].class_name == "aorta"
        assert backend.translate([AORTA], "en") == ["Calcified plaques of the aorta."]
        assert backend.free_vqa([AORTA], "en") == [[]]  # a valid "no items" answer, not a failure
    assert llm_server.requests == 3


# ----------------------------------------------------------------------------- prompts and cache


def test_few_shot_examples_pass_the_checks_they_teach():
    for language, sentence, keywords in EXTRACT_EXAMPLES:
        answer = keywords_answer(keywords)
        assert len(parse_keywords(json.dumps(answer), sentence, language)[0]) == len(keywords), sentence
    for language, sentence, translation in TRANSLATE_EXAMPLES:
        assert parse_translation(json.dumps({"translation": translation}), sentence, language)[0] == translation
    for language, sentence, items in VQA_EXAMPLES:
        assert len(parse_vqa(json.dumps({"items": items}), sentence, language)[0]) == len(items)


def test_fenced_json_and_bare_lists_are_accepted():
    fenced = '```json\n{"keywords": [{"keyword": "aorta", "category": "aorta", "negated": false}]}\n```'
    assert parse_keywords(fenced, AORTA, "en")[0][0].start == 25
    bare = '[{"keyword": "aorta", "category": "aorta", "negated": false}]'
    assert parse_keywords(bare, AORTA, "en")[0][0].end == 30
    with pytest.raises(AttemptFailed, match="invalid_json"):
        parse_keywords("", AORTA, "en")


def _fill(path: str, worker: int) -> None:
    cache = LLMCache(Path(path))
    for i in range(60):
        cache.put(CacheKey("openai", "http://s/v1", "m", "v", "extract", "en", f"{worker}-{i}"), '{"keywords": []}')
    cache.close()


def test_cache_takes_writes_from_several_processes(tmp_path):
    path = tmp_path / "cache" / "llm.sqlite"
    context = multiprocessing.get_context("fork")  # this test starts no threads, so fork is safe and quick
    workers = [context.Process(target=_fill, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(LLMCache(path)) == 180


def _open_together(path: str, worker: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait(timeout=30)
    cache = LLMCache(Path(path))
    cache.put(CacheKey("openai", "http://s/v1", "m", "v", "extract", "en", f"{worker}"), '{"keywords": []}')
    cache.close()


def test_processes_opening_a_fresh_cache_at_once_all_succeed(tmp_path):
    """The rebuild's Ray workers open the cache together: the WAL switch must not fail any of them."""
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        path = tmp_path / f"round{round_}" / "llm.sqlite"
        start = context.Barrier(8)
        workers = [context.Process(target=_open_together, args=(str(path), w, start)) for w in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [w.exitcode for w in workers] == [0] * 8
        cache = LLMCache(path)
        assert len(cache) == 8
        assert cache._connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
