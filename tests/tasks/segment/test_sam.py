"""SAM refinement on a tiny random SAM (CPU, seconds); a real checkpoint only when configured."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from radground.settings import SegmentationSettings, load_settings
from tasks.segment.base import SegmentationError, SeriesVolume, check_mask
from tasks.segment.sam import SamRefiner, bounding_box, box_probabilities, render_slice

H, W = 48, 80  # non-square: SAM's longest-side resize gives a 38 x 64 input frame, padded to 64 x 64
LIVER, AORTA, KIDNEY_RIGHT = 5, 52, 2


def tiny_sam(seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    return Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                      out_chans=16, window_size=0),
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=16, transformer=TwoWayTransformer(
            depth=1, embedding_dim=16, mlp_dim=32, num_heads=2), num_multimask_outputs=3, iou_head_hidden_dim=16),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_case() -> tuple[SeriesVolume, np.ndarray]:
    """Slice 0: liver + aorta; slice 1: liver, aorta, kidney; slice 2: nothing. Ellipses, not
    rectangles, so a refined mask filling its whole box never equals the coarse mask."""
    hu = np.full((3, H, W), -1000, dtype=np.int16)
    coarse = np.zeros((3, H, W), dtype=np.uint8)
    for k in range(3):
        body = ellipse(24, 40, 22, 38)
        hu[k][body] = 40
        if k < 2:
            coarse[k][ellipse(20, 22, 10, 14)] = LIVER
            coarse[k][ellipse(30, 40, 6, 6)] = AORTA  # its box overlaps the liver's
            hu[k][coarse[k] == AORTA] = 300
        if k == 1:
            coarse[k][ellipse(22, 66, 7, 6)] = KIDNEY_RIGHT
    volume = SeriesVolume(image_ids=("a", "b", "c"), modality="CT", values=hu,
                          orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                          positions=np.array([[0.0, 0.0, z] for z in (0.0, 5.0, 10.0)]), spacing=(1.0, 1.0))
    return volume, coarse


def settings(**kw) -> SegmentationSettings:
    return SegmentationSettings(device="cpu", **kw)


class BoxPromptEncoder(torch.nn.Module):
    """Passes the (B, 4) boxes, already in SAM's input frame, on as the 'sparse embedding'."""

    def forward(self, points, boxes, masks):
        return boxes, torch.zeros(1)

    def get_dense_pe(self):
        return torch.zeros(1)


class BoxDecoder(torch.nn.Module):
    """Logits +10 exactly inside each prompted box of the 64 x 64 input frame, -10 outside; or a
    constant per prompt (``constant``) to force every box completely 'on' with a chosen probability."""

    def __init__(self, constant: list[float] | None = None) -> None:
        super().__init__()
        self.constant = constant

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        boxes = sparse_prompt_embeddings  # (B, 4) x0, y0, x1, y1 in the input frame
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        out = []
        for b, (x0, y0, x1, y1) in enumerate(boxes):
            if self.constant is not None:
                out.append(torch.full((64, 64), self.constant[b]))
            else:
                inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
                out.append(torch.where(inside, 10.0, -10.0))
        return torch.stack(out)[:, None], torch.ones(len(boxes), 1)  # (B, 1, 64, 64), (B, 1)


def box_model(constant: list[float] | None = None) -> Sam:
    model = tiny_sam()
    model.prompt_encoder = BoxPromptEncoder()
    model.mask_decoder = BoxDecoder(constant)
    return model


def box_region(mask: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = bounding_box(mask)
    region = np.zeros_like(mask, dtype=bool)
    region[y0:y1 + 1, x0:x1 + 1] = True
    return region


def test_output_lies_on_the_input_grid_and_inside_each_prompt_box():
    volume, coarse = make_case()
    out, stats = SamRefiner(settings(sam_min_iou=0.0), model=tiny_sam()).refine(volume, coarse)
    assert out.shape == volume.values.shape and out.dtype == np.uint8
    check_mask(volume, out, "sam")
    assert stats == {"slices": 2, "prompts": 5, "kept_refined": 5, "kept_coarse": 0}
    assert not out[2].any()  # no coarse class, nothing added
    for k in range(2):
        assert set(np.unique(out[k])) <= set(np.unique(coarse[k]))  # no new class
        for c in np.unique(out[k])[1:]:
            assert not (out[k] == c)[~box_region(coarse[k] == c)].any(), f"class {c} leaves its box"


def test_full_box_masks_are_clipped_to_the_box_and_overlaps_go_to_the_likelier_class():
    # Every prompt's mask is the whole image; liver p = sigmoid(1), aorta p = sigmoid(2) on slice 0.
    volume, coarse = make_case()
    volume = SeriesVolume(volume.image_ids[:1], "CT", volume.values[:1], volume.orientation,
                          volume.positions[:1], volume.spacing)
    coarse = coarse[:1]
    liver, aorta = box_region(coarse[0] == LIVER), box_region(coarse[0] == AORTA)
    assert (liver & aorta).any()  # the boxes overlap: the case under test
    out, _ = SamRefiner(settings(sam_min_iou=0.0), model=box_model([1.0, 2.0])).refine(volume, coarse)
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[liver] = LIVER
    expected[aorta] = AORTA  # higher probability wins where the boxes overlap
    np.testing.assert_array_equal(out[0], expected)
    out, _ = SamRefiner(settings(sam_min_iou=0.0), model=box_model([2.0, 1.0])).refine(volume, coarse)
    assert np.all(out[0][liver & aorta] == LIVER)
    # Logit 0.3 is p = 0.57 (in), logit -0.3 is p = 0.43 (out); thresholding logits at 0.5 would drop both.
    out, _ = SamRefiner(settings(sam_min_iou=0.0), model=box_model([0.3, -0.3])).refine(volume, coarse)
    np.testing.assert_array_equal(out[0], np.where(liver, LIVER, 0))


def test_min_iou_zero_keeps_refined_and_one_keeps_every_coarse_mask():
    volume, coarse = make_case()
    _, stats = SamRefiner(settings(sam_min_iou=0.0), model=tiny_sam()).refine(volume, coarse)
    assert (stats["kept_refined"], stats["kept_coarse"]) == (5, 0)
    # IoU 1.0 would need the refined ellipse to match pixel for pixel; a random model never does.
    out, stats = SamRefiner(settings(sam_min_iou=1.0), model=tiny_sam()).refine(volume, coarse)
    assert (stats["kept_refined"], stats["kept_coarse"]) == (0, 5)
    np.testing.assert_array_equal(out, coarse)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_one_embedding_per_slice_and_ceil_classes_over_batch_decoder_calls(batch_size):
    volume, coarse = make_case()
    model = tiny_sam()
    events: list[str] = []
    model.image_encoder.register_forward_hook(lambda *_: events.append("embed"))
    model.mask_decoder.register_forward_hook(lambda *_: events.append("decode"))
    SamRefiner(settings(sam_batch_size=batch_size), model=model).refine(volume, coarse)
    per_slice = [run.count("decode") for run in " ".join(events).split("embed")[1:]]
    classes = [2, 3]  # slice 2 is empty: no embedding at all
    assert per_slice == [math.ceil(n / batch_size) for n in classes]
    assert events.count("embed") == 2


def test_box_prompt_lands_on_the_box_of_the_original_grid():
    # The decoder answers 'inside the box' in SAM's 64 x 64 input frame; after SAM's crop and
    # resize back to 48 x 80 the mask must be the box on the slice grid, within 1 px per edge.
    model = box_model()
    predictor = SamRefiner(settings(), model=model).predictor
    predictor.set_image(np.zeros((H, W, 3), dtype=np.uint8))
    boxes = np.array([[5, 7, 30, 20], [50, 30, 78, 46], [0, 0, W - 1, H - 1]], dtype=np.float32)
    with torch.inference_mode():
        probs = box_probabilities(predictor, boxes, (H, W))
    assert probs.shape == (3, H, W)
    yy, xx = np.mgrid[:H, :W]
    for box, prob in zip(boxes, probs, strict=True):
        got = np.array(bounding_box(prob >= 0.5))
        assert np.all(np.abs(got - box) <= 1), f"box {box} came back as {got}"
        x0, y0, x1, y1 = box
        inner = (xx >= x0 + 1) & (xx <= x1 - 1) & (yy >= y0 + 1) & (yy <= y1 - 1)
        outer = (xx >= x0 - 1) & (xx <= x1 + 1) & (yy >= y0 - 1) & (yy <= y1 + 1)
        # Filled: all of the box but its 1 px rim is in; nothing beyond the rim (bilinear
        # upsampling may round off corners, hence no exact rectangle).
        assert np.all(prob[inner] >= 0.5) and not np.any(prob[~outer] >= 0.5)


def test_box_prompt_end_to_end_gives_the_coarse_box():
    volume, coarse = make_case()
    out, _ = SamRefiner(settings(sam_min_iou=0.0), model=box_model()).refine(volume, coarse)
    for c in (LIVER, KIDNEY_RIGHT):  # the aorta takes at most a 1 px strip of the liver's box
        box = box_region(coarse[1] == c)
        x0, y0, x1, y1 = bounding_box(box)
        assert not (out[1] == c)[~box].any()
        assert np.count_nonzero(box & (out[1] != c)) <= 2 * (x1 - x0 + y1 - y0 + 2)  # 1 px per edge


def test_render_slice_maps_ct_windows_and_mr_grey():
    hu = np.array([[-1000, 40], [80, 3000]], dtype=np.int16)
    rgb = render_slice(hu, "CT")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    # lung: (HU + 1225) / 2250; soft: (HU + 135) / 350; brain: HU / 80; times 255, rounded.
    # atol 1: x.5 values (lung 25.5 at -1000 HU) may round either way in float32.
    np.testing.assert_allclose(rgb[0, 1], [1265 / 2250 * 255, 175 / 350 * 255, 127.5], atol=1)
    np.testing.assert_allclose(rgb[0, 0], [225 / 2250 * 255, 0, 0], atol=1)
    np.testing.assert_array_equal(rgb[1, 1], [255, 255, 255])
    mr = render_slice(np.array([[100, 300]], dtype=np.uint16), "MR")
    np.testing.assert_array_equal(mr, [[[0, 0, 0], [255, 255, 255]]])
    with pytest.raises(SegmentationError, match="expected CT or MR"):
        render_slice(hu, "PT")


def test_wrong_grid_is_rejected():
    volume, coarse = make_case()
    with pytest.raises(SegmentationError, match="differs from the series' pixel grid"):
        SamRefiner(settings(), model=tiny_sam()).refine(volume, coarse[:, :, :-1])


def test_missing_checkpoint_names_the_setting(tmp_path):
    with pytest.raises(SegmentationError, match=r"segmentation\.sam_checkpoint is not set.*"
                                                r"RADGROUND_SEGMENTATION__SAM_CHECKPOINT"):
        SamRefiner(settings())
    with pytest.raises(SegmentationError, match=r"segmentation\.sam_checkpoint = .*nope\.pth does not exist"):
        SamRefiner(settings(sam_checkpoint=tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SegmentationError, match=r"cannot be read as a torch state dict"):
        SamRefiner(settings(sam_checkpoint=garbage))


def test_checkpoint_loads_through_the_registry_and_a_mismatch_names_sam_model(tmp_path, monkeypatch):
    import segment_anything

    # The registry builds the tiny architecture instead of vit_b: loading, not size, is under test.
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam(seed=0))
    path = tmp_path / "tiny.pth"
    trained = tiny_sam(seed=1)
    torch.save(trained.state_dict(), path)
    loaded = SamRefiner(settings(sam_checkpoint=path, sam_model="vit_b")).model
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1)}, path)
    with pytest.raises(SegmentationError, match=r"does not fit segmentation\.sam_model = 'vit_b'"):
        SamRefiner(settings(sam_checkpoint=path, sam_model="vit_b"))


def test_cuda_without_a_device_is_rejected_before_loading():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the error path needs a host without one")
    with pytest.raises(SegmentationError, match="segmentation.device = 'cuda'"):
        SamRefiner(SegmentationSettings(device="cuda"), model=tiny_sam())


def _configured_checkpoint():
    return load_settings().segmentation.sam_checkpoint


@pytest.mark.slow
@pytest.mark.skipif(_configured_checkpoint() is None,
                    reason="no SAM checkpoint configured (set RADGROUND_SEGMENTATION__SAM_CHECKPOINT)")
def test_real_checkpoint_tightens_an_oversized_coarse_mask():
    configured = load_settings().segmentation
    refiner = SamRefiner(SegmentationSettings(sam_checkpoint=configured.sam_checkpoint,
                                              sam_model=configured.sam_model, device=configured.device,
                                              sam_min_iou=0.3))
    yy, xx = np.mgrid[:128, :160]
    truth = (yy - 64) ** 2 + (xx - 80) ** 2 <= 20 ** 2  # a bright 300 HU disk in 40 HU tissue
    hu = np.where(truth, 300, 40).astype(np.int16)[None]
    coarse = ((yy - 64) ** 2 + (xx - 80) ** 2 <= 26 ** 2).astype(np.uint8)[None] * AORTA  # 6 px too wide
    volume = SeriesVolume(("x",), "CT", hu, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), np.zeros((1, 3)), (1.0, 1.0))
    out, stats = refiner.refine(volume, coarse)
    assert stats["prompts"] == 1 and out.shape == coarse.shape

    def iou(a, b):
        return np.count_nonzero(a & b) / np.count_nonzero(a | b)

    assert iou(out[0] == AORTA, truth) > iou(coarse[0] == AORTA, truth)
