"""Keywords, translations and free-form VQA from any OpenAI-compatible server (vLLM, Ollama, llama.cpp).

One chat request per sentence at temperature ``llm.temperature``; every answer is parsed
with pydantic and checked against the sentence (keywords verbatim, classes in the label map,
numbers kept, answers supported: tasks/curate/llm_prompts.py) before it counts. A bad answer,
a 429/5xx, a timeout or a dropped connection is retried with exponential backoff up to ``llm.max_attempts`` tries
(tenacity; the openai client's own retries are off, so every try is ours and counted), then
becomes an ExtractionFailure with a stable reason — never an empty result. Rejected
credentials stop the batch at once (CurationError). Validated answers go to a SQLite cache
(tasks/curate/llm_cache.py) as they arrive, so reruns and resumed runs ask only for what
is missing.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from radground.settings import Settings
from tasks.curate.base import CurationError, ExtractionFailure, Keyword, Language
from tasks.curate.llm_cache import CacheKey, LLMCache, sentence_sha256, server_id
from tasks.curate.llm_prompts import LANGUAGES, PROMPT_VERSION, REASONS, AttemptFailed, Task, build_tasks

__all__ = ["OpenAIBackend", "PROMPT_VERSION", "REASONS"]

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0  # no single wait longer than this, whatever backoff_s, attempts or Retry-After say
_NO_KEY = "no-key"  # servers without auth ignore it; it keeps the client off OPENAI_API_KEY


class OpenAIBackend:
    """Keyword extraction, translation and free-form VQA against an OpenAI-compatible server."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._llm = settings.llm
        self.cache = LLMCache(settings.data_dir / "cache" / "llm.sqlite")
        # Cumulative over this backend's life, for the rebuild summary; sentences are counted once per batch.
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "cache_misses": 0, "succeeded": 0, "failed": 0}
        self.failure_reasons: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._client: openai.OpenAI | None = None
        self._tasks = build_tasks()
        self._policy = Retrying(stop=stop_after_attempt(self._llm.max_attempts), wait=self._wait,
                                retry=retry_if_exception(lambda e: isinstance(e, AttemptFailed) and e.retryable),
                                before_sleep=self._note_retry, reraise=True)

    @property
    def label(self) -> str:
        """What ReportRecord.keyword_backend records: ``openai:<model>``."""
        return f"openai:{self._llm.model}"

    def extract(self, sentences: Sequence[str], language: Language) -> list[list[Keyword] | ExtractionFailure]:
        """Keywords per sentence, in input order, or why none could be obtained."""
        return self._run(self._tasks["extract"], sentences, language)

    def translate(self, sentences: Sequence[str], source_language: Language) -> list[str | ExtractionFailure]:
        """Each sentence in the other language (de <-> en), numbers and placeholders kept."""
        return self._run(self._tasks["translate"], sentences, source_language)

    def free_vqa(self, sentences: Sequence[str], language: Language) -> list[list[dict] | ExtractionFailure]:
        """Question/answer items per sentence ({question, answer, question_type, choices})."""
        return self._run(self._tasks["vqa"], sentences, language)

    def check(self) -> list[str]:
        """The models the server offers; CurationError if it is unreachable, refuses us or lacks llm.model."""
        try:
            models = [model.id for model in self._openai().models.list()]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise self._auth_error(exc.status_code) from None
        except openai.APIConnectionError as exc:
            raise CurationError(
                f"the LLM server at {self._llm.base_url} cannot be reached ({type(exc).__name__}). Start it, or "
                "point llm.base_url (env RADGROUND_LLM__BASE_URL) at a running one.") from None
        except openai.APIStatusError as exc:
            raise CurationError(f"the LLM server at {self._llm.base_url} answered GET /models with HTTP "
                                f"{exc.status_code}; expected an OpenAI-compatible API root ending in /v1.") from None
        if self._llm.model not in models:
            raise CurationError(f"the LLM server at {self._llm.base_url} does not serve model {self._llm.model!r} "
                                f"(it serves {models}). Set llm.model (env RADGROUND_LLM__MODEL) to one of them.")
        return models

    def close(self) -> None:
        """Close the HTTP client and the cache."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self.cache.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one batch

    def _run(self, task: Task, sentences: Sequence[str], language: str) -> list:
        if language not in LANGUAGES:
            raise CurationError(f"{task.kind}: language {language!r} is not supported; expected one of {LANGUAGES}.")
        started = time.perf_counter()
        counts = dict(self.stats)
        results: list[Any] = [None] * len(sentences)
        todo: dict[str, list[int]] = {}  # sentence -> its positions; a repeated sentence is asked once
        known: dict[str, Any] = {}
        for i, sentence in enumerate(sentences):
            if sentence in todo:
                todo[sentence].append(i)
            elif sentence in known:
                results[i] = copy.deepcopy(known[sentence])
            elif (hit := self._cached(task, sentence, language)) is not None:
                results[i] = known[sentence] = hit
            else:
                todo[sentence] = [i]
        self._count("cache_hits", len(known))
        self._count("cache_misses", len(todo))
        failed: Counter[str] = Counter()
        if todo:
            self._ask_all(task, todo, language, results, failed)
        self.failure_reasons.update(failed)
        done = {name: self.stats[name] - counts[name] for name in self.stats}
        reasons = ", ".join(f"{reason} {n}" for reason, n in failed.most_common())
        logger.log(logging.WARNING if failed else logging.INFO,
                   "llm %s (%s, %s): %d sentences, %d cached, %d asked: %d ok, %d failed%s; %d requests, "
                   "%d retries, %.1f s", task.kind, language, self._llm.model, len(sentences), len(known), len(todo),
                   done["succeeded"], done["failed"], f" ({reasons}; quarantined)" if failed else "",
                   done["requests"], done["retries"], time.perf_counter() - started)
        return results

    def _ask_all(self, task: Task, todo: dict[str, list[int]], language: str, results: list,
                 failed: Counter[str]) -> None:
        pool = ThreadPoolExecutor(max_workers=min(self._llm.max_concurrency, len(todo)), thread_name_prefix="llm")
        # Set by the first CurationError, or when we leave early (Ctrl-C): no worker starts another
        # try, and a worker waiting out a backoff wakes at once (the wait is stop.wait).
        stop = threading.Event()
        policy = self._policy.copy(sleep=stop.wait)
        try:
            futures = {pool.submit(policy.copy(), self._attempt, task, s, language, stop): s for s in todo}
            for future in as_completed(futures):  # CurationError propagates; finally cancels what is queued
                sentence = futures[future]
                try:
                    outcome, answer = future.result()
                except _Stopped:
                    continue  # the CurationError that stopped it is on its way
                except AttemptFailed as exc:
                    outcome = ExtractionFailure(exc.reason, exc.detail)
                    failed[exc.reason] += 1
                    self._count("failed")
                else:
                    self.cache.put(self._key(task, sentence, language), answer)  # committed now: resumable
                    self._count("succeeded")
                for n, i in enumerate(todo[sentence]):
                    results[i] = outcome if n == 0 else copy.deepcopy(outcome)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)  # what is in flight ends within llm.timeout_s

    def _key(self, task: Task, sentence: str, language: str) -> CacheKey:
        # The server is part of the key: the same model name elsewhere may answer differently.
        return CacheKey(self.name, server_id(self._llm.base_url), self._llm.model, task.version, task.kind, language,
                        sentence_sha256(sentence))

    def _cached(self, task: Task, sentence: str, language: str) -> Any | None:
        key = self._key(task, sentence, language)
        answer = self.cache.get(key)
        if answer is None:
            return None
        try:  # re-checked on the way out: a stored answer is trusted no more than a fresh one
            return task.parse(answer, sentence, language)[0]
        except AttemptFailed as exc:
            logger.debug("llm %s: cached answer no longer valid (%s); asking again", task.kind, exc.reason)
            self.cache.delete(key)
            return None

    # -- one try

    def _attempt(self, task: Task, sentence: str, language: str, stop: threading.Event) -> tuple[Any, str]:
        if stop.is_set():
            raise _Stopped
        messages = [*task.prefix, {"role": "user", "content": task.user(sentence, language)}]
        try:
            return task.parse(self._complete(messages), sentence, language)
        except CurationError:
            stop.set()
            raise

    def _complete(self, messages: list[dict]) -> str:
        self._count("requests")
        try:
            reply = self._openai().chat.completions.create(
                model=self._llm.model, messages=messages, temperature=self._llm.temperature,
                response_format={"type": "json_object"})  # JSON mode: vLLM, Ollama and llama.cpp support it
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise self._auth_error(exc.status_code) from None
        except openai.NotFoundError:
            raise CurationError(
                f"the LLM server at {self._llm.base_url} answered HTTP 404 to a chat request for model "
                f"{self._llm.model!r}: the model or the endpoint does not exist. Check llm.model (env "
                "RADGROUND_LLM__MODEL) and llm.base_url, which must be the API root ending in /v1.") from None
        except openai.RateLimitError as exc:
            raise AttemptFailed("http_429", "the server is rate-limiting (HTTP 429)",
                                retry_after=_retry_after(exc.response)) from None
        except openai.APIStatusError as exc:
            if exc.status_code >= 500 or exc.status_code == 408:
                raise AttemptFailed("http_5xx" if exc.status_code >= 500 else "timeout",
                                    f"the server answered HTTP {exc.status_code}") from None
            raise AttemptFailed("http_4xx", f"the server refused the request with HTTP {exc.status_code}",
                                retryable=False) from None  # the same request would be refused again
        except openai.APITimeoutError:
            raise AttemptFailed("timeout", f"no answer within llm.timeout_s = {self._llm.timeout_s} s") from None
        except openai.APIConnectionError as exc:
            raise AttemptFailed("connection_error",
                                f"cannot reach {self._llm.base_url} ({type(exc).__name__})") from None
        try:
            choice = reply.choices[0]
            content = choice.message.content
        except (AttributeError, IndexError, TypeError):
            raise AttemptFailed("invalid_json", "the server's reply is not an OpenAI chat completion") from None
        if not content:
            raise AttemptFailed("invalid_json", f"the model's reply is empty (finish_reason {choice.finish_reason})")
        return content

    def _auth_error(self, status: int) -> CurationError:
        state = "is set but was refused" if self._llm.api_key is not None else "is not set"
        return CurationError(
            f"the LLM server at {self._llm.base_url} rejected the request with HTTP {status} "
            f"({'unauthorized' if status == 401 else 'forbidden'}); llm.api_key {state}. Set llm.api_key "
            "(env RADGROUND_LLM__API_KEY) to a key this server accepts for model "
            f"{self._llm.model!r}, or use llm.backend=lexicon.")

    def _openai(self) -> openai.OpenAI:
        with self._lock:
            if self._client is None:
                key = self._llm.api_key.get_secret_value() if self._llm.api_key is not None else _NO_KEY
                self._client = openai.OpenAI(base_url=self._llm.base_url, api_key=key,
                                             timeout=self._llm.timeout_s, max_retries=0)  # retries are ours
            return self._client

    # -- retry policy

    def _wait(self, state: RetryCallState) -> float:
        delay = self._llm.backoff_s * 2 ** (state.attempt_number - 1)
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, AttemptFailed) and error.retry_after is not None:
            delay = max(delay, error.retry_after)  # the server said how long to stay away
        # Jitter: threads that hit the same 429 do not all come back in the same instant.
        return min(delay, MAX_BACKOFF_S) * random.uniform(1.0, 1.25)

    def _note_retry(self, state: RetryCallState) -> None:
        self._count("retries")
        error = state.outcome.exception() if state.outcome is not None else None
        logger.debug("llm %s: try %d of %d failed (%s); next in %.2f s", state.args[0].kind, state.attempt_number,
                     self._llm.max_attempts, getattr(error, "reason", type(error).__name__),
                     state.next_action.sleep if state.next_action else 0.0)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n


class _Stopped(Exception):
    """The batch is being abandoned (another sentence raised CurationError); never retried or reported."""


def _retry_after(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after")))
    except (AttributeError, TypeError, ValueError):  # absent, or an HTTP date: fall back to our backoff
        return None
