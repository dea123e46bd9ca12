"""Lexicon keyword extraction throughput on the sentences of synthetic reports."""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path


def bench_lexicon(patients: int = 20, seed: int = 0, repeats: int = 5) -> dict:
    from radground.synth.drop import generate_drop
    from tasks.curate.lexicon import LexiconExtractor
    from tasks.curate.sentences import split_sentences

    with tempfile.TemporaryDirectory() as tmp:
        drop = generate_drop(Path(tmp) / "drop", patients=patients, seed=seed).drop_dir
        with (drop / "reports.csv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    by_language: dict[str, list[str]] = {"de": [], "en": []}
    for row in rows:
        by_language[row["language"]] += [s.text for s in split_sentences(row["report_text"], row["language"])]
    extractor = LexiconExtractor()
    figures = {}
    for language, sentences in by_language.items():
        if not sentences:
            continue
        extractor.extract(sentences, language)  # warm-up: regex compilation
        started = time.perf_counter()
        for _ in range(repeats):
            extractor.extract(sentences, language)
        seconds = time.perf_counter() - started
        figures[f"{language}_sentences"] = len(sentences)
        figures[f"{language}_sentences_per_s"] = round(len(sentences) * repeats / seconds)
    return figures
