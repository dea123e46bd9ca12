"""RadGrounder: PaliGemma plus a light mask decoder, split like a transformers model.

``configuration`` (config + presets), ``tokenizer`` (the tiny preset's byte-level BPE), ``processing``
(pixels, prompts, grounding text, labels, mask targets) and ``modeling`` (the model, its loss and
``predict``). :func:`build` makes a (model, processor) pair for a preset.
"""

from .configuration import PRESETS, RadGrounderConfig, paligemma2_3b_224_config, tiny_config
from .modeling import GroundedPrediction, MaskDecoder, RadGrounderForConditionalGeneration, build
from .processing import RadGrounderProcessor

__all__ = [
    "PRESETS",
    "GroundedPrediction",
    "MaskDecoder",
    "RadGrounderConfig",
    "RadGrounderForConditionalGeneration",
    "RadGrounderProcessor",
    "build",
    "paligemma2_3b_224_config",
    "tiny_config",
]


def _register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForImageTextToText / AutoProcessor load a saved RadGrounder folder."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    AutoConfig.register(RadGrounderConfig.model_type, RadGrounderConfig, exist_ok=True)
    AutoModelForImageTextToText.register(RadGrounderConfig, RadGrounderForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(RadGrounderConfig, RadGrounderProcessor, exist_ok=True)


_register_auto_classes()
