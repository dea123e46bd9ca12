"""What every segmentation backend speaks.

A backend gets one whole series (a 3D backend sees the volume once) and returns one
integer label mask per slice in the merged 121-class space of radground.labels
(0 = background), on exactly the DICOM pixel grid of that slice: mask[k, i, j] labels
pixel (row i, column j) of slice k as the images table stores it. Backends are chosen
by name in settings (``segmentation.backend``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from radground.errors import SegmentationError
from radground.volume import SeriesVolume

__all__ = ["SegmentationBackend", "SegmentationError", "SeriesVolume", "check_mask", "classes_present"]


@runtime_checkable
class SegmentationBackend(Protocol):
    name: str

    def segment(self, volume: SeriesVolume) -> np.ndarray:
        """(S, H, W) uint8 class ids of the merged label space; 0 = background."""
        ...


def check_mask(volume: SeriesVolume, mask: np.ndarray, backend: str) -> np.ndarray:
    """A backend's output must land on the series' pixel grid with valid class ids."""
    if mask.shape != volume.values.shape:
        raise SegmentationError(f"backend {backend}: mask shape {mask.shape} differs from the series' pixel "
                                f"grid {volume.values.shape}; every mask must lie on the DICOM grid.")
    if mask.size and int(mask.max()) > 121:
        raise SegmentationError(f"backend {backend}: class id {int(mask.max())} outside the label space 0..121")
    return mask.astype(np.uint8, copy=False)


def classes_present(mask: np.ndarray, min_area_px: int) -> Sequence[dict[int, int]]:
    """Per slice: {class id: pixel count} for classes with at least min_area_px pixels."""
    out = []
    for plane in mask:
        ids, counts = np.unique(plane, return_counts=True)
        out.append({int(i): int(c) for i, c in zip(ids, counts, strict=True) if i and c >= min_area_px})
    return out
