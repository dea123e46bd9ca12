"""Tests for tasks/ground.py: mask rows, the mention x presence intersection, every pair kept, sampling, VQA."""

from __future__ import annotations

import numpy as np
import pytest

from radground.labels import label_map
from radground.masks import decode_rle
from radground.schemas import KeywordItem, MaskRecord, ReportRecord, SentenceItem
from radground.settings import GroundingSettings
from tasks.ground import GroundingError, ground_study, mask_records

STUDY, SERIES, DROP, PSN = "2.25.900", "2.25.901", "2026-11-A", "PSN-3"
A, B, C = "2.25.901.1", "2.25.901.2", "2.25.901.3"
LUNG_L, LUNG_R, KIDNEY_R, LIVER, SPLEEN = (label_map().by_name(n).id for n in
                                           ("lung_left", "lung_right", "kidney_right", "liver", "spleen"))


def kw(text: str, span: str, class_name: str, negated: bool = False) -> KeywordItem:
    start = text.index(span)
    return KeywordItem(keyword=span, class_name=class_name, class_id=label_map().by_name(class_name).id,
                       start=start, end=start + len(span), negated=negated)


def sentence(index: int, text: str, keywords: list[tuple], translation: str | None = None,
             translation_keywords: list[tuple] = ()) -> SentenceItem:
    return SentenceItem(index=index, section="findings", text=text, start=40 * index, end=40 * index + len(text),
                        keywords=[kw(text, *k) for k in keywords], translation=translation,
                        translation_keywords=[kw(translation, *k) for k in translation_keywords])


def report(*, translated: bool = True, extra: list[SentenceItem] = ()) -> ReportRecord:
    t = (lambda s: s) if translated else (lambda s: None)
    sentences = [
        sentence(0, "Lunge beidseits ohne Infiltrate.", [("Lunge", "lung_left"), ("Lunge", "lung_right")],
                 t("Both lungs without infiltrates."),
                 [("lungs", "lung_left"), ("lungs", "lung_right")] if translated else []),
        sentence(1, "Zyste der rechten Niere.", [("rechten Niere", "kidney_right")],
                 t("Cyst of the right kidney."), [("right kidney", "kidney_right")] if translated else []),
        sentence(2, "Leber o.B.", [("Leber", "liver")], t("Liver unremarkable."),
                 [("Liver", "liver")] if translated else []),
        *extra,
    ]
    return ReportRecord(study_uid=STUDY, patient_pseudonym=PSN, drop_id=DROP, language="de",
                        text=" ".join(s.text for s in sentences), redactions=0, sentences=sentences,
                        keyword_backend="lexicon", translation_status="translated" if translated else "not_run")


def volume(liver_blobs: int = 1) -> np.ndarray:
    """(3, 32, 40): A = both lungs, B = left lung + liver, C = spleen only."""
    labels = np.zeros((3, 32, 40), dtype=np.uint8)
    labels[0, 4:20, 2:12] = LUNG_L  # 160 px, box [2, 4, 12, 20]
    labels[0, 6:22, 26:38] = LUNG_R  # 192 px, box [26, 6, 38, 22]
    labels[1, 4:20, 2:12] = LUNG_L
    labels[1, 24:30, 20:30] = LIVER  # 60 px, box [20, 24, 30, 30]
    if liver_blobs == 2:
        labels[1, 2:8, 30:36] = LIVER  # a second, separate 36-px island, box [30, 2, 36, 8]
    labels[2, 10:20, 10:20] = SPLEEN
    return labels


def records(labels: np.ndarray, ids: tuple[str, ...] = (A, B, C), min_area_px: int = 10) -> list[MaskRecord]:
    return mask_records(labels, image_ids=ids, series_uid=SERIES, study_uid=STUDY, drop_id=DROP,
                        backend="classical", min_area_px=min_area_px)


def ground(rep: ReportRecord, masks: list[MaskRecord], **settings):
    settings.setdefault("min_area_px", 10)
    settings.setdefault("ungrounded_sample", 0.0)
    return ground_study(rep, masks, GroundingSettings(**settings), patient_pseudonym=PSN, modality="CT")


def pairs(groundings, language: str = "de") -> set[tuple[str, str]]:
    return {(g.image_id, g.class_name) for g in groundings if g.language == language}


# ----------------------------------------------------------------------------- mask_records
def test_mask_records_rows_areas_boxes() -> None:
    labels = volume()
    labels[2, 0, 0] = KIDNEY_R  # one stray pixel: below min_area_px, no row
    rows = records(labels)
    # slice order, then class id (liver 5 < lung_left 118)
    assert [(r.image_id, r.class_name) for r in rows] == [(A, "lung_left"), (A, "lung_right"), (B, "liver"),
                                                          (B, "lung_left"), (C, "spleen")]
    boxes = {(r.image_id, r.class_name): r.bbox for r in rows}
    assert boxes[(A, "lung_left")] == [2.0, 4.0, 12.0, 20.0]
    assert boxes[(A, "lung_right")] == [26.0, 6.0, 38.0, 22.0]
    assert boxes[(B, "liver")] == [20.0, 24.0, 30.0, 30.0]
    for r in rows:
        plane = labels[(A, B, C).index(r.image_id)]
        assert r.area_px == int(np.count_nonzero(plane == r.class_id))
        np.testing.assert_array_equal(decode_rle(r.rle, r.rows, r.cols), plane == r.class_id)
        assert (r.rows, r.cols, r.series_uid, r.backend) == (32, 40, SERIES, "classical")


def test_mask_records_rejects_id_count_mismatch() -> None:
    with pytest.raises(ValueError, match=r"S = 2 image ids; got shape \(3, 32, 40\)"):
        records(volume(), ids=(A, B))


# ----------------------------------------------------------------------------- intersection
def test_every_pair_kept_and_absent_classes_dropped() -> None:
    groundings, slices, _ = ground(report(), records(volume()))
    assert pairs(groundings) == {(A, "lung_left"), (A, "lung_right"), (B, "lung_left"), (B, "liver")}
    a_lungs = [g for g in groundings if g.image_id == A and g.language == "de"]
    assert [(g.keyword, g.keyword_start, g.class_name) for g in a_lungs] == [
        ("Lunge", 0, "lung_left"), ("Lunge", 0, "lung_right")]  # both sides of one span, the reference keeps one
    assert not any(g.class_name == "kidney_right" for g in groundings)  # mentioned, never segmented
    assert not any(g.image_id == C for g in groundings)  # segmented spleen, never mentioned
    assert [(s.image_id, s.grounded) for s in slices] == [(A, True), (B, True)]
    assert [s.classes_present for s in slices] == [["lung_left", "lung_right"], ["liver", "lung_left"]]


def test_rows_carry_the_class_mask_box_and_rle() -> None:
    labels = volume()
    groundings, _, _ = ground(report(), records(labels))
    for g in groundings:
        plane = labels[(A, B, C).index(g.image_id)] == g.class_id
        rows, cols = np.nonzero(plane)
        assert g.bbox == [cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0]
        assert g.area_px == int(plane.sum())
        np.testing.assert_array_equal(decode_rle(g.rle, g.rows, g.cols), plane)
        assert (g.study_uid, g.patient_pseudonym, g.drop_id) == (STUDY, PSN, DROP)


def test_translation_keywords_ground_in_the_other_language() -> None:
    groundings, _, _ = ground(report(), records(volume()))
    assert pairs(groundings, "en") == pairs(groundings, "de")
    en = [g for g in groundings if g.language == "en" and g.image_id == B]
    assert [(g.sentence, g.keyword, g.class_name) for g in en] == [
        ("Both lungs without infiltrates.", "lungs", "lung_left"), ("Liver unremarkable.", "Liver", "liver")]
    untranslated, _, _ = ground(report(translated=False), records(volume()))
    assert {g.language for g in untranslated} == {"de"}


def test_output_order() -> None:
    groundings, _, _ = ground(report(), records(volume()))
    keys = [(g.image_id, g.language != "de", g.sentence_index, g.keyword_start, g.class_id) for g in groundings]
    assert keys == sorted(keys)
    again, _, _ = ground(report(), list(reversed(records(volume()))))
    assert again == groundings


def test_negated_mentions_are_kept_and_flagged() -> None:
    text = "Keine Infiltrate in der Leber."
    rep = report(translated=False, extra=[sentence(3, text, [("Leber", "liver", True)])])
    groundings, slices, _ = ground(rep, records(volume()))
    liver = [g for g in groundings if g.class_name == "liver"]
    assert [(g.sentence_index, g.negated) for g in liver] == [(2, False), (3, True)]
    only_negated = ReportRecord(**{**rep.model_dump(), "sentences": [sentence(0, text, [("Leber", "liver", True)])]})
    groundings, slices, _ = ground(only_negated, records(volume()))
    assert [(g.image_id, g.negated) for g in groundings] == [(B, True)]
    assert [(s.image_id, s.grounded) for s in slices] == [(B, True)]


def test_min_area_applies_to_mask_records() -> None:
    masks = records(volume(), min_area_px=1)
    groundings, slices, _ = ground(report(), masks, min_area_px=100)  # liver (60 px) no longer counts
    assert pairs(groundings) == {(A, "lung_left"), (A, "lung_right"), (B, "lung_left")}
    assert slices[1].classes_present == ["lung_left"]


# ----------------------------------------------------------------------------- component boxes
def test_per_component_boxes() -> None:
    labels = volume(liver_blobs=2)
    groundings, _, _ = ground(report(translated=False), records(labels), per_component_boxes=True)
    liver = [g for g in groundings if g.class_name == "liver"]
    assert [g.bbox for g in liver] == [[30.0, 2.0, 36.0, 8.0], [20.0, 24.0, 30.0, 30.0]]  # raster order
    assert [g.area_px for g in liver] == [36, 60]
    parts = [decode_rle(g.rle, g.rows, g.cols) for g in liver]
    assert not (parts[0] & parts[1]).any()
    np.testing.assert_array_equal(parts[0] | parts[1], labels[1] == LIVER)
    lungs = [g for g in groundings if g.image_id == A]
    assert len(lungs) == 2  # one component per lung: one row each, as without per-component boxes
    whole, _, _ = ground(report(translated=False), records(labels))
    assert [g.bbox for g in whole if g.class_name == "liver"] == [[20.0, 2.0, 36.0, 30.0]]


def test_per_component_speckles_fall_back_to_the_class_box() -> None:
    labels = np.zeros((1, 20, 20), dtype=np.uint8)
    labels[0, ::2, ::2] = LIVER  # 100 isolated pixels: every component is below min_area_px
    groundings, _, _ = ground(report(translated=False), records(labels, ids=(B,)), per_component_boxes=True)
    assert [(g.bbox, g.area_px) for g in groundings] == [([0.0, 0.0, 19.0, 19.0], 100)]


# ----------------------------------------------------------------------------- sampling
def many_slices(n: int) -> tuple[list[MaskRecord], list[str]]:
    ids = tuple(f"2.25.901.{100 + i}" for i in range(n))
    labels = np.zeros((n, 16, 16), dtype=np.uint8)
    labels[:, 4:12, 4:12] = SPLEEN  # never mentioned: every slice is ungrounded
    labels[0, 0:8, 8:16] = LIVER  # the first slice is grounded
    return records(labels, ids=ids), list(ids)


def kept_ungrounded(masks: list[MaskRecord], **settings) -> list[str]:
    _, slices, _ = ground(report(translated=False), masks, **settings)
    return [s.image_id for s in slices if not s.grounded]


def test_ungrounded_sample_is_seeded() -> None:
    masks, ids = many_slices(30)
    first = kept_ungrounded(masks, ungrounded_sample=0.3, seed=4)
    assert len(first) == 9 and set(first) <= set(ids[1:]) and first == sorted(first)
    assert kept_ungrounded(list(reversed(masks)), ungrounded_sample=0.3, seed=4) == first
    others = [kept_ungrounded(masks, ungrounded_sample=0.3, seed=s) for s in range(5, 9)]
    assert any(o != first for o in others)
    assert kept_ungrounded(masks, ungrounded_sample=0.0) == []
    assert kept_ungrounded(masks, ungrounded_sample=1.0) == ids[1:]
    _, slices, _ = ground(report(translated=False), masks, ungrounded_sample=1.0)
    assert [s.grounded for s in slices] == [True] + [False] * 29
    assert {tuple(s.classes_present) for s in slices[1:]} == {("spleen",)}


def test_slices_without_masks_can_be_sampled() -> None:
    masks = records(volume())
    _, slices, _ = ground_study(report(), masks, GroundingSettings(ungrounded_sample=1.0, min_area_px=10),
                                patient_pseudonym=PSN, modality="CT", image_ids=[A, B, C, "2.25.901.9"])
    assert [(s.image_id, s.grounded, s.classes_present) for s in slices][2:] == [
        (C, False, ["spleen"]), ("2.25.901.9", False, [])]


# ----------------------------------------------------------------------------- slice VQA
def test_slice_vqa_for_kept_slices() -> None:
    groundings, slices, vqa = ground(report(), records(volume()), ungrounded_sample=1.0)
    kept = {s.image_id for s in slices}
    assert kept == {A, B, C}
    assert {(v.image_id, v.language) for v in vqa} == {(i, lang) for i in kept for lang in ("de", "en")}
    for s in slices:
        yes = {v.class_name for v in vqa if v.image_id == s.image_id and v.question_type == "closed"
               and v.answer in ("yes", "Ja")}
        assert yes == set(s.classes_present)
    _, _, german_only = ground(report(translated=False), records(volume()))
    assert {v.language for v in german_only} == {"de"} and {v.image_id for v in german_only} == {A, B}


# ----------------------------------------------------------------------------- errors
def test_rejects_masks_of_another_study() -> None:
    masks = records(volume())
    masks[0] = masks[0].model_copy(update={"study_uid": "2.25.999"})
    with pytest.raises(GroundingError, match="belongs to study 2.25.999; pass only the masks"):
        ground(report(), masks)


def test_rejects_duplicate_masks() -> None:
    masks = records(volume())
    with pytest.raises(GroundingError, match="has two masks of class lung_left"):
        ground(report(), masks + [masks[0].model_copy(update={"backend": "sam"})])


def test_rejects_mismatched_pseudonym_and_modality() -> None:
    with pytest.raises(GroundingError, match="differs from the report's PSN-3"):
        ground_study(report(), [], GroundingSettings(), patient_pseudonym="PSN-4", modality="CT")
    with pytest.raises(GroundingError, match="modality 'US' is not supported"):
        ground_study(report(), [], GroundingSettings(), patient_pseudonym=PSN, modality="US")


def test_masked_slice_missing_from_image_ids() -> None:
    with pytest.raises(GroundingError, match="missing from image_ids"):
        ground_study(report(), records(volume()), GroundingSettings(), patient_pseudonym=PSN, modality="CT",
                     image_ids=[A])
