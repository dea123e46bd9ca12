"""An OpenAI-compatible stub server on loopback, for tests and benchmarks of tasks/curate/llm.py.

A real HTTP server (ThreadingHTTPServer, HTTP/1.1 keep-alive) on 127.0.0.1 and a free
port, serving ``POST /v1/chat/completions`` and ``GET /v1/models`` in OpenAI's format, so
the production client (openai + httpx) runs end to end. What it answers, first match wins:

1. the next scripted reply for the request's sentence (``script(sentence, replies)``);
2. ``responder(messages) -> (status, payload)`` when one is set;
3. the keyword table given at construction (sentence -> keywords), as an extraction answer;
4. HTTP 500 "no answer" otherwise.

A reply is ``(status, payload)``. With status 200 the payload is the assistant message's
content: a str as is, anything else as JSON. With another status it is the error message.
A responder that raises gives a 500. ``latency_s`` is slept per request while it counts as
in flight; ``requests`` and ``peak_in_flight`` say what the client did.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, Any]
Responder = Callable[[list[dict]], Reply]


def sentence_of(messages: list[dict]) -> str:
    """The sentence of a radground request: the JSON of its last user message carries it."""
    last_user = next(m for m in reversed(messages) if m["role"] == "user")
    return json.loads(last_user["content"])["sentence"]


def keywords_answer(keywords: Iterable[tuple[str, str] | tuple[str, str, bool] | dict]) -> dict:
    """An extraction answer from (keyword, category[, negated]) tuples or ready dicts."""
    items = []
    for item in keywords:
        if isinstance(item, dict):
            items.append(item)
        else:
            keyword, category, *negated = item
            items.append({"keyword": keyword, "category": category, "negated": bool(negated and negated[0])})
    return {"keywords": items}


def lexicon_like_responder() -> Responder:
    """A stand-in model for end-to-end runs: keywords as the lexicon finds them, a faithful
    'translation' (the sentence itself: numbers and placeholders intact), and one closed
    question per sentence. It tells the tasks apart by their system prompts."""
    from tasks.curate.lexicon import LexiconExtractor

    lexicon = LexiconExtractor()

    def respond(messages: list[dict]) -> Reply:
        system = messages[0]["content"]
        request = json.loads(messages[-1]["content"])
        sentence = request["sentence"]
        if "translate" in system.lower() and "from" in request:
            return 200, {"translation": sentence}
        if "question-answer" in system:
            yes = "ja" if request["language"] == "de" else "yes"
            question = "Befund?" if yes == "ja" else "Finding?"
            return 200, {"items": [{"question": question, "answer": yes, "question_type": "closed", "choices": []}]}
        (found,) = lexicon.extract([sentence], request["language"])
        return 200, {"keywords": [{"keyword": k.keyword, "category": k.class_name, "negated": k.negated}
                                  for k in found]}

    return respond


class StubLLMServer:
    """Start with ``with StubLLMServer(...) as server:``; point llm.base_url at ``server.url``."""

    def __init__(self, keywords: dict[str, list] | None = None, responder: Responder | None = None,
                 latency_s: float = 0.0, models: tuple[str, ...] = ("stub-model",)) -> None:
        self.keywords = dict(keywords or {})
        self.responder = responder
        self.latency_s = latency_s
        self.models = models
        self.requests = 0  # POST /v1/chat/completions received
        self.model_requests = 0  # GET /v1/models received
        self.per_sentence: Counter[str] = Counter()
        self.bodies: list[dict] = []  # the parsed request bodies, in arrival order
        self.in_flight = 0
        self.peak_in_flight = 0
        self._scripts: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API root, as llm.base_url wants it."""
        assert self._httpd is not None, "the server is not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def script(self, sentence: str, replies: Iterable[Reply]) -> None:
        """Queue replies for a sentence; each request for it takes the next one."""
        with self._lock:
            self._scripts.setdefault(sentence, deque()).extend(replies)

    def reset_counters(self) -> None:
        """Zero the counters (also reachable as POST /stub/reset, for a stub in another process)."""
        with self._lock:
            self.requests = self.model_requests = self.peak_in_flight = 0
            self.per_sentence.clear()
            self.bodies.clear()

    def start(self) -> StubLLMServer:
        handler = type("Handler", (_Handler,), {"stub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: the OS picks a free one
        self._httpd.daemon_threads = True  # a request still sleeping at stop() must not block it
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stub-llm", daemon=True)  # a short poll: stop() is quick
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> StubLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _answer(self, body: dict) -> Reply:
        messages = body.get("messages", [])
        try:
            sentence = sentence_of(messages)
        except (StopIteration, KeyError, TypeError, ValueError):
            sentence = None
        with self._lock:
            self.requests += 1
            self.bodies.append(body)
            if sentence is not None:
                self.per_sentence[sentence] += 1
            queue = self._scripts.get(sentence)
            scripted = queue.popleft() if queue else None
        if scripted is not None:
            return scripted
        if self.responder is not None:
            try:
                return self.responder(messages)
            except Exception as exc:  # noqa: BLE001 - a failing responder is a server error, as in life
                return 500, f"responder failed: {type(exc).__name__}"
        if sentence in self.keywords:
            return 200, keywords_answer(self.keywords[sentence])
        return 500, "the stub has no answer for this sentence"


def _completion(model: str, content: str) -> dict:
    return {
        "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM and llama.cpp serve it
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    stub: StubLLMServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/stub/stats":  # the counters, for a stub in another process
            stub = self.stub
            with stub._lock:
                stats = {"requests": stub.requests, "model_requests": stub.model_requests,
                         "peak_in_flight": stub.peak_in_flight}
            return self._send(200, stats)
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        with self.stub._lock:
            self.stub.model_requests += 1
        self._send(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in self.stub.models]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.rstrip("/") == "/stub/reset":
            self.stub.reset_counters()
            return self._send(200, {})
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        stub = self.stub
        with stub._lock:
            stub.in_flight += 1
            stub.peak_in_flight = max(stub.peak_in_flight, stub.in_flight)
        try:
            status, payload = stub._answer(body)  # counted on arrival, answered after the latency
            if stub.latency_s:
                time.sleep(stub.latency_s)
        finally:
            with stub._lock:
                stub.in_flight -= 1
        if status == 200:
            content = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            self._send(200, _completion(body.get("model", "stub-model"), content))
        else:
            headers = {"Retry-After": "0"} if status == 429 else {}
            self._send(status, {"error": {"message": str(payload), "type": "stub_error", "code": status}}, headers)

    def _send(self, status: int, document: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(document, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to tell it

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tests read counters
        pass


def main() -> None:
    """Serve a keyword table from a JSON file until killed; print the API root first (for benchmarks)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("keywords", help="JSON file: {sentence: [[keyword, category, negated], ...]}")
    parser.add_argument("--latency-s", type=float, default=0.0)
    args = parser.parse_args()
    with open(args.keywords, encoding="utf-8") as handle:
        table = {sentence: [tuple(item) for item in items] for sentence, items in json.load(handle).items()}
    with StubLLMServer(keywords=table, latency_s=args.latency_s) as server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
