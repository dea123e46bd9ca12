"""Pixel arrays for the model: CT windows and MR min-max scaling (docs/method.md, "Images").

Pure array functions. CT becomes three channels, one per window, each in [-1, 1];
MR is min-max scaled per image to [-1, 1] and repeated to three channels.
"""

from __future__ import annotations

import numpy as np

CT_FLOOR_HU = -1000.0  # below is air or padding; clipped before windowing

#: name -> (width, level) in HU, in channel order.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (2250.0, -100.0),  # -1225 … 1025 HU
    "soft_tissue": (350.0, 40.0),  # -135 … 215 HU
    "brain": (80.0, 40.0),  # 0 … 80 HU
}


def pixels_from_bytes(data: bytes, dtype: str, rows: int, cols: int) -> np.ndarray:
    """The (rows, cols) array of an images-table row (little-endian, row-major)."""
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != rows * cols:
        raise ValueError(f"pixel bytes hold {array.size} values; expected rows*cols = {rows}*{cols}")
    return array.reshape(rows, cols)


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map [level - width/2, level + width/2] linearly to [-1, 1], clipping outside."""
    low = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - low) / width
    return np.clip(scaled, 0.0, 1.0) * 2.0 - 1.0


def normalize_ct(hu: np.ndarray) -> np.ndarray:
    """(H, W) Hounsfield units -> (3, H, W) float32: lung, soft-tissue, brain windows."""
    clipped = np.maximum(np.asarray(hu, dtype=np.float32), CT_FLOOR_HU)
    return np.stack([window(clipped, w, lvl) for w, lvl in CT_WINDOWS.values()]).astype(np.float32)


def normalize_mr(values: np.ndarray) -> np.ndarray:
    """(H, W) raw MR -> (3, H, W) float32, per-image min-max to [-1, 1]; a flat image gives zeros."""
    x = np.asarray(values, dtype=np.float32)
    low, high = float(x.min()), float(x.max())
    scaled = np.zeros_like(x) if high == low else (x - low) / (high - low) * 2.0 - 1.0
    return np.repeat(scaled[None], 3, axis=0)


def normalize(values: np.ndarray, modality: str) -> np.ndarray:
    if modality == "CT":
        return normalize_ct(values)
    if modality == "MR":
        return normalize_mr(values)
    raise ValueError(f"modality {modality!r}: expected CT or MR")
