"""What every segmentation backend speaks.

A backend gets one whole series (a 3D backend sees the volume once) and returns one
integer label mask per slice in the merged 121-class space of radground.labels
(0 = background), on exactly the DICOM pixel grid of that slice: mask[k, i, j] labels
pixel (row i, column j) of slice k as the images table stores it. Backends are chosen
by name in settings (``segmentation.backend``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from radground.errors import RadgroundError


@dataclass(frozen=True)
class SeriesVolume:
    """One series as the images table holds it, slices sorted along the normal."""

    image_ids: tuple[str, ...]  # (S,)
    modality: str  # "CT" | "MR"
    values: np.ndarray  # (S, H, W): CT in HU (int16), MR raw (uint16)
    orientation: tuple[float, ...]  # ImageOrientationPatient: row cosines (3) then column cosines (3)
    positions: np.ndarray  # (S, 3) ImagePositionPatient per slice, mm (LPS)
    spacing: tuple[float, float]  # (row spacing, column spacing), mm

    def __post_init__(self) -> None:
        if self.values.ndim != 3 or len(self.image_ids) != self.values.shape[0]:
            raise ValueError(f"values must be (S, H, W) with S = {len(self.image_ids)} image ids; "
                             f"got shape {self.values.shape}")

    @property
    def row_direction(self) -> np.ndarray:
        """Patient-space direction of increasing column index (along a row)."""
        return np.asarray(self.orientation[:3], dtype=np.float64)

    @property
    def column_direction(self) -> np.ndarray:
        """Patient-space direction of increasing row index (down a column)."""
        return np.asarray(self.orientation[3:], dtype=np.float64)


@runtime_checkable
class SegmentationBackend(Protocol):
    name: str

    def segment(self, volume: SeriesVolume) -> np.ndarray:
        """(S, H, W) uint8 class ids of the merged label space; 0 = background."""
        ...


class SegmentationError(RadgroundError):
    """A backend cannot run (missing package, weights, or an unusable volume)."""


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
