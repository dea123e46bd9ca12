"""Tests for radground/masks.py: RLE round trips, the exclusive box convention, components."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from radground.masks import (
    bbox_of,
    component_boxes,
    components,
    decode_rle,
    encode_rle,
    masks_from_labels,
    rle_area,
)


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    single = np.zeros((5, 9), dtype=bool)
    single[3, 6] = True
    return [
        np.zeros((4, 4), dtype=bool),  # empty
        np.ones((6, 3), dtype=bool),  # full, non-square
        single,  # one pixel
        rng.random((17, 31)) < 0.5,  # noise: many short runs
        rng.random((64, 48)) < 0.05,  # sparse
        np.pad(np.ones((10, 20), dtype=bool), ((3, 40), (7, 1))),  # one block, tall
    ]


@pytest.mark.parametrize("mask", _cases(), ids=["empty", "full", "single", "noise", "sparse", "block"])
def test_rle_round_trip(mask: np.ndarray) -> None:
    counts = encode_rle(mask)
    assert isinstance(counts, str)
    back = decode_rle(counts, *mask.shape)
    assert back.dtype == bool and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)
    assert rle_area(counts, *mask.shape) == int(np.count_nonzero(mask))


def test_rle_is_column_major_coco() -> None:
    # Independent check: uncompressed COCO counts are alternating 0/1 runs over the column-major
    # flattening, starting with a 0-run. Compress them with pycocotools' own frPyObjects.
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1] = mask[1, 1] = mask[2, 3] = True
    flat = mask.flatten(order="F").astype(int)  # columns one after another
    runs, value, length = [], 0, 0
    for v in flat:
        if v == value:
            length += 1
        else:
            runs.append(length)
            value, length = v, 1
    runs.append(length)
    compressed = coco_mask.frPyObjects({"size": [3, 4], "counts": runs}, 3, 4)
    assert encode_rle(mask) == compressed["counts"].decode("ascii")


def test_decode_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="RLE size must be positive"):
        decode_rle(encode_rle(np.ones((2, 2), dtype=bool)), 0, 2)


def test_encode_rejects_3d() -> None:
    with pytest.raises(ValueError, match=r"must be 2D \(H, W\); got shape \(2, 2, 2\)"):
        encode_rle(np.ones((2, 2, 2), dtype=bool))


def test_bbox_exclusive_convention() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 7:12] = True  # rows 2..4, columns 7..11
    assert bbox_of(mask) == [7.0, 2.0, 12.0, 5.0]  # x = column, x2/y2 one past the last pixel
    single = np.zeros((4, 4), dtype=bool)
    single[1, 3] = True
    x1, y1, x2, y2 = bbox_of(single)
    assert (x2 - x1, y2 - y1) == (1.0, 1.0) and (x1, y1) == (3.0, 1.0)
    assert bbox_of(np.zeros((3, 3), dtype=bool)) is None
    assert bbox_of(np.ones((3, 5), dtype=bool)) == [0.0, 0.0, 5.0, 3.0]


def test_bbox_matches_random_masks() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((13, 21)) < 0.03
        rows, cols = np.nonzero(mask)
        expected = None if rows.size == 0 else [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert bbox_of(mask) == (None if expected is None else [float(v) for v in expected])


def test_component_boxes_two_blobs() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[10:15, 2:6] = True  # lower-left blob, 20 px
    mask[1:4, 20:28] = True  # upper-right blob, 24 px
    boxes = component_boxes(mask)
    # raster order of each component's first pixel: the upper blob first
    assert boxes == [[20.0, 1.0, 28.0, 4.0], [2.0, 10.0, 6.0, 15.0]]
    parts = components(mask)
    assert [int(np.count_nonzero(p)) for p in parts] == [24, 20]
    assert [bbox_of(p) for p in parts] == boxes
    np.testing.assert_array_equal(np.logical_or.reduce(parts), mask)
    assert component_boxes(mask, min_area_px=21) == [[20.0, 1.0, 28.0, 4.0]]
    assert component_boxes(np.zeros((4, 4), dtype=bool)) == [] and components(np.zeros((4, 4), bool)) == []


def test_components_join_diagonal_neighbours() -> None:
    mask = np.eye(5, dtype=bool)  # a diagonal line: one structure, not five
    assert component_boxes(mask) == [[0.0, 0.0, 5.0, 5.0]]


def test_masks_from_labels_area_threshold() -> None:
    rng = np.random.default_rng(11)
    labels = rng.choice(np.array([0, 1, 5, 118], dtype=np.uint8), size=(24, 40), p=[0.5, 0.3, 0.195, 0.005])
    labels[0, 0] = 118  # at least one pixel of the rare class
    counts = {c: int((labels == c).sum()) for c in (1, 5, 118)}  # independent numpy count
    threshold = counts[118] + 1
    out = masks_from_labels(labels, min_area_px=threshold)
    assert list(out) == sorted(c for c in (1, 5) if counts[c] >= threshold)
    for class_id, mask in out.items():
        assert mask.dtype == bool
        assert int(mask.sum()) == counts[class_id]
        np.testing.assert_array_equal(mask, labels == class_id)
    assert 118 in masks_from_labels(labels, min_area_px=1)
    assert 0 not in masks_from_labels(labels, min_area_px=1)


def test_masks_from_labels_rejects_floats() -> None:
    with pytest.raises(ValueError, match="integer class ids; got dtype float64"):
        masks_from_labels(np.zeros((2, 2)), 1)
