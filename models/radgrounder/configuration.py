"""RadGrounder's configuration: PaliGemma's plus the mask decoder, and the two presets.

Presets (``model.preset`` in the settings):

* ``tiny``: random init, a 2-layer SigLIP (224 px, patch 14, so 256 image tokens) and a 2-layer Gemma2
  with small hidden sizes; runs on CPU in seconds. Its tokenizer is trained on the dataset's text
  (:mod:`models.radgrounder.tokenizer`), so the vocabulary size is only known once the processor has
  added its tokens: :func:`tiny_config` takes the processor's tokenizer.
* ``paligemma2-3b-224``: PaliGemma-2 3B, weights and tokenizer from the local folder
  ``model.paligemma_path`` (never downloaded). :func:`paligemma_path` checks the setting.
  :func:`paligemma2_3b_224_config` is the same architecture with no weights (random init, for the GPU
  benchmark).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

from radground.errors import ConfigError

PRESETS = ("tiny", "paligemma2-3b-224")
ENV_PALIGEMMA_PATH = "RADGROUND_MODEL__PALIGEMMA_PATH"
#: Gemma2 refuses "sdpa" and flash attention drops PaliGemma's bidirectional prefix mask.
ATTN_IMPLEMENTATION = "eager"


@strict
class RadGrounderConfig(PaliGemmaConfig):
    """PaliGemma's configuration plus the light mask decoder (see ``modeling.MaskDecoder``).

    ``seg_close_token_id`` is the id of ``</seg>``: the language model's hidden state there queries the
    image features for the i-th mask. ``mask_loss_weight`` weighs BCE + soft Dice against the LM loss.
    """

    model_type = "radgrounder"

    mask_dim: int = 256  # channels of the query/image features the decoder compares
    mask_grid: int = 64  # the decoder predicts at mask_grid x mask_grid, then upsamples bilinearly
    mask_size: int = 224  # output masks are mask_size x mask_size (the model's input size)
    mask_loss_weight: float = 0.1
    mask_threshold: float = 0.5  # on probabilities (sigmoid), never on logits
    seg_close_token_id: int | None = None
    freeze_vision_tower: bool = True  # the recipe trains the projector and the LM, not SigLIP


def _token_ids(tokenizer: Any) -> dict[str, int]:
    from radground.tokens import SEG_CLOSE

    ids = {
        "vocab_size": len(tokenizer),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "seg_close_token_id": tokenizer.convert_tokens_to_ids(SEG_CLOSE),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    unk = tokenizer.unk_token_id
    for name in ("image_token_index", "seg_close_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        if ids[name] is None or (ids[name] == unk and name in ("image_token_index", "seg_close_token_id")):
            raise ConfigError(
                f"tokenizer has no id for {name}; build it with RadGrounderProcessor, which adds "
                "<image>, the loc/seg tokens and the grounding markup"
            )
    return ids


def tiny_config(tokenizer: Any, **overrides: Any) -> RadGrounderConfig:
    """The ``tiny`` preset for a processor's tokenizer (call after the processor added its tokens)."""
    ids = _token_ids(tokenizer)
    hidden = 64
    vision = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=14, vision_use_head=False,
    )
    text = Gemma2Config(
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, vocab_size=ids["vocab_size"],
        max_position_embeddings=1024, sliding_window=512,
        pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
    )
    kwargs = {
        "vision_config": vision, "text_config": text, "projection_dim": hidden, "hidden_size": hidden,
        "image_token_index": ids["image_token_index"], "vocab_size": ids["vocab_size"],
        "seg_close_token_id": ids["seg_close_token_id"], "mask_dim": 32, "mask_grid": 56,
        "freeze_vision_tower": False,  # random init: nothing to keep frozen
        "pad_token_id": ids["pad_token_id"], "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
    }
    kwargs.update(overrides)
    return _with_eager(RadGrounderConfig(**kwargs))


def paligemma2_3b_224_config(vocab_size: int = 257216, **overrides: Any) -> RadGrounderConfig:
    """PaliGemma-2 3B at 224 px with NO weights (≈3.03 B parameters): the architecture for benchmarks.

    The numbers are google/paligemma2-3b-pt-224's: SigLIP So400m/14 and Gemma2 2B, with its embedding
    table of 257216 rows (the tokenizer's 257152 tokens plus spare rows, where the six grounding markup
    tokens the processor adds land). ``seg_close_token_id`` is a placeholder id here.
    """
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=224, patch_size=14, vision_use_head=False, projection_dim=2304,
    )
    text = Gemma2Config(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=vocab_size,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    kwargs = {
        "vision_config": vision, "text_config": text, "projection_dim": 2304, "hidden_size": 2304,
        "image_token_index": 257152, "vocab_size": vocab_size, "seg_close_token_id": vocab_size - 1,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
    }
    kwargs.update(overrides)
    return _with_eager(RadGrounderConfig(**kwargs))


def paligemma_path(settings: Any) -> Path:
    """The checked local PaliGemma folder of ``settings.model.paligemma_path``; ConfigError naming the setting."""
    path = settings.model.paligemma_path
    if path is None:
        raise ConfigError(
            "model.paligemma_path is not set, and the paligemma2-3b-224 preset needs a local PaliGemma-2 "
            f"checkpoint folder (radground never downloads weights). Set {ENV_PALIGEMMA_PATH}=/path/to/"
            "paligemma2-3b-pt-224 (or model.paligemma_path in the --config YAML), or use --preset tiny."
        )
    path = Path(path).expanduser()
    missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).is_file()]
    if not path.is_dir() or missing:
        what = "does not exist or is not a folder" if not path.is_dir() else f"lacks {', '.join(missing)}"
        raise ConfigError(
            f"model.paligemma_path ({ENV_PALIGEMMA_PATH}) = {path} {what}. Point it at a local PaliGemma-2 "
            "checkpoint folder with config.json, the safetensors weights and the tokenizer files."
        )
    return path


def paligemma_config(path: Path, tokenizer: Any, **overrides: Any) -> RadGrounderConfig:
    """The ``paligemma2-3b-224`` preset: the folder's PaliGemma config with the processor's token ids
    (vocabulary size still the checkpoint's: see ``modeling.build``)."""
    base = PaliGemmaConfig.from_pretrained(str(path), local_files_only=True)
    ids = _token_ids(tokenizer)
    data = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    # The checkpoint's embedding size stays as it is here (a different size would re-initialise the
    # pretrained embeddings on load); ``modeling.build`` grows it afterwards if the tokenizer outgrew it.
    # PaliGemma-2's table has spare rows past its tokenizer, where the markup tokens land.
    data.update(
        vocab_size=data["text_config"]["vocab_size"], image_token_index=ids["image_token_index"],
        seg_close_token_id=ids["seg_close_token_id"],
    )
    data.update(overrides)
    return _with_eager(RadGrounderConfig(**data))


def _with_eager(config: RadGrounderConfig) -> RadGrounderConfig:
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config
