"""Ground report keywords on slices: keep a (keyword, class) pair where the class is mentioned AND present.

docs/method.md: per slice, the set intersection of the classes the report's keywords map to and
the classes the slice's segmentation shows; boxes come from the per-class mask of the slice.
Unlike the reference code, EVERY pair is kept: "Lunge beidseits" carries two keywords on one
span (lung_left, lung_right), and a slice showing both lungs yields two rows.

Decisions:
- Negated mentions ("Keine Läsion im Pankreas") are grounded like any other: the negation
  qualifies a finding, not the anatomy the keyword names, and that structure is both mentioned
  and visible, so its box is correct. Rows carry negated=True so a model target can skip
  them, and a slice whose only pairs are negated still counts as grounded.
- A MaskRecord counts only with area_px >= settings.min_area_px (the segment stage may have
  used a lower threshold); the same rule fills SliceRecord.classes_present.
- per_component_boxes: one row per connected component (8-connectivity) of >= min_area_px
  pixels, each with its own RLE and box; a class fragmented into specks that are each below
  the threshold falls back to one row for the whole class mask.
- Row order: image_id, language (the report's first, then its translation), sentence_index,
  keyword_start, keyword_end, class_id, then component order.

Pure functions over in-memory records; the stage that reads and writes tables wires them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radground import masks as rmask
from radground.errors import RadgroundError
from radground.labels import label_map
from radground.schemas import GroundingRecord, KeywordItem, MaskRecord, ReportRecord, SliceRecord, VQARecord
from radground.settings import GroundingSettings, VQASettings
from tasks.curate.vqa import slice_vqa

logger = logging.getLogger(__name__)

_OTHER_LANGUAGE = {"de": "en", "en": "de"}


class GroundingError(RadgroundError):
    """The masks and the report handed to grounding do not belong together."""


def mask_records(labels: np.ndarray, *, image_ids: Sequence[str], series_uid: str, study_uid: str, drop_id: str,
                 backend: str, min_area_px: int) -> list[MaskRecord]:
    """(S, H, W) class-id masks of one series -> one MaskRecord per (slice, class) with >= min_area_px pixels.

    Order: slice order of image_ids, then class id.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[0] != len(image_ids):
        raise ValueError(f"series {series_uid}: labels must be (S, H, W) with S = {len(image_ids)} image ids; "
                         f"got shape {labels.shape}")
    lm = label_map()
    _, rows, cols = labels.shape
    out = []
    for image_id, plane in zip(image_ids, labels, strict=True):
        for class_id, mask in rmask.masks_from_labels(plane, min_area_px).items():
            out.append(MaskRecord(image_id=image_id, series_uid=series_uid, study_uid=study_uid, drop_id=drop_id,
                                  class_id=class_id, class_name=lm.by_id(class_id).name, area_px=int(mask.sum()),
                                  bbox=rmask.bbox_of(mask), rle=rmask.encode_rle(mask), rows=rows, cols=cols,
                                  backend=backend))
    return out


@dataclass(frozen=True)
class _Mention:
    language: str
    rank: int  # 0: the report's language, 1: its translation
    sentence_index: int
    sentence: str
    keyword: KeywordItem


def _mentions(report: ReportRecord) -> list[_Mention]:
    other = _OTHER_LANGUAGE[report.language]
    out = []
    for s in report.sentences:
        out += [_Mention(report.language, 0, s.index, s.text, k) for k in s.keywords]
        if s.translation is not None:
            out += [_Mention(other, 1, s.index, s.translation, k) for k in s.translation_keywords]
    return out


def _index_masks(report: ReportRecord, masks: Sequence[MaskRecord], min_area_px: int
                 ) -> dict[str, dict[int, MaskRecord]]:
    """image_id -> {class id: its mask} for present classes; rejects masks of another study or duplicates."""
    by_slice: dict[str, dict[int, MaskRecord]] = {}
    seen: dict[tuple[str, int], MaskRecord] = {}
    for m in masks:
        if m.study_uid != report.study_uid:
            raise GroundingError(f"study {report.study_uid}: mask of image {m.image_id} belongs to study "
                                 f"{m.study_uid}; pass only the masks of the report's own study.")
        classes = by_slice.setdefault(m.image_id, {})
        if (first := seen.setdefault((m.image_id, m.class_id), m)) is not m:
            raise GroundingError(f"study {report.study_uid}: image {m.image_id} has two masks of class "
                                 f"{m.class_name} ({first.backend}, {m.backend}); expected one MaskRecord per "
                                 "(slice, class). Deduplicate the segment table first.")
        if m.area_px >= min_area_px:
            classes[m.class_id] = m
    return by_slice


def _boxes(m: MaskRecord, settings: GroundingSettings) -> list[tuple[list[float], str, int]]:
    """(bbox, rle, area) per box to emit for one class on one slice."""
    whole = [(list(m.bbox), m.rle, m.area_px)]
    if not settings.per_component_boxes:
        return whole
    parts = rmask.components(rmask.decode_rle(m.rle, m.rows, m.cols), settings.min_area_px)
    if not parts:
        return whole
    return [(rmask.bbox_of(p), rmask.encode_rle(p), int(p.sum())) for p in parts]


def ground_study(report: ReportRecord, masks: Sequence[MaskRecord], settings: GroundingSettings, *,
                 patient_pseudonym: str, modality: str, image_ids: Sequence[str] | None = None,
                 vqa_settings: VQASettings | None = None
                 ) -> tuple[list[GroundingRecord], list[SliceRecord], list[VQARecord]]:
    """Ground one study's report on its slices: (groundings, kept slices, slice VQA items).

    ``masks`` are all MaskRecords of the study's slices (any number of series). ``image_ids``
    lists every slice of the study, so that slices without any mask can enter the ungrounded
    sample; by default the slices named by ``masks``. ``vqa_settings`` seeds and caps the
    slice VQA (default VQASettings()).
    """
    if modality not in ("CT", "MR"):
        raise GroundingError(f"study {report.study_uid}: modality {modality!r} is not supported; expected 'CT' or 'MR'")
    if patient_pseudonym != report.patient_pseudonym:
        raise GroundingError(f"study {report.study_uid}: patient_pseudonym {patient_pseudonym} differs from the "
                             f"report's {report.patient_pseudonym}; the report and the images are mis-joined.")
    by_slice = _index_masks(report, masks, settings.min_area_px)
    slice_ids = set(by_slice)
    if image_ids is not None:
        unknown = slice_ids - set(image_ids)
        if unknown:
            raise GroundingError(f"study {report.study_uid}: {len(unknown)} masked slices are missing from "
                                 f"image_ids (e.g. {min(unknown)}); pass every slice of the study or none.")
        slice_ids |= set(image_ids)
    drop_of = {m.image_id: m.drop_id for m in masks}
    mentions = _mentions(report)
    component_cache: dict[tuple[str, int], list[tuple[list[float], str, int]]] = {}

    rows: list[tuple[tuple, GroundingRecord]] = []
    for image_id in sorted(slice_ids):
        present = by_slice.get(image_id, {})
        for mention in mentions:
            k = mention.keyword
            m = present.get(k.class_id)
            if m is None:  # mentioned but not on this slice: dropped (the intersection)
                continue
            boxes = component_cache.setdefault((image_id, m.class_id), _boxes(m, settings))
            for n, (bbox, rle, area) in enumerate(boxes):
                key = (image_id, mention.rank, mention.sentence_index, k.start, k.end, k.class_id, n)
                rows.append((key, GroundingRecord(
                    image_id=image_id, study_uid=report.study_uid, patient_pseudonym=patient_pseudonym,
                    drop_id=m.drop_id, language=mention.language, sentence_index=mention.sentence_index,
                    sentence=mention.sentence, keyword=k.keyword, keyword_start=k.start, keyword_end=k.end,
                    negated=k.negated, class_id=m.class_id, class_name=m.class_name, bbox=bbox, rle=rle,
                    area_px=area, rows=m.rows, cols=m.cols)))
    rows.sort(key=lambda r: r[0])
    groundings = [r for _, r in rows]

    grounded = {g.image_id for g in groundings}
    others = sorted(slice_ids - grounded)
    rng = random.Random(f"{settings.seed}:{report.study_uid}")
    sampled = set(rng.sample(others, int(settings.ungrounded_sample * len(others) + 0.5)))
    kept = sorted(grounded | sampled)

    languages = [report.language]
    if any(s.translation is not None for s in report.sentences):
        languages.append(_OTHER_LANGUAGE[report.language])
    vqa_settings = vqa_settings or VQASettings()
    slices, vqa = [], []
    for image_id in kept:
        present = [m.class_name for _, m in sorted(by_slice.get(image_id, {}).items())]
        drop_id = drop_of.get(image_id, report.drop_id)
        slices.append(SliceRecord(image_id=image_id, study_uid=report.study_uid, drop_id=drop_id,
                                  grounded=image_id in grounded, classes_present=present))
        for language in languages:
            vqa += slice_vqa(present, image_id=image_id, study_uid=report.study_uid,
                             patient_pseudonym=patient_pseudonym, drop_id=drop_id, language=language,
                             modality=modality, settings=vqa_settings)
    logger.debug("ground study %s: %d/%d slices grounded, %d ungrounded sampled, %d pairs, %d vqa items",
                 report.study_uid, len(grounded), len(slice_ids), len(sampled), len(groundings), len(vqa))
    return groundings, slices, vqa
