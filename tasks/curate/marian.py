"""Local DE<->EN translation with MarianMT models from folders in settings (no downloads).

Point ``translation.marian_de_en`` / ``marian_en_de`` at local copies of e.g.
Helsinki-NLP/opus-mt-de-en and opus-mt-en-de (``save_pretrained`` output). Translations
are validated like the LLM's: non-empty, numbers and placeholders preserved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from radground.settings import TranslationSettings
from tasks.curate.base import CurationError, ExtractionFailure
from tasks.curate.llm_prompts import AttemptFailed, check_translation


def translation_problem(source: str, translation: str) -> ExtractionFailure | None:
    """Why a translation cannot be kept, or None: the same checks as the LLM's translations."""
    try:
        check_translation(source, translation)
    except AttemptFailed as failed:
        return ExtractionFailure(failed.reason, failed.detail)
    return None


class MarianTranslator:
    """translate(sentences, source_language) with one MarianMT model per direction."""

    name = "marian"

    def __init__(self, settings: TranslationSettings, batch_size: int = 16) -> None:
        self._folders = {"de": settings.marian_de_en, "en": settings.marian_en_de}
        self._models: dict[str, tuple] = {}
        self._batch_size = batch_size

    def _load(self, source_language: str):
        if source_language not in self._models:
            folder = self._folders.get(source_language)
            setting = "marian_de_en" if source_language == "de" else "marian_en_de"
            if folder is None or not Path(folder).is_dir():
                raise CurationError(
                    f"translation.{setting} = {folder!r} is not a folder. Point it at a local MarianMT model "
                    "(save_pretrained output), or set translation.backend to none.")
            from transformers import MarianMTModel, MarianTokenizer

            tokenizer = MarianTokenizer.from_pretrained(folder, local_files_only=True)
            model = MarianMTModel.from_pretrained(folder, local_files_only=True).eval()
            self._models[source_language] = (tokenizer, model)
        return self._models[source_language]

    def translate(self, sentences: Sequence[str], source_language: str) -> list[str | ExtractionFailure]:
        import torch

        tokenizer, model = self._load(source_language)
        results: list[str | ExtractionFailure] = []
        for start in range(0, len(sentences), self._batch_size):
            batch = list(sentences[start:start + self._batch_size])
            inputs = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=256)
            with torch.inference_mode():
                generated = model.generate(**inputs, num_beams=1, max_new_tokens=256)
            for source, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True),
                                    strict=True):
                problem = translation_problem(source, text)
                results.append(problem if problem is not None else text)
        return results
