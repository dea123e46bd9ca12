"""LLM keyword-extraction throughput: OpenAIBackend.extract against the stub server (tests/llm_server.py).

The stub sleeps a fixed latency per request, standing in for a model server's generation
time, so the figures measure what the backend's concurrency and cache buy, not a model.
It runs in its own process, as a real model server would: in-process, its threads would
share the client's GIL and cap the figures. Each concurrency level gets a fresh cache
folder (nothing cached), a warm-up call on a sentence outside the measured set, then one
timed extract over the fixed sentences; the cached figure is a second, fresh backend over
the same folder (zero requests).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

STUB = Path(__file__).resolve().parents[1] / "tests" / "llm_server.py"
WARM_UP = "Warm-up: Leber unauffällig."
ORGANS = [("Leber", "liver"), ("Milz", "spleen"), ("Pankreas", "pancreas"), ("Aorta", "aorta"),
          ("Magen", "stomach"), ("Gallenblase", "gallbladder"), ("Harnblase", "urinary_bladder"),
          ("Herz", "heart")]


def _table(n: int) -> dict[str, list[tuple[str, str, bool]]]:
    """n distinct German sentences (plus the warm-up one), each with its keywords."""
    table = {WARM_UP: [("Leber", "liver", True)]}
    for i in range(n):
        word, category = ORGANS[i % len(ORGANS)]
        table[f"{word} unauffällig, Befund Nr. {i} ohne Nachweis einer Läsion."] = [(word, category, True)]
    return table


class _StubProcess:
    """tests/llm_server.py in a child process; its counters come over HTTP."""

    def __init__(self, table: dict, latency_s: float, folder: Path) -> None:
        path = folder / "keywords.json"
        path.write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, str(STUB), str(path), "--latency-s", str(latency_s)],
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError(f"the stub server did not start (exit code {self.proc.poll()})")
        self.root = self.url.removesuffix("/v1")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.root}/stub/stats") as response:
            return json.load(response)

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.root}/stub/reset", data=b"{}", method="POST")).close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _extract(url: str, data_dir: Path, concurrency: int, sentences: list[str]) -> tuple[float, dict]:
    from radground.settings import load_settings
    from tasks.curate.llm import OpenAIBackend

    settings = load_settings(data_dir=data_dir, llm={
        "backend": "openai", "base_url": url, "model": "stub-model", "max_concurrency": concurrency,
        "max_attempts": 2, "backoff_s": 0.01, "timeout_s": 10.0})
    with OpenAIBackend(settings) as backend:
        backend.extract([WARM_UP], "de")  # client, connection pool, cache file
        started = time.perf_counter()
        results = backend.extract(sentences, "de")
        elapsed = time.perf_counter() - started
        assert all(isinstance(r, list) and r for r in results), "the stub should answer every sentence"
        return elapsed, dict(backend.stats)


def bench_llm(sentences: int = 200, latency_s: float = 0.05, concurrency: tuple[int, ...] = (1, 32)) -> dict:
    """sentences/s of OpenAIBackend.extract at each concurrency, their ratio, and a cached rerun."""
    table = _table(sentences)
    inputs = [s for s in table if s != WARM_UP]
    figures: dict = {"sentences": len(inputs), "latency_s": latency_s}
    with tempfile.TemporaryDirectory() as tmp:
        stub = _StubProcess(table, latency_s, Path(tmp))
        try:
            for level in concurrency:
                stub.reset()
                elapsed, _ = _extract(stub.url, Path(tmp) / f"c{level}", level, inputs)
                figures[f"sentences_per_s_c{level}"] = round(len(inputs) / elapsed, 1)
                figures[f"peak_in_flight_c{level}"] = stub.stats()["peak_in_flight"]
            first, last = concurrency[0], concurrency[-1]
            figures[f"speedup_c{last}_vs_c{first}"] = round(
                figures[f"sentences_per_s_c{last}"] / figures[f"sentences_per_s_c{first}"], 1)
            # The latency-bound ceiling: requests go out in rounds of `concurrency`, one latency each.
            figures["ideal_speedup"] = round(math.ceil(len(inputs) / first) / math.ceil(len(inputs) / last), 1)
            stub.reset()
            elapsed, stats = _extract(stub.url, Path(tmp) / f"c{last}", last, inputs)  # same folder: all cached
            figures["sentences_per_s_cached"] = round(len(inputs) / elapsed, 1)
            figures["requests_cached_rerun"] = stub.stats()["requests"]
        finally:
            stub.close()
    return figures


if __name__ == "__main__":
    print(bench_llm())
