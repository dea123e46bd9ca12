"""The ``tiny`` preset's tokenizer: a byte-level BPE trained with ``tokenizers`` on the texts given.

The caller passes the dataset's SCRUBBED report text (and prompts), so the vocabulary and merges can
only hold strings of that text: PHI that de-identification removed cannot enter the tokenizer files.
Grounding tokens (``<image>``, ``<locNNNN>``, ``<segNNN>``, markup) are not trained here;
``RadGrounderProcessor`` adds them, as PaliGemma's processor does.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"  # Gemma's ids 0, 1, 2, 3
DEFAULT_VOCAB_SIZE = 2048


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; returns a transformers fast tokenizer (no grounding tokens yet).

    Byte-level: every string encodes (no unknown tokens), whatever the language. Pairs get token type
    ids 0 / 1 (prefix / suffix), which PaliGemma's processor turns into the labels mask.
    """
    if vocab_size < 256 + 4:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes + 4 special tokens a byte-level BPE needs")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a string seen once (a stray name the scrubber missed) never becomes a token
        special_tokens=[PAD, EOS, BOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", truncation_side="right",
    )
