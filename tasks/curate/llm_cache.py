"""A persistent cache of validated LLM answers: SQLite in WAL mode, safe for several processes.

Keyed by (backend, server, model, prompt version, task kind, language, sha256 of the
sentence), so a sentence seen before costs no request, whichever run or process asked first,
and another server (llm.base_url) never gets the answers of the first one replayed: the
same model name on two servers can be two different models or quantisations. Only
validated successes are stored, one commit each, so an interrupted run loses at most the
requests still in flight. Sentence text never enters a key: only its sha256 does.

The cache is one SQLite file, ``<data_dir>/cache/llm.sqlite`` (with ``-wal``/``-shm`` beside it
while open). Deleting the three files while no rebuild runs empties it; the next curate run
asks the server again for every sentence.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import tenacity

BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's write lock

# llm_results was the table before answers were keyed by server: nothing in it says which server
# gave an answer, so none of it can be trusted for a given server and it is dropped on open.
_RETIRED = "DROP TABLE IF EXISTS llm_results"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_answers (
    backend TEXT NOT NULL,
    server TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    language TEXT NOT NULL,
    sentence_sha256 TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (backend, server, model, prompt_version, kind, language, sentence_sha256)
) WITHOUT ROWID
"""


class CacheKey(NamedTuple):
    backend: str  # "openai"
    server: str  # server_id(llm.base_url), e.g. "http://127.0.0.1:8000/v1"
    model: str  # llm.model, e.g. "gpt-oss-120b"
    prompt_version: str  # PROMPT_VERSION plus a digest of the rendered prompt
    kind: str  # "extract" | "translate" | "vqa"
    language: str  # the sentence's language ("de" | "en")
    sentence_sha256: str


def server_id(base_url: str) -> str:
    """The cache's name for an LLM server: its API root without user:password (a key on disk must
    not hold a secret) and with a lower-case scheme and host, so one server has one name."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme.lower()}://{host}{parts.path.rstrip('/')}"


_WHERE_KEY = " AND ".join(f"{name}=?" for name in CacheKey._fields)


def sentence_sha256(sentence: str) -> str:
    """The cache's name for a sentence."""
    return hashlib.sha256(sentence.encode("utf-8")).hexdigest()


def _is_locked(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


# Several processes (the rebuild's Ray workers) share the cache. SQLite answers some of their
# collisions with "database is locked" at once instead of waiting busy_timeout (switching a
# fresh file to WAL, WAL recovery, a stale read snapshot), so every access retries on it.
_retry_when_locked = tenacity.retry(
    retry=tenacity.retry_if_exception(_is_locked), reraise=True,
    wait=tenacity.wait_random_exponential(multiplier=0.05, max=2.0), stop=tenacity.stop_after_delay(BUSY_TIMEOUT_S))


@_retry_when_locked
def _open_with_retry(path: Path) -> sqlite3.Connection:
    # isolation_level=None: autocommit, so every put is its own committed transaction.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file; readers never block the writer
        conn.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash; it is a cache
        conn.execute(_RETIRED)
        conn.execute(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class LLMCache:
    """get/put of validated JSON answers; one connection shared by the threads of a process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _open_with_retry(self.path)
        return self._conn

    @_retry_when_locked
    def get(self, key: CacheKey) -> str | None:
        """The stored JSON text for a key, or None."""
        with self._lock:
            row = self._connection().execute(
                f"SELECT result FROM llm_answers WHERE {_WHERE_KEY}", tuple(key)).fetchone()
        return None if row is None else row[0]

    def put(self, key: CacheKey, result: str) -> None:
        """Store (and commit at once) one validated JSON answer."""
        self._write("INSERT OR REPLACE INTO llm_answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*key, result, time.time()))

    def delete(self, key: CacheKey) -> None:
        """Forget one answer (a stored answer that no longer validates)."""
        self._write(f"DELETE FROM llm_answers WHERE {_WHERE_KEY}", tuple(key))

    @_retry_when_locked
    def _write(self, sql: str, params: tuple) -> None:
        # BEGIN IMMEDIATE takes the write lock first (waiting busy_timeout): a plain autocommit
        # write starts as a reader and upgrading it can fail at once when another process wrote.
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(sql, params)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM llm_answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
