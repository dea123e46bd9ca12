"""RadGrounder: ``PaliGemmaForConditionalGeneration`` plus a light mask decoder (DOMAIN.md, Model).

Mask decoder: the language model's last hidden state at each ``</seg>`` token is a query; the last
hidden states at the 256 image-token positions (SigLIP features after the projector and the language
model, which saw the prompt through PaliGemma's bidirectional prefix) are the image features. Both are
projected to ``mask_dim`` channels; the 16x16 image grid is upsampled to ``mask_grid`` and refined by two
3x3 convolutions; the mask logits are the scaled dot product of query and features at every cell,
upsampled bilinearly to 224x224. Probabilities are ``sigmoid(logits)``; a mask is ``prob >= 0.5``.

Loss: LM cross-entropy on the suffix (labels) + ``mask_loss_weight`` (0.1) x (BCE + soft Dice) over the
masks given. The i-th ``</seg>`` of the batch (row by row, text order within a row) pairs with the i-th
entry of ``mask_labels``. In training, a zero-weighted sum over the mask decoder's parameters is added
so that DDP sees a gradient for every parameter on batches without ``<seg>``.

Attention is ``eager``: Gemma2 refuses ``sdpa`` and flash attention drops the prefix mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PaliGemmaForConditionalGeneration
from transformers.models.paligemma.modeling_paligemma import PaliGemmaCausalLMOutputWithPast

from radground.errors import ConfigError, TokenDecodeError
from radground.tokens import pair_masks

from .configuration import (
    ATTN_IMPLEMENTATION,
    PRESETS,
    RadGrounderConfig,
    paligemma_config,
    paligemma_path,
    tiny_config,
)
from .processing import RadGrounderProcessor


@dataclass
class RadGrounderOutput(PaliGemmaCausalLMOutputWithPast):
    """PaliGemma's output plus the mask logits ``[N, 224, 224]`` (one per ``</seg>``) and the loss parts."""

    mask_logits: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None


class MaskDecoder(nn.Module):
    """Query (hidden state at ``</seg>``) x image features -> mask logits at ``mask_size`` x ``mask_size``."""

    def __init__(self, config: RadGrounderConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        d = config.mask_dim
        self.grid_in = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = config.mask_grid
        self.size = config.mask_size
        self.scale = 1.0 / math.sqrt(d)
        self.query = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d), nn.GELU(), nn.Linear(d, d))
        self.image = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d))
        self.refine = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU(), nn.Conv2d(d, d, 3, padding=1))
        self.bias = nn.Parameter(torch.zeros(1))

    def image_features(self, image_states: torch.Tensor) -> torch.Tensor:
        """``[B, grid_in**2, hidden]`` -> ``[B, d, grid, grid]``."""
        b, n, _ = image_states.shape
        if n != self.grid_in**2:
            raise ValueError(f"{n} image tokens per sample; the mask decoder expects {self.grid_in ** 2}")
        feats = self.image(image_states).transpose(1, 2).reshape(b, -1, self.grid_in, self.grid_in)
        feats = F.interpolate(feats, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return feats + self.refine(feats)

    def forward(self, queries: torch.Tensor, image_states: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        """``queries [N, hidden]``, ``image_states [B, T, hidden]``, ``sample_index [N]`` (the sample of
        each query) -> mask logits ``[N, size, size]``."""
        feats = self.image_features(image_states)[sample_index]  # [N, d, g, g]
        q = self.query(queries)
        logits = torch.einsum("nd,ndhw->nhw", q, feats) * self.scale + self.bias
        return F.interpolate(logits[:, None], size=(self.size, self.size), mode="bilinear", align_corners=False)[:, 0]


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE (mean over pixels and masks) + soft Dice (mean over masks) for ``[N, H, W]`` logits/targets."""
    logits = logits.float()
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probs = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    dice = 1.0 - (2.0 * (probs * t).sum(1) + 1.0) / (probs.sum(1) + t.sum(1) + 1.0)
    return bce + dice.mean()


@dataclass
class GroundedPrediction:
    """One generated answer. ``text`` is in radground/tokens.py's form (512 bins); ``plain`` the sentence
    without markup; ``spans`` the GroundedSpans (detection, boxes in pixels of 224x224) or (start, end)
    spans (segmentation); ``masks`` bool ``[224, 224]`` arrays paired with the spans, ``mask_probs`` their
    sigmoid probabilities. ``error`` says why a malformed prediction was dropped (spans/masks empty)."""

    text: str
    plain: str | None = None
    spans: list = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    mask_probs: list[np.ndarray] = field(default_factory=list)
    error: str | None = None


class RadGrounderForConditionalGeneration(PaliGemmaForConditionalGeneration):
    """PaliGemma + :class:`MaskDecoder`; ``forward`` takes ``mask_labels`` (and ``mask_counts``) from
    :class:`RadGrounderProcessor` and returns :class:`RadGrounderOutput`."""

    config_class = RadGrounderConfig
    config: RadGrounderConfig
    _supports_sdpa = False  # Gemma2 refuses sdpa
    _supports_flex_attn = False

    def __init__(self, config: RadGrounderConfig):
        config._attn_implementation = ATTN_IMPLEMENTATION
        super().__init__(config)
        self.mask_decoder = MaskDecoder(config)
        self.post_init()
        if config.freeze_vision_tower:
            self.model.vision_tower.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)
        model = super().from_pretrained(*args, **kwargs)
        if model.config.freeze_vision_tower:
            model.model.vision_tower.requires_grad_(False)
        return model

    # ------------------------------------------------------------------ forward

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _seg_positions(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.seg_close_token_id is None:
            raise ConfigError("config.seg_close_token_id is unset; build the config from the processor's tokenizer")
        rows, cols = (input_ids == self.config.seg_close_token_id).nonzero(as_tuple=True)  # row-major = text order
        return rows, cols

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mask_labels: torch.Tensor | None = None,
        mask_counts: torch.Tensor | None = None,
        return_masks: bool = False,
        logits_on_labels_only: bool = False,
        **kwargs: Any,
    ) -> RadGrounderOutput:
        """PaliGemma's forward; with ``mask_labels`` (or ``return_masks``) also the mask logits at each ``</seg>``.

        ``logits_on_labels_only`` (training): the LM head runs only at positions whose next token has a
        label, and ``logits`` is ``[M, V]`` for those positions (row-major); the loss is the same."""
        if pixel_values is not None and input_ids is not None and token_type_ids is None and cache is None:
            raise ValueError(
                "token_type_ids are missing: without them the prompt attends causally and nothing warns; "
                "pass the processor's token_type_ids"
            )
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # gradient accumulation's token count
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids,
            attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden = outputs.last_hidden_state
        vocab = self.config.text_config.vocab_size
        lm_loss = None
        if labels is not None and logits_on_labels_only:
            # The LM head only where a next token is scored: ~22 % fewer FLOPs at 3B, no [B, T, V] logits.
            targets = labels[:, 1:]
            where = targets != -100
            logits = self._lm_logits(hidden[:, :-1][where])  # [M, V], row-major over (sample, position)
            chosen = targets[where]
            lm_loss = F.cross_entropy(logits.float(), chosen, reduction="sum")
            lm_loss = lm_loss / (num_items_in_batch if num_items_in_batch is not None else max(chosen.numel(), 1))
        else:
            if isinstance(logits_to_keep, torch.Tensor):
                kept = hidden[:, logits_to_keep]
            else:
                kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self._lm_logits(kept)
            if labels is not None:
                lm_loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=vocab, num_items_in_batch=num_items_in_batch
                )

        mask_logits = None
        want_masks = mask_labels is not None or return_masks
        if want_masks:
            if input_ids is None or pixel_values is None:
                raise ValueError("masks need input_ids and pixel_values in the same call (a full, uncached pass)")
            rows, cols = self._seg_positions(input_ids)
            if mask_labels is not None and mask_labels.shape[0] != rows.numel():
                raise ValueError(
                    f"{mask_labels.shape[0]} mask_labels for {rows.numel()} '</seg>' tokens in input_ids; they pair "
                    "one to one in text order (use RadGrounderProcessor's mask_labels)"
                )
            if mask_counts is not None and mask_counts.sum().item() != rows.numel():
                raise ValueError(
                    f"mask_counts sum to {int(mask_counts.sum())} but input_ids hold {rows.numel()} '</seg>'"
                )
            if rows.numel():
                image_mask = input_ids == self.config.image_token_id
                image_states = hidden[image_mask].reshape(hidden.shape[0], -1, hidden.shape[-1])
                mask_logits = self.mask_decoder(hidden[rows, cols], image_states, rows)
            else:
                mask_logits = hidden.new_zeros((0, self.config.mask_size, self.config.mask_size))

        loss = None
        m_loss = None
        if lm_loss is not None:
            loss = lm_loss
            if mask_labels is not None and mask_logits is not None and mask_logits.shape[0]:
                m_loss = mask_loss(mask_logits, mask_labels.to(mask_logits.device))
                loss = loss + self.config.mask_loss_weight * m_loss
            if self.training:
                # DDP needs a gradient on every parameter, also on batches without <seg>: a zero-weighted term.
                loss = loss + 0.0 * sum(p.sum() for p in self.mask_decoder.parameters())

        return RadGrounderOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_outputs=outputs.image_outputs,
            mask_logits=mask_logits, lm_loss=lm_loss, mask_loss=m_loss,
        )

    # ------------------------------------------------------------------ prediction

    @torch.no_grad()
    def predict(
        self,
        processor: RadGrounderProcessor,
        image: Any,
        prefix: str,
        task: str = "text",
        max_new_tokens: int = 64,
    ) -> GroundedPrediction:
        """Greedy generation for one image, decoded through radground/tokens.py.

        ``task``: ``"text"`` (report / VQA), ``"detection"`` (boxes) or ``"segmentation"`` (masks: one
        more full pass over prompt + answer gives the hidden state at each generated ``</seg>``).
        """
        if task not in ("text", "detection", "segmentation"):
            raise ValueError(f"task {task!r}: expected text, detection or segmentation")
        enc = processor(images=[image], prefixes=[prefix])
        enc = {k: v.to(self.device) for k, v in enc.items() if k != "labels"}
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        prompt_len = enc["input_ids"].shape[1]
        generated = self.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        return self.decode_prediction(processor, enc, generated[0, prompt_len:], task)

    @torch.no_grad()
    def decode_prediction(
        self, processor: RadGrounderProcessor, enc: dict[str, torch.Tensor], new_ids: torch.Tensor, task: str
    ) -> GroundedPrediction:
        """Generated ids of one sample (after its prompt ``enc``) -> :class:`GroundedPrediction`."""
        text = processor.decode(new_ids)
        if task == "text":
            return GroundedPrediction(text=text, plain=text)
        try:
            if task == "detection":
                plain, spans = processor.parse_detection(text)
                return GroundedPrediction(text=text, plain=plain, spans=list(spans))
            plain, seg_spans = processor.parse_segmentation(text)
        except TokenDecodeError as exc:
            return GroundedPrediction(text=text, error=str(exc))
        new_ids = new_ids.to(enc["input_ids"].device)[None]
        full = torch.cat([enc["input_ids"], new_ids], dim=1)
        out = self(
            input_ids=full, pixel_values=enc["pixel_values"],
            attention_mask=torch.ones_like(full),
            token_type_ids=torch.cat([enc["token_type_ids"], torch.ones_like(new_ids)], dim=1),
            return_masks=True,
        )
        probs = torch.sigmoid(out.mask_logits.float()).cpu().numpy()  # threshold probabilities, not logits
        masks = [p >= self.config.mask_threshold for p in probs]
        try:
            pairs = pair_masks(seg_spans, masks)
        except TokenDecodeError as exc:
            return GroundedPrediction(text=text, plain=plain, error=str(exc))
        return GroundedPrediction(
            text=text, plain=plain, spans=[s for s, _ in pairs], masks=[m for _, m in pairs], mask_probs=list(probs)
        )


def build(
    preset: str, *, texts: Any = None, settings: Any = None, vocab_size: int | None = None
) -> tuple[RadGrounderForConditionalGeneration, RadGrounderProcessor]:
    """(model, processor) for a preset. ``tiny``: ``texts`` = the dataset's scrubbed text (the tokenizer is
    trained on it; random weights). ``paligemma2-3b-224``: ``settings.model.paligemma_path`` (never downloads)."""
    if preset == "tiny":
        if texts is None:
            raise ValueError("the tiny preset trains its tokenizer on the dataset's scrubbed text: pass texts=")
        processor = (RadGrounderProcessor.tiny(texts) if vocab_size is None
                     else RadGrounderProcessor.tiny(texts, vocab_size=vocab_size))
        return RadGrounderForConditionalGeneration(tiny_config(processor.tokenizer)), processor
    if preset == "paligemma2-3b-224":
        if settings is None:
            from radground.settings import load_settings

            settings = load_settings()
        path = paligemma_path(settings)
        processor = RadGrounderProcessor.from_paligemma(path)
        config = paligemma_config(path, processor.tokenizer)
        model = RadGrounderForConditionalGeneration.from_pretrained(
            str(path), config=config, local_files_only=True, dtype=torch.bfloat16
        )
        rows = len(processor.tokenizer)
        if model.get_input_embeddings().weight.shape[0] < rows:  # the tokenizer outgrew the embedding table
            model.resize_token_embeddings(rows, mean_resizing=True)
            model.config.text_config.vocab_size = model.config.vocab_size = rows
        return model, processor
    raise ConfigError(f"model preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")


__all__ = ["GroundedPrediction", "MaskDecoder", "RadGrounderForConditionalGeneration", "RadGrounderOutput", "build",
           "mask_loss"]
