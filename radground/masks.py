"""Binary masks as COCO RLE (pycocotools), their boxes and connected components.

Pure array functions. Conventions, shared by MaskRecord and GroundingRecord:
- a mask is (H, W) bool on the DICOM pixel grid: mask[row, col];
- RLE is pycocotools' compressed counts string of the column-major (Fortran) mask,
  so any COCO tool decodes it with size [H, W];
- a box is [x1, y1, x2, y2] in pixels with x = column and y = row; x1/y1 inclusive,
  x2/y2 EXCLUSIVE, so x2 - x1 is the width in pixels (a single pixel at (r, c) is
  [c, r, c + 1, r + 1]).
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask
from scipy import ndimage

# 8-connectivity: pixels touching at a corner belong to one component. A thin oblique
# structure (a rib, a vessel) rasterises into diagonal steps; 4-connectivity would split it.
_EIGHT = np.ones((3, 3), dtype=bool)


def _check_2d(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2D (H, W); got shape {array.shape}")
    return array


def encode_rle(mask: np.ndarray) -> str:
    """(H, W) bool mask -> COCO compressed RLE counts (column-major), as a str."""
    array = _check_2d(mask).astype(bool)
    # pycocotools wants (H, W, N) or (H, W) uint8 in Fortran order; it reads column-major runs.
    encoded = coco_mask.encode(np.asfortranarray(array.astype(np.uint8)))
    return encoded["counts"].decode("ascii")


def decode_rle(counts: str, rows: int, cols: int) -> np.ndarray:
    """COCO compressed RLE counts -> (rows, cols) bool mask."""
    if rows <= 0 or cols <= 0:
        raise ValueError(f"RLE size must be positive; got rows={rows}, cols={cols}")
    decoded = coco_mask.decode({"size": [int(rows), int(cols)], "counts": counts.encode("ascii")})
    return np.ascontiguousarray(decoded, dtype=bool)


def rle_area(counts: str, rows: int, cols: int) -> int:
    """Foreground pixel count of an RLE, without decoding it."""
    return int(coco_mask.area({"size": [int(rows), int(cols)], "counts": counts.encode("ascii")}))


def bbox_of(mask: np.ndarray) -> list[float] | None:
    """[x1, y1, x2, y2] (x = column, y = row, x2/y2 exclusive) of the foreground; None if empty."""
    array = _check_2d(mask).astype(bool)
    rows = np.flatnonzero(array.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(array.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def components(mask: np.ndarray, min_area_px: int = 1) -> list[np.ndarray]:
    """Connected components (8-connectivity) with >= min_area_px pixels, as (H, W) bool masks.

    Order is deterministic: raster order of each component's first pixel (top row first,
    then leftmost), which is the order scipy.ndimage.label numbers them in.
    """
    array = _check_2d(mask).astype(bool)
    labelled, count = ndimage.label(array, structure=_EIGHT)
    if count == 0:
        return []
    areas = np.bincount(labelled.ravel(), minlength=count + 1)
    return [labelled == k for k in range(1, count + 1) if areas[k] >= min_area_px]


def component_boxes(mask: np.ndarray, min_area_px: int = 1) -> list[list[float]]:
    """One [x1, y1, x2, y2] box (x2/y2 exclusive) per connected component, in components() order."""
    array = _check_2d(mask).astype(bool)
    labelled, count = ndimage.label(array, structure=_EIGHT)
    if count == 0:
        return []
    areas = np.bincount(labelled.ravel(), minlength=count + 1)
    boxes = []
    for k, slices in enumerate(ndimage.find_objects(labelled), start=1):
        if areas[k] >= min_area_px:
            rs, cs = slices  # find_objects gives half-open slices: exactly the exclusive convention
            boxes.append([float(cs.start), float(rs.start), float(cs.stop), float(rs.stop)])
    return boxes


def masks_from_labels(labels: np.ndarray, min_area_px: int = 1) -> dict[int, np.ndarray]:
    """(H, W) integer label image -> {class id: bool mask} for ids != 0 with >= min_area_px pixels.

    Keys ascend by class id.
    """
    array = _check_2d(labels, "label image")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"label image must hold integer class ids; got dtype {array.dtype}")
    ids, counts = np.unique(array, return_counts=True)
    return {int(i): array == i for i, c in zip(ids, counts, strict=True) if i != 0 and c >= min_area_px}
