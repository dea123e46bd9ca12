"""Tests for radground/overlay.py: size, translucent masks, boxes with labels, a PNG that reopens."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from radground.labels import label_map
from radground.overlay import class_colour, render_overlay
from radground.schemas import GroundingRecord, MaskRecord
from tasks.ground import mask_records

H, W, SCALE = 40, 56, 3
IMAGE = "2.25.5.1"
LIVER, SPLEEN = label_map().by_name("liver").id, label_map().by_name("spleen").id


def ct_slice() -> tuple[np.ndarray, np.ndarray, list[MaskRecord]]:
    hu = np.full((H, W), 40, dtype=np.int16)  # soft tissue: mid-grey in the soft-tissue window
    hu[:, :4] = -1000  # air
    labels = np.zeros((1, H, W), dtype=np.uint8)
    labels[0, 22:36, 30:50] = LIVER
    labels[0, 26:34, 6:14] = SPLEEN
    masks = mask_records(labels, image_ids=[IMAGE], series_uid="2.25.5", study_uid="2.25.4", drop_id="D",
                         backend="classical", min_area_px=1)
    return hu, labels[0], masks


def grounding(mask: MaskRecord, keyword: str) -> GroundingRecord:
    return GroundingRecord(image_id=IMAGE, study_uid="2.25.4", patient_pseudonym="PSN-1", drop_id="D",
                           language="de", sentence_index=0, sentence=f"{keyword} o.B.", keyword=keyword,
                           keyword_start=0, keyword_end=len(keyword), negated=False, class_id=mask.class_id,
                           class_name=mask.class_name, bbox=mask.bbox, rle=mask.rle, area_px=mask.area_px,
                           rows=mask.rows, cols=mask.cols)


def plain_window(hu: np.ndarray) -> np.ndarray:
    """The soft-tissue window computed here, independently: -135..215 HU -> 0..255."""
    return np.round(np.clip((hu.astype(float) + 135.0) / 350.0, 0, 1) * 255).astype(np.uint8)


def test_overlay_png(tmp_path) -> None:
    hu, labels, masks = ct_slice()
    liver = next(m for m in masks if m.class_name == "liver")
    image = render_and_check(hu, masks, [grounding(liver, "Leber")])
    path = tmp_path / "overlay.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.format == "PNG" and reopened.mode == "RGB"
        assert reopened.size == (W * SCALE, H * SCALE)  # PIL size is (width, height)
        rgb = np.asarray(reopened)

    plain = np.kron(plain_window(hu), np.ones((SCALE, SCALE), dtype=np.uint8))  # nearest upscaling
    big = np.kron(labels, np.ones((SCALE, SCALE), dtype=np.uint8))
    # away from the box outline and the legend: mask interiors are tinted, background stays grey
    for class_id, (r, c) in ((LIVER, (30, 35)), (SPLEEN, (31, 9))):
        y, x = r * SCALE + 1, c * SCALE + 1
        assert big[y, x] == class_id
        pixel = rgb[y, x].astype(int)
        assert not (pixel == plain[y, x]).all(), f"class {class_id} not drawn at {(y, x)}"
        assert len(set(pixel.tolist())) > 1  # coloured, not grey
    below = slice(37 * SCALE, H * SCALE), slice(0, W * SCALE)  # under the masks: no mask, box, label or legend
    assert (rgb[below] == plain[below][..., None]).all()
    liver_tint, spleen_tint = rgb[30 * SCALE + 1, 35 * SCALE + 1], rgb[31 * SCALE + 1, 9 * SCALE + 1]
    assert not (liver_tint == spleen_tint).all()  # one colour per class


def render_and_check(hu, masks, groundings) -> Image.Image:
    image = render_overlay(hu, "CT", masks, groundings, language="de", scale=SCALE)
    assert image.size == (W * SCALE, H * SCALE) and image.mode == "RGB"
    return image


def test_box_outline_on_the_exclusive_edge() -> None:
    hu, _, masks = ct_slice()
    liver = next(m for m in masks if m.class_name == "liver")
    rgb = np.asarray(render_overlay(hu, "CT", masks, [grounding(liver, "Leber")], scale=SCALE))
    x1, y1, x2, y2 = (int(v) * SCALE for v in liver.bbox)
    colour = class_colour(liver.class_id)
    assert tuple(rgb[(y1 + y2) // 2, x2 - 1]) == colour  # last pixel column of the box, scaled
    assert tuple(rgb[(y1 + y2) // 2, x2]) != colour  # one past it: outside the outline
    assert tuple(rgb[y2 - 1, (x1 + x2) // 2]) == colour


def test_overlay_is_deterministic_and_mr_works() -> None:
    hu, _, masks = ct_slice()
    a = np.asarray(render_overlay(hu, "CT", masks))
    b = np.asarray(render_overlay(hu, "CT", list(reversed(masks))))
    np.testing.assert_array_equal(a, b)
    mr = np.asarray(render_overlay(np.arange(H * W, dtype=np.uint16).reshape(H, W), "MR", masks, scale=1))
    assert mr.shape == (H, W, 3)


def test_overlay_rejects_masks_of_another_grid() -> None:
    hu, _, masks = ct_slice()
    with pytest.raises(ValueError, match="mask grid 40x56 differs from the pixels' 20x56"):
        render_overlay(hu[:20], "CT", masks)
    with pytest.raises(ValueError, match="modality 'US': expected CT or MR"):
        render_overlay(hu, "US", masks)
