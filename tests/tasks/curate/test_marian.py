"""MarianMT translation backend: a tiny random Marian model and tokenizer built here, no downloads."""

from __future__ import annotations

import json

import pytest

from radground.settings import TranslationSettings
from tasks.curate.base import CurationError, ExtractionFailure
from tasks.curate.marian import MarianTranslator, translation_problem

CORPUS = ["Die Leber ist unauffällig.", "Keine Raumforderung der Milz.", "Zyste der rechten Niere, 2,2 cm.",
          "The liver is unremarkable.", "No splenic mass.", "Cyst of the right kidney, 2.2 cm."] * 20


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    root = tmp_path_factory.mktemp("marian")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "spm"), vocab_size=48,
                                   model_type="unigram", minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = MarianTokenizer(str(root / "spm.model"), str(root / "spm.model"), str(root / "vocab.json"))
    config = MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0, forced_eos_token_id=1)
    folder = root / "opus-mt-tiny"
    tokenizer.save_pretrained(folder)
    MarianMTModel(config).save_pretrained(folder)
    return folder


def test_translation_problem_keeps_numbers_and_placeholders():
    assert translation_problem("Zyste 2,2 cm, [DATE].", "Cyst 2.2 cm, [DATE].") is None
    assert translation_problem("Zyste 2,2 cm.", "Cyst 2 cm.").reason == "numbers_not_preserved"
    assert translation_problem("Befund vom [DATE].", "Findings.").reason == "placeholders_not_preserved"
    assert translation_problem("Leber o.B.", "  ").reason == "schema_error"


def test_random_model_runs_locally_and_bad_output_is_a_failure_not_text(tiny_marian):
    translator = MarianTranslator(TranslationSettings(marian_de_en=tiny_marian, marian_en_de=tiny_marian))
    results = translator.translate(["Zyste der rechten Niere, 2,2 cm.", "Die Leber ist unauffällig."], "de")
    assert len(results) == 2
    # Random weights cannot keep "2,2": that sentence must come back as a failure with its reason.
    assert isinstance(results[0], ExtractionFailure) and results[0].reason in (
        "numbers_not_preserved", "schema_error")
    assert all(isinstance(r, (str, ExtractionFailure)) for r in results)


def test_missing_model_folder_names_the_setting(tmp_path):
    translator = MarianTranslator(TranslationSettings(marian_de_en=tmp_path / "nope"))
    with pytest.raises(CurationError, match=r"translation\.marian_de_en .* is not a folder"):
        translator.translate(["Leber o.B."], "de")
