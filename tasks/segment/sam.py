"""Refine a coarse label mask with box-prompted Segment Anything (SAM / MedSAM).

Per slice the image embedding is computed once; every class present in the coarse mask
of that slice becomes one box prompt (its bounding box), and the prompts go through the
mask decoder ``sam_batch_size`` at a time. A refined mask replaces the coarse one only
where it agrees with it (IoU >= ``segmentation.sam_min_iou``); otherwise the coarse mask
stays and is counted. Weights come from a local checkpoint only; nothing is downloaded.

Box convention: ``[x_min, y_min, x_max, y_max]`` in pixel indices of the slice, max
inclusive (x = column, y = row), as segment-anything's own ``batched_mask_to_box`` and
MedSAM build them. A refined mask is clipped to its prompt box: a box prompt bounds the
object, and leaking past it onto a neighbour of similar intensity is SAM's usual failure.

MedSAM checkpoints load the same way (same architecture), but MedSAM was trained with a
square 1024 resize and [0, 1] scaling instead of SamPredictor's longest-side resize and
ImageNet normalisation; expect it to work less well here than in MedSAM's own pipeline.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from radground.imaging import normalize
from radground.settings import SegmentationSettings
from tasks.segment.base import SegmentationError, SeriesVolume, check_mask

log = logging.getLogger(__name__)

_CHECKPOINT_HINT = ("Download a segment-anything (or MedSAM) checkpoint of that architecture and set "
                    "segmentation.sam_checkpoint (env RADGROUND_SEGMENTATION__SAM_CHECKPOINT) to the local "
                    "file, or drop 'sam' from segmentation.backend. radground never downloads weights.")


def render_slice(values: np.ndarray, modality: str) -> np.ndarray:
    """(H, W) HU or raw MR -> (H, W, 3) uint8 for SAM: CT windows as R, G, B (lung, soft tissue,
    brain); MR per-image min-max grey repeated."""
    if modality not in ("CT", "MR"):
        raise SegmentationError(f"backend sam: modality {modality!r}; expected CT or MR.")
    channels = normalize(values, modality)  # (3, H, W) in [-1, 1]
    return np.rint((channels.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)  # (H, W, 3)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x_min, y_min, x_max, y_max) of a non-empty (H, W) boolean mask, max inclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SegmentationError("backend sam: segmentation.device = 'cuda' but torch sees no CUDA device. "
                                "Set segmentation.device to 'auto' or 'cpu'.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_sam(settings: SegmentationSettings) -> torch.nn.Module:
    """Build ``settings.sam_model`` and load the local checkpoint (CPU first, tensors only)."""
    from segment_anything import sam_model_registry

    path = settings.sam_checkpoint
    if path is None:
        raise SegmentationError(f"backend sam: segmentation.sam_checkpoint is not set. {_CHECKPOINT_HINT}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise SegmentationError(f"backend sam: segmentation.sam_checkpoint = {path} does not exist or is not "
                                f"a file. {_CHECKPOINT_HINT}")
    try:
        # map_location: checkpoints saved on a GPU must load on CPU-only hosts; weights_only:
        # a checkpoint is data, never code to execute.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise SegmentationError(f"backend sam: segmentation.sam_checkpoint = {path} cannot be read as a torch "
                                f"state dict ({type(exc).__name__}: {exc}). {_CHECKPOINT_HINT}") from None
    # The registry builds the architecture; loading ourselves adds map_location and weights_only.
    model = sam_model_registry[settings.sam_model](checkpoint=None)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise SegmentationError(f"backend sam: checkpoint {path} does not fit segmentation.sam_model = "
                                f"{settings.sam_model!r} ({str(exc)[:300]}). Set segmentation.sam_model to the "
                                "checkpoint's architecture (vit_b, vit_l or vit_h).") from None
    return model


def box_probabilities(predictor, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, 4) pixel boxes of the slice -> (B, H, W) float32 mask probabilities on the slice grid.

    ``predictor`` holds the slice's embedding (``set_image`` done). Not clipped to the boxes.
    """
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=predictor.device)
    transformed = predictor.transform.apply_boxes_torch(boxes_t, size)  # slice pixels -> SAM input frame
    logits, _, _ = predictor.predict_torch(point_coords=None, point_labels=None, boxes=transformed,
                                           multimask_output=False, return_logits=True)  # (B, 1, H, W)
    # Probabilities, not logits (docs/method.md): they are bounded and comparable across classes, so
    # they also settle overlaps below; thresholding raw logits at 0.5 (the reference code's bug)
    # would silently mean p >= 0.62.
    return torch.sigmoid(logits[:, 0].float()).cpu().numpy()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


class SamRefiner:
    """Box-prompted SAM refinement of a previous backend's label mask."""

    name = "sam"

    def __init__(self, settings: SegmentationSettings, model: torch.nn.Module | None = None) -> None:
        from segment_anything import SamPredictor

        self.settings = settings
        self.device = _resolve_device(settings.device)
        model = load_sam(settings) if model is None else model  # a given model (tests) bypasses loading
        self.model = model.to(self.device).eval()
        self.predictor = SamPredictor(self.model)

    def refine(self, volume: SeriesVolume, coarse: np.ndarray) -> tuple[np.ndarray, dict]:
        """(S, H, W) coarse class ids -> (refined (S, H, W) uint8 on the same grid, stats).

        stats: ``slices`` embedded (slices with at least one class), ``prompts`` (one per class
        and slice), ``kept_refined`` and ``kept_coarse`` (refinement disagreed: IoU < sam_min_iou).
        """
        coarse = check_mask(volume, np.asarray(coarse), self.name)
        if volume.modality not in ("CT", "MR"):
            raise SegmentationError(f"backend sam: series modality {volume.modality!r}; expected CT or MR.")
        started = time.perf_counter()
        out = np.zeros_like(coarse)
        stats = {"slices": 0, "prompts": 0, "kept_refined": 0, "kept_coarse": 0}
        with torch.inference_mode():
            for k in range(coarse.shape[0]):
                classes = [int(c) for c in np.unique(coarse[k]) if c]
                if not classes:
                    continue
                out[k] = self._refine_slice(volume.values[k], volume.modality, coarse[k], classes, stats)
                stats["slices"] += 1
        log.info("sam: %d/%d slices, %d prompts, %d refined, %d coarse kept (IoU < %.2f), %.1f s",
                 stats["slices"], coarse.shape[0], stats["prompts"], stats["kept_refined"],
                 stats["kept_coarse"], self.settings.sam_min_iou, time.perf_counter() - started)
        return check_mask(volume, out, self.name), stats

    def _refine_slice(self, values: np.ndarray, modality: str, coarse: np.ndarray, classes: list[int],
                      stats: dict) -> np.ndarray:
        size = coarse.shape  # (H, W)
        self.predictor.set_image(render_slice(values, modality))  # the one embedding of this slice
        boxes = np.array([bounding_box(coarse == c) for c in classes], dtype=np.float32)  # (C, 4)
        label = np.zeros(size, dtype=np.uint8)
        best = np.full(size, -1.0, dtype=np.float32)  # probability of the class holding each pixel
        step = self.settings.sam_batch_size
        for start in range(0, len(classes), step):
            probs = box_probabilities(self.predictor, boxes[start:start + step], size)  # (B, H, W)
            for c, box, prob in zip(classes[start:start + step], boxes[start:start + step], probs, strict=True):
                x0, y0, x1, y1 = (int(v) for v in box)
                inside = np.zeros(size, dtype=bool)
                inside[y0:y1 + 1, x0:x1 + 1] = True
                refined = (prob >= 0.5) & inside
                reference = coarse == c
                if _iou(refined, reference) >= self.settings.sam_min_iou:
                    chosen = refined
                    stats["kept_refined"] += 1
                else:
                    chosen = reference
                    stats["kept_coarse"] += 1
                stats["prompts"] += 1
                # Overlaps: per pixel the class with the higher probability wins; classes come in
                # ascending id and ties keep the earlier one, so the result is deterministic.
                win = chosen & (prob > best)
                label[win] = c
                best[win] = prob[win]
        return label
