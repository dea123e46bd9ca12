"""RadGrounder's processor: PaliGemma's, fed windowed pixels and grounding text from radground/tokens.py.

What it does beyond ``PaliGemmaProcessor`` (facts checked on transformers 5.24):

* Pixels arrive already windowed to [-1, 1] (radground.imaging), float32 ``[3, H, W]``. The image
  processor's resize, rescale and normalise are OFF (they would break such pixels); a non-224 image is
  resized here (bilinear, antialiased) and the image processor has ``image_seq_length`` set.
* Suffixes are grounding text as :mod:`radground.tokens` writes it (512 location bins); they are turned
  into PaliGemma's 1024 ``<locNNNN>`` tokens by ``radground.tokens.to_paligemma_locs`` and generated
  text goes back through ``from_paligemma_locs`` (:meth:`decode`).
* ``max_length`` counts the 256 image tokens; truncation is ``only_second`` (the suffix), never the image
  tokens. ``token_type_ids`` are always returned (0 = image + prefix, attended bidirectionally; 1 = suffix).
  ``labels`` are the suffix ids, -100 on image, prefix and padding: the loss is on the answer only.
* Segmentation targets: ``mask_labels`` float32 ``[N, 224, 224]`` holds the masks of the whole batch
  in the order the ``</seg>`` tokens appear in ``input_ids`` read row by row (sample 0's in text order,
  then sample 1's, …); ``mask_counts`` ``[B]`` is each sample's share. A suffix cut by truncation keeps
  only the masks of the ``</seg>`` tokens that survived.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PaliGemmaProcessor, SiglipImageProcessor
from transformers.feature_extraction_utils import BatchFeature

from radground.tokens import (
    MODEL_MARKUP,
    SEG_CLOSE,
    decode_detection,
    decode_segmentation,
    from_paligemma_locs,
    to_paligemma_locs,
)

from .tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer

IMAGE_SIZE = 224
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256
TEXT_MAX_LENGTH = 200  # the recipe's max length, text tokens only
# A prefix must not smuggle in image tokens or markup; typed text goes through tokens.escape_text.
_FORBIDDEN_IN_PREFIX = ("<image>", "<loc", "<seg", "</seg", "<p", "</p")


def windowed_image_processor() -> SiglipImageProcessor:
    """SigLIP's image processor with every pixel operation off: pixels are windowed to [-1, 1] already."""
    return SiglipImageProcessor(
        do_resize=False, do_rescale=False, do_normalize=False, do_convert_rgb=False,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_seq_length=IMAGE_SEQ_LENGTH,
    )


def resize_pixels(pixels: Any) -> torch.Tensor:
    """One image, float ``[3, H, W]`` in [-1, 1] -> float32 ``[3, 224, 224]`` (bilinear, antialiased)."""
    t = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
    if t.ndim != 3 or t.shape[0] != 3 or not t.is_floating_point():
        raise ValueError(
            f"image of shape {tuple(t.shape)} and dtype {t.dtype}: expected float [3, H, W] windowed to [-1, 1] "
            "(radground.imaging's CT windows or MR scaling)"
        )
    t = t.float()
    if not torch.isfinite(t).all() or t.min() < -1.001 or t.max() > 1.001:
        raise ValueError(
            f"image values span [{t.min().item():.3g}, {t.max().item():.3g}]: expected finite values windowed to "
            "[-1, 1]; window CT / scale MR first"
        )
    if tuple(t.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        t = F.interpolate(t[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    return t.clamp_(-1.0, 1.0).contiguous()


def resize_mask(mask: Any) -> torch.Tensor:
    """One mask, ``[H, W]`` bool/0-1 -> float32 ``[224, 224]`` (nearest neighbour)."""
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if t.ndim != 2:
        raise ValueError(f"mask of shape {tuple(t.shape)}: expected [H, W]")
    t = t.float()
    if tuple(t.shape) != (IMAGE_SIZE, IMAGE_SIZE):
        t = F.interpolate(t[None, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="nearest")[0, 0]
    return (t > 0.5).float()


class RadGrounderProcessor(PaliGemmaProcessor):
    """PaliGemma's processor plus the grounding markup tokens, windowed pixels and mask targets."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)
        # PaliGemma's __init__ added <image>, <loc0000>…<loc1023>, <seg000>…<seg127>; the markup joins them
        # as normal tokens (no-op when loading a saved processor that has them already).
        self.tokenizer.add_tokens(list(MODEL_MARKUP))
        self.seg_close_token_id = self.tokenizer.convert_tokens_to_ids(SEG_CLOSE)

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> RadGrounderProcessor:
        """Wrap a text tokenizer (trained tiny BPE, or PaliGemma's) with the windowed image processor."""
        return cls(image_processor=windowed_image_processor(), tokenizer=tokenizer)

    @classmethod
    def tiny(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> RadGrounderProcessor:
        """The ``tiny`` preset: a byte-level BPE trained on ``texts`` (the dataset's scrubbed text only)."""
        return cls.for_tokenizer(train_tokenizer(texts, vocab_size=vocab_size))

    @classmethod
    def from_paligemma(cls, path: Any) -> RadGrounderProcessor:
        """The ``paligemma2-3b-224`` preset: PaliGemma's tokenizer from a local folder (never downloaded)."""
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls.for_tokenizer(tokenizer)

    # ------------------------------------------------------------------ encoding

    @property
    def default_max_length(self) -> int:
        """Image tokens + the recipe's 200 text tokens (456 at 224 px)."""
        return self.image_seq_length + TEXT_MAX_LENGTH

    def __call__(
        self,
        images: Any = None,
        prefixes: Sequence[str] | None = None,
        suffixes: Sequence[str] | None = None,
        masks: Sequence[Sequence[Any]] | None = None,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Encode a batch. ``images``: float ``[B, 3, H, W]`` or a list of ``[3, H, W]`` in [-1, 1];
        ``prefixes``: prompts (typed text escaped with ``radground.tokens.escape_text``); ``suffixes``:
        grounding text from radground/tokens.py, or None for generation; ``masks``: per sample, its
        masks in the text order of its ``</seg>`` tokens (needed when a suffix has ``</seg>``).
        Returns input_ids, attention_mask, token_type_ids, pixel_values, labels and, with ``masks``,
        mask_labels ``[N, 224, 224]`` and mask_counts ``[B]`` (see the module docstring)."""
        if kwargs:
            raise TypeError(
                f"unexpected arguments {sorted(kwargs)}; pass images, prefixes, suffixes, masks, max_length"
            )
        if images is None or prefixes is None:
            raise ValueError("images and prefixes are both required (one prefix per image)")
        pixels = [resize_pixels(img) for img in images]
        prefixes = list(prefixes)
        if len(pixels) != len(prefixes):
            raise ValueError(f"{len(pixels)} images but {len(prefixes)} prefixes; give one prefix per image")
        for i, prefix in enumerate(prefixes):
            bad = [m for m in _FORBIDDEN_IN_PREFIX if m in prefix]
            if bad:
                raise ValueError(
                    f"prefix {i} contains markup {bad}; prefixes are prompts, and typed text in them must go "
                    "through radground.tokens.escape_text"
                )
        self._refuse_special_strings(prefixes, "prefix")
        if suffixes is not None:
            self._refuse_special_strings(suffixes, "suffix")
        max_length = self.default_max_length if max_length is None else int(max_length)
        text = [self.image_token + p for p in prefixes]
        call: dict[str, Any] = {"padding": "longest", "return_tensors": "pt"}
        if suffixes is not None:
            suffixes = [to_paligemma_locs(s) for s in suffixes]
            if len(suffixes) != len(prefixes):
                raise ValueError(f"{len(suffixes)} suffixes for {len(prefixes)} prefixes; give one each")
            shortest = self.image_seq_length + 3  # image tokens, <bos>, '\n', one suffix token
            if max_length < shortest:
                raise ValueError(f"max_length {max_length} leaves no room for a suffix; it counts the "
                                 f"{self.image_seq_length} image tokens, so use at least {shortest}")
            call.update(truncation="only_second", max_length=max_length)
        try:
            with warnings.catch_warnings():
                # PaliGemma builds its labels with np.array() over torch tensors (numpy 2 warns); they are
                # rebuilt below from token_type_ids and attention_mask.
                warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
                out = super().__call__(images=pixels, text=text, suffix=suffixes, **call)
        except Exception as exc:  # the Rust tokenizer raises a bare Exception
            if "Truncation error" not in str(exc):
                raise
            raise ValueError(
                f"a prompt with its {self.image_seq_length} image tokens fills max_length {max_length}, and only "
                "the suffix may be truncated; shorten the prompt or raise max_length"
            ) from None
        # Loss on the suffix only: -100 on image tokens, <bos>, prompt and padding.
        keep = (out["token_type_ids"] == 1) & (out["attention_mask"] == 1)
        out["labels"] = torch.where(keep, out["input_ids"], torch.full_like(out["input_ids"], -100))
        if masks is not None:
            if suffixes is None:
                raise ValueError("masks need suffixes: the i-th mask pairs with the i-th '</seg>' of the suffix")
            out.update(self._mask_targets(out["input_ids"], suffixes, masks))
        return out

    def _refuse_special_strings(self, texts: Sequence[str], what: str) -> None:
        """A special token's string in text (``<image>``, ``<eos>``, …) would become that token: a shifted
        image-token count or an early end. radground.tokens.escape_text does not cover these, so refuse."""
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        for i, text in enumerate(texts):
            found = sorted({t for t in specials if t in text})
            if found:
                raise ValueError(
                    f"{what} {i} contains the tokenizer's special token text {found}; the model would read it as "
                    "that token. Remove or escape it where the text is built (models.data / radground.tokens)"
                )

    def _mask_targets(self, input_ids: torch.Tensor, suffixes: Sequence[str], masks: Sequence[Sequence[Any]]):
        if len(masks) != len(suffixes):
            raise ValueError(f"{len(masks)} mask lists for {len(suffixes)} samples; give one list per sample "
                             "(empty when the suffix has no '</seg>')")
        kept: list[torch.Tensor] = []
        counts: list[int] = []
        for i, (suffix, sample_masks) in enumerate(zip(suffixes, masks, strict=True)):
            sample_masks = list(sample_masks) if sample_masks is not None else []
            in_text = suffix.count(SEG_CLOSE)  # exact: typed text was escaped, so '</seg>' is only markup
            if in_text != len(sample_masks):
                raise ValueError(
                    f"sample {i}: its suffix has {in_text} '</seg>' but {len(sample_masks)} masks were given; "
                    "give one mask per <seg> span, in text order"
                )
            survived = int((input_ids[i] == self.seg_close_token_id).sum())  # truncation may cut the tail
            counts.append(survived)
            kept += [resize_mask(m) for m in sample_masks[:survived]]
        mask_labels = torch.stack(kept) if kept else torch.zeros((0, IMAGE_SIZE, IMAGE_SIZE))
        return {"mask_labels": mask_labels, "mask_counts": torch.tensor(counts, dtype=torch.long)}

    def collate(self, samples: Sequence[Mapping[str, Any]], max_length: int | None = None) -> BatchFeature:
        """Batch samples of ``models.data``: ``{pixel_values [3,224,224] in [-1,1], prefix, suffix, masks,
        language, task}``; ``masks`` (bool ``[224, 224]`` arrays in the text order of ``</seg>``) may be
        missing or empty on samples without segmentation. Extra keys are ignored."""
        return self(
            images=[s["pixel_values"] for s in samples],
            prefixes=[s["prefix"] for s in samples],
            suffixes=[s["suffix"] for s in samples],
            masks=[list(s.get("masks") or []) for s in samples],
            max_length=max_length,
        )

    # ------------------------------------------------------------------ decoding

    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        """Generated ids -> grounding text in radground/tokens.py's 512 bins (special tokens dropped)."""
        kwargs.setdefault("skip_special_tokens", True)
        text = self.tokenizer.decode(token_ids, **kwargs)
        return from_paligemma_locs(text)

    @staticmethod
    def parse_detection(text: str, width: int = IMAGE_SIZE, height: int = IMAGE_SIZE):
        """Decoded text -> (plain sentence, GroundedSpans with pixel boxes); TokenDecodeError if malformed."""
        return decode_detection(text, width, height)

    @staticmethod
    def parse_segmentation(text: str):
        """Decoded text -> (plain sentence, (start, end) spans in text order); TokenDecodeError if malformed."""
        return decode_segmentation(text)
